"""Figure 16: train and eval loss against step per configuration, one panel per setup, the seeds as a band (min-max)
around their mean, from `tables/loss_curves.csv` (analysis/loss_curves.py). Runs without history.csv are counted
in the caption's note.
"""
from pathlib import Path

import pandas as pd

from analysis.figures.data import MissingRuns
from analysis.figures.draw import Drawn, _legend_below, _setup_title, _write, config_colors
from analysis.statistics import n_label
from analysis.figures.style import panels, styled

BAND_ALPHA = 0.2


@styled
def plot_loss_curves(curves: pd.DataFrame):
    fig, panel = panels(curves, size=(4.2, 3.8))
    for ax, setup, g in panel:
        configs = list(dict.fromkeys(g.config))
        colors = config_colors(configs)
        for c in configs:
            h = g[g.config == c]
            train = h.dropna(subset=["train_loss_mean"])
            ax.plot(train.step, train.train_loss_mean, color=colors[c], lw=1,
                    label=f"{c} ({n_label(int(h.n_runs.max()))})", gid=f"train:{c}")
            ax.fill_between(train.step, train.train_loss_min, train.train_loss_max, color=colors[c],
                            alpha=BAND_ALPHA, lw=0)
            ev = h.dropna(subset=["eval_loss_mean"])
            if len(ev):
                ax.plot(ev.step, ev.eval_loss_mean, color=colors[c], lw=1, ls="--", marker="o", ms=3, gid=f"eval:{c}")
                ax.fill_between(ev.step, ev.eval_loss_min, ev.eval_loss_max, color=colors[c], alpha=BAND_ALPHA, lw=0)
        ax.set(xlabel="step", ylabel="loss (solid: train, dashed: eval)",
               title=_setup_title(setup, "loss over training"))
        _legend_below(ax, ncols=1)
    return fig


def loss_curves_note(curves: pd.DataFrame, runs: pd.DataFrame) -> str:
    """How many of the runs analysed have no loss curve (no history.csv): the runs table's count minus those the
    curves hold."""
    held = int(curves.drop_duplicates(["setup", "config"]).n_runs.sum()) if len(curves) else 0
    k = len(runs) - held
    return "" if k <= 0 else f"{k} run{'s' * (k > 1)} without history.csv (trained before it was written) left out."


def figure_16(tables, out_dir: Path) -> Drawn:
    curves, runs = tables.get("loss_curves"), tables["runs"]
    if curves is None or curves.empty:
        raise MissingRuns(f"no run has a loss history ({len(runs)} runs without history.csv)")
    table = curves.groupby(["setup", "config"], sort=False).agg(
        last_step=("step", "max"), n_runs=("n_runs", "max")).reset_index()
    last = curves.dropna(subset=["train_loss_mean"]).groupby(["setup", "config"], sort=False).last()
    table["final_train_loss"] = [last.train_loss_mean.get((s, c)) for s, c in zip(table.setup, table.config)]
    evals = curves.dropna(subset=["eval_loss_mean"]).groupby(["setup", "config"], sort=False).last()
    table["final_eval_loss"] = [evals.eval_loss_mean.get((s, c)) for s, c in zip(table.setup, table.config)]
    return _write(out_dir, "fig16_loss_curves", plot_loss_curves(curves), curves, table=table,
                  note=loss_curves_note(curves, runs))
