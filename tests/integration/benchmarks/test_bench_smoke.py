"""benchmarks.bench --smoke on the CPU: the rows it writes, and its trainer rows (lowrank.train.recipe.train runs)."""
import json

import pytest

from lowrank.adapters.targets import ALL_LINEAR
from tests.conftest import ROOT, run_cli


def test_smoke_run_writes_the_rows_the_issue_asks_for(tmp_path):
    result = run_cli(["-m", "benchmarks.bench", "--smoke", "--out", str(tmp_path), "--modes", "eager",
                      "--only", "full", "lora:ours:16", "lora:peft:16", "--no-parity", "--no-trainer"], cwd=ROOT,
                     env_extra={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    result = json.loads((tmp_path / "lora_vs_peft_cpu.json").read_text())
    rows = result["rows"]
    assert [(r["impl"], r["rank"]) for r in rows] == [("torch", None), ("ours", 16), ("peft", 16)]
    for r in rows:
        assert {"model", "method", "impl", "rank", "targets", "tokens_per_second", "peak_memory_bytes", "mfu"} <= set(r)
        assert r["tokens_per_second"] > 0 and r["peak_memory_bytes"] > 0
    assert rows[1]["targets"] == "all-linear" == ALL_LINEAR
    md = (tmp_path / "lora_vs_peft_cpu.md").read_text()
    assert "| tiny | lora | ours | 16 | all-linear | eager |" in md
    assert result["meta"]["command"].endswith("-m benchmarks.bench --smoke --out " + str(tmp_path) + " --modes eager "
                                              "--only full lora:ours:16 lora:peft:16 --no-parity --no-trainer")
    assert result["settings"]["models"] == ["tiny"] and f"`{result['meta']['command']}`" in md

def test_smoke_trainer_rows_run_the_trainer_and_its_loss_curves_agree(tmp_path):
    """The bench's `trainer` rows are lowrank.train.recipe.train runs (task=synthetic_lm), their ratio row compares
    LoRA with the trainer's own full fine-tuning, and the trainer's fast and plain paths give one loss curve."""
    result = run_cli(["-m", "benchmarks.bench", "--smoke", "--out", str(tmp_path), "--modes", "eager",
                      "--only", "nothing", "--no-parity"], cwd=ROOT, env_extra={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    result = json.loads((tmp_path / "lora_vs_peft_cpu.json").read_text())
    rows = {(r["method"], r["impl"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {("full", "trainer", "trainer"), ("lora", "trainer", "trainer")}
    lora = rows[("lora", "trainer", "trainer")]
    assert lora["tokens_per_second"] > 0 and lora["timed_steps"] == 2 and lora["cuda_graph"] is False
    assert lora["trainable_params"] < rows[("full", "trainer", "trainer")]["trainable_params"]
    (ratio,) = result["details"]["ratios"]
    assert ratio["ours_over_trainer_full"] == pytest.approx(
        lora["tokens_per_second"] / rows[("full", "trainer", "trainer")]["tokens_per_second"])
    par = result["details"]["trainer_parity"]
    assert len(par["fast"]) == len(par["plain"]) == 4 and par["max_abs_diff"] < 1e-4
