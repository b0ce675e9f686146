"""The trainer's optimizer and schedule: torch's AdamW, or, for LoRA over a bf16 base, the LoRA factors held in
bf16 and stepped through one flat fp32 master copy (`lora_fast.FlatMasterAdamW`: no per-layer casts of the
factors in forward and backward, one fused AdamW kernel for all of them) beside an AdamW for the head. Both
look the same to the trainer: `step`, `zero_grad`, `param_groups`, `state`, `state_dict`.

    optimizer = make_optimizer(model, trainable, kind, lr=1e-3, weight_decay=0.0, fused=True)
    scheduler = make_scheduler(optimizer, lr_lambda)
"""
import math

import torch

from lowrank.adapters.lora import lora_layers
from lowrank.adapters.fused import FlatMasterAdamW

OPTIMIZERS = ("auto", "adamw", "flat_master")


def lr_lambda(schedule: str, warmup: int, total: int):
    """The learning-rate factor at a step: linear warm-up, then linear, cosine or constant."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
    return f


class _States:
    """`optimizer.state` of several optimizers: what the budget probes clear after their steps."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    def clear(self) -> None:
        for opt in self.optimizers:
            opt.state.clear()


class FactorsAndHead:
    """bf16 LoRA factors stepped by FlatMasterAdamW (fp32 masters), the head and any other trained parameter
    by torch's AdamW: the update of AdamW on fp32 factors, computed in bf16 as bf16 autocast would."""

    def __init__(self, factors: list, others: list, lr: float, weight_decay: float, fused: bool):
        for p in factors:
            p.data = p.data.to(torch.bfloat16)
        self.flat = FlatMasterAdamW(factors, lr=lr, weight_decay=weight_decay)
        # a causal LM's LoRA trains nothing beside the factors (no new head)
        self.others = torch.optim.AdamW(others, lr=lr, weight_decay=weight_decay, fused=fused) if others else None
        self.inner = [self.flat.optimizer] + ([self.others] if others else [])
        self.state = _States(self.inner)

    @property
    def param_groups(self) -> list:
        return [g for opt in self.inner for g in opt.param_groups]

    def step(self) -> None:
        self.flat.step()
        if self.others is not None:
            self.others.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.flat.zero_grad()
        if self.others is not None:
            self.others.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"flat": self.flat.optimizer.state_dict(), "master": self.flat.master.detach().clone(),
                "others": self.others.state_dict() if self.others is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.flat.optimizer.load_state_dict(state["flat"])
        with torch.no_grad():
            self.flat.master.copy_(state["master"])
            self.flat.flat.copy_(self.flat.master)  # the bf16 factors the model computes with
        if self.others is not None:
            self.others.load_state_dict(state["others"])


class Schedules:
    """One LambdaLR per inner optimizer, stepped together (LambdaLR takes a torch optimizer only)."""

    def __init__(self, optimizers, factor):
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimizers]

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def get_last_lr(self) -> list[float]:
        return [float(lr) for lr in self.schedulers[0].get_last_lr()]  # tensors where the step is graphed

    def state_dict(self) -> dict:
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        for s, sd in zip(self.schedulers, state["schedulers"]):
            s.load_state_dict(sd)


def resolve_optimizer(kind: str, method: str, device_type: str, precision: str, static_batches: bool,
                      loraplus: bool = False) -> str:
    """`auto`: flat_master for LoRA computing in bf16 on CUDA with batches of one shape (so the step is one CUDA
    graph: there it measured 2.6% faster than adamw at 1.1B and 0.7% at 7B on one H200, where without the
    graph it was 1-6% slower), adamw otherwise."""
    if kind != "auto":
        return kind
    return "flat_master" if (method == "lora" and device_type == "cuda" and precision == "bf16"
                             and static_batches and not loraplus) else "adamw"


def loraplus_groups(model, trainable: list, lr: float, ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A. As in the paper's code and PEFT's
    create_loraplus_optimizer (for a model without embedding adapters), every 1-D parameter (the head's bias)
    goes with B and the rest (A, the head's weight) stays at lr."""
    b_ids = {id(layer.lora_B) for layer in lora_layers(model).values()}
    fast = [p for p in trainable if id(p) in b_ids or p.ndim == 1]
    fast_ids = {id(p) for p in fast}
    return [{"params": [p for p in trainable if id(p) not in fast_ids], "lr": lr}, {"params": fast, "lr": lr * ratio}]


def make_optimizer(model, trainable: list, kind: str, lr: float, weight_decay: float, fused: bool,
                   loraplus_ratio: float | None = None):
    if loraplus_ratio is not None:  # groups of their own lr: torch's AdamW (FlatMasterAdamW has one lr)
        if kind != "adamw":
            raise ValueError("LoRA+ steps with adamw: its factors need two learning rates")
        return torch.optim.AdamW(loraplus_groups(model, trainable, lr, loraplus_ratio), lr=lr,
                                 weight_decay=weight_decay, fused=fused)
    if kind == "adamw":
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, fused=fused)
    factors = [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    ids = {id(p) for p in factors}
    return FactorsAndHead(factors, [p for p in trainable if id(p) not in ids], lr, weight_decay, fused)


def make_scheduler(optimizer, factor) -> Schedules:
    return Schedules(optimizer.inner if isinstance(optimizer, FactorsAndHead) else [optimizer], factor)
