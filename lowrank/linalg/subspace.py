"""Normalised subspace similarity of the LoRA paper (Hu et al. 2021, Section 7.2, Eq. 4; Appendix G):

    φ(A, B, i, j) = ‖U_A^{i⊤} U_B^{j}‖_F² / min(i, j)  ∈ [0, 1]

where U_A^{i} holds the top-i singular directions of A (columns, ordered by singular value). 1 means one
subspace contains the other, 0 that they are orthogonal.

Which directions, per side (the report's `basis` column):
  basis 'factor' (LoRA vs LoRA, as the paper): input side = right singular vectors of A (r, in), i.e. the
      paper's "right-singular unitary matrix of A"; output side = left singular vectors of B (out, r).
  basis 'delta' (anything involving full fine-tuning): input side = right singular vectors of ΔW,
      output side = left singular vectors of ΔW.
"""
import torch


def phi_grid(Ua: torch.Tensor, Ub: torch.Tensor) -> torch.Tensor:
    """φ for every i ≤ I, j ≤ J at once. Ua: (d, I), Ub: (d, J), orthonormal columns, strongest first.
    Returns (I, J) float64 with out[i-1, j-1] = φ(i, j). One cross-Gram matrix G = (Uaᵀ Ub)² and a 2-D
    cumulative sum give every ‖Ua^{i⊤} Ub^{j}‖_F², so the grid costs one (I, d) @ (d, J) product."""
    if Ua.shape[0] != Ub.shape[0]:
        raise ValueError(f"subspaces live in different spaces: {Ua.shape[0]} vs {Ub.shape[0]}")
    G = (Ua.double().mT @ Ub.double()) ** 2        # (I, J)
    C = G.cumsum(0).cumsum(1)                      # C[i-1, j-1] = ‖Ua^{i⊤} Ub^{j}‖_F²
    i = torch.arange(1, G.shape[0] + 1, dtype=torch.float64, device=G.device)[:, None]
    j = torch.arange(1, G.shape[1] + 1, dtype=torch.float64, device=G.device)[None, :]
    return C / torch.minimum(i, j)


def phi(Ua: torch.Tensor, Ub: torch.Tensor, i: int, j: int) -> float:
    """φ(A, B, i, j) for one (i, j). Ua: (d, ≥i), Ub: (d, ≥j)."""
    return phi_grid(Ua[:, :i], Ub[:, :j])[-1, -1].item()


def random_phi(i: int, j: int, d: int) -> float:
    """E[φ] for independent uniformly random i- and j-dimensional subspaces of R^d: E‖U^{i⊤}V^{j}‖_F² = i·j/d,
    so E[φ] = max(i, j) / d. The baseline shown next to every measured φ."""
    return max(i, j) / d


def random_phi_grid(I: int, J: int, d: int) -> torch.Tensor:
    """(I, J) grid of random_phi(i, j, d)."""
    i = torch.arange(1, I + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, J + 1, dtype=torch.float64)[None, :]
    return torch.maximum(i, j) / d


def factor_bases(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's own directions: (left singular vectors of B (out, r), right singular vectors of A (in, r)),
    strongest first; the paper's choice for comparing LoRA runs (basis 'factor')."""
    U_b = torch.linalg.svd(B.double(), full_matrices=False)[0]
    V_a = torch.linalg.svd(A.double(), full_matrices=False)[2].mT
    return U_b, V_a


def random_basis(d: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(d, k) orthonormal columns spanning a uniformly random k-dimensional subspace (QR of a Gaussian)."""
    q, r = torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # sign fix makes the distribution Haar, not QR-biased
