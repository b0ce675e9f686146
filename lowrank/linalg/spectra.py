"""Singular values of ΔW and the ranks and norms derived from them. Pure functions over tensors.

    U, S, Vh = svd_factored(B, A, scaling)   # LoRA: through QR of the factors, never forming (out, in)
    U, S, Vh = svd_dense(delta)              # full fine-tuning: exact, or randomised top-k for huge matrices
    S, resid = svdvals_gram(delta)           # values only, fast: eigenvalues of the smaller Gram matrix
    U, S, Vh, how = svd_top(x, k)            # top-k triplets of an fp64 matrix, from its Gram matrix, certified
    U, S, Vh = svd_gram_full(w0, k)          # every left vector and value, the top-k right vectors (one eigh)
    U, S, Vh, how = svd_gram_top(w_ft, k)    # every value, the top-k vectors of both sides (one eigh)
    energy_rank(S, 0.9), effective_rank(S), stable_rank(S)

Singular values come back sorted descending, as float64 on the CPU (svd_top's and svd_gram_full's vectors stay on
the matrix's device, for the products that use them there).
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


def gram(x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The smaller Gram matrix of x (out, in), (q, q) with q = min(out, in): (xᵀx, "right") when out ≥ in, else
    (x xᵀ, "left"). Its eigenvalues are σ², its eigenvectors x's right or left singular vectors."""
    return (x.mT @ x, "right") if x.shape[0] >= x.shape[1] else (x @ x.mT, "left")


def svdvals_from_gram(g: torch.Tensor) -> tuple[torch.Tensor, float]:
    """svdvals_gram's values and eigensolver check from the Gram matrix g (q, q) itself."""
    lam = torch.linalg.eigvalsh(g)                          # ascending
    trace = g.diagonal().sum()
    resid = ((lam.sum() - trace).abs() / trace).item() if trace != 0 else 0.0  # NaN stays NaN
    return lam.flip(0).clamp_min(0).sqrt().cpu(), resid


def svdvals_gram(m: torch.Tensor, device=None) -> tuple[torch.Tensor, float]:
    """All min(out, in) singular values of m (out, in), descending, as sqrt of the eigenvalues of the smaller
    Gram matrix (mᵀm or m mᵀ) in fp64: on an H200, 0.1 s for 4096² against ~1.1 s for an fp32 SVD
    (benchmarks/results/svd_h200.md). Squaring costs relative accuracy ~ε·(σ_max/σ)²: in fp64 that is
    ≤ 1e-8 for every σ ≥ 1e-4·σ_max, and values below ~1e-8·σ_max are noise (clamped at 0). Also returns
    |Σλ − ‖m‖_F²| / ‖m‖_F², a check on the eigensolver (0 for a zero matrix)."""
    return svdvals_from_gram(gram(m.to(device=device or default_device(), dtype=torch.float64))[0])


def _eigh_top(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    lam, vec = torch.linalg.eigh(g)  # ascending
    return lam.flip(0)[:k], vec.flip(1)[:, :k]


def _nothing_above(g: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, level: float) -> bool:
    """True when every eigenvalue of g − y diag(θ) yᵀ is below `level`: a Cholesky factorisation of
    level·I − g + y diag(θ) yᵀ exists. With (θ, y) accurate eigenpairs, no eigenvalue of g outside them reaches
    `level`."""
    m = torch.addmm(-g, y * theta, y.mT)
    m.diagonal().add_(level)
    return torch.linalg.cholesky_ex(m).info.item() == 0


def top_eigh(g: torch.Tensor, k: int, start: torch.Tensor | None = None, tol: float = 1e-12, max_iter: int = 80,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The k largest eigenpairs (θ (k,) descending, y (n, k)) of a symmetric PSD g (n, n) fp64, on g's device, and how
    they were found: "iteration" or "eigh". Block subspace iteration with Rayleigh–Ritz (Saad, Numerical Methods
    for Large Eigenvalue Problems, ch. 5) from `start` (n, ·) columns plus seeded random ones. Its answer is
    returned only when certified: every Ritz pair's residual ‖g y − θ y‖ ≤ tol·θ_1 (so each vector is within
    tol·θ_1/gap of the exact one) and no eigenvalue of g beyond the k reaches (1 − 1e-6)·θ_k (_nothing_above).
    Otherwise (a gap too small for the iteration to converge in max_iter steps, a degenerate k-th value) and for
    small g, where it costs no more, the answer is a full `eigh`: exact either way, fast when the top of the
    spectrum stands apart."""
    n = g.shape[0]
    k = min(k, n)
    block = k + max(16, k // 2)
    if start is not None:
        block = max(block, start.shape[1] + 8)  # a warm start keeps a few random columns: nothing is left out
    if k == 0 or 2 * block >= n or max_iter == 0:
        return (*_eigh_top(g, k), "eigh")
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same start on every device
    q = torch.randn(n, block - (0 if start is None else start.shape[1]), generator=gen, dtype=torch.float64)
    q = q.to(g.device) if start is None else torch.cat([start.to(g), q.to(g.device)], 1)
    q = torch.linalg.qr(q).Q
    history = []
    for it in range(max_iter):
        z = g @ q                                   # (n, block): the one product with g per step
        theta, w = torch.linalg.eigh(((q.mT @ z + z.mT @ q) / 2).cpu())  # (block, block): tiny, and on a GPU
        theta, w = theta.flip(0).to(g.device), w.flip(1).to(g.device)  # a CPU eigh beats cusolver's latency
        y, gy = q @ w, z @ w                       # Ritz vectors and g times them
        res = (torch.linalg.vector_norm(gy[:, :k] - y[:, :k] * theta[:k], dim=0).max() / theta[0]).item()
        if theta[0] <= 0 or res != res:            # a zero or broken g: let eigh say what it is
            break
        if res <= tol:
            if _nothing_above(g, y[:, :k], theta[:k], (1 - 1e-6) * theta[k - 1].item()):
                return theta[:k], y[:, :k], "iteration"
            break
        history.append(res)
        if len(history) >= 6:  # residuals fall geometrically: give up early when the rest would not fit max_iter
            rate = (history[-1] / history[-4]) ** (1 / 3)
            if rate >= 0.97 or it + math.log(tol / res) / math.log(rate) > max_iter:
                break
        q = torch.linalg.qr(gy).Q
    return (*_eigh_top(g, k), "eigh")


def _other_side(x: torch.Tensor, vecs: torch.Tensor, s: torch.Tensor, side: str) -> torch.Tensor:
    """x's singular vectors on the side `vecs` are not: x v / σ (side "right") or xᵀ u / σ (side "left"); zero
    where σ = 0 (a direction x does not reach)."""
    other = x @ vecs if side == "right" else x.mT @ vecs
    return torch.where(s > 0, other / torch.where(s > 0, s, 1.0), 0.0)


def svd_top(x: torch.Tensor, k: int, start: tuple | None = None,
            tol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Top-k singular triplets of x (out, in) fp64, on x's device: U (out, k), S (k,), Vh (k, in), and how (top_eigh's
    answer, or "svd"). From top_eigh of the smaller Gram matrix, the other side by one product; `start` = (left
    (out, ·), right (in, ·)) directions near the answer (top_eigh takes the side its Gram matrix has); `tol` is
    top_eigh's, a residual relative to σ_1². When a top σ is
    below 1e-4·σ_1 (past svdvals_gram's accuracy; a rank-deficient x), the vectors come from torch.linalg.svd
    instead: the Gram matrix has lost them to rounding, and dividing by σ would not give unit vectors."""
    x = x.double()  # a no-op for the analysis' fp64 ΔW; a training-time fp32 ΔW (dynamics) is promoted here
    k = min(k, *x.shape)
    if k == 0:
        return x.new_zeros(x.shape[0], 0), x.new_zeros(0), x.new_zeros(0, x.shape[1]), "none"
    g, side = gram(x)
    init = None if start is None else start[1 if side == "right" else 0]
    theta, vecs, how = top_eigh(g, k, init, tol)
    del g
    s = theta.clamp_min(0).sqrt()
    if not s[-1] > 1e-4 * s[0]:
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k], "svd"
    other = _other_side(x, vecs, s, side)
    U, V = (other, vecs) if side == "right" else (vecs, other)
    return U, s, V.mT, how


def svd_gram_full(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every left singular vector U (out, q) and value S (q,) of x (out, in) fp64 and its top-k right vectors Vh
    (k, in), from one eigh of the smaller Gram matrix, on x's device (S on the CPU). For W0: intruder dimensions
    compare with all of its left vectors, amplification with its top few. Vectors of σ = 0 are zero."""
    g, side = gram(x)
    lam, vecs = torch.linalg.eigh(g)
    del g
    s = lam.flip(0).clamp_min(0).sqrt()
    vecs = vecs.flip(1)
    if side == "left":   # vecs are U: every left vector at once
        return vecs, s.cpu(), _other_side(x, vecs[:, :k], s[:k], "left").mT
    return _other_side(x, vecs, s, "right"), s.cpu(), vecs[:, :k].mT


def svd_gram_top(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Every singular value S (q,) of x (out, in) fp64, on the CPU, and its top-k vectors U (out, k), Vh (k, in), on x's
    device, from one eigh of the smaller Gram matrix, and how: "eigh", or "svd" when a top-k σ is below 1e-4·σ_1
    (svd_top's rule: the Gram matrix has lost those vectors). For W0 + ΔW, whose whole spectrum (its ESD) and top
    directions (intruders, principal angles) are both read."""
    k = min(k, *x.shape)
    g, side = gram(x)
    lam, vecs = torch.linalg.eigh(g)
    del g
    s = lam.flip(0).clamp_min(0).sqrt()
    vecs = vecs.flip(1)[:, :k]
    if k and not s[k - 1] > 1e-4 * s[0]:
        U, _, Vh = torch.linalg.svd(x, full_matrices=False)
        return U[:, :k], s.cpu(), Vh[:k], "svd"
    other = _other_side(x, vecs, s[:k], side)
    U, V = (other, vecs) if side == "right" else (vecs, other)
    return U, s.cpu(), V.mT, "eigh"


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
