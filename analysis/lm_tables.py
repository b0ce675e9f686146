"""The generative studies' tables (causal LMs: `task.objective` cpt or sft), from the runs and spectrum tables:
what figures 11-13 draw (analysis/figures/lm.py) and what the findings test (analysis/lm_findings.py). Each setup
stands alone (analysis.statistics: runs of different setups are never pooled); without their runs,
figure_data.MissingRuns.
"""
import numpy as np
import pandas as pd

from analysis.figures.data import MissingRuns, need, prepare
from analysis.variants import variants

LM_OBJECTIVES = ("cpt", "sft")


def lm_runs(runs: pd.DataFrame, columns) -> pd.DataFrame:
    """The causal-LM runs (prepare()'d) that recorded `columns`; MissingRuns when there are none."""
    if "task.objective" not in runs:
        raise MissingRuns("no causal-LM runs (task.objective cpt or sft)")
    r = runs[runs["task.objective"].isin(LM_OBJECTIVES)]
    if r.empty or any(c not in r for c in columns):
        raise MissingRuns(f"no causal-LM runs with {', '.join(columns)}")
    r = prepare(r)
    r = r.dropna(subset=list(columns))
    if r.empty:
        raise MissingRuns(f"no causal-LM runs with {', '.join(columns)}")
    dim = pd.to_numeric(r["method.dim"], errors="coerce") if "method.dim" in r else pd.Series(np.nan, index=r.index)
    curves = [_curve(v, k, d) for v, k, d in zip(variants(r), r["rank"], dim)]
    r["curve"], r["curve_order"] = [c for c, _ in curves], [o for _, o in curves]
    return r


def _curve(v, rank: float, dim: float) -> tuple[str, tuple]:
    """A run's curve ('full', 'LoRA r=8', 'DoRA r=8', 'subspace d=100': each variant its own) and its plotting order."""
    if v.method == "full":
        return v.label, (0, v.order, 0)
    if v.method == "subspace":
        return f"{v.label} d={dim:g}", (2, v.order, dim)
    return f"{v.label} r={int(rank)}", (1, v.order, rank)


def frontier_data(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: setup, curve (full / LoRA r=k / DoRA r=k ...), variant (analysis.variants), seed, lr,
    eval_loss, forgetting, eval_loss_base."""
    r = lm_runs(runs, ["eval_loss", "forgetting"])
    keep = ["setup", "curve", "curve_order", "variant", "config", "seed", "trainer.lr", "eval_loss", "forgetting"]
    return r[keep + [c for c in ("eval_loss_base",) if c in r]].sort_values(
        ["setup", "curve_order", "trainer.lr", "seed"], ignore_index=True)


def lr_data(runs: pd.DataFrame) -> dict:
    """curves: setup, curve, variant, lr, eval_loss (mean over seeds), n; best: per setup and curve the learning rate of
    the lowest mean loss, and its ratio to full fine-tuning's best in the setup (NaN without a full curve).
    Setups whose curves have fewer than two learning rates are left out."""
    r = lm_runs(runs, ["eval_loss", "trainer.lr"])
    c = r.groupby(["setup", "curve", "curve_order", "variant", "trainer.lr"], sort=True).agg(
        eval_loss=("eval_loss", "mean"), n=("eval_loss", "size")).reset_index().rename(columns={"trainer.lr": "lr"})
    spread = c.groupby("setup").lr.nunique()
    c = c[c.setup.isin(spread[spread >= 2].index)]
    if c.empty:
        raise MissingRuns("no causal-LM setup with runs at two or more learning rates")
    best = c.loc[c.groupby(["setup", "curve"]).eval_loss.idxmin()].reset_index(drop=True)
    full = best[best.curve == "full"].set_index("setup").lr
    best["lr_over_full"] = [lr / full[s] if s in full else np.nan for s, lr in zip(best.setup, best.lr)]
    best["edge"] = [lr in (c[(c.setup == s) & (c.curve == k)].lr.min(), c[(c.setup == s) & (c.curve == k)].lr.max())
                    for s, k, lr in zip(best.setup, best.curve, best.lr)]  # the best is at the grid's edge
    return {"curves": c.sort_values(["setup", "curve_order", "lr"], ignore_index=True),
            "best": best.sort_values(["setup", "curve_order"], ignore_index=True)}


def r90_layer_data(spectrum: pd.DataFrame, runs: pd.DataFrame) -> dict:
    """Full fine-tuning of causal LMs: r90 per setup, matrix type and layer (mean, min, max over runs), the
    matrix width (the largest possible rank), and the LoRA ranks run in each setup (for reference lines)."""
    need(spectrum, ["run_id", "r90", "layer", "matrix_type"], "spectra")
    r = lm_runs(runs, ["eval_loss"])
    full = r[r.method == "full"].set_index("run_id")
    sp = spectrum[spectrum.run_id.isin(full.index)].copy()
    if sp.empty:
        raise MissingRuns("no full fine-tuning ΔW of a causal LM")
    sp["setup"] = full.loc[sp.run_id, "setup"].values
    sp["width"] = sp[["out_features", "in_features"]].min(axis=1) if "in_features" in sp else np.nan
    sp["r90"] = sp.r90.astype(float)
    d = sp.groupby(["setup", "matrix_type", "layer"], sort=True).agg(
        r90=("r90", "mean"), r90_min=("r90", "min"), r90_max=("r90", "max"), n=("run_id", "nunique"),
        width=("width", "min")).reset_index()
    ranks = {s: sorted({int(k) for k in g["rank"].dropna()}) for s, g in r[r.method == "lora"].groupby("setup")}
    return {"data": d, "lora_ranks": ranks}
