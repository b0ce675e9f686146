"""Rank advice from the report's streamed results: the table `tables/rank_advice.csv`, the two PEFT rank_pattern
files and the section of report.md (the math: analysis/rank_advice.py).
"""
import pandas as pd
import torch

from analysis import rank_advice as ra
from analysis.runs import Run
from analysis.tables import markdown_table

RANK_PATTERN_FILE, BUDGET_PATTERN_FILE = "rank_pattern.json", "rank_pattern_budget.json"
RANK_ADVICE_COLUMNS = ["module", "layer", "matrix_type", "out_features", "in_features", "runs", "energy_rank",
                       "energy_share", "budget_rank", "budget_share"]

def rank_advice_table(runs: list[Run], results: dict, share: float, budget: int | None) -> tuple[pd.DataFrame, dict]:
    """rank_advice.csv's rows and what report.md says of them (the base model, the runs, budget, parameter counts,
    the patterns), from the full fine-tuning runs of the base model most of them share (analysis/rank_advice.py)."""
    groups = {}
    for r in runs:
        if r.method == "full" and r.run_id in results:
            groups.setdefault(r.base_path, []).append(r)
    if not groups:
        return pd.DataFrame(columns=RANK_ADVICE_COLUMNS), {}
    base, group = sorted(groups.items(), key=lambda kv: (-len(kv[1]), str(kv[0])))[0]
    per_run, totals, shape = [], [], {}
    for r in group:
        res = results[r.run_id]
        per_run.append({row["module"]: torch.as_tensor(S) for row, (_, S) in zip(res.spectrum, res.sigmas)})
        totals.append({row["module"]: row["fro_norm"] ** 2 for row in res.spectrum})
        shape |= {row["module"]: row for row in res.spectrum}
    costs = {m: row["out_features"] + row["in_features"] for m, row in shape.items()}
    energy, by_budget, budget = ra.advice(per_run, totals, costs, share, budget)
    pooled = ra.pooled_sigmas(per_run)
    rows = [{"module": m, "layer": shape[m]["layer"], "matrix_type": shape[m]["matrix_type"],
             "out_features": shape[m]["out_features"], "in_features": shape[m]["in_features"],
             "runs": sum(m in p for p in per_run), "energy_rank": energy[m],
             "energy_share": ra.captured_share(pooled[m], energy[m]), "budget_rank": by_budget[m],
             "budget_share": ra.captured_share(pooled[m], by_budget[m])} for m in sorted(energy)]
    uniform = budget // sum(costs[m] for m in energy)
    captured = lambda ranks: (sum((pooled[m][:ranks[m]].double() ** 2).sum().item() for m in ranks)  # noqa: E731
                              / sum((pooled[m].double() ** 2).sum().item() for m in ranks))
    info = {"base": base.name, "runs": [r.run_id for r in group], "other_bases": len(groups) - 1, "share": share,
            "budget": budget, "energy_params": ra.lora_params(energy, costs),
            "budget_params": ra.lora_params(by_budget, costs), "uniform_rank": uniform,
            "budget_captured": captured(by_budget),
            "uniform_captured": captured(dict.fromkeys(energy, max(uniform, 1))),
            "patterns": {RANK_PATTERN_FILE: energy, BUDGET_PATTERN_FILE: by_budget}}
    return pd.DataFrame(rows, columns=RANK_ADVICE_COLUMNS).sort_values(["layer", "module"], ignore_index=True), info


def rank_advice_lines(advice: pd.DataFrame, info: dict) -> list[str]:
    """report.md's rank advice section: what the two patterns are, their cost, and a summary per matrix type."""
    lines = ["## Rank advice (from full fine-tuning ΔW)", ""]
    if not info:
        return lines + ["No full fine-tuning runs were analysed: no rank advice (it reads their ΔW spectra).", ""]
    runs = ", ".join(f"`{r}`" for r in info["runs"])
    lines += [f"From {len(info['runs'])} full fine-tuning run(s) on base weights `{info['base']}` ({runs})"
              + (f"; {info['other_bases']} other base model(s) left out" if info["other_bases"] else "") + ". "
              f"`{RANK_PATTERN_FILE}`: per module, the smallest rank whose top directions hold {info['share']:g} of "
              f"‖ΔW‖_F² (the largest over the runs), {info['energy_params']:,} LoRA parameters. "
              f"`{BUDGET_PATTERN_FILE}`: the ranks a budget of {info['budget']:,} parameters allows, directions taken "
              f"by σ² per parameter (r·(out+in) each), {info['budget_params']:,} parameters holding "
              f"{info['budget_captured']:.3f} of ‖ΔW‖_F², against {info['uniform_captured']:.3f} "
              "for uniform rank "
              f"{max(info['uniform_rank'], 1)} at about the same cost. Both are PEFT `rank_pattern` maps (full module "
              f"names); `method.rank_pattern=FILE` trains a lowrank LoRA run with one (with `method.targets=all-linear`"
              f" to adapt every module it names). Per module: `tables/rank_advice.csv`.", ""]
    g = advice.groupby("matrix_type", sort=True).agg(
        modules=("module", "size"), energy_rank_mean=("energy_rank", "mean"), energy_rank_min=("energy_rank", "min"),
        energy_rank_max=("energy_rank", "max"), budget_rank_mean=("budget_rank", "mean"),
        budget_rank_min=("budget_rank", "min"), budget_rank_max=("budget_rank", "max")).reset_index()
    return lines + [markdown_table(g), ""]
