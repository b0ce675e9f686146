"""Closed-form checks of the ΔW analysis math (analysis/spectra, subspace, amplification). Fast: small matrices."""
import math

import pytest
import torch

from analysis import amplification as amp
from lowrank.linalg import spectra
from analysis.runs import layer_and_matrix
from lowrank.linalg.subspace import factor_bases, phi, phi_grid, random_basis, random_phi, random_phi_grid

CPU = torch.device("cpu")


def orthonormal(d, k, seed):
    return random_basis(d, k, torch.Generator().manual_seed(seed))


def planted(out, inp, sigmas, seed=0):
    """U diag(σ) Vᵀ with random orthonormal U (out, k), V (in, k): a matrix whose spectrum is known."""
    s = torch.tensor(sigmas, dtype=torch.float64)
    U, V = orthonormal(out, len(sigmas), seed), orthonormal(inp, len(sigmas), seed + 1)
    return U @ torch.diag(s) @ V.mT, U, s, V


def planted_factors(out, inp, sigmas, seed=0):
    """LoRA factors B (out, r), A (r, in) with B A = U diag(σ) Vᵀ for known orthonormal U, V, yet neither factor
    orthogonal: B = U diag(σ) M, A = M⁻¹ Vᵀ for an invertible M (r, r) with condition number 4."""
    _, U, s, V = planted(out, inp, sigmas, seed)
    r = len(sigmas)
    M = orthonormal(r, r, seed + 2) @ torch.diag(torch.linspace(0.5, 2.0, r, dtype=torch.float64)) \
        @ orthonormal(r, r, seed + 3).mT
    return U @ torch.diag(s) @ M, torch.linalg.inv(M) @ V.mT, U, s, V


# ---- spectra ----------------------------------------------------------------------------------------------

def test_planted_rank_k_spectrum_and_energy_rank():
    sig = [5.0, 3.0, 2.0, 1.0]
    m, _, s, _ = planted(40, 30, sig)
    S = spectra.svdvals_dense(m.float(), device=CPU)
    assert torch.allclose(S[:4], s, rtol=1e-5)
    assert S[4:].abs().max() < 1e-5
    for p in (0.5, 0.9, 0.99, 1.0):
        assert spectra.energy_rank(S, p) <= 4
    # σ² = 25, 9, 4, 1 of 39: shares 0.641, 0.872, 0.974, 1
    assert [spectra.energy_rank(S, p) for p in (0.5, 0.6, 0.7, 0.9, 0.97, 0.99)] == [1, 1, 2, 3, 3, 4]


def test_energy_rank_with_truncated_spectrum_and_zero_matrix():
    s = torch.tensor([3.0, 1.0])
    assert spectra.energy_rank(s, 0.9, total_energy=10.0) == 1          # 9/10 ≥ 0.9
    assert spectra.energy_rank(s, 0.99, total_energy=20.0) is None      # 10/20: more than 2 values needed
    assert spectra.energy_rank(torch.zeros(5), 0.9) == 0
    assert spectra.effective_rank(torch.zeros(5)) == 0.0 and spectra.stable_rank(torch.zeros(5)) == 0.0


def test_randomized_svd_finds_planted_values():
    m, _, s, _ = planted(300, 200, [10.0, 6.0, 3.0, 1.0, 0.5])
    U, S, Vh = spectra.svd_dense(m + 1e-6 * torch.randn(300, 200, dtype=torch.float64,
                                                        generator=torch.Generator().manual_seed(0)),
                                 k=5, randomized=True, device=CPU)
    assert U.shape == (300, 5) and Vh.shape == (5, 200)
    assert torch.allclose(S, s, rtol=1e-4)
    again = spectra.svd_dense(m, k=5, randomized=True, device=CPU)[1]   # fixed seed: deterministic
    assert torch.equal(again, spectra.svd_dense(m, k=5, randomized=True, device=CPU)[1])


@pytest.mark.parametrize("shape", [(60, 40), (40, 60)])  # the Gram matrix of the smaller side either way
def test_gram_spectrum_recovers_planted_values_down_to_1e4_of_the_largest(shape):
    sig = [1.0, 0.3, 1e-2, 1e-3, 1e-4]  # 1e-4·σ_max: the accuracy range the spectra promise
    m, _, s, _ = planted(*shape, sig, seed=3)
    S, resid = spectra.svdvals_gram(m, device=CPU)
    assert S.shape == (40,) and S.dtype == torch.float64
    assert ((S[:5] - s) / s).abs().max() < 1e-6
    assert S[5:].max() < 1e-6                  # the null space: noise at ~sqrt(ε)·σ_max, never negative
    assert resid < 1e-12
    noise = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(spectra.svdvals_gram(noise, device=CPU)[0], torch.linalg.svdvals(noise),
                               rtol=1e-9, atol=0)   # a full-rank random matrix, against the SVD
    S0, r0 = spectra.svdvals_gram(torch.zeros(5, 3), device=CPU)
    assert torch.equal(S0, torch.zeros(3, dtype=torch.float64)) and r0 == 0.0


def test_batched_factored_values_equal_one_pair_at_a_time():
    g = torch.Generator().manual_seed(5)
    B, A = torch.randn(3, 48, 6, generator=g), torch.randn(3, 6, 32, generator=g)
    S = spectra.svdvals_factored_batched(B, A, -0.5, device=CPU)
    assert S.shape == (3, 6)
    for i in range(3):
        torch.testing.assert_close(S[i], spectra.svdvals_factored(B[i], A[i], -0.5), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scaling", [2.0, 0.25, -1.5])
def test_factored_svd_equals_dense_svd(scaling):
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(48, 6, generator=g), torch.randn(6, 32, generator=g)
    dense = torch.linalg.svdvals((scaling * B.double() @ A.double()))[:6]
    U, S, Vh = spectra.svd_factored(B, A, scaling)
    assert torch.allclose(S, dense, rtol=1e-5)
    assert torch.allclose(spectra.svdvals_factored(B, A, scaling), dense, rtol=1e-5)  # values only, same answer
    assert torch.allclose(U @ torch.diag(S) @ Vh, scaling * B.double() @ A.double(), atol=1e-9)
    assert torch.allclose(U.mT @ U, torch.eye(6, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(Vh @ Vh.mT, torch.eye(6, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("scaling", [2.0, 0.25, -1.5])
def test_factored_svd_finds_planted_values_and_directions(scaling):
    """scaling · B A = U diag(|scaling| σ) (±V)ᵀ whatever M mixes into the factors: the singular values are
    |scaling| σ, the singular vectors ±U, ±V, and a dense SVD of the product agrees."""
    sig = [6.0, 3.0, 2.0, 0.5]
    B, A, U, s, V = planted_factors(48, 32, sig, seed=7)
    want = abs(scaling) * s
    torch.testing.assert_close(spectra.svdvals_factored(B, A, scaling), want, rtol=1e-12, atol=0)
    Uf, Sf, Vhf = spectra.svd_factored(B, A, scaling)
    torch.testing.assert_close(Sf, want, rtol=1e-12, atol=0)
    torch.testing.assert_close((Uf.mT @ U).abs(), torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close((Vhf @ V).abs(), torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
    dense = torch.linalg.svdvals(scaling * B @ A)
    torch.testing.assert_close(dense[:4], want, rtol=1e-12, atol=0)
    assert dense[4:].max() < 1e-12 * want[0]      # rank 4: nothing past the planted values


def test_effective_and_stable_rank_closed_forms():
    k = 7
    equal = torch.full((k,), 2.5)
    assert spectra.effective_rank(equal) == pytest.approx(k)
    assert spectra.stable_rank(equal) == pytest.approx(k)
    s = torch.tensor([3.0, 1.0])  # p = (3/4, 1/4): exp(H) with H = −Σ p log p; stable = 10/9
    assert spectra.effective_rank(s) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert spectra.stable_rank(s) == pytest.approx(10 / 9)
    assert spectra.fro_norm(s) == pytest.approx(math.sqrt(10))


def test_relative_norm():
    w0 = torch.full((3, 4), 2.0)  # ‖W0‖_F = sqrt(12 · 4)
    assert spectra.relative_norm(1.0, w0) == pytest.approx(1 / math.sqrt(48))


# ---- subspace similarity ------------------------------------------------------------------------------------

def test_phi_of_subspace_with_itself_is_one_on_the_diagonal():
    U = orthonormal(50, 12, 0)
    grid = phi_grid(U, U)
    assert grid.shape == (12, 12)
    assert torch.allclose(torch.diagonal(grid), torch.ones(12, dtype=torch.float64))
    assert (grid <= 1 + 1e-12).all() and (grid >= 0).all()


def test_phi_of_orthogonal_subspaces_is_zero():
    Q = orthonormal(40, 20, 1)
    assert phi_grid(Q[:, :8], Q[:, 8:20]).abs().max() < 1e-12


def test_phi_grid_matches_the_definition():
    Ua, Ub = orthonormal(30, 5, 2), orthonormal(30, 7, 3)
    grid = phi_grid(Ua, Ub)
    for i, j in [(1, 1), (2, 5), (5, 7), (4, 2)]:
        direct = torch.linalg.matrix_norm(Ua[:, :i].mT @ Ub[:, :j]).item() ** 2 / min(i, j)
        assert grid[i - 1, j - 1].item() == pytest.approx(direct)
        assert phi(Ua, Ub, i, j) == pytest.approx(direct)


def test_phi_of_random_subspaces_matches_expectation():
    d, I, J, n = 64, 4, 16, 300
    g = torch.Generator().manual_seed(0)
    grids = torch.stack([phi_grid(random_basis(d, I, g), random_basis(d, J, g)) for _ in range(n)])
    mean, sem = grids.mean(0), grids.std(0) / math.sqrt(n)
    expected = random_phi_grid(I, J, d)
    assert ((mean - expected).abs() <= 4 * sem + 1e-3).all()
    assert random_phi(4, 16, 64) == 16 / 64 == expected[3, 15].item()


def test_factor_bases_span_the_factors():
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(20, 3, generator=g).double(), torch.randn(3, 15, generator=g).double()
    U_b, V_a = factor_bases(B, A)
    assert U_b.shape == (20, 3) and V_a.shape == (15, 3)
    assert torch.allclose(U_b @ U_b.mT @ B, B) and torch.allclose(A @ V_a @ V_a.mT, A)


# ---- amplification and intruders ----------------------------------------------------------------------------

def test_amplification_of_scaled_top_part_of_w_is_the_scale():
    """ΔW = c · (top-r part of W): ΔW's top-r directions are W's, so ‖UᵀWV‖_F = sqrt(Σ_{≤r} σ_W²),
    ‖ΔW‖_F = c · sqrt(Σ_{≤r} σ_W²), and the amplification factor is exactly c."""
    W, U, s, V = planted(24, 18, [9.0, 7.0, 4.0, 2.0, 1.0], seed=3)
    r, c = 2, 0.3
    dW = c * U[:, :r] @ torch.diag(s[:r]) @ V[:, :r].mT
    res = amp.amplification(W, spectra.svd_dense(W, device=CPU), spectra.svd_dense(dW, device=CPU), r)
    top = math.sqrt(81 + 49)
    assert res["proj_delta"] == pytest.approx(top)
    assert res["proj_w"] == pytest.approx(top)
    assert res["delta_fro"] == pytest.approx(c * top)
    assert res["amplification"] == pytest.approx(c)
    assert res["w_fro"] == pytest.approx(math.sqrt(81 + 49 + 16 + 4 + 1))
    assert res["phi_out"] == pytest.approx(1.0) and res["phi_in"] == pytest.approx(1.0)
    assert res["proj_random"] < top


def test_amplification_of_a_weak_direction_of_w_is_known_by_hand():
    """W = Σ σ_i u_i v_iᵀ with σ = 6, 5, 4, 3, 2, 1 and a rank-1 LoRA ΔW = c · u_6 v_6ᵀ along W's weakest pair:
    ΔW's top directions are (u_6, v_6), so ‖UᵀWV‖_F = σ_6 = 1, ‖ΔW‖_F = c and the amplification is
    c / σ_6; W's own top directions give σ_1; u_6 ⟂ u_1 and v_6 ⟂ v_1, so φ(ΔW, W, 1, 1) = 0 on both sides."""
    sig, c = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0], 3.0
    W, U, s, V = planted(20, 14, sig, seed=8)
    B, A = 0.5 * c * U[:, 5:6], V[:, 5:6].mT     # ΔW = scaling · B A with scaling 2, as LoRA stores it
    res = amp.amplification(W, spectra.svd_dense(W, device=CPU), spectra.svd_factored(B, A, 2.0), 1)
    assert res["proj_delta"] == pytest.approx(1.0, rel=1e-12)
    assert res["delta_fro"] == pytest.approx(c, rel=1e-12)
    assert res["amplification"] == pytest.approx(c / 1.0, rel=1e-12)
    assert res["proj_w"] == pytest.approx(6.0, rel=1e-12)
    assert res["w_fro"] == pytest.approx(math.sqrt(sum(x * x for x in sig)), rel=1e-12)
    assert res["phi_out"] == pytest.approx(0.0, abs=1e-20) and res["phi_in"] == pytest.approx(0.0, abs=1e-20)
    g = torch.Generator().manual_seed(0)      # the random directions: seed 0, output side drawn first
    u, v = random_basis(20, 1, g), random_basis(14, 1, g)
    assert res["proj_random"] == pytest.approx(abs((u.mT @ W @ v).item()), rel=1e-12)
    assert 0 < res["proj_random"] <= 6.0      # |uᵀWv| ≤ σ_1 for unit u, v


def test_amplification_of_direction_orthogonal_to_w():
    """ΔW along directions W does not use: the projection is 0 and the amplification infinite."""
    W, U, s, V = planted(20, 20, [3.0, 2.0], seed=4)
    Q_out = torch.linalg.qr(torch.cat([U, orthonormal(20, 1, 9)], 1))[0][:, 2:3]
    Q_in = torch.linalg.qr(torch.cat([V, orthonormal(20, 1, 10)], 1))[0][:, 2:3]
    res = amp.amplification(W, spectra.svd_dense(W, device=CPU), spectra.svd_dense(5 * Q_out @ Q_in.mT, device=CPU), 1)
    assert res["proj_delta"] < 1e-12 and res["phi_out"] < 1e-12
    assert res["delta_fro"] == pytest.approx(5.0)


def test_projected_norm_hand_case():
    W = torch.arange(12.0).reshape(3, 4)
    U, V = torch.eye(3)[:, :1], torch.eye(4)[:, 1:3]      # picks W[0, 1:3] = (1, 2)
    assert amp.projected_norm(W, U, V) == pytest.approx(math.sqrt(5))


def test_no_intruders_without_update():
    w0 = planted(30, 20, [5.0, 4.0, 3.0, 2.0, 1.0, 0.5], seed=5)[0]
    assert amp.intruder_dimensions(w0, torch.zeros_like(w0), k=5, eps=0.5) == 0
    assert amp.intruder_dimensions(w0, torch.zeros_like(w0), k=5, eps=0.5, side="input") == 0


def test_planted_orthogonal_direction_is_an_intruder():
    """A strong rank-1 ΔW = 10 · u vᵀ with u spread evenly over W0's left singular vectors becomes the top
    singular vector of W0 + ΔW, and its largest |cos| with W0's singular vectors is about 1/sqrt(d) < ε."""
    d = 16
    w0 = planted(d, d, [float(d - i) / 4 for i in range(d)], seed=6)[0]
    U0 = torch.linalg.svd(w0)[0]
    u = U0.sum(1) / math.sqrt(d)   # |cos| with every singular vector = 1/4
    V0 = torch.linalg.svd(w0)[2].mT
    v = V0.sum(1) / math.sqrt(d)
    delta = 10.0 * torch.outer(u, v)
    assert amp.intruder_dimensions(w0, delta, k=1, eps=0.5) == 1
    assert amp.intruder_dimensions(w0, delta, k=1, eps=0.2) == 0    # 1/4 is not below 0.2
    assert amp.intruder_count(U0, U0, k=d, eps=0.99) == 0


# ---- module paths -------------------------------------------------------------------------------------------

def test_layer_and_matrix_types_stay_distinct():
    names = [f"bert.encoder.layer.{i}.{m}" for i in (0, 11) for m in
             ["attention.self.query", "attention.self.value", "attention.output.dense", "intermediate.dense",
              "output.dense"]]
    got = layer_and_matrix(names)
    assert got["bert.encoder.layer.11.attention.self.query"] == (11, "query")
    assert got["bert.encoder.layer.0.attention.output.dense"] == (0, "attention.output.dense")
    assert got["bert.encoder.layer.0.output.dense"] == (0, "output.dense")
    assert got["bert.encoder.layer.0.intermediate.dense"] == (0, "intermediate.dense")
    gpt2 = layer_and_matrix(["h.3.attn.c_attn", "h.3.attn.c_proj", "h.3.mlp.c_proj", "h.3.mlp.c_fc"])
    assert gpt2 == {"h.3.attn.c_attn": (3, "c_attn"), "h.3.attn.c_proj": (3, "attn.c_proj"),
                    "h.3.mlp.c_proj": (3, "mlp.c_proj"), "h.3.mlp.c_fc": (3, "c_fc")}
    with pytest.raises(ValueError, match="layer index"):
        layer_and_matrix(["pooler.dense"])
