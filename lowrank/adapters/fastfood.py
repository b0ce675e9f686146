"""Fastfood random projections R^d → R^D in O(D) memory (Le, Sarlós & Smola 2013), the structured projection
that Li et al. 2018 and Aghajanyan et al. 2020 use to measure intrinsic dimension.

    P θ = (1 / (σ_G √(D L)))  ·  [H G Π H B · pad_L(θ)]_{:D},    L = 2^⌈log2 max(d, D)⌉

B is a random ±1 diagonal, H the (unnormalised) Walsh-Hadamard transform, Π a random permutation, G a Gaussian
diagonal and σ_G = ‖G‖/√L. H B spreads θ over all L coordinates, Π G H mixes them again like a dense Gaussian
matrix would, and the scale makes E‖Pθ‖² = ‖θ‖²: a step of size s in θ moves the weights by about s.
What is stored is B, Π and G: three length-L vectors, so memory is O(D) where a dense P would take d·D numbers.
"""
import math

import torch


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """The unnormalised Walsh-Hadamard transform along the last dimension (a power of 2): log2(L) butterfly
    passes of adds and subtracts, differentiable, O(L) memory."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"walsh_hadamard needs a power-of-2 length, got {n}")
    lead, h = x.shape[:-1], 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*lead, n)


class Fastfood:
    """One projection R^d → R^D, drawn from `generator` (on the CPU, so every device gets the same one)."""

    def __init__(self, d: int, D: int, generator: torch.Generator, device=None):
        if d < 1 or D < 1:
            raise ValueError(f"Fastfood needs d ≥ 1 and D ≥ 1, got d={d}, D={D}")
        self.d, self.D = d, D
        self.L = 2 ** math.ceil(math.log2(max(d, D, 2)))
        L = self.L
        self.signs = (torch.randint(0, 2, (L,), generator=generator) * 2 - 1).to(torch.int8)
        self.perm = torch.randperm(L, generator=generator)
        self.gauss = torch.randn(L, generator=generator)
        self.scale = 1.0 / math.sqrt(D * float(self.gauss.square().sum()))
        if device is not None:
            self.to(device)

    def to(self, device) -> "Fastfood":
        self.signs, self.perm, self.gauss = (t.to(device) for t in (self.signs, self.perm, self.gauss))
        return self

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.signs, self.perm, self.gauss))

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """P θ for θ of shape (d,): a (D,) tensor in θ's dtype."""
        x = torch.nn.functional.pad(theta, (0, self.L - self.d)) * self.signs.to(theta.dtype)
        x = walsh_hadamard(x)[self.perm] * self.gauss.to(theta.dtype)
        return walsh_hadamard(x)[:self.D] * self.scale
