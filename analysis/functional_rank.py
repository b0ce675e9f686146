"""Functional rank from a truncation table (analysis.truncate): the smallest uniform rank whose truncated model keeps
≥ 90 % of the fine-tune's gain over W0, per run and per setup, beside LoRA's 90 % rank and the spectral r90. Pure
functions over tables.

    functional_rank_table(truncation, runs)     # one row per run, then one per (setup, variant)

Definitions (docs/functional-rank.md):
- the metric: test accuracy for a classifier (higher is better), held-out loss for a causal LM (lower is better);
- gain = metric(W0 + ΔW) − metric(W0) (for a loss, loss(W0) − loss(W0 + ΔW)); a point keeps the share
  (metric(point) − metric(W0)) / (metric(W0 + ΔW) − metric(W0)) of it, whichever the direction;
- r_f90: the smallest r of the grid whose `truncated` point keeps ≥ 90 %; NaN where none does or the gain is ≤ 0.
  Its test-set interval (classifiers): the same rule applied to the upper and to the lower end of each point's Wilson
  interval (analysis.statistics), giving the smallest and the largest rank the test set cannot tell from r_f90;
- per setup: the mean of its runs' r_f90 with the seed interval (analysis.statistics.seed_interval);
- LoRA's 90 % rank: the smallest method.rank of the plain LoRA runs of the setup whose mean metric (metrics.json)
  keeps ≥ 90 % of the gain of the setup's full fine-tuning (mean metric in metrics.json) over the mean W0 point;
- spectral r90: the mean over the targeted matrices of the rank holding 90 % of ‖ΔW‖_F² (lowrank.linalg.spectra).
"""
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.statistics import seed_interval, wilson_interval
from analysis.tables import markdown_table, table_path

FUNCTIONAL_RANK_TABLE = "functional_rank"

SHARE = 0.9


def metric_of(is_lm: bool) -> tuple[str, bool]:
    """(metric column, higher is better)."""
    return ("loss", False) if is_lm else ("accuracy", True)


def _is_lm(rows: pd.DataFrame) -> bool:
    return "perplexity" in rows and rows.perplexity.notna().any()


def kept_share(value, w0: float, full: float):
    """The share of the gain a point keeps: (value − w0) / (full − w0), either direction; NaN without a gain."""
    gain = full - w0
    return (np.asarray(value, dtype=float) - w0) / gain if gain != 0 else np.full(np.shape(value), math.nan)


def smallest_rank(ranks, kept, share: float = SHARE) -> float:
    """The smallest rank whose kept share is ≥ `share`; NaN where none is."""
    ok = [r for r, k in zip(ranks, kept) if k >= share]
    return float(min(ok)) if ok else math.nan


def run_rows(truncation: pd.DataFrame) -> list[dict]:
    out = []
    for run, rows in truncation.groupby("run", sort=True):
        metric, higher = metric_of(_is_lm(rows))
        w0 = rows.loc[rows.kind == "w0", metric].mean()
        full = rows.loc[rows.kind == "full", metric].mean()
        grid = rows[rows.kind == "truncated"].sort_values("r")
        gain = (full - w0) if higher else (w0 - full)
        row = {"level": "run", "setup": rows.setup.iloc[0], "variant": rows.variant.iloc[0], "run": run,
               "metric": metric, "w0": w0, "full": full, "gain": gain,
               "r_f90": math.nan, "r_f90_lo": math.nan, "r_f90_hi": math.nan,
               "spectral_r90": rows.spectral_r90.iloc[0], "n_runs": 1}
        if gain > 0:
            row["r_f90"] = smallest_rank(grid.r, kept_share(grid[metric], w0, full))
            if metric == "accuracy":
                lo, hi = wilson_interval(grid.accuracy, grid.examples)
                row["r_f90_lo"] = smallest_rank(grid.r, kept_share(hi, w0, full))
                row["r_f90_hi"] = smallest_rank(grid.r, kept_share(lo, w0, full))
        out.append(row)
    return out


def lora_r90(runs: pd.DataFrame, setup: str, metric: str, w0: float) -> float:
    """LoRA's 90 % rank in one setup, from the runs table's metrics: the smallest rank, over the setup's LoRA target
    sets, whose seed mean keeps 90 % of full fine-tuning's gain (NaN without plain LoRA and full runs,
    or if none does)."""
    column = f"eval_{metric}"
    here = runs[runs.setup == setup] if "setup" in runs else runs.iloc[:0]
    if column not in here or "method.rank" not in here:  # no LoRA run among them
        return math.nan
    full = here.loc[here.variant == "full", column].mean()
    lora = here[here.variant == "lora"]
    gain = (full - w0) if metric_of(metric == "loss")[1] else (w0 - full)
    if lora.empty or not gain > 0:  # no gain to keep (as run_rows): full fine-tuning did not improve on W0
        return math.nan
    # each target set on its own (LoRA on q,v and on every linear layer are different adapters); the smallest rank
    targets = lora["method.targets"].astype(str) if "method.targets" in lora else pd.Series("", index=lora.index)
    ranks = [smallest_rank(means.index, kept_share(means.values, w0, full))
             for _, group in lora.groupby(targets, sort=True)
             for means in [group.groupby("method.rank")[column].mean().sort_index()]]
    finite = [r for r in ranks if np.isfinite(r)]
    return min(finite) if finite else math.nan


def functional_rank_table(truncation: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per truncated run (level `run`), then one per setup and variant (level `setup`: the mean r_f90 over
    its runs, seed_lo/seed_hi its seed interval, r_f90_lo/hi the mean of the runs' test-set interval ends, and LoRA's
    90 % rank of the setup)."""
    columns = ["level", "setup", "variant", "run", "metric", "w0", "full", "gain", "r_f90", "r_f90_lo", "r_f90_hi",
               "seed_lo", "seed_hi", "n_runs", "spectral_r90", "lora_r90"]
    if truncation.empty:
        return pd.DataFrame(columns=columns)
    per_run = pd.DataFrame(run_rows(truncation))
    per_setup = []
    for (setup, variant), rows in per_run.groupby(["setup", "variant"], sort=True):
        values = rows.r_f90.to_numpy(dtype=float)
        lo, hi = seed_interval(values) if np.isfinite(values).all() else (math.nan, math.nan)
        metric = rows.metric.iloc[0]
        per_setup.append({"level": "setup", "setup": setup, "variant": variant, "run": "", "metric": metric,
                          "w0": rows.w0.mean(), "full": rows.full.mean(), "gain": rows.gain.mean(),
                          "r_f90": values.mean(), "r_f90_lo": rows.r_f90_lo.mean(skipna=False),
                          "r_f90_hi": rows.r_f90_hi.mean(skipna=False),
                          "seed_lo": lo, "seed_hi": hi, "n_runs": len(rows), "spectral_r90": rows.spectral_r90.mean(),
                          "lora_r90": lora_r90(runs, setup, metric, rows.w0.mean())})
    return pd.DataFrame(per_run.to_dict("records") + per_setup).reindex(columns=columns)


def report_lines(out_dir: Path) -> list[str]:
    """report.md's section when `python -m analysis.truncate ... --out DIR` wrote DIR/tables/functional_rank.csv
    before `analysis.report --out DIR`; nothing otherwise."""
    path = table_path(out_dir, FUNCTIONAL_RANK_TABLE)
    if not path.is_file():
        return []
    table = pd.read_csv(path)
    setups = table[table.level == "setup"].drop(columns=["level", "run"])
    return ["## Functional rank (tables/functional_rank.csv, from analysis.truncate)", "",
            "r_f90: the smallest uniform rank whose truncated ΔW keeps ≥ 90 % of the fine-tune's gain over W0 "
            "(docs/functional-rank.md); lora_r90: the smallest trained LoRA rank that does; spectral_r90: the rank "
            "holding 90 % of ‖ΔW‖_F² (mean over matrices).", "", markdown_table(setups), ""]
