"""Each fine-tuning method as one type: how it is applied to a model, what it trains, and how its ΔW against W0
is read, so the trainer, the ΔW writer and rank dynamics each run one loop over `method.delta(...)`.

    method = method_for(cfg)                    # Full, Subspace, LoRA (PiSSA, DoRA as layer types), ReLoRA
    method.apply(model, names, head)           # inject and freeze: afterwards requires_grad says what trains
    for name in names:
        d = method.delta(model, name, w0)      # Delta: s·B A as factors, or dense (out, in) fp32

A method whose ΔW is not a product of trained factors (`needs_w0`: full, subspace, DoRA, ReLoRA) is read as
W − W0 against a copy of W0 the trainer keeps. ReLoRA also acts during training (`schedule`, `after_step`, and
its state for resume); the others' hooks do nothing.
"""
from dataclasses import dataclass

import torch
from torch import nn

from lowrank.adapters.lora import LoRALinear, freeze_for_lora, inject_lora, lora_layers
from lowrank.adapters.relora import ReLoRA, jagged
from lowrank.adapters.subspace import freeze_for_subspace, inject_subspace
from lowrank.adapters.variants import DoRALinear, PiSSALinear
from lowrank.config import option


@dataclass
class Delta:
    """ΔW of one matrix against the original W0: `factors` (B (out, r), A (r, in), s) with ΔW = s·B A, or `dense`."""
    factors: tuple[torch.Tensor, torch.Tensor, float] | None = None
    dense: torch.Tensor | None = None


class Full:
    """Every weight trains; ΔW = W_ft − W_0 of the targets."""
    name, needs_w0, trains_everything = "full", True, True
    base_moves = False  # ReLoRA folds its adapters into the base weights

    def apply(self, model: nn.Module, names: list[str], head: nn.Module | None) -> None:
        pass

    def weight(self, model: nn.Module, name: str) -> torch.Tensor:
        return model.get_submodule(name).weight  # a subspace target: W0 + P θ, its parametrization

    def delta_params(self, model: nn.Module, names: list[str]) -> set[int]:
        """ids of the parameters whose training ΔW of the targets already holds: every other trained parameter is
        what rebuilding the fine-tuned model needs besides W0 + ΔW (lowrank.rundir.delta.trained_params)."""
        return {id(model.get_submodule(n).weight) for n in names}

    def delta(self, model: nn.Module, name: str, w0: torch.Tensor) -> Delta:
        """The difference is taken in fp32 on the weight's device (exactly W_ft − W_0); `w0` moves there if it
        must."""
        w = self.weight(model, name).detach().float()
        return Delta(dense=w - w0.to(w.device))

    def schedule(self, factor):
        return factor

    def attach(self, optimizer) -> None:
        pass

    def due(self, steps_done: int, max_steps: int) -> bool:
        return False

    def after_step(self, steps_done: int, max_steps: int) -> None:
        pass

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass

    def metrics(self) -> dict:
        return {}


class Subspace(Full):
    """The targets train only through θ_d (lowrank.adapters.subspace); the head trains as with LoRA."""
    name, trains_everything = "subspace", False

    def __init__(self, dim: int, said: bool, seed: int):
        self.dim, self.said, self.seed = dim, said, seed

    def apply(self, model: nn.Module, names: list[str], head: nn.Module | None) -> None:
        inject_subspace(model, names, self.dim, self.said, seed=self.seed)
        freeze_for_subspace(model, head)

    def delta_params(self, model: nn.Module, names: list[str]) -> set[int]:
        return {id(p) for p in model.intrinsic_subspace.parameters()}  # θ (and λ): W0 + P θ is the targets' ΔW


class LoRA(Full):
    """Adapters of `layer_type` on the targets; only they and the head train. ΔW is the layer's own product, or,
    where it has none (DoRA), its dense ΔW against W0."""
    name, trains_everything = "lora", False

    def __init__(self, mc, rank_pattern=None, layer_type: type[LoRALinear] = LoRALinear):
        self.mc, self.rank_pattern, self.layer_type = mc, rank_pattern, layer_type
        self.needs_w0 = layer_type.dense_delta or self.base_moves

    def apply(self, model: nn.Module, names: list[str], head: nn.Module | None) -> None:
        mc = self.mc
        inject_lora(model, names, mc.rank, mc.alpha, mc.dropout, mc.scaling, mc.init, self.rank_pattern,
                    layer_type=self.layer_type)
        freeze_for_lora(model, head)

    def weight(self, model: nn.Module, name: str) -> torch.Tensor:
        return model.get_submodule(name).base_layer.weight

    def delta_params(self, model: nn.Module, names: list[str]) -> set[int]:
        return {id(p) for layer in lora_layers(model).values() for p in layer.parameters()}  # DoRA's magnitude too

    def delta(self, model: nn.Module, name: str, w0: torch.Tensor | None) -> Delta:
        layer = model.get_submodule(name)
        factors = layer.delta_factors()
        if factors is not None and not self.base_moves:
            B, A, s = factors
            return Delta(factors=(B.detach(), A.detach(), s))
        # not B·A alone: what moved the base weight (ReLoRA's merges; exactly 0 for DoRA) plus the live adapter's
        # ΔW, the difference taken first: ΔW is small beside W, and W + ΔW − W0 would round most of it away
        w = self.weight(model, name).detach().float()
        return Delta(dense=(w - w0.to(w.device)) + layer.delta_weight().detach().float())


class ReLoRAMethod(LoRA):
    """LoRA whose adapters are folded into their base weights every `relora_every` steps and restarted
    (lowrank.adapters.relora): the base moves, so ΔW is dense, against W0."""
    base_moves = True

    def __init__(self, mc, rank_pattern, every: int, warmup: int):
        super().__init__(mc, rank_pattern)
        self.every, self.warmup = every, warmup
        self.model, self.relora = None, None

    def apply(self, model: nn.Module, names: list[str], head: nn.Module | None) -> None:
        super().apply(model, names, head)
        self.model = model

    def schedule(self, factor):
        return jagged(factor, self.every, self.warmup)

    def attach(self, optimizer) -> None:
        self.relora = ReLoRA(self.model, optimizer, self.every)

    def due(self, steps_done: int, max_steps: int) -> bool:
        return self.relora.due(steps_done, max_steps)

    def after_step(self, steps_done: int, max_steps: int) -> None:
        self.relora.after_step(steps_done, max_steps)

    def state_dict(self) -> dict:
        return self.relora.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.relora.load_state_dict(state)

    def metrics(self) -> dict:
        return {"relora_restarts": self.relora.restarts}


def method_for(cfg) -> Full:
    """The method `cfg.method` names (checked by lowrank.config.validate)."""
    mc = cfg.method
    if mc.name == "full":
        return Full()
    if mc.name == "subspace":
        return Subspace(mc.dim, mc.said, cfg.seed)
    pattern = option(cfg, "method.rank_pattern")
    if option(cfg, "method.relora_every"):
        return ReLoRAMethod(mc, pattern, option(cfg, "method.relora_every"), option(cfg, "method.relora_warmup"))
    if option(cfg, "method.dora"):
        return LoRA(mc, pattern, DoRALinear)
    return LoRA(mc, pattern, PiSSALinear if mc.init == "pissa" else LoRALinear)
