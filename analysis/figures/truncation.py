"""The truncation figure (analysis.truncate): per setup, the metric against r for the truncated fine-tunes (mean over
seeds), the random-projection baseline and LoRA trained at r (its runs' metrics.json), with W0 and the whole ΔW as
horizontal lines and r_f90, LoRA's 90 % rank and the spectral r90 marked.

    figure_truncation(truncation, functional, runs, out_dir) -> Path    # OUT/figures/truncation.png and .pdf
"""
import math
from pathlib import Path

import pandas as pd

from analysis.figures.style import FULL_COLOR, RANDOM_COLOR, color, new_figure, save, styled

NAME = "truncation"


def figure_truncation(truncation: pd.DataFrame, functional: pd.DataFrame, runs: pd.DataFrame, out_dir: Path) -> Path:
    """Draw the figure and write it to OUT_DIR; returns the PNG's path."""
    return save(draw_truncation(truncation, functional, runs), Path(out_dir), NAME)


@styled
def draw_truncation(truncation: pd.DataFrame, functional: pd.DataFrame, runs: pd.DataFrame):
    setups = functional[functional.level == "setup"]
    fig, axes = new_figure(1, max(1, setups.setup.nunique()))
    for ax, (setup, rows) in zip(axes[0], setups.groupby("setup", sort=True)):
        metric = rows.metric.iloc[0]
        for i, row in enumerate(rows.itertuples()):
            points = truncation[(truncation.setup == setup) & (truncation.variant == row.variant)]
            for kind, style, c in (("truncated", "-o", color(i)), ("random", ":", RANDOM_COLOR)):
                mean = points[points.kind == kind].groupby("r")[metric].mean()
                ax.plot(mean.index, mean.values, style, color=c, label=f"{row.variant} {kind}")
            ax.axhline(row.w0, color=color(i), lw=0.6, ls="--")
            ax.axhline(row.full, color=FULL_COLOR if row.variant == "full" else color(i), lw=0.6)
            for value, ls, what in ((row.r_f90, "-", "r_f90"), (row.spectral_r90, "-.", "spectral r90")):
                if not math.isnan(value):
                    ax.axvline(value, color=color(i), ls=ls, lw=0.6, alpha=0.7, label=f"{row.variant} {what}")
        column = f"eval_{metric}"
        lora = runs[(runs.get("setup") == setup) & (runs.variant == "lora")] if "setup" in runs else runs.iloc[:0]
        if column in lora and not lora.empty:  # one line per target set: LoRA on q,v and on all-linear differ
            targets = lora["method.targets"].astype(str) if "method.targets" in lora else pd.Series("", lora.index)
            for j, (which, group) in enumerate(lora.groupby(targets, sort=True)):
                mean = group.groupby("method.rank")[column].mean()
                ax.plot(mean.index, mean.values, "-s", color=color(len(rows) + j),
                        label="LoRA trained at r" + (f" ({_short(which)})" if targets.nunique() > 1 else ""))
        if not math.isnan(rows.lora_r90.iloc[0]):
            ax.axvline(rows.lora_r90.iloc[0], color=color(len(rows)), ls="--", lw=0.6, label="LoRA 90 % rank")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel(metric)
        ax.set_title(setup)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2, fontsize="x-small")  # below: off the curves
    return fig


def _short(targets: str) -> str:
    """A target list as the config prints it (`['query', 'value']`) as a label: query,value."""
    return "".join(c for c in targets if c not in "[]'\" ")
