"""`python -m experiments.estimate` as a process: the breakdown, the JSON line last, and no file written (Hydra's
output switched off by the command's own overrides)."""
import json

from lowrank.train.memory import GIB
from tests.conftest import run_cli


def test_estimate_entry_point_prints_json_last_and_writes_nothing(tmp_path):
    result = run_cli(["-m", "experiments.estimate", "model=llama2_7b_shape", "method=full", "trainer.batch_size=1",
                      "trainer.max_length=512", "budget=80gb"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert {"weights_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "total_bytes", "budget_bytes",
            "fits"} <= set(out)
    assert out["weights_bytes"] + out["grads_bytes"] + out["optimizer_bytes"] == 16 * out["params"]
    assert out["budget_bytes"] == 80 * GIB and out["fits"] is False  # 16 bytes/param of 6.6B: 98 GiB + activations
    assert "weights" in result.stdout and "GiB" in result.stdout
    assert list(tmp_path.iterdir()) == []
