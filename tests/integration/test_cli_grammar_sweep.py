"""Hydra's sweep grammar end to end: `-m 'method=choice(lora,full)' 'seed=range(0,2)'` trains every job (the checks
themselves: tests/unit/test_cli_grammar.py)."""
import json

from tests.conftest import run_cli


def test_a_multirun_of_choice_and_range_runs_every_job(tmp_path):
    result = run_cli(["-m", "experiments.train", "-m", "method=choice(lora,full)", "seed=range(0,2)",
                      "trainer.max_steps=2", "trainer.batch_size=4", "trainer.max_length=32", "task.eval_size=16",
                      "task.train_size=32", "trainer.eval_interval=2", "logger=none", "trainer.progress_bar=false",
                      f"runs_root={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent.name for p in tmp_path.glob("default/*/metrics.json"))
    assert [r.split(",")[:2] for r in runs] == [[f"method={m}", f"seed={s}"] for m in ("full", "lora") for s in (0, 1)]
    assert all(json.loads(p.read_text())["status"] == "complete" for p in tmp_path.glob("default/*/metrics.json"))
