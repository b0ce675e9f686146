"""A sweep of conf/experiment/ really runs as a (tiny) Hydra multirun, and the demo command runs a tiny study end
to end."""
import json

import pytest

from tests.conftest import ROOT, run_cli
from tests.unit.experiments.test_experiments import TINY_RUN


@pytest.mark.slow
def test_a_sweep_starts_and_finishes_as_a_tiny_multirun(tmp_path):
    res = run_cli(["-m", "experiments.train", "-m", "experiment=subspace", "method.rank=8", "seed=0",
                   f"runs_root={tmp_path}", *TINY_RUN], cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (metrics,) = (tmp_path / "subspace").glob("*/metrics.json")
    assert json.loads(metrics.read_text())["status"] == "complete"
    assert metrics.parent.name.startswith("rank=8,seed=0")

@pytest.mark.slow
def test_demo_command_runs_a_tiny_study_and_names_its_report(tmp_path):
    """demo_scarce shrunk (a full and a LoRA run, side by side as subprocesses, one progress bar), then the report."""
    args = ["-m", "experiments.demo", "--runs-root", str(tmp_path / "runs"), "--out", str(tmp_path / "report"),
            "--sweeps", "demo_scarce", *TINY_RUN]
    res = run_cli(args, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == f"report: {tmp_path / 'report' / 'report.md'}"
    assert "demo: training" in res.stderr and "2/2" in res.stderr   # the progress bar counted both runs' steps
    runs = sorted(p.parent.name for p in (tmp_path / "runs" / "demo").glob("*/metrics.json"))
    assert [r.split(",")[0] for r in runs] == ["method=full", "method=lora"] and "train_size=32" in runs[0]
    assert "demo_scarce method=lora: eval_accuracy" in res.stdout
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Runs analysed (2)" in report
    assert "![Figure 10](figures/fig10_checkpoint_size.png)" in report   # 32 examples: only data-size-free figures
    assert "### Figure 1\n\nSkipped: no full-data LoRA runs" in report
