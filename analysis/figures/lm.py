"""The generative studies' figures (causal LMs: `task.objective` cpt or sft), from the same tables as the others:

    figure_11: in-domain held-out loss against forgetting, one point per run (the learning-forgetting frontier
               of Biderman et al. 2024, "LoRA Learns Less and Forgets Less")
    figure_12: final held-out loss against learning rate per method and rank, each curve's best learning rate
               marked, and best-LoRA-lr / best-full-lr ("LoRA Without Regret": ~10, nearly flat across ranks)
    figure_13: full fine-tuning's ΔW energy rank r90 per layer and matrix type, beside the LoRA ranks run

Each panel is one setup (analysis.statistics: runs of different setups are never pooled). A figure without its
runs raises figure_data.MissingRuns. Their data: analysis/lm_tables.py.
"""
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.figures.data import SHORT, matrix_order
from analysis.figures.draw import Drawn, _setup_title, _write
from analysis.lm_tables import frontier_data, lr_data, r90_layer_data
from analysis.statistics import n_label
from analysis.figures.style import FULL_COLOR, color, marker, panels, styled


def _curve_style(curves: list[str]) -> dict:
    lora = [c for c in curves if c != "full"]
    return {"full": (FULL_COLOR, "s")} | {c: (color(i), marker(i + 1)) for i, c in enumerate(lora)}


@styled
def plot_frontier(d: pd.DataFrame):
    fig, panel = panels(d, size=(4.6, 3.6))
    for ax, setup, g in panel:
        curves = list(dict.fromkeys(g.sort_values("curve_order").curve))
        style = _curve_style(curves)
        base = g.eval_loss_base.dropna().iloc[0] if "eval_loss_base" in g and g.eval_loss_base.notna().any() else None
        worse = g.eval_loss > base if base is not None else pd.Series(False, index=g.index)
        for c in curves:
            h = g[(g.curve == c) & ~worse]
            ax.scatter(h.eval_loss, h.forgetting, color=style[c][0], marker=style[c][1], s=22,
                       label=f"{c} ({n_label(len(h), 'run')})", gid=f"frontier:{c}")
        if base is not None:
            ax.scatter([base], [1.0], color="white", edgecolor="black", marker="*", s=80, label="base model")
        ax.axhline(1.0, color="#999999", lw=0.8, ls=":")
        ax.set_yscale("log")  # a ratio: after / before
        if worse.any():
            k = int(worse.sum())
            ax.text(0.01, 0.99, f"not shown: {k} run{'s' * (k > 1)} above the base model's loss",
                    transform=ax.transAxes, fontsize=6, va="top", color="#555555")
        ax.set(xlabel="held-out in-domain loss (nats/token; lower: learned more)",
               ylabel="forgetting: OOD perplexity after / before (log)",
               title=_setup_title(setup, "learning vs forgetting"))
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    return fig


def figure_11(tables, out_dir: Path) -> Drawn:
    d = frontier_data(tables["runs"])
    return _write(out_dir, "fig11_learning_vs_forgetting", plot_frontier(d), d.drop(columns="curve_order"),
                  table=d.groupby(["setup", "curve"], sort=False).agg(
                      eval_loss=("eval_loss", "mean"), forgetting=("forgetting", "mean"),
                      n=("eval_loss", "size")).reset_index())


def per_lr(n: pd.Series) -> str:
    return n_label(int(n.max())) if n.nunique() == 1 else f"n={int(n.min())}-{int(n.max())} seeds"


@styled
def plot_lr(data: dict):
    c, best = data["curves"], data["best"]
    fig, panel = panels(c, size=(4.6, 3.6))
    for ax, setup, g in panel:
        b = best[best.setup == setup]
        curves = list(dict.fromkeys(g.curve))
        style = _curve_style(curves)
        for k in curves:
            h, hb = g[g.curve == k], b[b.curve == k].iloc[0]
            ratio = "" if k == "full" or not np.isfinite(hb.lr_over_full) else f", best ÷ full's {hb.lr_over_full:.3g}"
            ax.plot(h.lr, h.eval_loss, color=style[k][0], marker=style[k][1], ms=4, lw=1,
                    label=f"{k} ({per_lr(h.n)} per lr; best lr {hb.lr:.3g}{ratio})", gid=f"lr:{k}")
            ax.scatter([hb.lr], [hb.eval_loss], s=90, facecolor="none", edgecolor=style[k][0], lw=1.2)
        ax.set_xscale("log")
        ax.set(xlabel="learning rate (log scale)", ylabel="final held-out loss (nats/token)",
               title=_setup_title(setup, "loss vs learning rate (circle: best)"))
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
    return fig


def figure_12(tables, out_dir: Path) -> Drawn:
    data = lr_data(tables["runs"])
    best = data["best"]
    edge = best[best.edge]
    note = "" if edge.empty else (f"The best learning rate of {', '.join(edge.curve)} lies at the edge of its grid: "
                                  "the true optimum may lie beyond it.")
    return _write(out_dir, "fig12_loss_vs_lr", plot_lr(data), data["curves"].drop(columns="curve_order"),
                  table=best[["setup", "curve", "lr", "eval_loss", "lr_over_full", "edge"]], note=note)


@styled
def plot_r90_layers(data: dict):
    d = data["data"]
    fig, panel = panels(d, size=(4.6, 3.6))
    for ax, setup, g in panel:
        for i, t in enumerate(sorted(set(g.matrix_type), key=matrix_order)):
            h = g[g.matrix_type == t]
            ax.plot(h.layer, h.r90, color=color(i), marker=marker(i), ms=3, lw=1,
                    label=f"{SHORT.get(t, t)} (width {int(h.width.min()) if h.width.notna().any() else '?'})",
                    gid=f"r90:{t}")
        for k in data["lora_ranks"].get(setup, []):
            ax.axhline(k, color="#999999", lw=0.7, ls="--")
            ax.annotate(f"LoRA r={k}", (g.layer.max(), k), xytext=(2, 1), textcoords="offset points", fontsize=6,
                        color="#555555", ha="right", va="bottom")
        ax.set_yscale("log")
        ax.set(xlabel="layer", ylabel="full fine-tuning ΔW r90 (log scale)",
               title=_setup_title(setup, f"energy rank per layer ({n_label(int(g.n.max()), 'run')})"))
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, frameon=False)
    return fig


def figure_13(tables, out_dir: Path) -> Drawn:
    data = r90_layer_data(tables["spectrum"], tables["runs"])
    d = data["data"]
    table = d.groupby(["setup", "matrix_type"], sort=True).agg(
        r90_mean=("r90", "mean"), r90_min=("r90_min", "min"), r90_max=("r90_max", "max"),
        width=("width", "min"), layers=("layer", "nunique")).reset_index()
    table["largest_lora_rank"] = [max(data["lora_ranks"].get(s, [np.nan])) for s in table.setup]
    return _write(out_dir, "fig13_full_r90_per_layer", plot_r90_layers(data), d, table=table)
