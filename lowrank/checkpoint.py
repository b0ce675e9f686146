"""Training state on disk, so a pre-empted or killed run resumes where it stopped, bit for bit on CPU.

What is saved: the trainable parameters (adapter + head for LoRA, everything for full fine-tuning), the
optimizer and scheduler state, the RNG states (dropout), the step (which fixes the data position: batches
are a pure function of seed and step) and the bookkeeping of the loop.
"""
from pathlib import Path

import torch

from . import atomic

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, loop_state: dict) -> Path:
    state = {
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "loop": loop_state,
    }
    return atomic.write_with(Path(run_dir) / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))


def load_checkpoint(run_dir: Path, model, optimizer, scheduler) -> dict | None:
    """Restore state saved by `save_checkpoint`; returns the loop state, or None if there is none."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state["trainable"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["loop"]
