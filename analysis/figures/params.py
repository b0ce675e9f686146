"""Figures beyond the paper's, one panel per setup:

    figure_14: test accuracy against the number of numbers each method trains (log axis), full fine-tuning, LoRA over
               ranks (each target set and variant a curve), and the subspace method over d, with d90 and LoRA's 90%
               rank marked (analysis.intrinsic_dim); classification runs (eval_accuracy)
    figure_15: rank over training time: ΔW's r90 and the drift of its top direction (φ(1,1) with the previous
               snapshot) against step, per configuration (the runs' dynamics.csv, tables/dynamics.csv)
"""
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.figures.data import MissingRuns, majority_by_setup, prepare, targets_label
from analysis.figures.draw import Drawn, _majority, _setup_title, _write
from analysis.intrinsic_dim import LR, SHARE, threshold_table
from analysis.statistics import n_label
from analysis.variants import label_of, variant_of
from analysis.figures.style import FULL_COLOR, color, marker, new_figure, panels, styled


def _curve(row) -> str:
    """'full', or the variant's label and target set: 'LoRA (q,v)', 'DoRA (q,v)', 'subspace (q,v)'."""
    v = variant_of(row)
    return v.label if v.method == "full" else f"{v.label} ({targets_label(row.get('method.targets'))})"


def params_data(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (setup, curve, size) at its best learning rate (the highest mean accuracy over seeds, as d90 is
    judged: analysis.intrinsic_dim): that mean, the lr, the runs at it and their mean trained numbers
    (adapted_params: the head, trained by every method, is not counted)."""
    need = ["setup", "method.name", "seed", "eval_accuracy", "adapted_params"]
    if any(c not in runs for c in need):
        raise MissingRuns("no runs with eval_accuracy and adapted_params")
    r = runs.dropna(subset=["eval_accuracy", "adapted_params"]).copy()
    if r.empty or not (r["method.name"] != "full").any():
        raise MissingRuns("no LoRA or subspace runs with accuracy")
    r["curve"] = [_curve(row) for row in r.to_dict("records")]
    size = np.where(r["method.name"] == "subspace", pd.to_numeric(r.get("method.dim"), errors="coerce"),
                    pd.to_numeric(r.get("method.rank"), errors="coerce"))
    r["size"] = np.where(r["method.name"] == "full", 0, size)
    r["lr"] = pd.to_numeric(r[LR], errors="coerce") if LR in r else np.nan
    g = r.groupby(["setup", "curve", "size", "lr"], dropna=False)
    per_lr = g.agg(method=("method.name", "first"), accuracy=("eval_accuracy", "mean"),
                   n=("eval_accuracy", "size"), params=("adapted_params", "mean")).reset_index()
    best = per_lr.sort_values("accuracy", ascending=False, kind="stable").drop_duplicates(["setup", "curve", "size"])
    return best.sort_values(["setup", "curve", "size"]).reset_index(drop=True)


@styled
def plot_params(d: pd.DataFrame, marks: pd.DataFrame):
    fig, panel = panels(d, size=(5.2, 3.8))
    for ax, setup, g in panel:
        curves = [c for c in dict.fromkeys(g.curve) if c != "full"]
        for i, c in enumerate(curves):
            h = g[g.curve == c].sort_values("params")
            ax.plot(h.params, h.accuracy, color=color(i), marker=marker(i + 1), ms=4, lw=1,
                    label=f"{c} ({n_label(int(h.n.sum()), 'run')})", gid=f"params:{c}")
        full = g[g.curve == "full"]
        if not full.empty:
            f = full.iloc[0]
            ax.scatter([f.params], [f.accuracy], color=FULL_COLOR, marker="s", s=30, zorder=3,
                       label=f"full ({n_label(int(f.n), 'run')})")
            ax.axhline(SHARE * f.accuracy, color="#999999", lw=0.8, ls=":", label=f"{SHARE:.0%} of full")
        floors = marks.loc[marks.setup == setup, "majority"].dropna()
        _majority(ax, float(floors.iloc[0]) if len(floors) else None)  # how much of "90 % of full" it gives alone
        shown = marks[(marks.setup == setup) & marks["size"].notna()]
        for x in shown.adapted_params:
            ax.axvline(x, color="#555555", lw=0.7, ls="--")
        for (_, size), g in shown.groupby([shown.method == "subspace", "size"], sort=False):
            # variants reaching 90 % at the same rank share one label (their lines lie side by side)
            name = "d90" if g.method.iloc[0] == "subspace" else f"{', '.join(label_of(m) for m in g.method)} r90%"
            ax.annotate(f"{name} = {size:g}", (g.adapted_params.min(), g.goal.iloc[0]), fontsize=6, rotation=90,
                        va="bottom", ha="right")
        ax.set_xscale("log")
        ax.set(xlabel="trained numbers (log; the head not counted)", ylabel="test accuracy",
               title=_setup_title(setup, "accuracy vs trained numbers"))
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return fig


def figure_14(tables, out_dir: Path) -> Drawn:
    runs = tables["runs"]
    d = params_data(runs)
    marks = threshold_table(runs, majority=majority_by_setup(runs))
    notes = [f"Setup {s}: {n}." for s, n in dict.fromkeys(zip(marks.setup, marks.note)) if n]
    return _write(out_dir, "fig14_accuracy_vs_parameters", plot_params(d, marks), d, table=marks, note=" ".join(notes))


MIN_SNAPSHOTS = 2   # a curve over training needs two steps (and φ with the previous snapshot a second one)


def dynamics_data(tables) -> pd.DataFrame:
    """One row per (setup, config, step): r90 and φ(1,1), φ(8,8) against the previous snapshot, each the mean over
    the matrices a run tracked and then over its seeds; n = runs."""
    d = tables.get("dynamics")
    if d is None or d.empty:
        raise MissingRuns("no run recorded rank dynamics (trainer.dynamics writes dynamics.csv)")
    runs = prepare(tables["runs"])[["run_id", "setup", "config", "order"]]
    per_run = d.groupby(["run_id", "step"], as_index=False)[["r90", "phi_1", "phi_8"]].mean()
    per_run = per_run[per_run.run_id.isin(runs.run_id)]
    if not per_run.empty and per_run.groupby("run_id").step.nunique().max() < MIN_SNAPSHOTS:
        raise MissingRuns(f"every run has one rank snapshot (taken at each evaluation, and these runs evaluated only "
                          f"at their last step): a curve needs trainer.eval_interval below trainer.max_steps, e.g. a "
                          f"third of it for {MIN_SNAPSHOTS + 1} points")
    m = per_run.merge(runs, on="run_id")
    if m.empty:
        raise MissingRuns("no run with rank dynamics among the runs analysed")
    out = m.groupby(["setup", "config", "step"], as_index=False).agg(
        r90=("r90", "mean"), phi_1=("phi_1", "mean"), phi_8=("phi_8", "mean"), n=("run_id", "nunique"))
    order = m.drop_duplicates("config").set_index("config")["order"]
    return out.assign(_o=[order[c] for c in out.config]).sort_values(["setup", "_o", "step"]).drop(columns="_o")


@styled
def plot_dynamics(d: pd.DataFrame):
    setups = list(dict.fromkeys(d.setup))
    fig, axes = new_figure(2, len(setups), size=(4.8, 3.0))
    for col, setup in enumerate(setups):
        g = d[d.setup == setup]
        configs = list(dict.fromkeys(g.config))
        lora = [c for c in configs if c != "full"]
        for c in configs:
            h = g[g.config == c]
            style = dict(color=FULL_COLOR, marker="s") if c == "full" else dict(color=color(lora.index(c)),
                                                                                marker=marker(lora.index(c) + 1))
            label = f"{c} ({n_label(int(h.n.max()), 'run')})"
            axes[0][col].plot(h.step, h.r90, ms=3, lw=1, label=label, **style)
            axes[1][col].plot(h.step, h.phi_1, ms=3, lw=1, **style)
        axes[0][col].set(ylabel="r90 of ΔW (mean over matrices)", title=_setup_title(setup, "rank over training"))
        axes[1][col].set(xlabel="step", ylabel="φ(1,1) with the previous snapshot", ylim=(-0.05, 1.05),
                         xlim=axes[0][col].get_xlim())  # the first snapshot has no φ: keep the steps aligned
        axes[1][col].legend(*axes[0][col].get_legend_handles_labels(), fontsize=6, loc="upper center",
                            bbox_to_anchor=(0.5, -0.3), ncol=2 if len(configs) <= 6 else 1, frameon=False)
    return fig


def figure_15(tables, out_dir: Path) -> Drawn:
    d = dynamics_data(tables)
    return _write(out_dir, "fig15_rank_dynamics", plot_dynamics(d), d,
                  table=d.groupby(["setup", "config"], as_index=False).agg(
                      last_step=("step", "max"), r90_last=("r90", "last"), phi_1_last=("phi_1", "last"),
                      n=("n", "max")))
