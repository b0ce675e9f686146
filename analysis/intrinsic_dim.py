"""Intrinsic dimension beside intrinsic rank: how few trained numbers reach a share of full fine-tuning's accuracy.

    d90 (Li et al. 2018; Aghajanyan et al. 2020): the smallest subspace dimension d whose mean test accuracy over
        seeds, at its best learning rate, reaches 90% of full fine-tuning's mean at its best learning rate, on the
        same setup and the same seeds;
    LoRA's r90 by the same rule: the smallest rank (per target set) reaching it, with its trainable parameters; each
        LoRA variant (DoRA, PiSSA, ...: analysis.variants) on its own.

Each method is judged at its own best learning rate ("Learning Rate Matters": a method's rank shows only once its
lr is tuned), chosen on the same test accuracy that is judged (the tasks here have no separate dev split), so the
curve is an upper envelope over the lrs that ran. It reads the runs table (analysis.report's tables/runs.csv):
`setup`, `method.name`, `seed`, `eval_accuracy`, `adapted_params`, `method.dim` or `method.rank`, and `trainer.lr` when
present. Means are over the seeds that both the candidate and full fine-tuning ran; a candidate with no seed in
common is not judged. None where nothing reaches the threshold.
"""
import math

import pandas as pd

from analysis.variants import variants

SHARE = 0.9
LR = "trainer.lr"


def _by_lr(runs: pd.DataFrame):
    """(lr, runs at that lr) for each learning rate among `runs` (one group of lr None without the column)."""
    if LR not in runs:
        return [(None, runs)]
    return list(runs.groupby(runs[LR].astype(float), dropna=False))


def best_mean(runs: pd.DataFrame, seeds: set) -> tuple[float, float | None]:
    """The highest mean accuracy over `seeds` among the learning rates of `runs` (each lr's mean over the seeds
    it ran of these), and that lr; (nan, None) when no run is on those seeds."""
    means = [(float(acc.mean()), lr) for lr, g in _by_lr(runs) if len(acc := g[g.seed.isin(seeds)].eval_accuracy)]
    return max(means, key=lambda m: m[0]) if means else (math.nan, None)


def _smallest_reaching(mt: pd.DataFrame, key: str, full: pd.DataFrame, share: float) -> dict | None:
    full_seeds = set(full.seed)
    for size, ms in sorted(mt.groupby(key), key=lambda kv: kv[0]):
        passing = []
        for lr, g in _by_lr(ms):
            seeds = set(g.seed) & full_seeds
            if not seeds:
                continue
            full_acc, full_lr = best_mean(full, seeds)
            acc = float(g[g.seed.isin(seeds)].eval_accuracy.mean())
            if acc >= share * full_acc:
                passing.append({"size": size, "accuracy": acc, "goal": share * full_acc, "full_accuracy": full_acc,
                                "seeds": len(seeds), "adapted_params": float(g.adapted_params.mean()), "lr": lr,
                                "full_lr": full_lr})
        if passing:
            return max(passing, key=lambda p: p["accuracy"] - p["goal"])
    return None


def gain_share(accuracy: float | None, full_accuracy: float, majority: float) -> tuple[float | None, str]:
    """(accuracy − majority) / (full − majority), the share of full fine-tuning's gain over the majority class that
    `accuracy` reached, and why there is none: None with a note where full fine-tuning gains nothing over the
    majority class (a share of no gain is no number) or no majority rate is known."""
    if accuracy is None or not math.isfinite(majority):
        return None, ""
    if not full_accuracy - majority > 0:
        return None, (f"full fine-tuning ({full_accuracy:.3f}) gains nothing over the majority class "
                      f"({majority:.3f}): no share of its gain")
    return (accuracy - majority) / (full_accuracy - majority), ""


def threshold_table(runs: pd.DataFrame, share: float = SHARE, majority: dict | None = None) -> pd.DataFrame:
    """One row per (setup, method, target set), method being the run's variant (analysis.variants: 'subspace',
    'lora', 'dora', ...; each its own curve, never pooled with plain LoRA): the smallest size (d, or rank) whose mean
    accuracy at one of its learning rates reaches `share` × full fine-tuning's best mean on common seeds; its
    accuracy, lr, trainable parameters, the target accuracy, full fine-tuning's accuracy and lr behind it and how many
    seeds were compared (the lr with the widest margin where several reach it). Setups without full fine-tuning
    runs give no row.

    With `majority` ({setup: the test set's majority-class rate}), `gain_share` is the share of full fine-tuning's
    gain over the majority class that the size reached, (accuracy − majority) / (full − majority): where the
    majority class alone is near `share` of full, reaching `share` says little, and this says how little. Where full
    fine-tuning gains nothing over the majority class, there is no share: `note` says so."""
    rows = []
    for setup, g in runs.groupby("setup"):
        full = g[g["method.name"] == "full"]
        if full.empty:
            continue
        kinds = variants(g)
        names = pd.Series([v.name for v in kinds], index=g.index)
        judged = {v.name: v for v in kinds if v.method in ("subspace", "lora")}
        for kind in sorted(judged.values(), key=lambda v: (v.method != "subspace", v.order)):
            m = g[names == kind.name]
            key = "method.dim" if kind.method == "subspace" else "method.rank"
            if key not in m:
                continue
            targets = m["method.targets"].astype(str) if "method.targets" in m else pd.Series("", index=m.index)
            for tgt, mt in m.groupby(targets):
                found = _smallest_reaching(mt, key, full, share)
                if found is None:
                    full_acc, full_lr = best_mean(full, set(full.seed))
                    found = {"size": None, "accuracy": None, "seeds": None, "adapted_params": None, "lr": None,
                             "goal": share * full_acc, "full_accuracy": full_acc, "full_lr": full_lr}
                floor = (majority or {}).get(setup, math.nan)
                gain, note = gain_share(found["accuracy"], found["full_accuracy"], floor)
                rows.append({"setup": setup, "method": kind.name, "targets": tgt, "size_key": key.split(".")[1],
                             "share": share, **found, "majority": floor if math.isfinite(floor) else None,
                             "gain_share": gain, "note": note})
    return pd.DataFrame(rows, columns=["setup", "method", "targets", "size_key", "share", "size", "accuracy", "goal",
                                       "full_accuracy", "seeds", "adapted_params", "lr", "full_lr", "majority",
                                       "gain_share", "note"])
