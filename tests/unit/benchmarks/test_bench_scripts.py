"""The benchmark scripts that launch other commands (budget_bench, demo_speed) write their results through
benchmarks.harness.record: tested with the launched commands replaced by fakes that leave their metrics behind."""
import json
import sys

import pytest

from benchmarks import budget_bench
from benchmarks import demo_speed
from benchmarks.harness.record import read_result
from lowrank.train.memory import GIB


def test_budget_bench_tabulates_each_cell_into_one_result(tmp_path, monkeypatch):
    def fake_sweeps(runs_root):
        for method, budget, fits, peak in (("full", 8, False, None), ("lora", 8, True, 7.5 * GIB)):
            run = runs_root / f"budget_{method}" / f"budget={budget}gb"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps(dict(
                method=method, budget_bytes=budget * GIB, fits=fits, micro_batch=1 if fits else None,
                grad_accum=8 if fits else None, activation_checkpointing=False if fits else None,
                peak_memory_bytes=peak, memory_estimate=dict(total_bytes=7.8 * GIB, weights_bytes=2 * GIB),
                tokens_per_second=6914.0 if fits else None)))
    monkeypatch.setattr(budget_bench, "run_sweeps", fake_sweeps)
    args = ["--out", str(tmp_path / "out"), "--runs-root", str(tmp_path / "runs")]
    monkeypatch.setattr(sys, "argv", ["budget_bench", *args])
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", "-m", "benchmarks.budget_bench", *args])
    budget_bench.main()
    (result,) = (tmp_path / "out").glob("budget_*.json")
    data = read_result(result)
    assert [(r["method"], r["fits"], r["targets"]) for r in data["rows"]] == [("full", False, None),
                                                                              ("lora", True, "all-linear")]
    assert data["settings"]["budgets"] == budget_bench.BUDGETS
    assert data["meta"]["command"] == f"python3 -m benchmarks.budget_bench --out {tmp_path / 'out'} --runs-root " \
                                      f"{tmp_path / 'runs'}"
    md = result.with_suffix(".md").read_text()
    assert "| full | 8 | no | – | – | – | 7.80 | – | – | – |" in md
    assert "| lora | 8 | yes | 1 × 8 | False | 7.50 | 7.80 | 1.040 | True | 6914 |" in md


def test_demo_speed_times_each_variant_into_one_result(tmp_path, monkeypatch):
    calls, real_run = [], demo_speed.subprocess.run

    def fake_run(cmd, **kwargs):  # `python -m experiments.demo ... --runs-root R ...`: leaves two runs in R
        if "experiments.demo" not in cmd:
            return real_run(cmd, **kwargs)  # git, for the metadata
        calls.append(cmd)
        root = cmd[cmd.index("--runs-root") + 1]
        for rank, acc in (("1", 0.73), ("8", 0.78)):
            run = tmp_path / root / "demo" / f"method.rank={rank}"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps(dict(eval_accuracy=acc)))
    monkeypatch.setattr(demo_speed.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["demo_speed", "--out", str(tmp_path / "out")])
    demo_speed.main()
    assert len(calls) == len(demo_speed.VARIANTS)
    data = read_result(tmp_path / "out" / "demo_speed_cpu.json")
    assert [r["variant"] for r in data["rows"]] == [v for v, _ in demo_speed.VARIANTS]
    assert data["rows"][0]["speedup"] == 1.0 and data["settings"]["sweep"] == "demo_targets"
    assert data["rows"][0]["eval_accuracy"] == {"demo/method.rank=1": 0.73, "demo/method.rank=8": 0.78}
    md = (tmp_path / "out" / "demo_speed_cpu.md").read_text()
    assert "| one run at a time | `--jobs 1` |" in md and "| 1.00× | 0.7300, 0.7800 |" in md
    assert data["meta"]["device"] in md


@pytest.mark.parametrize("script", [budget_bench, demo_speed])
def test_the_scripts_say_what_they_write(script):
    assert "benchmarks.harness.record" in script.__doc__
