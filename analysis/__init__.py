"""ΔW analysis from run directories. It never imports the model or training code: from `lowrank` it takes only the
run-directory contract `lowrank.rundir.layout` (file names, statuses, the metrics reader), `lowrank.rundir.integrity`
(content hashes, checked on every read), `lowrank.rundir.atomic` (every file it writes), `lowrank.logger`
(`has_wandb_key`), `lowrank.errors` (`fail`: the one-line `error: ...` of every entry point) and the math leaf
`lowrank.linalg` (spectra, subspaces).
tests/unit/analysis/test_analysis_imports.py checks it.

    runs.py              read and check run directories
    variants.py          which method a run is (LoRA, DoRA, PiSSA, ..., full, subspace, imported): one place, from its
                         config, for every label, pairing and pooling rule
    checked_reads.py     their safetensors files: header checks, single tensors read and checked against their hashes
    stream.py            every matrix of every run analysed, one matrix in memory at a time, timed by phase
    amplification.py     the math (with lowrank/linalg/spectra.py, subspace.py): pure functions over tensors
    statistics.py        the aggregation rules: setups (which runs may be pooled), amplification as a ratio of
                         sums, Wilson and stratified-bootstrap intervals; pure functions over arrays and tables
    report.py            `python -m analysis.report ROOT ... --out DIR`: the tables, the figures, report.md
    rank_advice.py, rank_advice_report.py    which rank per module (pure functions), and its table and section
    intrinsic_dim.py     d90 and LoRA's 90 % rank from the runs table
    dynamics.py          the runs' dynamics.csv (rank over training time) as one table
    report_cli.py        its command line, checked before anything is written
    sections.py          a part of the report that raises is left out with one line, not the report
    tables.py            DIR's layout, the CSV writer, markdown tables
    figures/data.py      what each figure plots: pure functions over the tables
    figures/draw.py, figures/style.py    the drawing: one function per figure, one style
    figures/lm.py, figures/params.py     figures 11-13 (causal LMs) and 14-15 (trained numbers, rank dynamics)
    figures/registry.py  every figure with its caption and sweep; the report's figure section
    wandb_sync.py        the `analysis` W&B run

Imports go one way, with no cycle: report -> figures.registry -> figures.draw -> figures.data, figures.style, tables;
figures.data and report -> statistics; report -> stream -> runs -> checked_reads.
"""
