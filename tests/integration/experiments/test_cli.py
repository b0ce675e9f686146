"""The Hydra entry point as a process: a multirun with W&B offline (its one-line errors for bad input:
tests/unit/experiments/test_cli.py, and tests/integration/test_entry_points.py for the command itself)."""
import json

from tests.conftest import TINY, run_cli


def test_multirun_with_offline_wandb(tmp_path):
    result = run_cli(["-m", "experiments.train", "-m", "method=lora", "method.rank=1,4", "seed=0,1",
                      "trainer.max_steps=5", *[o for o in TINY if not o.startswith(("logger", "trainer.max_steps"))],
                      "logger=wandb", f"runs_root={tmp_path}"], cwd=tmp_path, env_extra={"WANDB_API_KEY": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent for p in tmp_path.glob("default/*/metrics.json"))
    assert len(runs) == 4
    seen = set()
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "complete"
        assert (run / "delta_w.safetensors").exists() and (run / ".hydra" / "config.yaml").exists()
        offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(offline) == 1, list((run / "wandb").rglob("*"))
        seen.add((metrics["adapted_params"], (run / ".hydra/overrides.yaml").read_text()))
    assert len(seen) == 4
