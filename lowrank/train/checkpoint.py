"""Training state on disk, so a pre-empted or killed run resumes where it stopped, bit for bit on CPU.

What is saved: the trainable parameters (adapter + head for LoRA, everything for full fine-tuning), the
optimizer and scheduler state, the RNG states (dropout), the step (which fixes the data position: batches
are a pure function of seed and step) and the bookkeeping of the loop, with a SHA-256 of all of it
(`torch.load` does not check the CRCs of its own zip records: a flipped byte loads as a wrong weight). A
checkpoint that cannot be read, fails its hash or does not fit the model is set aside as
`checkpoint.pt.corrupt[-N]` and the run starts again from step 0.

Under torchrun every rank calls both functions: an FSDP model's shards are gathered tensor by tensor for rank 0
to write (the file holds whole tensors, as one process writes them), each rank's RNG state travels with it, and
rank 0 checks the file before every rank loads it.
"""
import logging
from pathlib import Path

import torch

from lowrank.rundir import atomic
from lowrank.train import distributed
from lowrank.rundir.integrity import state_sha256
from lowrank.rundir.layout import CHECKPOINT_FILE

log = logging.getLogger(__name__)


def _rng_states() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def _optimizer_state(model, optimizer) -> dict:
    if not distributed.is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, loop_state: dict) -> Path | None:
    state = {
        "trainable": {n: distributed.full_tensor(p.detach()).cpu() for n, p in model.named_parameters()
                      if p.requires_grad},
        "optimizer": _optimizer_state(model, optimizer),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "loop": loop_state,
    }
    ranks = distributed.gather_objects(_rng_states())
    if len(ranks) > 1:  # one dropout stream per rank
        state["rng_ranks"] = ranks
    if not distributed.is_main():
        return None
    state["sha256"] = state_sha256(state)
    return atomic.write_with(Path(run_dir) / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))


def set_aside(path: Path, reason: str) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection, never read again) and say so."""
    target, n = path.with_name(path.name + ".corrupt"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{n}")
    path.rename(target)
    log.warning("%s is damaged (%s); set aside as %s, the run starts again from step 0", path, reason, target.name)
    return target


def _read(path: Path, params: dict) -> dict:
    """The checkpoint's state, checked; raises ValueError with the reason."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, garbled pickle, an empty file: all unreadable
        raise ValueError(f"unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict) or "sha256" not in state:
        raise ValueError("not a checkpoint written by this version (no content hash)")
    digest = state.pop("sha256")
    if state_sha256(state) != digest:
        raise ValueError("content hash mismatch")
    trainable = state.get("trainable", {})
    wrong = [n for n, t in trainable.items() if n not in params or params[n].shape != t.shape]
    if wrong or set(trainable) != {n for n, p in params.items() if p.requires_grad}:
        raise ValueError(f"its parameters do not match the model's ({wrong[:2] or 'a different set'})")
    return state


def load_checkpoint(run_dir: Path, model, optimizer, scheduler) -> dict | None:
    """Restore state saved by `save_checkpoint`; returns the loop state, or None if there is none (or it was
    damaged and has been set aside)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    params = dict(model.named_parameters())
    state = None
    if distributed.is_main() and path.exists():
        try:
            state = _read(path, params)
        except ValueError as e:
            set_aside(path, str(e))
    if not distributed.share(state is not None):  # rank 0 checked it; the others read it only when sound
        return None
    if state is None:
        state = torch.load(path, map_location="cpu", weights_only=False)
    for n, t in state["trainable"].items():
        distributed.load_full(params[n], t)
    if distributed.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == distributed.world_size():
        cpu, cuda = ranks[distributed.rank()]
        torch.set_rng_state(cpu)
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)
    return state["loop"]
