"""analysis.rank_advice: energy ranks and the budget allocation against answers known by hand, and the allocation
against every allocation of a small case (brute force)."""
import itertools

import pytest
import torch

from analysis import rank_advice as ra
from analysis.report_cli import parse_args


def s(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_energy_rank_is_the_smallest_reaching_the_share():
    # σ² = 9, 4, 1 (total 14): 9/14 = 0.64, 13/14 = 0.93
    sigmas = {"a": s(3, 2, 1), "zero": s(0, 0, 0)}
    assert ra.energy_ranks(sigmas, 0.5) == {"a": 1, "zero": 1}  # PEFT has no rank 0: a zero ΔW still gets 1
    assert ra.energy_ranks(sigmas, 0.9) == {"a": 2, "zero": 1}
    assert ra.energy_ranks(sigmas, 0.95) == {"a": 3, "zero": 1}
    # a truncated spectrum: ‖ΔW‖_F² = 28, twice what the two values hold; a rank beyond them is capped at len(S)
    assert ra.energy_ranks({"a": s(3, 2)}, 0.4, {"a": 28.0}) == {"a": 2}


def test_budget_allocation_by_energy_per_parameter_by_hand():
    # a: cost 10, σ² 4, 3, 1 (0.4, 0.3, 0.1 per parameter); b: cost 20, σ² 10, 8, 0.5 (0.5, 0.4, 0.025)
    sigmas, costs = {"a": s(4, 3, 1).sqrt(), "b": s(10, 8, 0.5).sqrt()}, {"a": 10, "b": 20}
    assert ra.budget_ranks(sigmas, costs, 29) == {"a": 1, "b": 1}  # below rank 1 everywhere: still 1 each
    assert ra.budget_ranks(sigmas, costs, 30 + 20) == {"a": 1, "b": 2}  # b's second (0.4) before a's (0.3)
    assert ra.budget_ranks(sigmas, costs, 30 + 20 + 10) == {"a": 2, "b": 2}
    assert ra.budget_ranks(sigmas, costs, 30 + 20 + 10 + 10) == {"a": 3, "b": 2}  # a's third (0.1) > b's (0.025)
    assert ra.budget_ranks(sigmas, costs, 10 ** 6) == {"a": 3, "b": 3}  # capped at the spectrum
    assert ra.budget_ranks({"a": s(1, 0, 0)}, {"a": 10}, 100) == {"a": 1}  # σ = 0 is never worth a parameter
    assert ra.lora_params({"a": 3, "b": 2}, costs) == 70


@pytest.mark.parametrize("seed", range(5))
def test_budget_allocation_is_optimal_within_one_direction(seed):
    """Against every allocation of ranks 1..4 to three modules that fits the budget: the greedy one captures at least
    the best energy of any allocation costing one direction less (the knapsack bound of a greedy over sorted chains),
    and never exceeds the budget."""
    g = torch.Generator().manual_seed(seed)
    sigmas = {m: torch.sort(torch.rand(4, generator=g, dtype=torch.float64), descending=True).values for m in "abc"}
    costs = {"a": 3, "b": 5, "c": 8}
    budget = 40
    got = ra.budget_ranks(sigmas, costs, budget)
    energy = lambda ranks: sum((sigmas[m][:r] ** 2).sum().item() for m, r in ranks.items())  # noqa: E731
    assert ra.lora_params(got, costs) <= budget
    best = max(energy(dict(zip("abc", rs))) for rs in itertools.product(range(1, 5), repeat=3)
               if ra.lora_params(dict(zip("abc", rs)), costs) <= budget - max(costs.values()))
    assert energy(got) >= best - 1e-12


def test_pooled_advice_over_runs():
    run_a, run_b = {"m": s(2, 0)}, {"m": s(0, 2)}
    assert torch.allclose(ra.pooled_sigmas([run_a, run_b])["m"], s(2 ** 0.5, 2 ** 0.5))
    energy, budget, used = ra.advice([{"m": s(3, 2, 1)}, {"m": s(1, 0, 0)}], [{}, {}], {"m": 10}, share=0.9)
    assert energy == {"m": 2} and used == 80 and budget == {"m": 3}  # the largest of 2 and 1; default: 8 · cost


def test_report_options_are_checked(capsys):
    with pytest.raises(SystemExit):
        parse_args(["runs", "--out", "o", "--energy-share", "1.5"])
    assert "--energy-share: expected a share of ‖ΔW‖_F² in (0, 1]" in capsys.readouterr().err
