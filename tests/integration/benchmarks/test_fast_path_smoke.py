"""benchmarks.fast_path --smoke on the CPU: the speed part's rows (the trainer's LoRA with each loss and each
GEMM path, its full fine-tuning, plain PEFT + compile) and the one-step memory part, each with its record."""
import json

from tests.conftest import ROOT, run_cli


def test_smoke_run_writes_every_row_and_ratio(tmp_path):
    result = run_cli(["-m", "benchmarks.fast_path", "--smoke", "--parts", "speed", "step_memory", "--out",
                      str(tmp_path), "--runs-root", str(tmp_path / "runs")], cwd=ROOT,
                     env_extra={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    speed = json.loads((tmp_path / "fast_path_speed_cpu.json").read_text())
    runs = [r["run"] for r in speed["rows"]]
    assert runs == ["trainer, LoRA r16 all-linear", "trainer, LoRA r16 all-linear, cuBLAS pair",
                    "trainer, LoRA r16 all-linear, one pair a launch",
                    "trainer, LoRA r16 all-linear, chunked_loss=false",
                    "trainer, full fine-tuning", "plain PEFT + torch.compile"]
    assert all(r["tokens_per_second"] > 0 for r in speed["rows"])
    assert [r["chunked_loss"] for r in speed["rows"][:4]] == [False] * 4  # the CPU keeps transformers' loss
    md = (tmp_path / "fast_path_speed_cpu.md").read_text()
    for ratio in ("LoRA / full fine-tuning", "LoRA / plain PEFT + compile", "LoRA, chunked loss / transformers' loss",
                  "LoRA, GEMM from the LoRA product / cuBLAS pair",
                  "LoRA, a group's input gradient in one launch / one pair a launch"):
        assert f"tiny: trainer {ratio}: " in md
    memory = json.loads((tmp_path / "fast_path_step_memory_cpu.json").read_text())
    losses = [r["loss"] for r in memory["rows"]]
    assert len(losses) == 6 and all(abs(a - b) < 1e-4 for a, b in zip(losses[::2], losses[1::2]))
    assert [r["activation_checkpointing"] for r in memory["rows"][::2]] == [False, True, True]
