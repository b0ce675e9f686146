"""ΔW kept to part of itself: its top-r singular directions, or a random rank-r projection as the baseline. Pure
functions over tensors.

    top = TopSingular.of_dense(delta).kept(64)      # one SVD per matrix; or .of_factors(B, A, scaling) for LoRA
    top.truncated(8)                                # ΔW_8 = U_8 Σ_8 V_8ᵀ, (out, in) fp32
    top.energy_share(8)                             # ‖ΔW_8‖_F² / ‖ΔW‖_F²
    B, A = top.factors(8)                           # B @ A = ΔW_8: a LoRA of rank 8 with scaling 1
    kept_rank(top.S, share=0.9)                     # the rank a rule keeps: a fixed r, or a share of ‖ΔW‖_F²
    DW_Q, Q = random_projection(delta, 8, seed)     # ΔW Q Qᵀ = DW_Q @ Q.T, Q (in, r) a random orthonormal basis

The random baseline projects ΔW onto a uniformly random r-dimensional subspace of its input space (Q from the QR of
a Gaussian (in, r) matrix, which is Haar-distributed). E[Q Qᵀ] = (r/d) I by rotation invariance, so the energy it
keeps, ‖ΔW Q Qᵀ‖_F² = tr(ΔW Q Qᵀ ΔWᵀ), is (r/d)·‖ΔW‖_F² in expectation (`random_energy_share`),
d = in: a spectrum with no preferred directions keeps exactly that much under truncation too.
"""
import zlib
from dataclasses import dataclass

import torch

from lowrank.linalg.spectra import energy_rank, svd_dense, svd_factored


@dataclass
class TopSingular:
    """The top-`keep` singular triplets of ΔW (U (out, k), Vh (k, in), float64) and every singular value S (q,),
    q = ΔW's largest possible rank (min(out, in), or a LoRA run's r)."""
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @classmethod
    def of_dense(cls, delta: torch.Tensor, device=None) -> "TopSingular":
        return cls(*svd_dense(delta, device=device))

    @classmethod
    def of_factors(cls, B: torch.Tensor, A: torch.Tensor, scaling: float) -> "TopSingular":
        return cls(*svd_factored(B, A, scaling))

    def kept(self, keep: int) -> "TopSingular":
        """The same spectrum with only the top `keep` triplets held (what the points need of a large matrix)."""
        return TopSingular(self.U[:, :keep].clone(), self.S, self.Vh[:keep].clone())

    @property
    def max_rank(self) -> int:
        return len(self.S)

    def truncated(self, r: int) -> torch.Tensor:
        """ΔW_r (out, in) fp32; r must be ≤ the number of triplets kept."""
        if r > self.U.shape[1]:
            raise ValueError(f"rank {r} asked of a ΔW kept to its top {self.U.shape[1]} directions")
        return ((self.U[:, :r] * self.S[:r]) @ self.Vh[:r]).float()  # (out, r) @ (r, in)

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out, r), A (r, in)) fp32 with B @ A = ΔW_r, the singular values split evenly between them:
        B = U_r √Σ_r, A = √Σ_r V_rᵀ (neither factor carries the scale alone, so fp32 keeps both well within
        range)."""
        if r > self.U.shape[1]:
            raise ValueError(f"rank {r} asked of a ΔW kept to its top {self.U.shape[1]} directions")
        root = self.S[:r].sqrt()
        return (self.U[:, :r] * root).float().contiguous(), (root[:, None] * self.Vh[:r]).float().contiguous()

    def energy_share(self, r: int) -> float:
        s2 = self.S.double() ** 2
        total = s2.sum().item()
        return s2[:r].sum().item() / total if total > 0 else 1.0


def projection_seed(seed: int, name: str, r: int) -> int:
    """One random subspace per (seed, matrix, rank), the same on every machine."""
    return (seed * 1_000_003 + zlib.crc32(f"{name}/{r}".encode())) % 2**63


def random_basis(d: int, r: int, seed: int) -> torch.Tensor:
    """A uniformly random orthonormal basis (d, r) of an r-dimensional subspace of R^d, fp64."""
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))  # signs fixed: Q is then Haar-distributed, not just orthonormal


def random_projection(delta: torch.Tensor, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔW Q (out, r), Q (in, r)): ΔW projected onto a random r-dimensional subspace of its input space is their
    product ΔW Q Qᵀ, of rank ≤ r, and ‖ΔW Q‖_F² is the energy it keeps."""
    Q = random_basis(delta.shape[1], r, seed)
    return delta.double() @ Q, Q


def random_energy_share(r: int, d: int) -> float:
    """The expected share of ‖ΔW‖_F² a random rank-r projection of the input space (dimension d) keeps: r/d."""
    return min(r, d) / d


def kept_rank(s: torch.Tensor, rank: int | None = None, share: float | None = None) -> int:
    """The rank ΔW keeps under one rule: `rank` (at most len(s), ΔW's largest possible rank), or the smallest rank
    holding `share` of ‖ΔW‖_F² (spectra.energy_rank). Never below 1, since a LoRA module has no rank 0 (a zero ΔW
    keeps one zero direction). s: (q,) every singular value, descending."""
    if (rank is None) == (share is None):
        raise ValueError("give exactly one of rank and share")
    r = min(rank, len(s)) if rank is not None else energy_rank(s, share)
    return max(1, r)
