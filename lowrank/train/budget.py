"""Fit a run under a GPU memory budget (`budget.gib`): cap the process, then find the largest micro-batch
that runs, accumulating gradients to keep the configured batch, and turn on activation checkpointing if
even a micro-batch of 1 does not fit. A run that cannot fit is a result (`fits: false`), not a crash.

    cap_process_memory(validation.budget_bytes(cfg.budget), device)
    fit = fit_micro_batch(cfg.trainer.batch_size, cuda_oom_probe(run_steps))   # run_steps(micro, ckpt)
    fit.micro_batch, fit.grad_accum, fit.activation_checkpointing, fit.fits, fit.failed_at

On CPU nothing is capped: `fit_with_estimate(batch, estimate, budget)` asks the memory model instead.
The search is device-agnostic: it only calls `probe(micro_batch, checkpointing) -> bool`, so tests inject one.
`fit_to_budget(budget, model, optimizer, ...)` is what the trainer calls: both paths, plus the memory
estimate at the chosen setting, as a `BudgetFit`.
"""
import dataclasses
import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lowrank.errors import ConfigError
from lowrank.train.memory import GIB, MemoryEstimate
from lowrank.train.step import model_loss

Probe = Callable[[int, bool], bool]  # (micro_batch, activation_checkpointing) -> ran without running out


def micro_batch_candidates(batch_size: int) -> list[int]:
    """Micro-batches that divide the batch exactly, largest first: 12 -> [12, 6, 4, 3, 2, 1]."""
    return [m for m in range(batch_size, 0, -1) if batch_size % m == 0]


@dataclass
class FitResult:
    micro_batch: int | None       # None when nothing fits
    grad_accum: int | None        # batch_size / micro_batch
    activation_checkpointing: bool
    fits: bool
    failed_at: dict | None = None  # the last setting that ran out of memory: {micro_batch, activation_checkpointing}
    tried: list[dict] = field(default_factory=list)  # every probe in order: {micro_batch, ..., ok}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def fit_micro_batch(batch_size: int, probe: Probe, allow_checkpointing: bool = True) -> FitResult:
    """Try every micro-batch that divides `batch_size`, largest first, without activation checkpointing,
    then (if allowed) the same with it; the first that runs wins."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"trainer.batch_size={batch_size!r} is not valid; it must be an integer > 0")
    tried = []
    for checkpointing in ((False, True) if allow_checkpointing else (False,)):
        for micro in micro_batch_candidates(batch_size):
            ok = bool(probe(micro, checkpointing))
            tried.append({"micro_batch": micro, "activation_checkpointing": checkpointing, "ok": ok})
            if ok:
                return FitResult(micro, batch_size // micro, checkpointing, True, None, tried)
    last = tried[-1]
    return FitResult(None, None, last["activation_checkpointing"], False,
                     {"micro_batch": last["micro_batch"], "activation_checkpointing": last["activation_checkpointing"]},
                     tried)


def free_cuda_memory(device=None) -> None:
    """Drop what a failed attempt left: collect its tensors, hand cached blocks back, restart the peak."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def cuda_oom_probe(run_steps: Callable[[int, bool], None], device=None) -> Probe:
    """Wrap `run_steps(micro_batch, checkpointing)` into a probe: False when it runs out of GPU memory, after
    freeing what the attempt allocated. `run_steps` should do what training will: at least one optimizer step
    (so AdamW's moments exist) over two accumulated micro-batches when micro_batch < batch (so gradients and
    activations coexist), and leave the run as it found it (e.g. lr 0, then clear `optimizer.state`, zero the
    gradients, re-seed)."""
    def probe(micro_batch: int, checkpointing: bool) -> bool:
        try:
            run_steps(micro_batch, checkpointing)
            ok = True
        except torch.OutOfMemoryError:  # torch.cuda.OutOfMemoryError is the same class
            ok = False
        # outside the except block, so the traceback (and the tensors its frames hold) is already gone
        free_cuda_memory(device)
        return ok
    return probe


def estimate_probe(estimate: Callable[..., MemoryEstimate], budget: int, batch_size: int) -> Probe:
    """A probe that asks the memory model instead of the device (CPU runs, and `experiments.estimate`).
    `estimate(micro_batch=, grad_accum=, activation_checkpointing=)` returns a MemoryEstimate."""
    def probe(micro_batch: int, checkpointing: bool) -> bool:
        est = estimate(micro_batch=micro_batch, grad_accum=batch_size // micro_batch,
                       activation_checkpointing=checkpointing)
        return est.total_bytes <= budget
    return probe


def fit_with_estimate(batch_size: int, estimate: Callable[..., MemoryEstimate],
                      budget: int) -> tuple[FitResult, MemoryEstimate]:
    """The fit the memory model predicts, and the estimate at the chosen setting (at the configured batch
    without checkpointing when nothing fits)."""
    fit = fit_micro_batch(batch_size, estimate_probe(estimate, budget, batch_size))
    if fit.fits:
        return fit, estimate(micro_batch=fit.micro_batch, grad_accum=fit.grad_accum,
                             activation_checkpointing=fit.activation_checkpointing)
    return fit, estimate(micro_batch=batch_size, grad_accum=1, activation_checkpointing=False)


def cap_process_memory(budget: int | None, device) -> float | None:
    """Cap this process's CUDA caching allocator at `budget` bytes (an allocation beyond it raises
    OutOfMemoryError, as on a smaller GPU). Returns the fraction set; None on CPU or without a budget.
    The CUDA context itself (a few hundred MiB) lives outside the allocator and is not counted."""
    device = torch.device(device)
    if budget is None or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if budget > total:
        raise ConfigError(f"budget.gib={budget / GIB:g} is more than this GPU has ({total / GIB:.1f} GiB)")
    fraction = budget / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def require_weights_fit(estimate: MemoryEstimate, budget: int | None) -> None:
    """Raise when the budget cannot even hold the weights: no micro-batch or checkpointing can help."""
    if budget is not None and budget < estimate.weights_bytes:
        need = math.ceil(estimate.weights_bytes / GIB * 100) / 100
        raise ConfigError(f"budget.gib={budget / GIB:g} is below the model's weights alone "
                          f"({estimate.weights_bytes / GIB:.2f} GiB in {estimate.weight_dtype}); the minimum "
                          f"budget.gib is {need:g}")


def _worst_case_batch(micro: int, max_length: int, device, causal_lm: bool) -> dict:
    """A micro-batch of `max_length` tokens: what the longest real batch can cost (a causal LM's labels are
    its tokens, a classifier's one class each)."""
    ids = torch.randint(1, 1000, (micro, max_length), device=device)
    labels = ids.clone() if causal_lm else torch.zeros(micro, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _weights_too_big(estimate, budget: int) -> str | None:
    """The reason when not even the weights and optimizer state fit the budget, else None."""
    try:
        require_weights_fit(estimate(micro_batch=1, grad_accum=1), budget)
    except ConfigError as e:
        return str(e)
    return None


@dataclass
class BudgetFit:
    """What `fit_to_budget` chose, or why nothing fits: the run's memory settings and the estimate at them,
    recorded in its metrics.json next to the measured peak."""
    fits: bool
    budget_bytes: int | None
    micro_batch: int | None
    activation_checkpointing: bool
    memory_estimate: dict
    reason: str | None = None
    failed_at: dict | None = None
    tried: list[dict] = field(default_factory=list)

    def out_of_memory_at(self, step: int) -> "BudgetFit":
        """The probes fit, yet training step `step` did not (fragmentation, a longer eval batch)."""
        return dataclasses.replace(self, fits=False, reason=(
            f"out of memory at step {step} after fitting micro-batch {self.micro_batch} "
            f"(checkpointing {self.activation_checkpointing})"), failed_at={
            "step": step, "micro_batch": self.micro_batch, "activation_checkpointing": self.activation_checkpointing})


def probe_steps(model, optimizer, device, autocast, batch_size: int, max_length: int, causal_lm: bool,
                loss_fn=None) -> Callable[[int, bool], None]:
    """`run_steps(micro_batch, checkpointing)` for `cuda_oom_probe`: two optimizer steps at lr 0 over worst-case
    micro-batches, with the training loss (`loss_fn(model, **batch)`, default the model's own), leaving the model,
    the optimizer's state and its learning rates as they were."""
    loss_fn = loss_fn or model_loss
    lrs = [g["lr"] for g in optimizer.param_groups]

    def run_steps(m: int, ckpt: bool) -> None:
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        try:
            # Two steps: the second runs forward/backward with the optimizer state already allocated, as
            # every real step after the first does; two micro-batches each, so gradients and activations
            # coexist as under accumulation.
            for _ in range(2):
                for _ in range(min(2, batch_size // m)):
                    with autocast():
                        loss_fn(model, **_worst_case_batch(m, max_length, device, causal_lm)).backward()
                optimizer.step()
        finally:
            optimizer.zero_grad(set_to_none=True)
            optimizer.state.clear()
            for g, lr in zip(optimizer.param_groups, lrs):
                g["lr"] = lr
            model.gradient_checkpointing_disable()
    return run_steps


def fit_to_budget(budget: int | None, model, optimizer, device, autocast, batch_size: int, max_length: int,
                  micro: int, checkpointing: bool, estimate: Callable[..., MemoryEstimate],
                  causal_lm: bool = False, measure: bool = True, loss_fn=None) -> BudgetFit:
    """Choose micro-batch and activation checkpointing under `budget` bytes (None: keep `micro` and
    `checkpointing` as configured). `estimate(**setting)` is the memory model for this run.

    CUDA: cap the process at the budget and probe real steps (largest micro-batch first, then with
    checkpointing; `probe_steps`, with the run's loss `loss_fn`); the probes use lr 0 and their optimizer state
    and gradients are discarded (they draw random numbers: re-seed after). CPU, or `measure=False` (several
    processes, whose probes could end differently on each rank): the memory model decides."""
    def at(fit: FitResult) -> dict:
        return estimate(micro_batch=fit.micro_batch, grad_accum=fit.grad_accum,
                        activation_checkpointing=fit.activation_checkpointing).as_dict()
    if budget is None:
        fit = FitResult(micro, batch_size // micro, checkpointing, True)
        return BudgetFit(True, None, micro, checkpointing, at(fit))
    if (too_big := _weights_too_big(estimate, budget)) is not None:
        return BudgetFit(False, budget, None, False, estimate().as_dict(), reason=too_big)
    if device.type == "cuda" and measure:
        free_cuda_memory(device)  # what an earlier job of this multirun left in the cache
        cap_process_memory(budget, device)
        run_steps = probe_steps(model, optimizer, device, autocast, batch_size, max_length, causal_lm, loss_fn)
        fit = fit_micro_batch(batch_size, cuda_oom_probe(run_steps, device))
        reason = "no micro-batch fits, even with checkpointing"
    else:
        fit = fit_micro_batch(batch_size, estimate_probe(estimate, budget, batch_size))
        reason = "the estimate exceeds the budget at every setting"
    if not fit.fits:  # the estimate at the configured batch without checkpointing: what did not fit
        return BudgetFit(False, budget, None, fit.activation_checkpointing, estimate().as_dict(), reason=reason,
                         failed_at=fit.failed_at, tried=fit.tried)
    return BudgetFit(True, budget, fit.micro_batch, fit.activation_checkpointing, at(fit), tried=fit.tried)
