"""What one run sets process-wide is undone when it ends, so the jobs of a multirun sweep (one process) do not
see each other: the CUDA memory cap of a budget, TF32, dynamo's flags and compiled graphs, module switches.

    with job_scope():
        train_one_run(...)      # may cap memory, enable TF32, compile blocks; any outcome, even an exception
"""
from contextlib import contextmanager

import torch

from lowrank.adapters import fused as lora_fast


def _memory_fractions() -> dict[int, float]:
    """The allocator cap of every CUDA device this process has initialised (none on CPU)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {i: torch.cuda.get_per_process_memory_fraction(i) for i in range(torch.cuda.device_count())}


def _snapshot() -> dict:
    import torch._dynamo.config as dynamo_config
    return {
        "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "dynamo_checkpoint_side_effects": dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint,
        "fused_factor_grads": lora_fast.FUSED_FACTOR_GRADS,
        "memory_fractions": _memory_fractions(),
    }


def _restore(saved: dict) -> None:
    import torch._dynamo
    import torch._dynamo.config as dynamo_config
    torch.backends.cuda.matmul.allow_tf32 = saved["cuda_matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = saved["cudnn_tf32"]
    torch.set_float32_matmul_precision(saved["float32_matmul_precision"])
    torch.use_deterministic_algorithms(saved["deterministic"])
    dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = saved["dynamo_checkpoint_side_effects"]
    lora_fast.FUSED_FACTOR_GRADS = saved["fused_factor_grads"]
    # Compiled graphs hold the last job's model alive, and count against dynamo's recompile limit, past
    # which later jobs would silently run eager.
    torch._dynamo.reset()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, fraction in _memory_fractions().items():  # a device first used by this job had no cap: 1.0
            if fraction != saved["memory_fractions"].get(i, 1.0):
                torch.cuda.set_per_process_memory_fraction(saved["memory_fractions"].get(i, 1.0), i)
        torch.cuda.empty_cache()


@contextmanager
def job_scope():
    """Snapshot the process-wide settings a run may change; restore them when the block ends, however."""
    saved = _snapshot()
    try:
        yield
    finally:
        _restore(saved)
