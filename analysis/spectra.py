"""Singular values of ΔW and the ranks and norms derived from them. Pure functions over tensors.

    U, S, Vh = svd_factored(B, A, scaling)   # LoRA: through QR of the factors, never forming (out, in)
    U, S, Vh = svd_dense(delta)              # full fine-tuning: exact, or randomised top-k for huge matrices
    S, resid = svdvals_gram(delta)           # values only, fast: eigenvalues of the smaller Gram matrix
    energy_rank(S, 0.9), effective_rank(S), stable_rank(S)

Singular values come back sorted descending, as float64 on the CPU.
"""
import math

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def svd_dense(m: torch.Tensor, k: int | None = None, randomized: bool = False, niter: int = 6,
              oversample: int = 16, seed: int = 0, device=None, dtype=torch.float64):
    """Thin SVD of m (out, in): U (out, q), S (q,), Vh (q, in) with q = min(out, in), or q = k when k is set.
    `randomized` (needs k) uses torch.svd_lowrank (Halko et al. 2011) with a fixed seed, for matrices too large
    for an exact SVD; its leading values are accurate to a few digits, enough for ranks and subspaces."""
    device = device or default_device()
    x = m.to(device=device, dtype=dtype)
    if randomized:
        if k is None:
            raise ValueError("randomized SVD needs k")
        q = min(k + oversample, *x.shape)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # svd_lowrank draws its test matrix from the global generator
            U, S, V = torch.svd_lowrank(x, q=q, niter=niter)
        U, S, Vh = U[:, :k], S[:k], V[:, :k].mT
    else:
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        if k is not None:
            U, S, Vh = U[:, :k], S[:k], Vh[:k]
    return U.cpu(), S.cpu(), Vh.cpu()


def svdvals_dense(m: torch.Tensor, device=None, dtype=torch.float64) -> torch.Tensor:
    """All min(out, in) singular values of m (out, in), descending."""
    return torch.linalg.svdvals(m.to(device=device or default_device(), dtype=dtype)).cpu()


def svdvals_gram(m: torch.Tensor, device=None) -> tuple[torch.Tensor, float]:
    """All min(out, in) singular values of m (out, in), descending, as sqrt of the eigenvalues of the smaller
    Gram matrix (mᵀm or m mᵀ) in fp64: on an H200, 0.1 s for 4096² against ~1.1 s for an fp32 SVD
    (benchmarks/results/svd_h200.md). Squaring costs relative accuracy ~ε·(σ_max/σ)²: in fp64 that is
    ≤ 1e-8 for every σ ≥ 1e-4·σ_max, and values below ~1e-8·σ_max are noise (clamped at 0). Also returns
    |Σλ − ‖m‖_F²| / ‖m‖_F², a check on the eigensolver (0 for a zero matrix)."""
    x = m.to(device=device or default_device(), dtype=torch.float64)
    g = x.mT @ x if x.shape[0] >= x.shape[1] else x @ x.mT  # (q, q), q = min(out, in)
    lam = torch.linalg.eigvalsh(g)                          # ascending
    trace = g.diagonal().sum()
    resid = ((lam.sum() - trace).abs() / trace).item() if trace != 0 else 0.0  # NaN stays NaN
    return lam.flip(0).clamp_min(0).sqrt().cpu(), resid


def svd_factored(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0, dtype=torch.float64):
    """Thin SVD of scaling · B @ A from the factors. B: (out, r), A: (r, in).
    B = Q_B R_B and Aᵀ = Q_A R_A give B A = Q_B (R_B R_Aᵀ) Q_Aᵀ, so only the r×r core is decomposed.
    Returns U (out, r), S (r,), Vh (r, in), with S ≥ 0 whatever the sign of `scaling`."""
    B, A = B.to(dtype), A.to(dtype)
    Qb, Rb = torch.linalg.qr(B)        # (out, r), (r, r)
    Qa, Ra = torch.linalg.qr(A.mT)     # (in, r), (r, r)
    Uc, S, Vhc = torch.linalg.svd(Rb @ Ra.mT)  # the r×r core
    sign = -1.0 if scaling < 0 else 1.0
    return sign * (Qb @ Uc), abs(scaling) * S, Vhc @ Qa.mT


def svdvals_factored(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """The r singular values of scaling · B @ A (B: (out, r), A: (r, in)), descending."""
    return svd_factored(B, A, scaling)[1]


def svdvals_factored_batched(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0, device=None) -> torch.Tensor:
    """svdvals_factored for a stack of same-shape pairs at once. B: (b, out, r), A: (b, r, in) -> (b, r)."""
    dev = device or default_device()
    Rb = torch.linalg.qr(B.to(dev, torch.float64), mode="r")[1]     # (b, r, r)
    Ra = torch.linalg.qr(A.to(dev, torch.float64).mT, mode="r")[1]  # (b, r, r)
    return (torch.linalg.svdvals(Rb @ Ra.mT) * abs(scaling)).cpu()


def energy_rank(s: torch.Tensor, p: float, total_energy: float | None = None) -> int | None:
    """Smallest k whose top-k share of σ² is ≥ p (0 < p ≤ 1); 0 for a zero matrix. s: (q,) descending.
    With a truncated spectrum pass total_energy = ‖ΔW‖_F²: then None means "more than len(s)"."""
    s2 = s.double() ** 2
    cum = torch.cumsum(s2, 0)
    total = cum[-1].item() if total_energy is None else total_energy
    if total <= 0:
        return 0
    k = int((cum < p * total).sum().item()) + 1
    if k > len(s):
        return None if total_energy is not None else len(s)
    return k


def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp of the Shannon entropy of σ/Σσ. k equal values give k; 0 for a zero matrix.
    s: (q,), the full spectrum."""
    s = s.double()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(-(p * p.log()).sum().item())


def stable_rank(s: torch.Tensor) -> float:
    """‖ΔW‖_F² / ‖ΔW‖_2² = Σσ² / σ_max²; 0 for a zero matrix. s: (q,)."""
    s = s.double()
    top = s.max().item() if len(s) else 0.0
    return (s ** 2).sum().item() / top ** 2 if top > 0 else 0.0


def fro_norm(s: torch.Tensor) -> float:
    """‖ΔW‖_F = sqrt(Σσ²). s: (q,), the full spectrum."""
    return math.sqrt((s.double() ** 2).sum().item())


def relative_norm(delta_fro: float, w0: torch.Tensor) -> float:
    """‖ΔW‖_F / ‖W0‖_F. w0: (out, in)."""
    return delta_fro / torch.linalg.matrix_norm(w0.double()).item()
