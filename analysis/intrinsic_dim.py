"""Intrinsic dimension beside intrinsic rank: how few trained numbers reach a share of full fine-tuning's accuracy.

    d90 (Li et al. 2018; Aghajanyan et al. 2020): the smallest subspace dimension d whose mean test accuracy over
        seeds reaches 90% of full fine-tuning's mean on the same setup and the same seeds;
    LoRA's r90 by the same rule: the smallest rank (per target set) reaching it, with its trainable parameters.

Both read the runs table (analysis.report's tables/runs.csv): `setup`, `method.name`, `seed`, `eval_accuracy`,
`adapted_params`, and `method.dim` or `method.rank`. Means are over the seeds that both the candidate and full
fine-tuning ran; a candidate with no seed in common is not judged. None where nothing reaches the threshold.
"""
import math

import pandas as pd

SHARE = 0.9


def _mean_on(runs: pd.DataFrame, seeds: set) -> float:
    acc = runs[runs.seed.isin(seeds)].eval_accuracy
    return float(acc.mean()) if len(acc) else math.nan


def threshold_table(runs: pd.DataFrame, share: float = SHARE) -> pd.DataFrame:
    """One row per (setup, method, target set): the smallest size (d, or rank) whose mean accuracy reaches `share`
    × full fine-tuning's on common seeds, its accuracy and trainable parameters, the target accuracy and how many
    seeds were compared. Setups without full fine-tuning runs give no row."""
    rows = []
    for setup, g in runs.groupby("setup"):
        full = g[g["method.name"] == "full"]
        if full.empty:
            continue
        full_seeds = set(full.seed)
        for method, key in (("subspace", "method.dim"), ("lora", "method.rank")):
            m = g[g["method.name"] == method]
            if m.empty or key not in m:
                continue
            targets = m["method.targets"].astype(str) if "method.targets" in m else pd.Series("", index=m.index)
            for tgt, mt in m.groupby(targets):
                found = None
                for size, ms in sorted(mt.groupby(key), key=lambda kv: kv[0]):
                    seeds = set(ms.seed) & full_seeds
                    if not seeds:
                        continue
                    goal = share * _mean_on(full, seeds)
                    acc = _mean_on(ms, seeds)
                    if acc >= goal:
                        found = {"size": size, "accuracy": acc, "goal": goal, "seeds": len(seeds),
                                 "adapted_params": float(ms.adapted_params.mean())}
                        break
                rows.append({"setup": setup, "method": method, "targets": tgt, "size_key": key.split(".")[1],
                             "share": share, **(found or {"size": None, "accuracy": None, "seeds": None,
                                                          "adapted_params": None,
                                                          "goal": share * float(full.eval_accuracy.mean())})})
    return pd.DataFrame(rows, columns=["setup", "method", "targets", "size_key", "share", "size", "accuracy", "goal",
                                       "seeds", "adapted_params"])
