"""The paper's figures, drawn: `plot_*(data) -> Figure` draws what a `figure_data` function computed, and
`figure_N(tables, out_dir) -> Drawn` writes figure N from the analysis tables (DataFrames).

    drawn = figure_1(tables, out / "figures")   # fig1_accuracy_vs_rank.{png,pdf,csv} and _table.csv
    drawn.path, drawn.data, drawn.table          # the PNG, the plotted data, the table report.md shows

Figure N writes figN_*.{png,pdf,csv} (the CSV holds the plotted data; `*_table.csv`, where present, the table
the report shows) in the one style of `analysis.style`, with no dates or versions in the files: the same tables
give the same bytes. A figure whose runs are missing raises figure_data.MissingRuns. The ten plots (20-50 lines
each) share this file's axis and heat-map helpers, which is why it runs past 400 lines.
"""
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from .figure_data import (GIB, MEMORY_PARTS, SHORT, accuracy_by_rank, accuracy_memory_data, accuracy_table,
                          amplification_data, amplification_table, checkpoint_data, data_scarce_data, memory_data,
                          phi_layers_data, phi_rank_data, phi_seed_data, spectra_data)
from .style import FULL_COLOR, color, marker, new_figure, save, styled
from .tables import write_csv

ZOOM = 8                     # the paper's zoom into i, j <= 8


class Drawn(NamedTuple):
    """What figure_N wrote: the PNG (NAME.pdf and NAME.csv lie beside it), the plotted data (NAME.csv) and the
    table report.md shows under the figure (NAME_table.csv), if any."""
    path: Path
    data: pd.DataFrame
    table: pd.DataFrame | None = None


def _write(out_dir: Path, name: str, fig, data: pd.DataFrame, table: pd.DataFrame | None = None,
           **extra: pd.DataFrame) -> Drawn:
    """NAME.png, .pdf, .csv (data), NAME_table.csv and NAME_{key}.csv for each extra table."""
    write_csv(out_dir / f"{name}.csv", data)
    for key, df in extra.items():
        write_csv(out_dir / f"{name}_{key}.csv", df)
    if table is not None:
        write_csv(out_dir / f"{name}_table.csv", table)
    return Drawn(save(fig, out_dir, name), data, table)


def _ordered(values, key_frame: pd.DataFrame) -> list:
    """Config labels in plotting order: full first, then by target set and rank."""
    order = key_frame.drop_duplicates("config").set_index("config")["order"]
    return sorted(dict.fromkeys(values), key=lambda v: order.get(v, (2, str(v), 0)))


def config_colors(configs) -> dict:
    """One colour per configuration label of a figure: full fine-tuning black, LoRA configurations in
    plotting order."""
    lora = [c for c in configs if c != "full"]
    return {"full": FULL_COLOR} | {c: color(i) for i, c in enumerate(lora)}


def _log2_ticks(ax, values, axis: str = "x") -> None:
    """Plain-number ticks at the given values (ranks, indices) on a log axis."""
    values = sorted(set(int(v) for v in values))
    (ax.set_xticks if axis == "x" else ax.set_yticks)(values, [str(v) for v in values])
    ax.minorticks_off()


def _index_ticks(top: int) -> list[int]:
    """Powers of two up to `top`, and `top` itself (replacing the last power when the two labels would touch)."""
    ticks = [2 ** e for e in range(int(math.log2(top)) + 1)]
    if ticks[-1] != top:
        ticks = (ticks[:-1] if top < 1.6 * ticks[-1] else ticks) + [top]
    return ticks


# ---- Figure 1: accuracy against LoRA rank per target set, full fine-tuning as the reference (Table 6 analogue) ----

@styled
def plot_accuracy_vs_rank(data: dict[str, pd.DataFrame]):
    points, summary = data["points"], data["summary"]
    setups = sorted(summary.setup.unique())
    fig, axes = new_figure(1, len(setups), size=(3.4, 2.6))
    for ax, setup in zip(axes[0], setups):
        s, p = summary[summary.setup == setup], points[points.setup == setup]
        lora = s[s.method == "lora"]
        for k, targets in enumerate(sorted(lora.targets.unique())):
            line = lora[lora.targets == targets].sort_values("rank")
            ax.errorbar(line["rank"], line["mean"], yerr=line["std"].fillna(0), color=color(k), marker=marker(k),
                        label=f"LoRA ({targets})", gid=f"mean:{targets}")
            pts = p[(p.method == "lora") & (p.targets == targets)]
            ax.scatter(pts["rank"], pts.eval_accuracy, color=color(k), alpha=0.35, s=10, linewidths=0,
                       gid=f"points:{targets}")
        full = s[s.method == "full"]
        if len(full):
            m, sd = full["mean"].iloc[0], full["std"].fillna(0).iloc[0]
            ax.axhline(m, color=FULL_COLOR, ls="--", label=f"full FT (n={full.n.iloc[0]})", gid="mean:full")
            ax.axhspan(m - sd, m + sd, color=FULL_COLOR, alpha=0.08, lw=0)
        ax.set_xscale("log", base=2)
        _log2_ticks(ax, lora["rank"].unique())
        ax.set(xlabel="LoRA rank r", ylabel="test accuracy", title=setup)
        ax.legend(loc="lower right")
    return fig


def figure_1(tables, out_dir: Path) -> Drawn:
    data = accuracy_by_rank(tables["runs"])
    return _write(out_dir, "fig1_accuracy_vs_rank", plot_accuracy_vs_rank(data), data["summary"],
                  table=accuracy_table(data["summary"]))


# ---- Figures 2-4: φ heat maps (paper Figures 3, 4; Appendix H.1 Figures 6, 7) -------------------------------------

def _grid(df: pd.DataFrame, value: str = "phi") -> np.ndarray:
    """(I, J) array of one heat map from its long rows (i, j from 1)."""
    return df.pivot(index="i", columns="j", values=value).sort_index().sort_index(axis=1).to_numpy()


def _heatmap(ax, grid: np.ndarray, gid: str):
    I, J = grid.shape
    im = ax.imshow(grid, vmin=0, vmax=1, aspect="auto", interpolation="nearest", origin="upper",
                   extent=(0.5, J + 0.5, I + 0.5, 0.5), gid=gid)
    ax.grid(False)
    ax.set_xticks(_ticks(J))
    ax.set_yticks(_ticks(I))
    return im


def _ticks(n: int) -> list[int]:
    step = max(1, int(math.ceil(n / 8)))
    return sorted({1, *range(step, n + 1, step)})


def _panel_title(matrix_type: str) -> str:
    short = SHORT.get(matrix_type)
    return f"ΔW_{short} ({matrix_type})" if short else f"ΔW ({matrix_type})"


def _phi_panels(data: pd.DataFrame) -> list:
    """(name, rows, value column, title) per matrix type, and the random baseline last."""
    kinds = sorted(data.matrix_type.unique())
    panels = [(k, data[data.matrix_type == k], "phi", _panel_title(k)) for k in kinds]
    return panels + [("random", data[data.matrix_type == kinds[0]], "random_baseline", "random subspaces: E[φ]")]


@styled
def plot_phi_rank(data: pd.DataFrame):
    """Top row: φ over i ≤ r_a, j ≤ r_b per matrix type and the random baseline; bottom: zoom to i, j ≤ 8."""
    ra, rb, seed, layer = data.rank_a.iloc[0], data.rank_b.iloc[0], data.seed.iloc[0], data.layer.iloc[0]
    panels = _phi_panels(data)
    zoom = min(ZOOM, ra, rb)
    fig, axes = new_figure(2, len(panels), size=(2.4, 1.9))
    for col, (name, df, value, title) in enumerate(panels):
        for row, limit in enumerate([None, zoom]):
            d = df if limit is None else df[(df.i <= limit) & (df.j <= limit)]
            im = _heatmap(axes[row, col], _grid(d, value), gid=f"{name}:{'full' if limit is None else 'zoom'}")
            axes[row, col].set_title(title + ("" if limit is None else f", i, j ≤ {limit}"))
            axes[row, col].set_xlabel(f"j (A, r={rb})")
        axes[0, col].set_ylabel(f"i (A, r={ra})")
        axes[1, col].set_ylabel(f"i (A, r={ra})")
    fig.colorbar(im, ax=axes, label="φ(i, j)", shrink=0.8)
    fig.suptitle(f"Subspace similarity of A (right-singular directions), r={ra} vs r={rb}, seed {seed}, "
                 f"layer {layer}")
    return fig


def figure_2(tables, out_dir: Path, layer: int | None = None) -> Drawn:
    data = phi_rank_data(tables["subspace"], tables["runs"], layer)
    return _write(out_dir, "fig2_phi_rank", plot_phi_rank(data), data)

@styled
def plot_phi_seed(data: pd.DataFrame):
    r, sa, sb, layer = data["rank"].iloc[0], data.seed_a.iloc[0], data.seed_b.iloc[0], data.layer.iloc[0]
    panels = _phi_panels(data)
    fig, axes = new_figure(1, len(panels), size=(2.5, 2.3))
    for ax, (name, df, value, title) in zip(axes[0], panels):
        im = _heatmap(ax, _grid(df, value), gid=name)
        ax.set(title=title, xlabel=f"j (A, seed {sb})", ylabel=f"i (A, seed {sa})")
    fig.colorbar(im, ax=axes, label="φ(i, j)", shrink=0.8)
    fig.suptitle(f"Subspace similarity of A across seeds {sa} and {sb}, r={r}, layer {layer}")
    return fig


def figure_3(tables, out_dir: Path, layer: int | None = None) -> Drawn:
    data = phi_seed_data(tables["subspace"], tables["runs"], layer)
    return _write(out_dir, "fig3_phi_seed", plot_phi_seed(data), data)

@styled
def plot_phi_layers(data: pd.DataFrame):
    columns = list(dict.fromkeys(zip(data.comparison, data.matrix_type)))
    layers = sorted(data.layer.unique())
    fig, axes = new_figure(len(layers), len(columns), size=(2.3, 1.9))
    for row, layer in enumerate(layers):
        for col, (comparison, kind) in enumerate(columns):
            ax = axes[row, col]
            d = data[(data.comparison == comparison) & (data.matrix_type == kind) & (data.layer == layer)]
            if d.empty:
                ax.set_axis_off()
                continue
            im = _heatmap(ax, _grid(d), gid=f"{comparison}:{kind}:{layer}")
            ax.set(title=f"{_panel_title(kind)}, layer {layer}\n{comparison}", xlabel="j", ylabel="i")
    fig.colorbar(im, ax=axes, label="φ(i, j)", shrink=0.6)
    fig.suptitle("Subspace similarity of A (right-singular directions) at the first, middle and last layer")
    return fig


def figure_4(tables, out_dir: Path) -> Drawn:
    data = phi_layers_data(tables["subspace"], tables["runs"])
    return _write(out_dir, "fig4_phi_layers", plot_phi_layers(data), data)


# ---- Figure 5: amplification (paper Table 7) and the overlap of ΔW's directions with W's (Figure 8 analogue) ------

@styled
def plot_amplification(data: dict[str, pd.DataFrame]):
    summary, points = data["summary"], data["points"]
    setups = sorted(summary.setup.unique())
    fig, axes = new_figure(len(setups), 2, size=(3.6, 2.8))
    for row, setup in enumerate(setups):
        s, p = summary[summary.setup == setup], points[points.setup == setup]
        families = sorted(s.family.unique(), key=lambda f: (f != "full", f))
        kinds = sorted(s.matrix_type.unique())
        for f_i, family in enumerate(families):
            c = FULL_COLOR if family == "full" else color(f_i)
            for k_i, kind in enumerate(kinds):
                line = s[(s.family == family) & (s.matrix_type == kind)].sort_values("r")
                pts = p[(p.family == family) & (p.matrix_type == kind)]
                if line.empty:
                    continue
                label = f"{family}, {SHORT.get(kind, kind)}"
                ls = ["-", "--", ":", "-."][k_i % 4]
                axes[row, 0].plot(line.r, line.amplification, color=c, ls=ls, marker=marker(k_i), label=label,
                                  gid=f"amp:{family}:{kind}")
                axes[row, 0].scatter(pts.r, pts.amplification, color=c, alpha=0.25, s=8, linewidths=0)
                axes[row, 1].plot(line.r, line.phi_out, color=c, ls=ls, marker=marker(k_i), label=label,
                                  gid=f"phi:{family}:{kind}")
        base = s.groupby("r").random_phi_out.mean()
        axes[row, 1].plot(base.index, base.values, color="grey", ls=":", label="random subspaces", gid="phi:random")
        for ax in axes[row]:
            ax.set_xscale("log", base=2)
            _log2_ticks(ax, s.r.unique())
            ax.set_xlabel("r (top-r singular directions of ΔW)")
        axes[row, 0].set_yscale("log")
        axes[row, 0].set(ylabel="amplification ‖ΔW‖_F / ‖UᵀWV‖_F", title=f"{setup}: amplification (Table 7)")
        axes[row, 1].set(ylabel="φ(ΔW, W, r, r), output side", ylim=(0, None),
                         title="overlap of ΔW's and W's top-r directions")
        axes[row, 0].legend(fontsize=6, ncols=2)
        axes[row, 1].legend(fontsize=6, ncols=2)
    return fig


def figure_5(tables, out_dir: Path) -> Drawn:
    data = amplification_data(tables["amplification"], tables["runs"])
    return _write(out_dir, "fig5_amplification", plot_amplification(data), data["summary"],
                  table=amplification_table(data["summary"]))


# ---- Figure 6: singular values of full fine-tuning's ΔW vs LoRA's, per matrix type, r90 marked --------------------

@styled
def plot_spectra(data: dict[str, pd.DataFrame]):
    curves, r90 = data["curves"], data["r90"]
    panels = list(curves[["setup", "matrix_type"]].drop_duplicates().itertuples(index=False))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = new_figure(nrows, ncols, size=(2.9, 2.4))
    configs = _ordered(curves.config, data["order"])
    colors = config_colors(configs)
    for ax, (setup, kind) in zip(axes.flat, panels):
        for config in configs:
            c = curves[(curves.setup == setup) & (curves.matrix_type == kind) & (curves.config == config)]
            if c.empty:
                continue
            col = colors[config]
            mark = r90[(r90.setup == setup) & (r90.matrix_type == kind) & (r90.config == config)].r90
            label = config if config != "full" else "full FT"
            label += f", r90 = {mark.iloc[0]:.0f}" if len(mark) else ""
            ax.plot(c["index"], c["mean"], color=col, label=label, lw=1.4 if config == "full" else 1,
                    marker="o" if len(c) == 1 else None, ms=3, gid=f"sigma:{config}")
            if config == "full":
                ax.fill_between(c["index"], c["min"], c["max"], color=col, alpha=0.12, lw=0)
            if len(mark):
                ax.axvline(mark.iloc[0], color=col, ls=":", lw=0.9, gid=f"r90:{config}")
        ax.set(xscale="log", yscale="log", xlabel="index k (log scale)", ylabel="σ_k / σ_1 (log scale)",
               title=f"{_panel_title(kind)}, {setup}" if len(set(curves.setup)) > 1 else _panel_title(kind))
        top = int(curves[(curves.setup == setup) & (curves.matrix_type == kind)]["index"].max())
        _log2_ticks(ax, _index_ticks(top))
        ax.legend(fontsize=6, loc="lower left")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.suptitle("Singular values of ΔW (mean over layers and seeds; band: full FT min-max; dotted: r90)")
    return fig


def figure_6(tables, out_dir: Path) -> Drawn:
    data = spectra_data(tables["singular_values"], tables["spectrum"], tables["runs"])
    return _write(out_dir, "fig6_spectra", plot_spectra(data), data["curves"], r90=data["r90"])


# ---- Figure 7: peak memory (stacked estimate where known) and throughput by method and rank -----------------------

PART_LABELS = {"weights_bytes": "weights", "grads_bytes": "gradients", "optimizer_bytes": "optimizer state",
               "weight_copies_bytes": "bf16 weight copies", "activations_bytes": "activations"}
PART_COLORS = {"weights_bytes": "#999999", "grads_bytes": "#E69F00", "optimizer_bytes": "#D55E00",
               "weight_copies_bytes": "#CC79A7", "activations_bytes": "#56B4E9"}


@styled
def plot_memory(data: dict[str, pd.DataFrame]):
    summary, points = data["summary"], data["points"]
    setups = list(dict.fromkeys(summary.setup))
    width = max(3.0, 0.55 * summary.groupby("setup").size().max() + 1.2)
    fig, axes = new_figure(len(setups), 2, size=(width, 2.9))
    colors = config_colors(list(dict.fromkeys(summary.config)))  # summary is in plotting order
    for row, setup in enumerate(setups):
        s, p = summary[summary.setup == setup].reset_index(drop=True), points[points.setup == setup]
        x = np.arange(len(s))
        ax = axes[row, 0]
        has_estimate = s[[f"estimate_{q}" for q in MEMORY_PARTS]].notna().any(axis=1)
        bottom = np.zeros(len(s))
        for part in MEMORY_PARTS:
            v = s[f"estimate_{part}"].fillna(0).to_numpy() / GIB
            if v.any():
                ax.bar(x, v, bottom=bottom, color=PART_COLORS[part], label=f"estimate: {PART_LABELS[part]}",
                       width=0.6, gid=f"estimate:{part}")
                bottom += v
        total = s["estimate_total_bytes"].to_numpy() / GIB
        if has_estimate.any():  # the model's peak is not the sum of the parts: activations free as grads appear
            ax.scatter(x[has_estimate.to_numpy()], total[has_estimate.to_numpy()], marker="_", s=300, color="black",
                       linewidths=1.5, zorder=3, label="estimate: peak (total)", gid="estimate:total")
        measured_only = ~has_estimate.to_numpy()
        if measured_only.any():
            ax.bar(x[measured_only], s.peak_mean[measured_only] / GIB, color="#DDDDDD", width=0.6,
                   label="measured peak (no estimate)", gid="measured_bar")
        for i, config in enumerate(s.config):
            pts = p[p.config == config]
            ax.scatter(np.full(len(pts), i), pts.peak_memory_bytes / GIB, color="black", marker="D", s=12, zorder=3,
                       label="measured peak (per run)" if i == 0 else None, gid=f"peak:{config}")
        device = s.device.iloc[0]
        what = "peak RSS" if device == "cpu" else "max allocated"
        ax.set_xticks(x, s.config, rotation=30, ha="right")
        ax.set(ylabel=f"peak memory (GiB; measured: {what})", title=f"{setup}: memory")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax = axes[row, 1]
        ax.bar(x, s.tokens_per_second_mean, yerr=s.tokens_per_second_std.fillna(0),
               color=[colors[c] for c in s.config], alpha=0.75, width=0.6, gid="tokens_per_second")
        for i, config in enumerate(s.config):
            pts = p[p.config == config]
            ax.scatter(np.full(len(pts), i), pts.tokens_per_second, color="black", s=8, zorder=3)
        ax.set_xticks(x, s.config, rotation=30, ha="right")
        ax.set(ylabel="training throughput (tokens/s)", title=f"{setup}: throughput ({device})")
    return fig


def figure_7(tables, out_dir: Path) -> Drawn:
    data = memory_data(tables["runs"])
    return _write(out_dir, "fig7_memory_throughput", plot_memory(data), data["summary"])


# ---- Figure 8: accuracy against peak memory, one point per run, with the Pareto front -----------------------------

@styled
def plot_accuracy_memory(data: pd.DataFrame):
    setups = list(dict.fromkeys(data.setup))
    fig, axes = new_figure(1, len(setups), size=(3.6, 2.8))
    configs = _ordered(data.config, data)
    colors = config_colors(configs)
    for ax, setup in zip(axes[0], setups):
        d = data[data.setup == setup]
        for k, config in enumerate(configs):
            pts = d[d.config == config]
            if pts.empty:
                continue
            ax.scatter(pts.peak_gib, pts.eval_accuracy, color=colors[config], marker=marker(k), s=18, label=config,
                       alpha=0.8, gid=f"runs:{config}")
        front = d[d.pareto].sort_values("peak_gib")
        ax.step(front.peak_gib, front.eval_accuracy, where="post", color="grey", lw=0.8, ls="--",
                label="Pareto front", gid="pareto")
        ax.set(xlabel="peak memory (GiB)", ylabel="test accuracy", title=setup)
        ax.legend(fontsize=6)
    return fig


def figure_8(tables, out_dir: Path) -> Drawn:
    data = accuracy_memory_data(tables["runs"])
    return _write(out_dir, "fig8_accuracy_vs_memory", plot_accuracy_memory(data), data.drop(columns="order"))


# ---- Figure 9: train vs test accuracy against training-set size, full vs LoRA -------------------------------------

@styled
def plot_data_scarce(data: pd.DataFrame):
    setups = list(dict.fromkeys(data.setup))
    fig, axes = new_figure(1, len(setups), size=(3.6, 2.8))
    for ax, setup in zip(axes[0], setups):
        d = data[data.setup == setup]
        lines = list(dict.fromkeys(zip(d.config, d.lr)))
        several_lr = len({lr for _, lr in lines}) > len({c for c, _ in lines})
        for k, (config, lr) in enumerate(lines):
            g = d[(d.config == config) & (d.lr == lr)]
            c = FULL_COLOR if config == "full" else color(k)
            name = config + (f", lr {lr:g}" if several_lr else "")
            ax.errorbar(g.train_examples, g.test_mean, yerr=g.test_std.fillna(0), color=c, marker=marker(k),
                        label=f"{name}: test", gid=f"test:{config}:{lr}")
            ax.errorbar(g.train_examples, g.train_mean, yerr=g.train_std.fillna(0), color=c, marker=marker(k),
                        ls="--", mfc="white", label=f"{name}: train", gid=f"train:{config}:{lr}")
        ax.set_xscale("log")
        _log2_ticks(ax, d.train_examples.unique())
        ax.set(xlabel="training examples", ylabel="accuracy", title=setup)
        ax.legend(fontsize=6)
    return fig


def figure_9(tables, out_dir: Path) -> Drawn:
    data = data_scarce_data(tables["runs"])
    return _write(out_dir, "fig9_data_scarce", plot_data_scarce(data), data.drop(columns="order"))


# ---- Figure 10: checkpoint size per task, full model vs adapter ---------------------------------------------------

@styled
def plot_checkpoints(data: pd.DataFrame):
    tasks = list(dict.fromkeys(data.data))
    configs = _ordered(data.config, data)
    colors = config_colors(configs)
    fig, axes = new_figure(1, 1, size=(max(3.2, 1.0 + 0.5 * len(configs) * len(tasks)), 2.8))
    ax = axes[0, 0]
    width = 0.8 / len(configs)
    for k, config in enumerate(configs):
        d = data[data.config == config]
        x = np.array([tasks.index(t) for t in d.data]) + (k - (len(configs) - 1) / 2) * width
        bars = ax.bar(x, d.checkpoint_mib, width=width * 0.9, label=config, gid=f"ckpt:{config}",
                      color=colors[config])
        ax.bar_label(bars, [f"{v:.3g}" for v in d.checkpoint_mib], fontsize=5, rotation=90, padding=2)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(yscale="log", ylabel="checkpoint size (MiB, log scale)",
           title="Saved state: full model vs LoRA adapter + head")
    ax.set_ylim(top=ax.get_ylim()[1] * 8)
    ax.legend(fontsize=6, ncols=2)
    return fig


def figure_10(tables, out_dir: Path) -> Drawn:
    data = checkpoint_data(tables["runs"])
    return _write(out_dir, "fig10_checkpoint_size", plot_checkpoints(data), data.drop(columns="order"),
                  table=data[["data", "config", "checkpoint_mib", "fraction_of_full", "n"]])
