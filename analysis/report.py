"""Analyse every run below one or more roots: the tables, the figures built from them, and report.md.
Its ~460 lines are the report's sections in the order report.md prints them; the math, pooling, figures and
reading of runs live in the modules it calls.

    python -m analysis.report runs [more_roots ...] --out analysis_out

Writes (each file atomically; re-running on the same runs gives identical tables):
  tables/runs.csv             one row per analysed run: run_id, setup, path, flattened config, scalar metrics
  tables/setups.csv           one row per setup (analysis/statistics.py: runs never averaged across setups)
  tables/spectrum.csv         one row per run × matrix: ranks, norms, intruder count
  tables/singular_values.csv  one row per run × matrix × singular value
  tables/subspace.csv         φ(i, j) grids between pairs of runs, with the random-subspace baseline
  tables/amplification.csv    the LoRA paper's Table 7 quantities per run × matrix × r
  tables/rank_advice.csv      per module of the full fine-tuning runs: the rank reaching --energy-share of
                              ‖ΔW‖_F², and the rank a --rank-budget of parameters allows (analysis/rank_advice.py)
  tables/summary.csv          per setup and configuration: the headline metric with its intervals, trainable share,
                              r90, peak memory, tokens/s (analysis/summary.py)
  tables/loss_curves.csv      per setup, configuration and step: train and eval loss over seeds (runs' history.csv)
  rank_pattern.json           those energy ranks as a PEFT rank_pattern (method.rank_pattern=FILE trains with it);
  rank_pattern_budget.json    the budget's ranks; both only where there are full fine-tuning runs
  figures/figN_*              the figures (analysis/figures/registry.py) from those tables, passed in memory
  report.md                   the answer first (the summary table and its findings as sentences), the setups found
                              and their runs, the figures with captions and tables, runs
                              analysed and skipped (with reasons), key numbers per setup, and the analysis' own
                              seconds per phase, peak host RSS and device
  timing.json                 those numbers for programs (benchmarks.analysis_bench); never identical twice, so
                              kept out of tables/
--no-figures writes the tables and the text report only; --wandb logs figures and tables as an `analysis` run
(analysis/wandb_sync.py). The matrices stream (analysis/stream.py): one ΔW and its W0 in memory at a time, each
tensor read and hashed once. A run whose files fail a check (lowrank.rundir.integrity: content hashes, finite values:
headers when runs are collected, each tensor as it is read) is listed as skipped with the reason. A table, section of
report.md or figure that raises is left out with one line on stderr and in report.md, and the rest is written
(analysis/sections.py). Each method is its own configuration (analysis/variants.py: DoRA, ReLoRA, PiSSA, LoRA+,
rsLoRA and imported runs are never pooled or paired with plain LoRA), and every analysis reads ΔW in whichever form a
run stored it (factors, or dense). Bad command-line input, a root without run directories included, exits with
status 2 and one line `error: ...` naming the argument and what would be valid (analysis/report_cli.py).
"""
import argparse
import resource
import time
from pathlib import Path

import pandas as pd
import torch

from lowrank.rundir.atomic import write_json, write_text
from lowrank.errors import fail

from analysis import functional_rank
from analysis import rank_advice as ra
from analysis.rank_advice_report import rank_advice_lines, rank_advice_table
from analysis import runs as runs_mod
from analysis import statistics as st
from analysis.provenance import add_setups, provenance_lines
from analysis.report_cli import parse_args
from analysis.figures.data import prepare, targets_label
from analysis.dynamics import dynamics_table
from analysis.runs import Run, config_keys
from analysis.sections import Sections
from analysis.variants import variants
from analysis.lm_findings import findings, report_lines
from analysis.loss_curves import loss_curves_table, missing_line, read_histories
from analysis.summary import summary_lines, summary_table
from analysis.stream import PHASES, analyse_runs
from lowrank.linalg.subspace import phi_grid, random_phi_grid
from analysis.tables import REPORT_FILE, TIMING_FILE, markdown_table, table_path, write_csv
from analysis.wandb_sync import analysis_run_settings, log_analysis_run

SUBSPACE_COLUMNS = ["run_a", "run_b", "kind", "basis", "side", "layer", "matrix_type", "i", "j", "phi",
                    "random_baseline"]
NO_PAIRS = pd.DataFrame(columns=["run_a", "run_b", "kind"])
WANDB_TABLES = ["runs", "setups", "spectrum", "amplification"]  # the per-matrix tables; subspace grids stay on disk


def collect_runs(roots):
    """runs.collect_runs with the tensors' bytes left unread: analyse_runs reads, hashes and checks each tensor once,
    as it analyses it, where a full check first would read a 26 GB ΔW twice."""
    return runs_mod.collect_runs(roots, check_data=False)


def lora_setups_runs(table: pd.DataFrame) -> set[str]:
    """Runs that a pair may compare (select_pairs: every pair holds a LoRA run and stays in its setup): those of a
    setup with a LoRA run. Only their top directions are kept for the φ grids."""
    if table.empty:
        return set()
    lora = set(table.setup[table["method.name"] == "lora"])
    return set(table.run_id[table.setup.isin(lora)])


def sigma_rows(results) -> list[pd.DataFrame]:
    """singular_values.csv's rows, one block per matrix: (identity and place) × index × σ."""
    return [pd.DataFrame({**{k: [v] * len(S) for k, v in ident.items()}, "index": range(1, len(S) + 1), "sigma": S})
            for res in results.values() for ident, S in res.sigmas]


def select_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """Pairs of runs to compare, within one setup (the `setup` column, add_setups), of LoRA and its variants; a
    rank or seed pair stays within one variant (analysis.variants: a DoRA run is never paired with a plain LoRA one):
      rank:         same variant, targets and seed, different ranks (run_a has the smaller rank)
      seed:         same variant, targets and rank, different seeds (run_a has the smaller seed)
      lora_vs_full: every run of LoRA or a variant vs the full fine-tuning run with its seed, else the one with the
                    smallest seed (run_a is the LoRA run; only the matrices both stored are compared).
    Returns columns run_a, run_b, kind, sorted."""
    if table.empty:
        return pd.DataFrame(columns=["run_a", "run_b", "kind"])
    t = table.copy()
    for c in ["method.targets", "method.rank"]:
        t[c] = t[c].astype(str) if c in t else "None"  # None/NaN must group like any other value
    t["variant"] = [v.name for v in variants(table)]
    rows = []
    for _, g in t.groupby("setup", sort=True):
        lora = g[g["method.name"] == "lora"].sort_values(["seed", "method.rank", "run_id"]).to_dict("records")
        full = g[g["method.name"] == "full"].sort_values(["seed", "run_id"]).to_dict("records")
        for a in lora:
            for b in lora:
                if a["run_id"] == b["run_id"] or (a["variant"], a["method.targets"]) != (b["variant"],
                                                                                         b["method.targets"]):
                    continue
                ra, rb = int(float(a["method.rank"])), int(float(b["method.rank"]))
                if a["seed"] == b["seed"] and ra < rb:
                    rows.append((a["run_id"], b["run_id"], "rank"))
                if ra == rb and a["seed"] < b["seed"]:
                    rows.append((a["run_id"], b["run_id"], "seed"))
            if full:
                same = [f for f in full if f["seed"] == a["seed"]]
                rows.append((a["run_id"], (same or full)[0]["run_id"], "lora_vs_full"))
    return pd.DataFrame(rows, columns=["run_a", "run_b", "kind"]).sort_values(["kind", "run_a", "run_b"],
                                                                             ignore_index=True)


def subspace_rows(kind: str, run_a: str, run_b: str, bases_a: dict, bases_b: dict) -> list[pd.DataFrame]:
    """φ grids for every matrix both runs stored, on both sides, one block of rows per matrix and side.
    Two runs that both stored factors (LoRA, PiSSA, LoRA+, rsLoRA), compared by rank or seed, use the factors'
    directions (basis 'factor', as the paper); every other pair uses ΔW's own (basis 'delta'): a comparison with
    full fine-tuning, and runs whose ΔW is stored dense (DoRA, ReLoRA), which have no factors."""
    blocks = []
    for name in sorted(set(bases_a) & set(bases_b)):
        a, b = bases_a[name], bases_b[name]
        basis = "factor" if kind in ("rank", "seed") and "factor" in a and "factor" in b else "delta"
        for side, col in (("output", 0), ("input", 1)):
            Ua, Ub = a[basis][col], b[basis][col]
            grid, base = phi_grid(Ua, Ub), random_phi_grid(Ua.shape[1], Ub.shape[1], Ua.shape[0])
            i, j = torch.meshgrid(torch.arange(1, grid.shape[0] + 1), torch.arange(1, grid.shape[1] + 1),
                                  indexing="ij")
            blocks.append(pd.DataFrame({
                "run_a": run_a, "run_b": run_b, "kind": kind, "basis": basis, "side": side, "layer": a["layer"],
                "matrix_type": a["matrix_type"], "i": i.flatten().numpy(), "j": j.flatten().numpy(),
                "phi": grid.flatten().numpy(), "random_baseline": base.flatten().numpy()}))
    return blocks


def _frame(rows: list[dict], sort_keys: list[str], int_cols: list[str]) -> pd.DataFrame:
    """Rows as a table sorted by sort_keys, so that re-runs write identical files."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for c in int_cols:
        df[c] = df[c].astype("Int64")  # nullable: rank is empty for full fine-tuning, not "8.0"
    return df.sort_values(sort_keys, ignore_index=True)


def _setup_lines(setups: pd.DataFrame, not_pooled=()) -> list[str]:
    """report.md's list of setups: what each is and which runs it holds, and the setups split because their runs'
    model or data digests differ (analysis/provenance.py)."""
    lines = [f"## Setups ({len(setups)})", "",
             "A setup is every config key of a run but the seed, the configuration compared (`method.*`, "
             "`trainer.lr`) and the keys that never change results (`runs_root`, `name`, `logger.*`, "
             "`trainer.progress_bar`; `config_hash` covers the rest): runs of different setups are never averaged "
             "together. Figures and tables say which setup each number comes from.", ""]
    if len(setups):
        common = st.common_settings(setups)
        lines += ([f"Common to all: {common}.", ""] if common else [])
        for row in setups.itertuples():
            runs = row.runs.split(" ")
            lines.append(f"- **{row.setup}**" + (f" ({row.label})" if row.label else "") + f": {row.n_runs} run"
                         + ("s" if row.n_runs > 1 else "") + ": " + ", ".join(f"`{r}`" for r in runs))
        lines.append("")
    if not_pooled:
        lines += ["Split because their model or data differ (metrics.json `provenance`):", ""]
        lines += [f"- {line}" for line in not_pooled] + [""]
    return lines


def _runs_lines(table: pd.DataFrame) -> list[str]:
    lines = [f"## Runs analysed ({len(table)})", ""]
    if not len(table):
        return lines
    t = table.sort_values(["setup", "run_id"]).copy()
    t["targets"] = [targets_label(v) for v in t["method.targets"]] if "method.targets" in t else ""
    if "eval_accuracy" in t and "eval_examples" in t:
        lo, hi = st.wilson_interval(t.eval_accuracy.to_numpy(float), t.eval_examples.to_numpy(float))
        t["test-set interval (Wilson 95 %)"] = [f"[{a:.3f}, {b:.3f}]" if pd.notna(a) else "" for a, b in zip(lo, hi)]
    cols = [c for c in ["run_id", "setup", "method.name", "method.rank", "targets", "seed", "variant", "trainer.lr",
                        "eval_examples", "eval_accuracy", "test-set interval (Wilson 95 %)", "config_hash"] if c in t]
    return lines + [markdown_table(t[cols]), ""]


def amplification_summary_table(amps: pd.DataFrame) -> pd.DataFrame:
    """Per setup, configuration (`config`, figure_data.prepare's label), r and matrix type: runs, matrices, mean
    norms, and the amplification as statistics defines it (Σ‖ΔW_r‖_F / Σ‖UᵀWV‖_F), the whole-ΔW ratio of
    sums and the per-matrix median."""
    rows = []
    for key, g in amps.groupby(["setup", "config", "r", "matrix_type"], sort=True):
        rows.append(dict(zip(["setup", "config", "r", "matrix_type"], key)) | {
            "runs": g.run_id.nunique(), "matrices": len(g), "‖ΔW‖_F": g.delta_fro.mean(),
            "‖ΔW_r‖_F": g.delta_top_fro.mean(), "‖UᵀWV‖ ΔW": g.proj_delta.mean(),
            "‖UᵀWV‖ W": g.proj_w.mean(), "‖UᵀWV‖ random": g.proj_random.mean(),
            "amplification Σ‖ΔW_r‖/Σ‖UᵀWV‖": st.amplification_summary(g.delta_top_fro, g.proj_delta),
            "Σ‖ΔW‖/Σ‖UᵀWV‖": st.amplification_summary(g.delta_fro, g.proj_delta),
            "median per matrix": (g.delta_top_fro / g.proj_delta).median()})
    return pd.DataFrame(rows)


def summarise(table, setups, spectrum, subspace, amps, skipped, timing, opts, figures: str = "",
              advice_lines: list[str] = (), sections: Sections | None = None, not_pooled: list[str] = (),
              summary: pd.DataFrame | None = None) -> str:
    """The short report: the answer first (`summary`: analysis/summary.py's table, per setup with its findings as
    sentences), the setups found and their runs, the provenance per setup, the figure section (markdown) if any,
    what was analysed, what was skipped and why, key numbers per setup, the parts left out (`sections`: each part
    that raises here is left out too, with its line), timing. `not_pooled`: analysis.provenance's lines for setups
    split by digests."""
    sections = sections if sections is not None else Sections()
    runs = sections.attempt("configuration labels (analysis/figures/data.py prepare)",
                            lambda: prepare(table).set_index("run_id") if len(table) else None)
    parts = [("summary", lambda: summary_lines(summary, setups) if summary is not None else []),
             ("setups", lambda: _setup_lines(setups, not_pooled)),
             ("provenance", lambda: provenance_lines(table)),
             ("figures", lambda: [figures, ""] if figures else []), ("runs analysed", lambda: _runs_lines(table))]
    lines = ["# ΔW analysis report", "", f"Roots: {', '.join(map(str, opts.roots))}", ""]
    lines += [line for name, make in parts for line in sections.attempt(f"report.md section '{name}'", make, [])]
    lines += [f"## Runs skipped ({len(skipped)})", ""] + [f"- `{r}`: {why}" for r, why in skipped] + [""]
    if runs is not None:
        parts = [("φ(1,1) summary", lambda: _phi_lines(subspace, runs)),
                 ("energy rank of full fine-tuning", lambda: _full_rank_lines(spectrum, runs)),
                 ("per configuration and matrix type", lambda: _spectrum_lines(spectrum, runs, opts)),
                 ("amplification", lambda: _amplification_lines(amps, runs))]
        lines += [line for name, make in parts for line in sections.attempt(f"report.md section '{name}'", make, [])]
    lines += list(advice_lines) + sections.lines()
    return "\n".join(lines + ["## Timing", ""] + [f"- {k}: {v}" for k, v in timing.items()] + [""])


def _phi_lines(subspace: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    if not len(subspace):
        return []
    s = subspace[(subspace.i == 1) & (subspace.j == 1)].copy()
    s["setup"] = runs.setup.loc[s.run_a].values
    s["pair"] = [f"{runs.config[a]} vs {runs.config[b]}" for a, b in zip(s.run_a, s.run_b)]
    g = s.groupby(["setup", "kind", "basis", "pair", "side", "matrix_type"]).agg(
        phi_1_1_median=("phi", "median"), phi_1_1_min=("phi", "min"), phi_1_1_max=("phi", "max"),
        matrices=("phi", "size"), random_baseline=("random_baseline", "mean")).reset_index()
    return ["## φ(·,·,1,1): overlap of the top directions (per setup, over layers and pairs)", "",
            "kind rank: same seed, two ranks; seed: same rank, two seeds; each within LoRA or one of its variants. "
            "Basis 'factor' where both runs stored factors: input side = right singular vectors of A, output side = "
            "left of B; else (lora_vs_full, and DoRA or ReLoRA, whose ΔW is stored dense) basis 'delta', ΔW's own. "
            "Median, min and max over the matrices (layers × pairs).", "", markdown_table(g), ""]


def _with_labels(spectrum: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    return spectrum.assign(setup=runs.setup.loc[spectrum.run_id].values, config=runs.config.loc[spectrum.run_id].values,
                           width=spectrum[["out_features", "in_features"]].min(axis=1))


def _full_rank_lines(spectrum: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    sp = _with_labels(spectrum, runs) if len(spectrum) else spectrum
    full = sp[sp.method == "full"] if len(sp) else sp
    if not len(full):
        return []
    g = full.groupby(["setup", "config", "matrix_type"]).agg(
        r90_mean=("r90", "mean"), r90_min=("r90", "min"), r90_max=("r90", "max"), r50_mean=("r50", "mean"),
        r99_mean=("r99", "mean"), effective_rank=("effective_rank", "mean"),
        stable_rank=("stable_rank", "mean"), runs=("run_id", "nunique"), matrices=("r90", "size"),
        width=("width", "min")).reset_index()
    share = []
    for setup, f in full.groupby("setup"):
        ranks = sorted(sp.loc[(sp.method == "lora") & (sp.setup == setup), "rank"].dropna().unique().tolist())
        share.append(f"{setup}: " + (", ".join(f"r={r}: {(f.r90 <= r).mean():.2f}" for r in ranks) or "no LoRA runs"))
    return ["## Energy rank of full fine-tuning ΔW (per setup, over layers and full runs)", "",
            "width = min(out, in), the largest possible rank. Share of full-FT matrices with r90 ≤ each "
            "LoRA rank of the setup: " + "; ".join(share) + ".", "", markdown_table(g), ""]


def _spectrum_lines(spectrum: pd.DataFrame, runs: pd.DataFrame, opts) -> list[str]:
    if not len(spectrum):
        return []
    g = _with_labels(spectrum, runs).groupby(["setup", "config", "matrix_type"], sort=False).agg(
        r90_mean=("r90", "mean"), effective_rank=("effective_rank", "mean"), stable_rank=("stable_rank", "mean"),
        rel_norm=("rel_norm", "mean"), intruders=("intruders", "mean"), runs=("run_id", "nunique"),
        matrices=("r90", "size")).reset_index()
    g = g.sort_values(["setup", "config", "matrix_type"], key=_config_order(runs), ignore_index=True)
    return [f"## Per setup, configuration and matrix type (means over matrices; intruders: top-{opts.intruder_k} left "
            f"singular vectors, ε = {opts.intruder_eps})", "", markdown_table(g), ""]


def _amplification_lines(amps: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    if not len(amps):
        return []
    g = amplification_summary_table(amps.assign(setup=runs.setup.loc[amps.run_id].values,
                                                config=runs.config.loc[amps.run_id].values))
    g = g.sort_values(["setup", "config", "r", "matrix_type"], key=_config_order(runs), ignore_index=True)
    return ["## Amplification (LoRA paper Table 7: ‖UᵀWV‖_F for U, V from ΔW / W / random)", "",
            "Norms are means over the matrices (layers × runs). The amplification is the ratio of their sums "
            "(so the columns divide to it), with ΔW's top-r part ‖ΔW_r‖_F on top so that full fine-tuning (ΔW "
            "of full rank) and LoRA (ΔW_r = ΔW) are alike; never the mean of per-matrix ratios, which one "
            "near-zero projection can dominate. Σ‖ΔW‖/Σ‖UᵀWV‖ uses the whole ΔW (the same for LoRA).", "",
            markdown_table(g), ""]


def _config_order(runs: pd.DataFrame):
    """A sort key for tables with a `config` column: configurations in figure order (full first)."""
    order = runs.drop_duplicates("config").set_index("config")["order"]

    def key(col: pd.Series) -> pd.Series:
        return col.map(lambda c: order.get(c, (9,))) if col.name == "config" else col
    return key


def progress(line: str) -> None:
    """One line of progress while the report is computed (a full fine-tuning run takes seconds to minutes)."""
    print(f"analysis: {line}", flush=True)


def run_report(opts) -> dict:
    """Compute every table for the runs below opts.roots and write them under opts.out. Returns the tables."""
    t_start = time.perf_counter()
    opts = argparse.Namespace(**vars(opts))  # a copy: the default amp_ranks below depend on the runs found
    runs, table, skipped = collect_runs(opts.roots)
    default_ranks = opts.amp_ranks is None
    if default_ranks:  # the LoRA ranks present, so full fine-tuning lines up with them (8 without LoRA runs)
        opts.amp_ranks = sorted({r.rank for r in runs if r.method == "lora"} | {8})  # cut to the runs analysed below
    t_load = time.perf_counter() - t_start
    progress(f"{len(runs)} runs to analyse, {len(skipped)} skipped ({t_load:.1f} s)")
    table_setups = add_setups(table, {k for r in runs for k in config_keys(r)})
    keep = lora_setups_runs(table_setups[0])
    results, failed, stream = analyse_runs(runs, opts, keep)
    for run in runs:
        res = results.get(run.run_id)
        progress(f"{run.run_id}: " + (f"{len(run.names)} matrices, {res.seconds:.1f} s" if res else "skipped while "
                                      "analysing"))
    if failed:  # a file damaged before or since it was checked, or an SVD that failed: skip the run, not the report
        runs = [r for r in runs if r.run_id in results]
        table = table[table.run_id.isin(results)].reset_index(drop=True)
        skipped = sorted(skipped + failed)
    if default_ranks:
        lora_ranks = sorted({r.rank for r in runs if r.method == "lora"}) or [8]
        for res in results.values():
            res.amps = [a for a in res.amps if a["method"] == "lora" or a["r"] in lora_ranks]
    t_runs = time.perf_counter() - t_start - t_load

    if failed:  # setups again over the runs that were analysed
        table_setups = add_setups(table, {k for r in runs for k in config_keys(r)})
    table, setups, not_pooled = table_setups
    sections = Sections()  # a table or section that raises is left out with its line, not the report
    pairs, subspace = sections.attempt("subspace grids (tables/subspace.csv)", lambda: subspace_table(table, results),
                                       (NO_PAIRS, None))
    t_sub = time.perf_counter() - t_start - t_load - t_runs
    progress(f"{len(setups)} setups; subspace grids of {len(pairs)} pairs ({t_sub:.1f} s)")

    keys = ["run_id", "layer", "matrix_type"]
    spectrum = _frame([r for v in results.values() for r in v.spectrum], keys,
                      ["rank", "r50", "r90", "r99", "intruders"])
    blocks_sv = sigma_rows(results)
    sigmas = _frame(pd.concat(blocks_sv, ignore_index=True) if blocks_sv else [], keys + ["index"], ["rank"])
    amps = _frame([r for v in results.values() for r in v.amps], keys + ["r"], ["rank"])
    table = table.sort_values("run_id", ignore_index=True) if len(table) else table

    advice, advice_info = sections.attempt(
        "rank advice (tables/rank_advice.csv, rank_pattern*.json)",
        lambda: rank_advice_table(runs, results, getattr(opts, "energy_share", ra.DEFAULT_SHARE),
                                  getattr(opts, "rank_budget", None)), (None, {}))
    out = Path(opts.out)
    for file, pattern in advice_info.get("patterns", {}).items():
        write_json(out / file, pattern)
    tables = {"runs": table, "setups": setups, "spectrum": spectrum, "singular_values": sigmas,
              "subspace": subspace, "amplification": amps, "rank_advice": advice,
              "dynamics": sections.attempt("rank dynamics (tables/dynamics.csv)", lambda: dynamics_table(runs))}
    tables["lm_findings"] = sections.attempt("causal-LM findings (tables/lm_findings.csv)", lambda: findings(
        {k: v if v is not None else pd.DataFrame() for k, v in tables.items()}))
    tables["summary"] = sections.attempt("summary (tables/summary.csv)", lambda: summary_table(table, spectrum))
    tables["loss_curves"] = sections.attempt("loss curves (tables/loss_curves.csv)", lambda: loss_curves(table))
    t_tables = time.perf_counter()
    tables, left_out = write_tables(out, tables)
    subspace = tables["subspace"]
    seconds = {"runs found and checked": t_load, **stream["phases"], "subspace": t_sub,
               "tables": time.perf_counter() - t_tables}
    figures = ""
    if getattr(opts, "figures", False):
        t_fig = time.perf_counter()
        figures = sections.attempt("figures", lambda: make_figures(out, tables, getattr(opts, "wandb", "auto")), "")
        seconds["figures"] = time.perf_counter() - t_fig
    seconds["total"] = time.perf_counter() - t_start
    record = {"device": str(opts.device), "seconds": seconds, "matrices": sum(len(r.names) for r in runs),
              "counts": stream["counts"], "read+hash (background) seconds": stream["read+hash (background)"],
              "bytes read": stream["bytes read"],
              "peak host RSS bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    record |= {k: v for k, v in stream.items() if k == "peak CUDA allocated bytes"}
    write_json(out / TIMING_FILE, record)
    timing = timing_lines(record, runs, results, len(pairs), len(subspace), table_path(out, "subspace"))
    more = [] if "rank_advice" in left_out else sections.attempt(
        "report.md section 'rank advice'", lambda: rank_advice_lines(advice, advice_info), [])
    more += [] if "lm_findings" in left_out else sections.attempt(
        "report.md section 'causal-LM findings'", lambda: report_lines(tables["lm_findings"]), [])
    more += sections.attempt("report.md section 'functional rank'", lambda: functional_rank.report_lines(out), [])
    write_text(out / REPORT_FILE, summarise(table, setups, spectrum, subspace, amps, skipped, timing, opts, figures,
                                            more, sections, not_pooled,
                                            None if "summary" in left_out else tables["summary"]))
    for k, v in timing.items():
        print(f"{k}: {v}")
    print(f"{len(runs)} runs analysed, {len(skipped)} skipped -> {out}" + (
        f"; {len(sections.skipped)} parts left out (report.md lists them)" if sections.skipped else ""))
    return tables | {"skipped": skipped, "pairs": pairs, "left_out": sections.skipped}


def loss_curves(table: pd.DataFrame) -> pd.DataFrame:
    """tables/loss_curves.csv from the analysed runs' history.csv files; runs without one are counted in one line."""
    history, missing = read_histories(dict(zip(table.run_id, table.path)) if len(table) else {})
    if missing:
        progress(missing_line(missing))
    return loss_curves_table(history, table)


def write_tables(out: Path, tables: dict) -> tuple[dict, set[str]]:
    """Each table to OUT/tables/NAME.csv. One left out (None: it raised) gets no file, and loses any an earlier
    report wrote, which would pass for this one's. Returns the tables, those left out as empty frames, and their
    names."""
    left_out = {name for name, df in tables.items() if df is None}
    for name, df in tables.items():
        if name in left_out:
            table_path(out, name).unlink(missing_ok=True)
        else:
            write_csv(table_path(out, name), df)
    return {k: pd.DataFrame() if k in left_out else v for k, v in tables.items()}, left_out


def subspace_table(table: pd.DataFrame, results: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(select_pairs' pairs, their φ grids: tables/subspace.csv), from the bases the stream kept."""
    pairs = select_pairs(table)
    blocks = [block for p in pairs.itertuples() for block in
              subspace_rows(p.kind, p.run_a, p.run_b, results[p.run_a].bases, results[p.run_b].bases)]
    subspace = pd.concat(blocks, ignore_index=True) if blocks else pd.DataFrame(columns=SUBSPACE_COLUMNS)
    return pairs, subspace.sort_values(["kind", "run_a", "run_b", "side", "layer", "matrix_type", "i", "j"],
                                       ignore_index=True)


def timing_lines(record: dict, runs: list[Run], results: dict, n_pairs: int, n_rows: int, subspace_csv: Path) -> dict:
    """report.md's timing section (and the lines printed at the end): seconds per phase, how the top singular vectors
    were found, what was read, peak memory, and per full-FT run its own share."""
    sec = record["seconds"]
    lines = {"device": record["device"], "runs found and checked (headers)": f"{sec['runs found and checked']:.2f} s"}
    lines |= {f"{phase} (all matrices)": f"{sec.get(phase, 0.0):.2f} s" for phase in PHASES}
    lines["subspace grids"] = f"{sec['subspace']:.2f} s ({n_pairs} pairs, {n_rows} rows)"
    lines |= {"tables written": f"{sec['tables']:.2f} s", **({"figures": f"{sec['figures']:.2f} s"} if "figures" in sec
                                                             else {}), "total": f"{sec['total']:.2f} s"}
    lines["read+hash (background thread)"] = (f"{record['read+hash (background) seconds']:.2f} s, "
                                              f"{record['bytes read'] / 1e9:.2f} GB")
    if record["counts"]:
        lines["top singular vectors found by"] = ", ".join(f"{k}: {v}" for k, v in sorted(record["counts"].items()))
    lines["peak host RSS"] = f"{record['peak host RSS bytes'] / 2**30:.2f} GiB"
    if "peak CUDA allocated bytes" in record:
        lines["peak CUDA allocated"] = f"{record['peak CUDA allocated bytes'] / 2**30:.2f} GiB"
    for r in runs:
        if r.method == "full":
            ph = results[r.run_id].phases
            lines[f"full-FT run `{r.run_id}`, {len(r.names)} matrices"] = (
                f"ΔW spectra {ph['spectra']:.2f} s; with reading, ΔW vectors, intruders, amplification "
                f"{results[r.run_id].seconds:.2f} s (W0 SVDs are shared by the runs of a base model)")
    if subspace_csv.is_file():  # not where the subspace grids were left out
        lines["subspace.csv size"] = f"{subspace_csv.stat().st_size / 1e6:.1f} MB"
    return lines


def make_figures(out_dir: Path, tables: dict[str, pd.DataFrame], wandb: str = "auto", numbers=None) -> str:
    """The figures (all, or those in `numbers`) from the tables, their W&B run (wandb: auto | on | off; auto: when
    the runs used logger=wandb), and the report's figure section (markdown)."""
    # lazy: matplotlib only when figures are asked for
    from analysis.figures.registry import figures_markdown, write_figures
    built = write_figures(out_dir, tables, numbers)
    settings = analysis_run_settings(tables["runs"], wandb)
    if settings is not None:
        drawn = [b for b in built if b.drawn is not None]
        log_analysis_run(out_dir, settings,
                         images={f"figures/{b.drawn.path.stem}": (b.drawn.path, b.spec.caption) for b in drawn},
                         tables={f"tables/{name}": tables[name] for name in WANDB_TABLES if len(tables[name])}
                         | {f"tables/{b.drawn.path.stem}": b.drawn.data for b in drawn})
    return figures_markdown(built, Path(out_dir))


def main(argv=None) -> None:
    opts = parse_args(argv)
    try:
        run_report(opts)
    except OSError as e:  # the disk filled up, or --out changed under us; a run's own files never get here
        where = Path(e.filename).resolve() if e.filename else None
        if where is None or opts.out.resolve() not in (where, *where.parents):
            raise
        fail(f"cannot write the report under --out {str(opts.out)!r}: {e.strerror or e} ({e.filename})")


if __name__ == "__main__":
    main()
