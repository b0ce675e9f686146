"""Figure 14: test accuracy against the number of numbers each method trains (log axis), full fine-tuning, LoRA over
ranks (each target set and variant a curve), and the subspace method over d, with d90 and LoRA's 90% rank marked
(analysis.intrinsic_dim). Classification runs only (eval_accuracy); one panel per setup.
"""
from pathlib import Path

import numpy as np
import pandas as pd

from .figure_data import MissingRuns, targets_label
from .figures import Drawn, _setup_title, _write
from .intrinsic_dim import SHARE, threshold_table
from .statistics import n_label
from .style import FULL_COLOR, color, marker, new_figure, styled


def _curve(row) -> str:
    method = row["method.name"]
    if method == "full":
        return "full"
    tgt = targets_label(row.get("method.targets"))
    variant = row.get("method.variant")
    label = "subspace" if method == "subspace" else "LoRA" if not isinstance(variant, str) or variant == "lora" \
        else variant
    return f"{label} ({tgt})"


def params_data(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (setup, curve, size): mean accuracy over seeds, the seeds, mean trained numbers (adapted_params:
    the head, trained by every method, is not counted)."""
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
    g = r.groupby(["setup", "curve", "size"], dropna=False)
    return g.agg(method=("method.name", "first"), accuracy=("eval_accuracy", "mean"),
                 n=("eval_accuracy", "size"), params=("adapted_params", "mean")).reset_index()


@styled
def plot_params(d: pd.DataFrame, marks: pd.DataFrame):
    setups = list(dict.fromkeys(d.setup))
    fig, axes = new_figure(1, len(setups), size=(5.2, 3.8))
    for ax, setup in zip(axes[0], setups):
        g = d[d.setup == setup]
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
        for m in marks[(marks.setup == setup) & marks["size"].notna()].to_dict("records"):
            name = "d90" if m["method"] == "subspace" else "LoRA r90%"
            ax.axvline(m["adapted_params"], color="#555555", lw=0.7, ls="--")
            ax.annotate(f"{name} = {m['size']:g}", (m["adapted_params"], m["goal"]), fontsize=6, rotation=90,
                        va="bottom", ha="right")
        ax.set_xscale("log")
        ax.set(xlabel="trained numbers (log; the head not counted)", ylabel="test accuracy",
               title=_setup_title(setup, "accuracy vs trained numbers"))
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return fig


def figure_14(tables, out_dir: Path) -> Drawn:
    runs = tables["runs"]
    d = params_data(runs)
    marks = threshold_table(runs)
    return _write(out_dir, "fig14_accuracy_vs_parameters", plot_params(d, marks), d, table=marks)
