"""One optimizer step of the trainer: forward and backward over the micro-batches, gradient clipping, the
optimizer step; eager, or the whole step captured as one CUDA graph and replayed (`trainer.cuda_graph`).

    step = TrainStep(model, optimizer, trainable, autocast, grad_clip=1.0, graphed=False)
    loss, grad_norm, stepped = step([micro_batch, ...])   # device tensors; the scheduler steps outside

Why a graph: with compiled blocks a step is a few thousand kernels, and the host launching them sets the pace
of a LoRA step (its p90 step time was 19% above its p50 on one H200, full fine-tuning's 2%): replayed as one
graph, nothing waits on the host. It needs one static batch shape (no padding, a fixed batch size), no host
reads of GPU values inside the step, and optimizer state and learning rates in GPU tensors (`place_lr`).
"""
import math
from contextlib import nullcontext

import torch

from lowrank.train.step_graph import StepGraph

def use_cuda_graph(setting, device: torch.device, static_shape: bool, checkpointing: bool) -> tuple[bool, str]:
    """Whether the step is graphed, and why not where it is not. `auto` graphs it where it can be; `true`
    where it cannot is an error the trainer reports naming the key."""
    why_not = ("it runs on the CPU" if device.type != "cuda" else
               "its batches are padded or differ in shape (causal models with unpadded batches only)"
               if not static_shape else
               "activation checkpointing saves RNG state on the host" if checkpointing else "")
    return (not why_not and setting in ("auto", True)), why_not


def place_lr(optimizer, device: torch.device | None, capturable: bool = False) -> None:
    """Each param group's learning rate as a tensor on `device`, which a captured optimizer step reads and the
    scheduler fills in place (a Python float would be baked into the graph), or a float (device None); and
    torch's `capturable` flag, which a step inside a CUDA graph capture needs. Also after loading a
    checkpoint, whose learning rates come back as they were saved (floats or CPU tensors)."""
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if device is not None else lr
        group["capturable"] = capturable


def model_loss(model, **batch) -> torch.Tensor:
    """The model's own loss for a batch (Hugging Face models compute it from `labels`): the default training loss."""
    return model(**batch).loss


class TrainStep:
    def __init__(self, model, optimizer, trainable, autocast, grad_clip, graphed: bool, warmup: int = 3,
                 sync=None, reduce_loss=None, loss_fn=None):
        """`sync(last)`: a context for each micro-batch's backward (DDP reduces gradients only in the last);
        `reduce_loss`: this rank's loss to the whole batch's (the mean over ranks; identity in one process);
        `loss_fn(model, **batch)`: the micro-batch's mean loss (default: the model's own, `model(**batch).loss`)."""
        self.model, self.optimizer, self.trainable, self.autocast = model, optimizer, trainable, autocast
        self.loss_fn = loss_fn or model_loss
        self.max_norm = grad_clip if grad_clip else math.inf
        self.graph = StepGraph(self._whole_step, warmup) if graphed else None
        self.sync = sync or (lambda last: nullcontext())
        self.reduce_loss = reduce_loss or (lambda t: t)

    def _forward_backward(self, micro_batches: list[dict]):
        n = sum(len(b["input_ids"]) for b in micro_batches)
        loss_sum = None
        # gradient accumulation: each micro-batch's mean loss weighted by its size
        for i, batch in enumerate(micro_batches):
            with self.sync(i == len(micro_batches) - 1):
                with self.autocast():
                    loss = self.loss_fn(self.model, **batch) * (len(batch["input_ids"]) / n)
                loss.backward()
            loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_norm)
        return self.reduce_loss(loss_sum), grad_norm

    def _whole_step(self, micro_batches: list[dict]):
        loss, grad_norm = self._forward_backward(micro_batches)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # backward in the capture allocates them in the graph's pool
        return loss, grad_norm

    @property
    def overlaps(self) -> bool:
        """Graphed, a step's loss is read after the next step is launched (the host never holds the GPU up)."""
        return self.graph is not None

    def launch(self, micro_batches: list[dict]) -> "_Result":
        """Run one step. Eager, it is done on return, and a non-finite loss or gradient skipped the optimizer
        step (`skipped_update()`). Graphed, the step is queued on the GPU and its loss and gradient norm are on
        their way to the host (`result()` waits for them); the update has run whatever they are (the trainer
        stops such a run as diverged and keeps no weights of it)."""
        if self.graph is not None:
            loss, grad_norm = self.graph(micro_batches)
            return _Result(pending=torch.stack([loss.float(), grad_norm.float()]))
        loss, grad_norm = self._forward_backward(micro_batches)
        loss_value, norm_value = loss.item(), grad_norm.item()  # one host sync per step: the step time is real
        stepped = math.isfinite(loss_value) and math.isfinite(norm_value)
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _Result(values=(loss_value, norm_value, stepped))

    def __call__(self, micro_batches: list[dict]) -> tuple[float, float, bool]:
        """(loss, gradient norm, whether the optimizer stepped), once the step is done."""
        return self.launch(micro_batches).result()


class _Result:
    """A step's (loss, gradient norm, stepped): at hand (eager), or copied to pinned host memory behind the
    step's kernels, with an event to wait on (graphed)."""

    def __init__(self, values=None, pending: torch.Tensor | None = None):
        self.values, self.event = values, None
        if pending is not None:
            self.host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            self.host.copy_(pending, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def skipped_update(self) -> bool:
        return self.values is not None and not self.values[2]

    def result(self) -> tuple[float, float, bool]:
        if self.values is None:
            self.event.synchronize()
            self.values = (float(self.host[0]), float(self.host[1]), True)
        return self.values
