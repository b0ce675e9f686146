"""benchmarks.analysis_bench --smoke: a shape run written by benchmarks.shape_run, the report on it in a child
process, the record written."""
import json

import pandas as pd
import pytest
import torch

from analysis.runs import collect_runs
from lowrank.linalg import spectra
from lowrank.rundir.layout import config_hash


def test_a_shape_run_is_analysed_like_a_trained_one(tmp_path):
    """benchmarks.analysis_bench --smoke: a tiny llama shape built by benchmarks.shape_run, the report on it in a
    child process, the record written; the run directory passes every check of a full collect."""
    from benchmarks.analysis_bench import main as bench_main
    bench_main(["--smoke", "--runs-root", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    record = json.loads((tmp_path / "out" / "analysis_cpu.json").read_text())
    phases = {r["phase"]: r["seconds"] for r in record["rows"]}
    assert {"spectra", "W0 SVDs", "intruders", "amplification", "total"} <= set(phases)
    assert record["details"]["peak_rss_bytes"] > 0 and record["details"]["report"]["matrices"] == 14
    runs, _, skipped = collect_runs([tmp_path / "runs"])   # every hash and value checked
    assert not skipped and len(runs) == 1
    run = runs[0]
    assert run.path.name.endswith(config_hash(run.config)) and run.method == "full" and len(run.names) == 14
    spec = pd.read_csv(tmp_path / "out" / "report_run" / "tables" / "spectrum.csv")
    assert len(spec) == 14 and spec[["r90", "effective_rank", "intruders", "rel_norm"]].notna().all().all()
    row = spec[spec.module == run.names[0]].iloc[0]
    S = torch.linalg.svdvals(run.delta(run.names[0]).double())
    assert row.r90 == spectra.energy_rank(S, 0.9) and row.fro_norm == pytest.approx(spectra.fro_norm(S), rel=1e-6)
    assert 1e-3 < row.rel_norm < 1e-2   # ΔW is ~2e-3 of W0, as after a short full fine-tuning run
