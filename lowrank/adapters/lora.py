"""LoRA: a trainable low-rank update B·A beside a frozen nn.Linear (Hu et al., 2021, arXiv 2106.09685).

    h = W0 x + scaling · B A x,   A: (r, in), B: (out, r), B = 0 at init so a fresh adapter changes nothing.

The adapter wraps the frozen layer (as PEFT does) instead of inheriting from it; `merge()` folds ΔW into
W0 for inference and `unmerge()` takes it out again, with an explicit `merged` flag and no side effects
in `train()`/`eval()` (unlike loralib). Dropout-free layers run one fused autograd function
(lowrank.adapters.fused); siblings that a block calls on one input (q, k, v; gate, up) compute together as a
SharedInputGroup, which reads that input once for all their adapters.
"""
import functools
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.errors import ConfigError, check_choice
from lowrank.adapters.fused import lora_linear, lora_linear_group
from lowrank.adapters.targets import module_ranks, pattern_key, read_rank_pattern, select_targets

SCALINGS = ("standard", "rslora")
# sibling layers a block calls on one input, one after another (Llama/Mistral/Qwen attention and MLP; BERT)
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))
INITS = ("kaiming_uniform", "gaussian", "pissa")


def lora_scaling(alpha: float, rank: int, rule: str) -> float:
    """standard: alpha/r (the paper); rslora: alpha/sqrt(r) (Kalajdzievski 2023, rank-stabilised)."""
    if rule == "standard":
        return alpha / rank
    if rule == "rslora":
        return alpha / math.sqrt(rank)
    check_choice("method.scaling", rule, SCALINGS)


class LoRALinear(nn.Module):
    """The adapter protocol, which its variants (lowrank.adapters.variants) keep: `trainable()` names what trains,
    `delta_factors()` gives ΔW against the original W0 as a product (or None where it is not one, then
    `delta_weight()` is read: `dense_delta`), and `shares_input` says whether siblings may compute together
    (SharedInputGroup)."""
    shares_input, dense_delta = True, False

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 scaling: str = "standard", init: str = "kaiming_uniform"):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRALinear needs rank >= 1, got {rank}")  # configs are checked by lowrank.config
        self.base_layer = base_layer
        self.rank, self.alpha = rank, alpha
        self.scaling = lora_scaling(alpha, rank, scaling)
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, device=w.device, dtype=w.dtype))
        if init in ("kaiming_uniform", "pissa"):  # what loralib and PEFT do (nn.Linear's default init); for PiSSA
            # the trainer then sets A, B and the base from W's top singular part (lowrank.adapters.variants.pissa_init)
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":  # the paper's text: "random Gaussian initialization for A"
            nn.init.normal_(self.lora_A, std=1.0 / rank)
        else:
            check_choice("method.init", init, INITS)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.group: SharedInputGroup | None = None  # set by group_shared_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.group is not None and not self.group.any_merged():
            return self.group(self, x)
        if isinstance(self.dropout, nn.Identity):  # one autograd node: fewer casts, copies and kernels
            b = self.base_layer
            return lora_linear(x, b.weight, b.bias, self.lora_A, self.lora_B, self.scaling)
        # (.., in) -> (.., r) -> (.., out): never form the (out, in) product in the forward pass
        y = self.base_layer(x)
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, r) @ (r, in)

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(B, A, s) with ΔW against the original W0 = s · B A: (out, r), (r, in); spectra come from QR of them."""
        return self.lora_B, self.lora_A, self.scaling

    def trainable(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("merge() on an already merged LoRA layer")
        self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("unmerge() on a LoRA layer that is not merged")
        self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


class SharedInputGroup:
    """Dropout-free LoRA layers that a block calls on one input, one after another (q, k, v): the first
    call computes every member's output at once (`lora_linear_group`: one pass over the input for all
    their h = x Aᵀ and one for all their A gradients), and the others take theirs if they are called with
    that same tensor, in the same grad mode and autocast state; otherwise the group is recomputed. A member
    called with another tensor while outputs for the last one still wait (cross-attention) ends the group:
    from then on each layer computes alone. Outputs wait only within one forward pass of the model
    (`inject_lora` clears the groups as each forward begins), so a failed pass leaves nothing held. A plain
    object, not a module: the members stay where the model has them."""

    def __init__(self, layers: list["LoRALinear"]):
        self.layers = layers
        self.clear()
        for i, layer in enumerate(layers):
            layer.group, layer.group_index = self, i

    def clear(self) -> None:
        self.x, self.context, self.pending = None, None, [None] * len(self.layers)

    def __getstate__(self) -> dict:  # copies and pickles hold no waiting outputs
        return {"layers": self.layers, "x": None, "context": None, "pending": [None] * len(self.layers)}

    def any_merged(self) -> bool:
        return any(layer.merged for layer in self.layers)

    def dissolve(self) -> None:
        self.clear()
        for layer in self.layers:
            layer.group = None

    def __call__(self, layer: "LoRALinear", x: torch.Tensor) -> torch.Tensor:
        if self.x is not None and self.x is not x:  # the members do not share their input
            self.dissolve()
            return layer(x)
        i = layer.group_index
        context = (torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type))
        if self.pending[i] is None or self.context != context:
            ys = lora_linear_group(x, [(m.base_layer.weight, m.base_layer.bias, m.lora_A, m.lora_B, m.scaling)
                                       for m in self.layers])
            self.x, self.context, self.pending = x, context, list(ys)  # only once computed: an error holds nothing
        y, self.pending[i] = self.pending[i], None
        if all(p is None for p in self.pending):
            self.clear()  # nothing left to hand out: hold no tensor between forward passes
        return y


def _clear_groups(owner: nn.Module, module: nn.Module, args) -> None:
    for group in owner.lora_groups:
        group.clear()


def group_shared_inputs(model: nn.Module, names: list[str]) -> None:
    """Group the dropout-free LoRA layers among `names` that are siblings in one SHARED_INPUT family and
    take inputs of one width, dtype and device. The model clears its groups as each of its forward passes
    begins, and so does its decoder (`base_model`) called alone."""
    groups = []
    for family in SHARED_INPUT:
        by_parent: dict[tuple, list[str]] = {}
        for name in names:
            parent, _, leaf = name.rpartition(".")
            layer = model.get_submodule(name)
            if leaf in family and isinstance(layer.dropout, nn.Identity):
                w = layer.base_layer.weight
                by_parent.setdefault((parent, w.shape[1], w.dtype, w.device), []).append(name)
        for members in by_parent.values():
            if len(members) > 1:
                groups.append(SharedInputGroup([model.get_submodule(n) for n in members]))
    if groups:
        if getattr(model, "lora_groups", None) is None:  # the first groups: the model clears them each forward
            model.lora_groups = []
            clear = functools.partial(_clear_groups, model)
            model.register_forward_pre_hook(clear)
            decoder = getattr(model, "base_model", model)  # which a loss that runs the head itself calls alone
            if decoder is not model:
                decoder.register_forward_pre_hook(clear)
        model.lora_groups.extend(groups)


_LAYER_INDEX = re.compile(r"\.\d+\.")


def block_linear_names(model: nn.Module) -> list[str]:
    """Every nn.Linear inside a repeated transformer block (a name with a layer index, e.g.
    `encoder.layer.3.attention.self.query`): the attention and MLP projections, not the pooler or head."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _LAYER_INDEX.search(f".{n}")]


def match_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the block nn.Linear modules that `targets` selects (lowrank.adapters.targets.select_targets)."""
    return select_targets(block_linear_names(model), targets)


def inject_lora(model: nn.Module, targets, rank: int, alpha: float, dropout: float = 0.0,
                scaling: str = "standard", init: str = "kaiming_uniform", rank_pattern=None,
                layer_type: type | None = None) -> list[str]:
    """Replace each targeted nn.Linear by a LoRALinear wrapping it; returns the replaced names. Layers that
    share their input (SHARED_INPUT) compute together (SharedInputGroup). `rank_pattern` (a mapping or the path
    of a JSON file, PEFT's semantics: lowrank.adapters.targets.pattern_key) gives some modules another rank; each
    module's scaling follows its own rank, as in PEFT."""
    names = match_targets(model, targets)
    pattern = read_rank_pattern(rank_pattern)
    if pattern and not any(pattern_key(pattern, n) for n in names):
        raise ConfigError(f"method.rank_pattern selects none of the {len(names)} targets (keys such as "
                          f"{next(iter(pattern))!r}; targets such as {names[0]!r}); give module-name suffixes or "
                          f"full names of targeted modules")
    layer_type = layer_type or LoRALinear  # a subclass: lowrank.adapters.variants.PiSSALinear, DoRALinear
    for name, r in module_ranks(names, rank, pattern).items():
        model.set_submodule(name, layer_type(model.get_submodule(name), r, alpha, dropout, scaling, init))
    if layer_type.shares_input:  # DoRA's layers compute alone (its row norms need the whole product)
        group_shared_inputs(model, names)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def freeze_for_lora(model: nn.Module, head: nn.Module | None) -> None:
    """Freeze by module type: only LoRA factors and the task head train."""
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        for p in layer.trainable():
            p.requires_grad_(True)
    if head is not None:
        head.requires_grad_(True)
