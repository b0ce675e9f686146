"""ΔW versus W0: how much of W0 lies in ΔW's directions, and whether fine-tuning brings new directions in.

LoRA paper (Hu et al. 2021, Section 7.3, Table 7): project W onto an r-dimensional subspace,
‖Uᵀ W V‖_F with U (out, r), V (in, r) the top-r singular directions of ΔW, of W itself, or random ones.
A small ‖Uᵀ W V‖_F for ΔW's directions means ΔW amplifies directions W barely uses; the amplification
factor is ‖ΔW‖_F / ‖Uᵀ W V‖_F (U, V from ΔW). Appendix H.3 compares the directions themselves with φ.

Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"):
a top-k singular vector of W0 + ΔW whose largest |cosine| with every singular vector of W0 is below ε.
"""
import torch

from lowrank.linalg.subspace import phi, random_basis


def projected_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """‖Uᵀ W V‖_F. W: (out, in), U: (out, r), V: (in, r) orthonormal columns."""
    return torch.linalg.matrix_norm(U.double().mT @ W.double() @ V.double()).item()


def amplification(W: torch.Tensor, w_svd, delta_svd, r: int, seed: int = 0, delta_fro: float | None = None) -> dict:
    """Table 7 for one matrix and one r.
    W: (out, in) the pre-trained weight; w_svd, delta_svd: (U (out, q), S (q,), Vh (q, in)) thin SVDs of W
    and ΔW with q ≥ r, strongest first (ΔW's may be the factored LoRA SVD; U and Vh may hold only the top
    directions, S all values), U, Vh on W's device. Random directions use `seed`.
    ‖ΔW‖_F comes from ΔW's singular values unless `delta_fro` is given (needed when delta_svd is truncated).
    Returns w_fro, delta_fro, delta_top_fro = ‖ΔW_r‖_F (ΔW's top-r part, √Σ_{k≤r} σ_k²: all of ΔW for LoRA
    at rank r), proj_delta / proj_w / proj_random (‖Uᵀ W V‖_F for each choice of U, V), amplification =
    delta_fro / proj_delta (the paper's; for full fine-tuning the numerator sees every direction, the
    denominator only r: statistics.amplification_summary divides delta_top_fro instead), and
    phi_out / phi_in = φ(ΔW, W, r, r) on each side."""
    Ud, Sd, Vhd = delta_svd
    Uw, Sw, Vhw = w_svd
    if r > len(Sd) or r > len(Sw):
        raise ValueError(f"r={r} exceeds the directions given ({len(Sd)} of ΔW, {len(Sw)} of W)")
    g = torch.Generator().manual_seed(seed)
    out_dim, in_dim = W.shape
    Ur, Vr = random_basis(out_dim, r, g).to(W.device), random_basis(in_dim, r, g).to(W.device)  # drawn on the CPU
    if delta_fro is None:
        delta_fro = torch.linalg.vector_norm(Sd.double()).item()
    proj_delta = projected_norm(W, Ud[:, :r], Vhd[:r].mT)
    return {
        "w_fro": torch.linalg.matrix_norm(W.double()).item(),
        "delta_fro": delta_fro,
        "delta_top_fro": torch.linalg.vector_norm(Sd[:r].double()).item(),
        "proj_delta": proj_delta,
        "proj_w": projected_norm(W, Uw[:, :r], Vhw[:r].mT),
        "proj_random": projected_norm(W, Ur, Vr),
        "amplification": delta_fro / proj_delta if proj_delta > 0 else float("inf"),
        "phi_out": phi(Ud.double(), Uw.double(), r, r),
        "phi_in": phi(Vhd.mT.double(), Vhw.mT.double(), r, r),
    }


def max_abs_cosine(U0: torch.Tensor, U1: torch.Tensor) -> torch.Tensor:
    """For each column of U1 (d, k), its largest |cosine| with any column of U0 (d, m); both unit-norm. (k,)"""
    return (U0.double().mT @ U1.double()).abs().amax(dim=0)


def intruder_count(U0: torch.Tensor, U_ft: torch.Tensor, k: int = 10, eps: float = 0.5) -> int:
    """How many of the top-k singular vectors U_ft[:, :k] (d, ≥k) of W0 + ΔW have max |cos| < eps with every
    singular vector U0 (d, m) of W0. Pass all of W0's singular vectors: a subset would inflate the count."""
    return int((max_abs_cosine(U0, U_ft[:, :k]) < eps).sum().item())


def intruder_dimensions(w0: torch.Tensor, delta: torch.Tensor, k: int = 10, eps: float = 0.5,
                        side: str = "output") -> int:
    """intruder_count on the left (side 'output', vectors in R^out) or right ('input') singular vectors of
    W0 (out, in) and W0 + ΔW. Shuttleworth et al. use the left ones, k = 10 and a range of ε."""
    U0, _, Vh0 = torch.linalg.svd(w0.double(), full_matrices=False)
    U1, _, Vh1 = torch.linalg.svd((w0 + delta).double(), full_matrices=False)
    if side == "output":
        return intruder_count(U0, U1, k, eps)
    if side == "input":
        return intruder_count(Vh0.mT, Vh1.mT, k, eps)
    raise ValueError(f"side must be 'output' or 'input', not {side!r}")


def magnitude_direction_change(w0: torch.Tensor, delta: torch.Tensor) -> tuple[float, float]:
    """The DoRA paper's ΔM and ΔD (Liu et al. 2024, Eq. 5) for one matrix, rows as the weight's units (PEFT's
    convention for nn.Linear): ΔM = mean over rows of | ‖W0 + ΔW‖ − ‖W0‖ |, ΔD = mean over rows of
    1 − cos(W0 + ΔW, W0). Any method's ΔW: full fine-tuning moves both, LoRA couples them, DoRA splits them."""
    w0 = w0.double()
    w = w0 + delta.double()
    n0, n1 = torch.linalg.vector_norm(w0, dim=1), torch.linalg.vector_norm(w, dim=1)
    dm = (n1 - n0).abs().mean().item()
    dd = (1 - (w * w0).sum(1) / (n0 * n1).clamp_min(1e-300)).mean().item()
    return dm, dd
