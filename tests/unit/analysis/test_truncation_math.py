"""Truncation and functional rank against cases with known answers: a planted rank-3 ΔW is whole at r ≥ 3; a random
rank-r projection keeps r/d of ‖ΔW‖_F² in expectation (exactly, for a ΔW with equal singular values); r_f90 from
a table whose kept shares are known."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.functional_rank import functional_rank_table, kept_share, smallest_rank
from lowrank.linalg.truncation import (TopSingular, kept_rank, projection_seed, random_basis, random_energy_share,
                                       random_projection)


def planted(out: int, inp: int, values, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out, len(values), generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(inp, len(values), generator=g, dtype=torch.float64))[0]
    return (U * torch.tensor(values, dtype=torch.float64)) @ V.T


def test_a_planted_rank_3_delta_is_whole_from_r_3_and_its_energy_shares_are_the_values_squared():
    delta = planted(24, 16, [3.0, 2.0, 1.0]).float()
    top = TopSingular.of_dense(delta, device="cpu").kept(4)
    assert torch.allclose(top.truncated(3), delta, atol=1e-5) and torch.allclose(top.truncated(4), delta, atol=1e-5)
    assert not torch.allclose(top.truncated(2), delta, atol=1e-2)
    assert top.energy_share(1) == pytest.approx(9 / 14) and top.energy_share(2) == pytest.approx(13 / 14)
    with pytest.raises(ValueError, match="rank 5"):
        top.truncated(5)
    B, A = torch.randn(24, 3, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    lora = TopSingular.of_factors(B, A, 0.5)
    assert lora.max_rank == 3 and torch.allclose(lora.truncated(3).double(), 0.5 * B @ A, atol=1e-5)


def test_a_random_projection_keeps_r_over_d_of_the_energy_in_expectation():
    d, r = 32, 8
    spike = planted(20, d, [1.0])  # rank 1: the share is Beta(r/2, (d−r)/2), std 0.105, so 400 draws' mean: ± 0.005
    shares = [(random_projection(spike, r, projection_seed(s, "m", r))[0] ** 2).sum().item() for s in range(400)]
    assert np.mean(shares) == pytest.approx(random_energy_share(r, d), abs=0.02)  # 4 standard errors
    flat = planted(d, d, [1.0] * d)  # equal singular values: every projection keeps exactly r/d
    dw_q, Q = random_projection(flat, r, 7)
    assert (dw_q ** 2).sum().item() / d == pytest.approx(r / d, rel=1e-12)
    assert torch.allclose(Q.T @ Q, torch.eye(r, dtype=torch.float64), atol=1e-12)
    assert torch.equal(random_basis(d, r, 3), random_basis(d, r, 3))  # seeded: the same subspace every time
    assert projection_seed(0, "a", 8) != projection_seed(0, "b", 8) != projection_seed(1, "a", 8)
    assert random_energy_share(64, d) == 1.0


def test_smallest_rank_keeping_90_percent_of_the_gain_in_either_direction():
    assert smallest_rank([1, 2, 4, 8], kept_share([0.6, 0.7, 0.79, 0.8], w0=0.5, full=0.8)) == 4  # 0.29/0.3 ≥ 0.9
    assert smallest_rank([1, 2, 4], kept_share([2.0, 1.2, 1.05], w0=2.0, full=1.0)) == 4          # a loss falls
    assert math.isnan(smallest_rank([1, 2], kept_share([0.5, 0.5], w0=0.5, full=0.5)))           # no gain


def rows(run, setup, variant, accs, w0=0.5, full=0.8):
    points = [("w0", 0, w0)] + [("truncated", r, a) for r, a in zip([1, 2, 4], accs)] + [("full", None, full)]
    return [{"run": run, "setup": setup, "variant": variant, "kind": k, "r": r, "accuracy": a, "loss": 1 - a,
             "examples": 1000, "spectral_r90": 3.0} for k, r, a in points]


def test_functional_rank_table_per_run_and_per_setup_with_lora_90_percent_rank():
    truncation = pd.DataFrame(rows("a", "S1", "full", [0.6, 0.78, 0.8]) + rows("b", "S1", "full", [0.79, 0.8, 0.8]))
    runs = pd.DataFrame({"run_id": ["a", "b", "l2", "l8"], "setup": "S1", "variant": ["full", "full", "lora", "lora"],
                         "method.rank": [None, None, 2, 8], "eval_accuracy": [0.8, 0.8, 0.7, 0.79]})
    table = functional_rank_table(truncation, runs)
    per_run = table[table.level == "run"].set_index("run")
    assert per_run.r_f90.to_dict() == {"a": 2.0, "b": 1.0} and per_run.gain.round(9).tolist() == [0.3, 0.3]
    assert (per_run.r_f90_lo <= per_run.r_f90).all() and (per_run.r_f90_hi >= per_run.r_f90).all()
    setup = table[table.level == "setup"].iloc[0]
    assert setup.r_f90 == 1.5 and setup.n_runs == 2 and (setup.seed_lo, setup.seed_hi) == (1.0, 2.0)
    assert setup.lora_r90 == 8 and setup.spectral_r90 == 3.0   # rank 2 keeps 0.2/0.3 of full's gain, rank 8 0.29/0.3


def test_lora_90_percent_rank_takes_each_target_set_on_its_own():
    """Averaged together, q,v (rank 4 keeps 0.28/0.3 of full's gain) and a collapsed all-linear set (0.5: none)
    would pass no rank; each on its own, q,v passes at 4."""
    truncation = pd.DataFrame(rows("a", "S1", "full", [0.6, 0.78, 0.8]))
    runs = pd.DataFrame({"run_id": ["a", "q1", "q4", "x1", "x4"], "setup": "S1",
                         "variant": ["full", "lora", "lora", "lora", "lora"], "method.rank": [None, 1, 4, 1, 4],
                         "method.targets": [None, "[query, value]", "[query, value]", "all-linear", "all-linear"],
                         "eval_accuracy": [0.8, 0.7, 0.78, 0.5, 0.5]})
    setup = functional_rank_table(truncation, runs).query("level == 'setup'").iloc[0]
    assert setup.lora_r90 == 4


def test_no_lora_90_percent_rank_where_full_fine_tuning_did_not_improve():
    """Full fine-tuning below W0 (0.5 < 0.6): LoRA runs further below would 'keep' more than 90 % of a negative gain."""
    truncation = pd.DataFrame(rows("a", "S1", "full", [0.6, 0.55, 0.5], w0=0.6, full=0.5))
    runs = pd.DataFrame({"run_id": ["a", "q1"], "setup": "S1", "variant": ["full", "lora"], "method.rank": [None, 1],
                         "method.targets": [None, "[query, value]"], "eval_accuracy": [0.5, 0.45]})
    setup = functional_rank_table(truncation, runs).query("level == 'setup'").iloc[0]
    assert np.isnan(setup.lora_r90)


def test_the_factors_of_a_truncation_multiply_to_it_and_share_its_singular_values_evenly():
    delta = planted(24, 16, [4.0, 2.0, 1.0]).float()
    top = TopSingular.of_dense(delta, device="cpu")
    B, A = top.factors(2)
    assert B.shape == (24, 2) and A.shape == (2, 16) and B.dtype == A.dtype == torch.float32
    assert torch.allclose(B @ A, top.truncated(2), atol=1e-6)
    assert torch.allclose(B.T @ B, torch.diag(torch.tensor([4.0, 2.0])), atol=1e-5)  # U_r √Σ: Bᵀ B = Σ_r
    assert torch.allclose(A @ A.T, torch.diag(torch.tensor([4.0, 2.0])), atol=1e-5)  # √Σ V_rᵀ: A Aᵀ = Σ_r


@pytest.mark.parametrize("rule,rank", [({"share": 0.9}, 2), ({"share": 0.96}, 3),
                                       ({"share": 0.5}, 1), ({"share": 1.0}, 3), ({"rank": 2}, 2), ({"rank": 8}, 3)])
def test_the_rank_a_rule_keeps_on_a_planted_spectrum(rule, rank):
    """σ = 4, 2, 1: energies 16, 4, 1 of 21, so the top 1 holds 16/21 = 0.76 and the top 2 20/21 = 0.95; a fixed rank
    above ΔW's largest possible rank keeps all of it."""
    s = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    assert kept_rank(s, **rule) == rank


def test_a_zero_delta_keeps_one_zero_direction_and_a_rule_is_one_of_rank_and_share():
    assert kept_rank(torch.zeros(5, dtype=torch.float64), share=0.9) == 1  # PEFT has no rank 0
    with pytest.raises(ValueError, match="exactly one"):
        kept_rank(torch.ones(3), rank=2, share=0.9)


def test_the_truncation_figure_draws_with_lora_per_target_set(tmp_path, recwarn):
    """The figure of analysis.truncate (its style fits titles on a Figure; the file is written apart)."""
    from analysis.figures.truncation import figure_truncation
    truncation = pd.DataFrame(rows("a", "S1", "full", [0.6, 0.78, 0.8]))
    runs = pd.DataFrame({"run_id": ["a", "q1", "q4", "x1"], "setup": "S1", "variant": ["full", "lora", "lora", "lora"],
                         "method.rank": [None, 1, 4, 1], "eval_accuracy": [0.8, 0.7, 0.78, 0.5],
                         "method.targets": [None, "['query', 'value']", "['query', 'value']", "all-linear"]})
    path = figure_truncation(truncation, functional_rank_table(truncation, runs), runs, tmp_path)
    assert path == tmp_path / "truncation.png" and path.stat().st_size > 0 and (tmp_path / "truncation.pdf").is_file()
    assert not [w for w in recwarn.list if "matplotlib" in str(w.filename) or "font" in str(w.message).lower()]
