"""method=subspace: train d numbers θ_d and nothing else of the targets, θ = θ_0 + P θ_d (Li et al. 2018,
"Measuring the Intrinsic Dimension of Objective Landscapes"; Aghajanyan et al. 2020, "Intrinsic Dimensionality
Explains the Effectiveness of Language Model Fine-Tuning").

Every target matrix W_i gets its own Fastfood projection P_i: R^d → R^{numel(W_i)} (lowrank.adapters.fastfood), all
fed by the one θ_d, so W_i = W0_i + reshape(P_i θ_d). With `said=true` (Aghajanyan's SAID) each matrix also gets a
trainable scale λ_i, W_i = W0_i + λ_i reshape(P_i θ_d), and θ_d holds d − m numbers for m matrices, so that d
counts every trainable number of the method. θ_d starts at 0 (the model starts as the base model) and λ at 1.
The weights are torch parametrizations: `module.weight` is W0 + offset wherever it is read, so ΔW = W_ft − W_0
is written exactly as for full fine-tuning. Memory is O(Σ numel(W_i)) for the projections, never d × D.
"""
import zlib

import torch
from torch import nn
from torch.nn.utils import parametrize

from lowrank.errors import ConfigError
from lowrank.adapters.fastfood import Fastfood


class Subspace(nn.Module):
    """θ_d (and λ for SAID): the method's only trainable numbers, shared by every target's parametrization."""

    def __init__(self, dim: int, n_matrices: int, said: bool):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim - n_matrices if said else dim))
        self.scales = nn.Parameter(torch.ones(n_matrices)) if said else None


class SubspaceOffset(nn.Module):
    """The parametrization of one matrix: W0 ↦ W0 + λ_i · reshape(P_i θ_d)."""

    def __init__(self, space: Subspace, index: int, shape: torch.Size, generator: torch.Generator):
        super().__init__()
        object.__setattr__(self, "space", space)  # shared, registered once on the model: not a child of each layer
        self.index, self.shape = index, tuple(shape)
        self.projection = Fastfood(space.theta.numel(), int(torch.Size(shape).numel()), generator)

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        theta = self.space.theta
        if self.projection.gauss.device != theta.device:
            self.projection.to(theta.device)
        offset = self.projection(theta.float()).view(self.shape)
        if self.space.scales is not None:
            offset = offset * self.space.scales[self.index]
        return w0 + offset.to(w0.dtype)


def inject_subspace(model: nn.Module, names: list[str], dim: int, said: bool = False, seed: int = 0) -> Subspace:
    """Freeze the targets' weights and train them through θ_d of size `dim` instead; the Subspace module is
    registered on the model as `intrinsic_subspace` (so .to(), .parameters() and checkpoints see it once)."""
    if said and dim <= len(names):
        raise ConfigError(f"method.dim={dim} is not valid with method.said=true; it must exceed the number of target "
                          f"matrices ({len(names)}), which each take one scale")
    space = Subspace(dim, len(names), said)
    model.add_module("intrinsic_subspace", space)
    for i, name in enumerate(names):
        layer = model.get_submodule(name)
        layer.weight.requires_grad_(False)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))  # one projection per matrix
        parametrize.register_parametrization(layer, "weight", SubspaceOffset(space, i, layer.weight.shape, gen),
                                             unsafe=True)
    return space


def freeze_for_subspace(model: nn.Module, head: nn.Module | None) -> None:
    """Only θ_d (and λ) and the classification head train, as LoRA's factors and the head do."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.intrinsic_subspace.parameters():
        p.requires_grad_(True)
    if head is not None:
        for p in head.parameters():
            p.requires_grad_(True)


def projection_bytes(model: nn.Module) -> int:
    """What the projections store (B, Π, G per matrix): O(D), measured from the tensors themselves."""
    return sum(m.projection.state_bytes() for m in model.modules() if isinstance(m, SubspaceOffset))
