"""The heavy-tail exponent α of a matrix's empirical spectral density, fitted as WeightWatcher does (Martin & Mahoney
2021, "Implicit self-regularization in deep neural networks", JMLR 22; weightwatcher 0.7.7's default
`analyze()`: `pl_package='ww'`, `fix_fingers=None`, `xmax=None`). Pure numpy over the singular values.

    fit = fit_power_law(eigenvalues(S))     # PowerLawFit(alpha, xmin, D, num_pl_spikes)
    row = esd_metrics(S)                    # weightwatcher's columns: alpha, xmin, D, num_pl_spikes, alpha_weighted,
                                            # log_norm

What weightwatcher does, and so this module:
- The ESD is λ_i = σ_i² of W as it is: no 1/N normalisation (weightwatcher's `normalize` was removed in 0.6.5), so
  α, D and num_pl_spikes do not depend on W's scale; xmin, alpha_weighted and log_norm do.
- λ ≤ 1e-5 are left out of the fit (its EVALS_THRESH, an absolute floor: a matrix with σ < 3.2e-3 throughout has
  nothing to fit).
- For every candidate xmin = λ_(i) (each kept λ but the largest) the continuous power law's MLE
  α = 1 + n / Σ_{λ ≥ xmin} ln(λ / xmin) (Clauset, Shalizi & Newman 2009, Eq. 3.1) and the Kolmogorov-Smirnov
  distance D between the tail's empirical CDF and 1 − (λ / xmin)^(1−α); xmin is the candidate of smallest D.
- With fewer than 20 kept values (a LoRA ΔW of rank r < 20) its small-sample fit instead: the bias-corrected
  α = 1 + (n − 1) / Σ ln(λ / xmin) over tails of at least 8 values, or the whole set when none has 8, and again the
  xmin of smallest D (WW_powerlaw.fit_powerlaw_smallN ranks candidates by D − 0.868 / √n, but its WWFit then
  keeps the smallest D: weightwatcher's answers are the smallest D's, and so are these).
- alpha_weighted = α · log10 λ_max, log_norm = log10 Σλ = log10 ‖W‖_F² (over every λ, kept or not).
A fit that cannot be made (fewer than 2 kept values, or all equal) gives NaN where weightwatcher writes -1 (or
α = 0 for equal values).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

EVALS_FLOOR = 1e-5    # weightwatcher.constants.EVALS_THRESH
SMALL_N = 20          # WW_powerlaw.SMALL_N_CUTOFF
SMALL_N_MIN_TAIL = 8  # WW_powerlaw.fit_powerlaw_smallN's k_min
ESD_COLUMNS = ("alpha", "xmin", "D", "num_pl_spikes", "alpha_weighted", "log_norm")  # esd_metrics' keys
BLOCK_ENTRIES = 1 << 22  # candidate xmins × values per block of the KS distances: 32 MiB


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    xmin: float
    D: float
    num_pl_spikes: int  # eigenvalues ≥ xmin: the tail the fit describes

    @staticmethod
    def failed() -> "PowerLawFit":
        return PowerLawFit(math.nan, math.nan, math.nan, 0)


def eigenvalues(s) -> np.ndarray:
    """The ESD's eigenvalues λ = σ² of W (W W ᵀ's nonzero spectrum), ascending fp64. s: (q,) singular values."""
    s = s.double().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s, dtype=np.float64)
    return np.sort(s * s)


def _ks_distances(x: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """D_i = max_{j ≥ i} |1 − (x_j / x_i)^(1 − α_i) − (j − i) / (N − i)| for every candidate i < N − 1 of
    the sorted x (N,); 1 where α_i ≤ 1 (weightwatcher leaves those at 1). Blocks of candidates bound memory."""
    N, logx = len(x), np.log(x)
    D = np.ones(N - 1)
    rows = max(1, BLOCK_ENTRIES // N)
    j = np.arange(N)
    for lo in range(0, N - 1, rows):
        i = np.arange(lo, min(lo + rows, N - 1))[:, None]
        a = alphas[i]
        with np.errstate(over="ignore", invalid="ignore"):
            dev = np.abs(-np.expm1((1 - a) * (logx[None, :] - logx[i])) - (j - i) / (N - i))
        dev = np.where(j >= i, dev, 0.0)  # the tail only; the point at j = i is 0 anyway
        D[lo:lo + len(i)] = np.where(a[:, 0] > 1, np.nanmax(dev, axis=1), 1.0)
    return D


def _tail_alphas(x: np.ndarray, corrected: bool) -> np.ndarray:
    """α_i for each candidate xmin = x_i, i < N − 1: n / Σ_{j ≥ i} ln(x_j / x_i) (+1), with n − 1 when
    `corrected`."""
    N, logx = len(x), np.log(x)
    n = (N - np.arange(N - 1)).astype(np.float64)
    spread = np.cumsum(logx[::-1])[::-1][:-1] - n * logx[:-1]  # Σ_{j ≥ i} ln x_j − n ln x_i
    with np.errstate(divide="ignore"):
        return 1 + (n - 1 if corrected else n) / spread, spread


def fit_power_law(evals: np.ndarray) -> PowerLawFit:
    """weightwatcher's power-law fit of the ESD's tail (module docstring). evals: (q,) eigenvalues, any order."""
    evals = np.asarray(evals, dtype=np.float64)
    x = np.sort(evals[evals > EVALS_FLOOR])
    N = len(x)
    if N < 2:
        return PowerLawFit.failed()
    if N >= SMALL_N:
        alphas, _ = _tail_alphas(x, corrected=False)
        D = _ks_distances(x, alphas)
        best = int(np.argmin(D))
        alpha, d = alphas[best], D[best]
    else:
        alphas, spread = _tail_alphas(x, corrected=True)
        usable = (N - np.arange(N - 1) >= SMALL_N_MIN_TAIL) & (spread > 1e-12)
        if not usable.any():
            usable[0] = spread[0] > 1e-12  # no tail of 8: the whole set
        if not usable.any():
            return PowerLawFit.failed()    # every value equal: no tail to fit
        D = np.where(usable, _ks_distances(x, np.where(usable, alphas, 0.0)), 1.0)
        best = int(np.argmin(D))
        alpha, d = alphas[best], D[best]
    return PowerLawFit(float(alpha), float(x[best]), float(d), int((evals >= x[best]).sum()))


def esd_metrics(s) -> dict:
    """weightwatcher's per-layer columns from the singular values s (q,) of one matrix: alpha, xmin, D,
    num_pl_spikes, alpha_weighted = α · log10 λ_max and log_norm = log10 Σλ."""
    lam = eigenvalues(s)
    fit = fit_power_law(lam)
    top, total = (lam[-1], lam.sum()) if len(lam) else (0.0, 0.0)
    return {"alpha": fit.alpha, "xmin": fit.xmin, "D": fit.D, "num_pl_spikes": fit.num_pl_spikes,
            "alpha_weighted": fit.alpha * math.log10(top) if top > 0 else math.nan,
            "log_norm": math.log10(total) if total > 0 else math.nan}
