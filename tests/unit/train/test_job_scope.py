"""What one job of a sweep sets process-wide is undone when it ends, whatever its outcome."""
import pytest
import torch
import torch._dynamo.config as dynamo_config

from lowrank.adapters import fused as lora_fast
from lowrank.rundir import layout as rundir
from lowrank.train.budget import cap_process_memory
from lowrank.train.job_scope import job_scope


@pytest.fixture
def fake_gpu(monkeypatch):
    """A one-GPU CUDA runtime as far as the allocator cap is concerned: 80 GiB, fraction 1.0 to start."""
    state = {"fraction": {0: 1.0}}
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 80 * 2**30}))
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda i: state["fraction"][i])

    def set_fraction(fraction, device):
        state["fraction"][device if isinstance(device, int) else torch.device(device).index] = fraction
    monkeypatch.setattr(cuda, "set_per_process_memory_fraction", set_fraction)
    return state


@pytest.mark.parametrize("outcome", ["returns", "raises"])
def test_a_budget_cap_ends_with_its_job(fake_gpu, outcome):
    with pytest.raises(RuntimeError) if outcome == "raises" else torch.no_grad():
        with job_scope():
            cap_process_memory(8 * 2**30, torch.device("cuda", 0))
            assert fake_gpu["fraction"][0] == pytest.approx(0.1)  # the job runs capped at 8 of 80 GiB
            if outcome == "raises":
                raise RuntimeError("out of memory")
    assert fake_gpu["fraction"][0] == 1.0  # the next job (budget=none) sees the whole GPU


def test_module_switches_and_backend_flags_are_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(),
              dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint, lora_fast.FUSED_FACTOR_GRADS)
    with pytest.raises(ValueError):
        with job_scope():
            torch.backends.cuda.matmul.allow_tf32 = not before[0]
            torch.set_float32_matmul_precision("medium")
            dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = not before[2]
            lora_fast.FUSED_FACTOR_GRADS = not before[3]
            raise ValueError
    assert (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(),
            dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint, lora_fast.FUSED_FACTOR_GRADS) == before


def test_the_trainer_runs_each_job_in_a_scope_and_records_a_crash(tiny_run, tmp_path, monkeypatch):
    """A job that changes a switch and then fails: the switch is back, and metrics.json says why it failed."""
    import lowrank.data.objectives as objectives
    before = lora_fast.FUSED_FACTOR_GRADS

    def broken_loader(*args, **kwargs):
        lora_fast.FUSED_FACTOR_GRADS = not before
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(objectives, "load_task", broken_loader)  # the classification objective's loader
    with pytest.raises(RuntimeError):
        tiny_run()
    assert lora_fast.FUSED_FACTOR_GRADS == before
    metrics = rundir.read_metrics(tmp_path / "run")
    assert metrics["status"] == "failed" and metrics["reason"] == "RuntimeError: disk on fire"
    assert "disk on fire" in (tmp_path / "run" / "train.log").read_text()  # with its traceback
