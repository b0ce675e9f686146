"""Closed-form checks of the per-matrix metrics beside rank (lowrank.linalg.sparsity, drift, heavy_tail), and the α fit
against the weightwatcher package on matrices with a planted spectrum. Fast: small matrices."""
import logging
import math

import numpy as np
import pytest
import torch
import weightwatcher

from lowrank.linalg import heavy_tail, sparsity
from lowrank.linalg.drift import principal_cosines, sigma_drift, top_overlap
from lowrank.linalg.subspace import random_basis


# ---- update sparsity --------------------------------------------------------------------------------------------

def test_sparsity_of_a_hand_built_update():
    m = torch.zeros(10, 10)
    m[0, 0], m[1, 1], m[2, 2], m[3, 3] = -2.0, 1.0, 2.5e-3, 1e-3   # threshold 1e-3 · 2: the last entry is below it
    share, top = sparsity.update_sparsity(lambda: [m])
    assert share == 3 / 100
    total = 4 + 1 + 2.5e-3 ** 2 + 1e-6
    assert top == pytest.approx(4 / total, rel=1e-12)               # ⌈1 % of 100⌉ = 1 entry: the −2
    m[4, 4] = 2.0                                                   # a tie for the largest changes nothing: still 1
    assert sparsity.update_sparsity(lambda: [m])[1] == pytest.approx(4 / (total + 4), rel=1e-12)
    assert sparsity.update_sparsity(lambda: [torch.zeros(3, 4)]) == (0.0, 0.0)


def test_sparsity_of_a_gaussian_update_is_dense_and_its_top_share_the_gaussian_tail():
    g = torch.Generator().manual_seed(0)
    share, top = sparsity.update_sparsity(lambda: [torch.randn(500, 400, generator=g, dtype=torch.float64)])
    z = 2.5758293035489  # the 99th percentile of |z|: E[z²; |z| > z] = 2 (z φ(z) + 1 − Φ(z))
    tail = 2 * (z * math.exp(-z * z / 2) / math.sqrt(2 * math.pi) + 0.005)
    assert share > 0.99 and top == pytest.approx(tail, abs=0.004)


def test_factored_rows_give_the_dense_answer_block_by_block(monkeypatch):
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(37, 3, generator=g), torch.randn(3, 29, generator=g)
    B[5:20] = 0  # rows LoRA never moved: counted below the threshold
    dense = sparsity.update_sparsity(lambda: [(B.double() @ A.double()) * -0.5])
    monkeypatch.setattr(sparsity, "ROW_BLOCK_ENTRIES", 100)         # 3 rows of 29 per block: 13 blocks
    assert len(list(sparsity.factor_rows(B, A, -0.5))) == 13
    chunked = sparsity.update_sparsity(lambda: sparsity.factor_rows(B, A, -0.5))
    assert chunked[0] == dense[0] and chunked[1] == pytest.approx(dense[1], rel=1e-12)
    assert dense[0] <= 22 / 37


# ---- principal angles and σ drift -------------------------------------------------------------------------------

def test_principal_angles_of_subspaces_rotated_by_known_angles():
    a, b = 0.3, 1.1
    e = torch.eye(5, dtype=torch.float64)
    Qa = e[:, :2]
    Qb = torch.stack([math.cos(a) * e[0] + math.sin(a) * e[2], math.cos(b) * e[1] + math.sin(b) * e[3]], 1)
    torch.testing.assert_close(principal_cosines(Qa, Qb), torch.tensor([math.cos(a), math.cos(b)], dtype=torch.float64))
    overlap = top_overlap(Qa, Qb, (1, 2, 64))                      # 64 is capped at the 2 directions given
    assert overlap[1] == pytest.approx(math.cos(a) ** 2)
    assert overlap[2] == overlap[64] == pytest.approx((math.cos(a) ** 2 + math.cos(b) ** 2) / 2)
    R = random_basis(5, 2, torch.Generator().manual_seed(0)) @ torch.tensor([[0.6, -0.8], [0.8, 0.6]]).double()
    assert top_overlap(R, R @ torch.tensor([[0.0, 1.0], [1.0, 0.0]]).double(), (2,))[2] == pytest.approx(1.0)
    assert top_overlap(e[:, :1], e[:, 1:2], (1,))[1] == 0.0        # orthogonal


def test_sigma_drift_of_diagonal_matrices():
    w0 = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    w_ft = w0 + torch.diag(torch.tensor([1.0, 0.0, -1.0, 0.0]))   # σ(W_ft) = 5, 3, 1, 1 sorted: compared in order
    s0, s_ft = torch.linalg.svdvals(w0), torch.linalg.svdvals(w_ft)
    torch.testing.assert_close(sigma_drift(s_ft, s0, 8), torch.tensor([1.25, 1.0, 0.5, 1.0], dtype=torch.float64))
    assert sigma_drift(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0]), 2)[1].isnan()


# ---- heavy-tail exponent ----------------------------------------------------------------------------------------

def pareto_quantiles(n: int, alpha: float, xmin: float) -> np.ndarray:
    """n eigenvalues at the mid-quantiles of a power law p(λ) ∝ λ^-α on [xmin, ∞):
    a planted ESD with no sampling noise."""
    u = (np.arange(n) + 0.5) / n
    return xmin * (1 - u) ** (-1 / (alpha - 1))


@pytest.mark.parametrize("alpha", [2.0, 3.5])
def test_alpha_of_a_planted_power_law_spectrum(alpha):
    lam = pareto_quantiles(2000, alpha, 1e-2)
    fit = heavy_tail.fit_power_law(lam)
    assert fit.alpha == pytest.approx(alpha, abs=0.05) and fit.D < 0.02
    assert fit.num_pl_spikes == (lam >= fit.xmin).sum() > 100
    scaled = heavy_tail.fit_power_law(lam * 100)                   # σ × 10: α and D keep, xmin scales
    assert scaled.alpha == pytest.approx(fit.alpha, rel=1e-9) and scaled.xmin == pytest.approx(100 * fit.xmin)
    row = heavy_tail.esd_metrics(torch.as_tensor(np.sqrt(lam)))
    assert row["alpha"] == pytest.approx(fit.alpha, rel=1e-12)
    assert row["alpha_weighted"] == pytest.approx(fit.alpha * math.log10(lam.max()), rel=1e-9)
    assert row["log_norm"] == pytest.approx(math.log10(lam.sum()), rel=1e-12)


def test_small_spectra_and_those_below_the_floor():
    lam = pareto_quantiles(12, 2.5, 1e-2)                          # < 20 values: the bias-corrected fit
    n = len(lam)
    whole = 1 + (n - 1) / np.log(lam / lam.min()).sum()
    assert heavy_tail.fit_power_law(lam[:7]).xmin == lam.min()     # < 8 values: the whole set is the tail
    assert heavy_tail.fit_power_law(lam[:7]).alpha == pytest.approx(1 + 6 / np.log(lam[:7] / lam.min()).sum())
    assert 1 < heavy_tail.fit_power_law(lam).alpha < 2 * whole
    assert math.isnan(heavy_tail.fit_power_law(np.array([1.0])).alpha)       # one value: no fit
    assert math.isnan(heavy_tail.fit_power_law(np.full(10, 3.0)).alpha)      # all equal: no tail
    low = heavy_tail.esd_metrics(torch.full((50,), 1e-3))                      # σ² = 1e-6 < the 1e-5 floor
    assert math.isnan(low["alpha"]) and low["num_pl_spikes"] == 0
    assert low["log_norm"] == pytest.approx(math.log10(50e-6))


@pytest.mark.parametrize("out, inp, rank", [(300, 200, None), (120, 200, None), (64, 48, 12), (64, 48, 5)])
def test_alpha_agrees_with_weightwatcher(out, inp, rank):
    """weightwatcher 0.7.7's analyze() of a torch Linear whose σ² follow a power law (full rank: its standard fit;
    rank 12 and 5: its small-sample fit, the rest of the ESD below its floor)."""
    g = torch.Generator().manual_seed(out + inp + (rank or 0))
    q = rank or min(out, inp)
    s = 0.05 * torch.rand(q, generator=g, dtype=torch.float64) ** -0.5
    U = torch.linalg.qr(torch.randn(out, q, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(inp, q, generator=g, dtype=torch.float64)).Q
    layer = torch.nn.Linear(inp, out, bias=False)
    with torch.no_grad():
        layer.weight.copy_((U * s) @ V.mT)
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    theirs = weightwatcher.WeightWatcher(model=torch.nn.Sequential(layer)).analyze(min_evals=1).iloc[0]
    ours = heavy_tail.esd_metrics(torch.linalg.svdvals(layer.weight.detach().double()))
    assert ours["num_pl_spikes"] == theirs["num_pl_spikes"]
    for col in ("alpha", "xmin", "D", "alpha_weighted", "log_norm"):
        assert ours[col] == pytest.approx(theirs[col], rel=1e-6), col
