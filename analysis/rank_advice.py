"""Which LoRA rank for each module, read off full fine-tuning ΔW spectra; pure functions over singular values.

    energy_ranks({m: S}, 0.9)                  # {m: smallest r whose top-r σ² reach 90 % of ‖ΔW_m‖_F²} (≥ 1)
    budget_ranks({m: S}, {m: out + in}, N)      # {m: r}: Σ r·(out + in) ≤ N, directions chosen by σ² per
                                                  parameter
    advice(...)                                 # both, as analysis.report writes them: table rows and rank_pattern

A LoRA module of rank r costs r·(out + in) parameters (A: r × in, B: out × r). The budget allocation is greedy by
marginal energy per parameter: every module starts at rank 1 (PEFT's rank_pattern has no rank 0), then the next
direction taken is the one with the largest σ²_{k+1} / (out + in) over all modules that still fits the budget. Since
each module's σ² do not increase with k, this takes directions in order of energy per parameter, so it captures the
most ‖ΔW‖_F² of any allocation of its cost but for at most the one direction that did not fit (the greedy solution
of a knapsack whose items come in sorted chains). Energy is absolute (σ², not each module's share), so modules that
fine-tuning changed more get more rank. Ties go to the module first by name, then the earlier direction.
"""
import heapq

import torch

from lowrank.linalg.spectra import energy_rank

DEFAULT_SHARE, DEFAULT_UNIFORM_RANK = 0.9, 8  # the budget defaults to uniform rank 8's parameter count


def energy_ranks(sigmas: dict[str, torch.Tensor], share: float = DEFAULT_SHARE,
                 totals: dict[str, float] | None = None) -> dict[str, int]:
    """{module: smallest r ≥ 1 whose top-r σ² reach `share` of the module's ‖ΔW‖_F²}. sigmas: (q,) descending
    per module; `totals` (‖ΔW‖_F² per module) for truncated spectra, where a rank beyond len(S) is
    capped at len(S)."""
    out = {}
    for m, s in sigmas.items():
        r = energy_rank(s, share, None if totals is None else totals.get(m))
        out[m] = max(1, len(s) if r is None else r)
    return out


def lora_params(ranks: dict[str, int], costs: dict[str, int]) -> int:
    """Parameters of LoRA factors of these ranks: Σ r·(out + in)."""
    return sum(r * costs[m] for m, r in ranks.items())


def budget_ranks(sigmas: dict[str, torch.Tensor], costs: dict[str, int], budget: int) -> dict[str, int]:
    """{module: r ≥ 1} with Σ r·costs ≤ budget (when Σ costs ≤ budget; below that every module gets 1), chosen
    greedily by σ²_{k+1} / cost (the module docstring); directions of σ = 0 are never taken, so a budget larger than
    ΔW's rank needs is left partly unspent. sigmas: (q,) descending; costs: out + in per module."""
    ranks = dict.fromkeys(sorted(sigmas), 1)
    left = budget - lora_params(ranks, costs)
    energy = {m: (s.double() ** 2).tolist() for m, s in sigmas.items()}
    heap = [(-energy[m][1] / costs[m], m, 1) for m in ranks if len(energy[m]) > 1 and energy[m][1] > 0]
    heapq.heapify(heap)
    while heap:
        _, m, k = heapq.heappop(heap)  # k: the 0-based index of the direction this module would add next
        if costs[m] > left:
            continue  # its later directions cost as much: the module is done
        ranks[m], left = k + 1, left - costs[m]
        if k + 1 < len(energy[m]) and energy[m][k + 1] > 0:  # a direction with no energy is never worth a parameter
            heapq.heappush(heap, (-energy[m][k + 1] / costs[m], m, k + 1))
    return ranks


def captured_share(s: torch.Tensor, r: int, total: float | None = None) -> float:
    """Share of ‖ΔW‖_F² in the top r directions (total: ‖ΔW‖_F² where s is truncated)."""
    s2 = s.double() ** 2
    denom = s2.sum().item() if total is None else total
    return s2[:r].sum().item() / denom if denom > 0 else 1.0


def pooled_sigmas(per_run: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per module, √(mean over runs of σ_k²) (spectra of unequal length padded with zeros): the runs' mean energy
    per direction, what budget_ranks allocates when several full fine-tuning runs advise one pattern."""
    names = sorted({m for run in per_run for m in run})
    out = {}
    for m in names:
        spectra = [run[m].double() for run in per_run if m in run]
        q = max(len(s) for s in spectra)
        s2 = torch.stack([torch.nn.functional.pad(s ** 2, (0, q - len(s))) for s in spectra]).mean(0)
        out[m] = s2.sqrt()
    return out


def advice(per_run: list[dict[str, torch.Tensor]], per_run_totals: list[dict[str, float]], costs: dict[str, int],
           share: float = DEFAULT_SHARE, budget: int | None = None) -> tuple[dict[str, int], dict[str, int], int]:
    """(energy pattern, budget pattern, the budget used) for one base model's full fine-tuning runs: per module the
    largest of the runs' energy ranks (the rank that reaches `share` in every run), and budget_ranks over the runs'
    pooled σ² (pooled_sigmas). `budget` defaults to uniform rank DEFAULT_UNIFORM_RANK's parameter count."""
    energy = {}
    for sigmas, totals in zip(per_run, per_run_totals):
        for m, r in energy_ranks(sigmas, share, totals).items():
            energy[m] = max(r, energy.get(m, 0))
    if budget is None:
        budget = DEFAULT_UNIFORM_RANK * sum(costs[m] for m in energy)
    return energy, budget_ranks(pooled_sigmas(per_run), costs, budget), budget
