"""How far fine-tuning moved W's own top directions and values: W0 against W_ft = W0 + ΔW. Pure functions over tensors.

    cos = principal_cosines(Qa, Qb)                  # cos θ_1 ≥ ... ≥ cos θ_k of two k-dim subspaces
    overlap = top_overlap(U0, U_ft, (1, 8, 64))      # {k: mean cos² of the principal angles of the top-k subspaces}
    drift = sigma_drift(S_ft, S0, 8)                 # σ_i(W_ft) / σ_i(W0), i ≤ 8

Principal angles (Björck & Golub 1973, "Numerical methods for computing angles between linear subspaces", Math.
Comp. 27): for orthonormal bases Qa, Qb (d, k) the cosines of the angles 0 ≤ θ_1 ≤ ... ≤ θ_k ≤ π/2 are the
singular values of Qaᵀ Qb. The mean of cos² θ_i is ‖Qaᵀ Qb‖_F² / k, the LoRA paper's φ(k, k)
(lowrank.linalg.subspace.phi): 1 for the same subspace, 0 for orthogonal ones, k/d on average for a random one. The mean
rather than the largest angle: where σ_k ≈ σ_{k+1}, a small update swaps the k-th and (k+1)-th directions, which
moves the largest angle to ~90° but the mean cos² by 1/k only.
"""
import torch

from lowrank.linalg.subspace import phi


def principal_cosines(Qa: torch.Tensor, Qb: torch.Tensor) -> torch.Tensor:
    """cos θ_i, descending (angles ascending), of span(Qa) and span(Qb). Qa: (d, i), Qb: (d, j), orthonormal columns;
    min(i, j) values, clamped to [0, 1] against rounding."""
    return torch.linalg.svdvals(Qa.double().mT @ Qb.double()).clamp(0.0, 1.0)


def top_overlap(Ua: torch.Tensor, Ub: torch.Tensor, ks=(1, 8, 64)) -> dict[int, float]:
    """{k: mean cos² of the principal angles between the top-k columns of Ua and of Ub} for each k, capped at the
    columns both have (a matrix of rank below k compares all its directions). Ua, Ub: (d, ·), strongest first."""
    cap = min(Ua.shape[1], Ub.shape[1])
    return {k: phi(Ua, Ub, min(k, cap), min(k, cap)) if cap else float("nan") for k in ks}


def sigma_drift(s_ft: torch.Tensor, s0: torch.Tensor, k: int) -> torch.Tensor:
    """σ_i(W_ft) / σ_i(W0) for i ≤ k (capped at the values both have): (k,). Each side sorted descending, so the
    i-th values are compared whichever directions they belong to. NaN where σ_i(W0) = 0."""
    k = min(k, len(s_ft), len(s0))
    s0 = s0[:k].double()
    return torch.where(s0 > 0, s_ft[:k].double() / torch.where(s0 > 0, s0, 1.0), float("nan"))
