"""The paper's figures, drawn: `plot_*(data) -> Figure` draws what a `figure_data` function computed, and
`figure_N(tables, out_dir) -> Drawn` writes figure N from the analysis tables (DataFrames).

    drawn = figure_1(tables, out / "figures")   # fig1_accuracy_vs_rank.{png,pdf,csv} and _table.csv
    drawn.path, drawn.data, drawn.table, drawn.note   # the PNG, the plotted data, report.md's table, caption note

Figure N writes figN_*.{png,pdf,csv} (the CSV holds the plotted data; `*_table.csv` the table the report shows)
in the one style of `analysis.figures.style`, with no dates or versions in the files: the same tables give the same
bytes. Every figure says its setup (analysis.statistics), every series its n; seed intervals are drawn only where
there are two or more seeds; legends sit under or beside their panel, inside the figure
(tests/unit/analysis/figures/test_figures.py renders every figure and checks that no two texts overlap). A figure
whose runs are missing raises
figure_data.MissingRuns. The ten plots share this file's axis, interval and heat-map helpers, which is why it
runs past 600 lines.
"""
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.transforms import ScaledTranslation

from analysis.figures.data import (GIB, MEMORY_PARTS, SHORT, ZOOM, accuracy_by_rank, accuracy_memory_data,
                                   accuracy_memory_table, accuracy_table, amplification_data, amplification_table,
                                   checkpoint_data, data_scarce_data, data_scarce_table, energy_rank_table,
                                   matrix_order, memory_data, memory_table, phi_layers_data, phi_rank_data,
                                   phi_seed_data, phi_table, spectra_data)
from analysis.statistics import n_label
from analysis.variants import label_of
from analysis.figures.style import (FULL_COLOR, MAJORITY_COLOR, RANDOM_COLOR, color, marker, new_figure, panels, save,
                                    styled)
from analysis.tables import write_csv


class Drawn(NamedTuple):
    """What figure_N wrote: the PNG (NAME.pdf and NAME.csv lie beside it), the plotted data (NAME.csv), the
    table report.md shows under the figure (NAME_table.csv), and a note for its caption (setups left out,
    what was not recorded)."""
    path: Path
    data: pd.DataFrame
    table: pd.DataFrame | None = None
    note: str = ""


def _write(out_dir: Path, name: str, fig, data: pd.DataFrame, table: pd.DataFrame | None = None, note: str = "",
           **extra: pd.DataFrame) -> Drawn:
    """NAME.png, .pdf, .csv (data), NAME_table.csv and NAME_{key}.csv for each extra table."""
    write_csv(out_dir / f"{name}.csv", data)
    for key, df in extra.items():
        write_csv(out_dir / f"{name}_{key}.csv", df)
    if table is not None:
        write_csv(out_dir / f"{name}_table.csv", table)
    return Drawn(save(fig, out_dir, name), data, table, note)


def _ordered(values, key_frame: pd.DataFrame) -> list:
    """Config labels in plotting order: full first, then by target set, variant and rank (unknown labels last)."""
    order = key_frame.drop_duplicates("config").set_index("config")["order"]
    known = [v for v in dict.fromkeys(values) if v in order.index]
    return sorted(known, key=lambda v: order[v]) + sorted(v for v in dict.fromkeys(values) if v not in order.index)


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


def _yerr(mean, lo, hi) -> np.ndarray:
    """(2, k) error-bar lengths from an interval; 0 where there is none (n = 1)."""
    mean, lo, hi = (np.asarray(v, dtype=float) for v in (mean, lo, hi))
    return np.nan_to_num(np.vstack([mean - lo, hi - mean]), nan=0.0).clip(min=0)


def _series_label(name: str, ns) -> str:
    """A legend label with its n: 'LoRA (q,v), n=2 seeds' when every point has the same n, else
    'LoRA (q,v), n per point (1, 2)' (the points are marked)."""
    ns = sorted(set(int(n) for n in ns))
    return f"{name}, {n_label(ns[0])}" if len(ns) == 1 else f"{name}, n per point ({', '.join(map(str, ns))})"


def _annotate_n(ax, xs, ys, ns, c, k: int = 0) -> None:
    """'n=k' under each point of a series whose points differ in n (the k-th such series a line lower)."""
    if len(set(int(n) for n in ns)) > 1:
        for x, y, n in zip(xs, ys, ns):
            ax.annotate(f"n={int(n)}", (x, y), xytext=(0, -12 - 8 * k), textcoords="offset points", ha="center",
                        fontsize=6, color=c, gid="n")


def _n_row(ax, xs, ns) -> None:
    """One 'n=k' per x along the bottom of the axes, for series that share n at each x."""
    for x, n in zip(xs, ns):
        ax.annotate(f"n={int(n)}", (x, 0.02), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                    fontsize=6, color="#555555", gid="n")


def _majority(ax, value) -> None:
    if value is not None and np.isfinite(value):
        ax.axhline(value, color=MAJORITY_COLOR, ls="-.", lw=1, label=f"majority class ({value:.3f})", gid="majority")


def _legend_below(ax, ncols: int = 1, **kwargs):
    """A legend under the axes, below its tick labels and x label (call it after setting the label)."""
    if not ax.get_legend_handles_labels()[0]:
        return None
    lines = ax.get_xlabel().count("\n") + 1 if ax.get_xlabel() else 0
    drop = 3.5 + 10 + 4 + 10 * lines + 3   # points: tick pad, tick labels (10^k included), label pad, label, gap
    below = ax.transAxes + ScaledTranslation(0, -drop / 72, ax.figure.dpi_scale_trans)
    return ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below, ncols=ncols, fontsize=6.5,
                     **kwargs)


def _legend_right(ax, **kwargs):
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=6.5, **kwargs)


def _setup_title(setup: str, what: str = "") -> str:
    return f"setup {setup}" + (f": {what}" if what else "")


# ---- Figure 1: accuracy against LoRA rank per target set, full fine-tuning as the reference (Table 6 analogue) ----

@styled
def plot_accuracy_vs_rank(data: dict):
    points, summary = data["points"], data["summary"]
    setups = sorted(summary.setup.unique())
    fig, axes = new_figure(1, len(setups), size=(3.6, 3.6))
    for ax, setup in zip(axes[0], setups):
        s, p = summary[summary.setup == setup], points[points.setup == setup]
        lora = s[s.method == "lora"]
        ranks = sorted(lora["rank"].unique())
        for k, family in enumerate(dict.fromkeys(lora.family)):
            line = lora[lora.family == family].sort_values("rank")
            c = color(k)
            ax.fill_between(line["rank"], line.test_lo, line.test_hi, color=c, alpha=0.12, lw=0,
                            gid=f"test:{family}")
            ax.errorbar(line["rank"], line["mean"], yerr=_yerr(line["mean"], line.seed_lo, line.seed_hi), color=c,
                        marker=marker(k), label=_series_label(family, line.n), gid=f"mean:{family}")
            _annotate_n(ax, line["rank"], line["mean"], line.n, c)
            pts = p[p.family == family]
            ax.scatter(pts["rank"], pts.eval_accuracy, color=c, alpha=0.35, s=10, linewidths=0,
                       gid=f"points:{family}")
        full = s[s.method == "full"]
        if len(full):
            f = full.iloc[0]
            ax.axhline(f["mean"], color=FULL_COLOR, ls="--", label=_series_label("full FT", [f.n]), gid="mean:full")
            ax.axhspan(f.test_lo, f.test_hi, color=FULL_COLOR, alpha=0.07, lw=0, gid="test:full")
            if f.n >= 2:  # its seed interval, at the right edge
                x = max(ranks) * 1.5
                ax.errorbar([x], [f["mean"]], yerr=_yerr([f["mean"]], [f.seed_lo], [f.seed_hi]), color=FULL_COLOR,
                            marker="_", ms=8, gid="seeds:full")
        _majority(ax, data["majority"].get(setup))
        ax.set_xscale("log", base=2)
        _log2_ticks(ax, ranks)
        ax.set(xlabel="LoRA rank r", ylabel="test accuracy", title=_setup_title(setup, "test accuracy vs rank"))
        _legend_below(ax)
    return fig


def figure_1(tables, out_dir: Path) -> Drawn:
    data = accuracy_by_rank(tables["runs"])
    return _write(out_dir, "fig1_accuracy_vs_rank", plot_accuracy_vs_rank(data), data["summary"],
                  table=accuracy_table(data["summary"]), note=data["note"])


# ---- Figures 2-4: φ heat maps (paper Figures 3, 4; Appendix H.1 Figures 6, 7) -------------------------------------

def _grid(df: pd.DataFrame, value: str = "phi") -> np.ndarray:
    """(I, J) array of one heat map from its long rows (i, j from 1)."""
    return df.pivot(index="i", columns="j", values=value).sort_index().sort_index(axis=1).to_numpy()


NUMBERED = ZOOM   # a φ grid at most this many cells a side carries its values: at r = 1 or 4 colours alone say little


def _heatmap(ax, grid: np.ndarray, gid: str):
    I, J = grid.shape
    im = ax.imshow(grid, vmin=0, vmax=1, aspect="auto", interpolation="nearest", origin="upper",
                   extent=(0.5, J + 0.5, I + 0.5, 0.5), gid=gid)
    ax.grid(False)
    ax.set_xticks(_ticks(J))
    ax.set_yticks(_ticks(I))
    if max(I, J) <= NUMBERED:
        _cell_values(ax, grid, gid)
    return im


def _cell_values(ax, grid: np.ndarray, gid: str) -> None:
    """Each cell's φ written in it (two decimals; dark text on the light end of viridis)."""
    size = 7 if max(grid.shape) <= 4 else 5
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j + 1, i + 1, f"{v:.2f}", ha="center", va="center", fontsize=size,
                color="black" if v > 0.6 else "white", gid=f"{gid}:value")


def _ticks(n: int) -> list[int]:
    """At most 5 ticks: 1, and multiples of a round step up to n."""
    if n <= 4:
        return list(range(1, n + 1))
    step = next(s for s in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, n) if n / s <= 4)
    return sorted({1, *range(step, n + 1, step)})


def _panel_title(matrix_type: str) -> str:
    short = SHORT.get(matrix_type)
    return f"ΔW_{short} ({matrix_type})" if short else f"ΔW ({matrix_type})"


def _phi_panels(data: pd.DataFrame) -> list:
    """(name, rows, value column, title) per matrix type, and the random baseline last."""
    kinds = sorted(data.matrix_type.unique(), key=matrix_order)
    panels = [(k, data[data.matrix_type == k], "phi", _panel_title(k)) for k in kinds]
    return panels + [("random", data[data.matrix_type == kinds[0]], "random_baseline", "random subspaces: E[φ]")]


def _phi_two_rows(data: pd.DataFrame, ylabel: str, xlabel: str, suptitle: str):
    """Top row: φ over the whole grid per matrix type and the random baseline; bottom: zoom to i, j ≤ 8."""
    panels = _phi_panels(data)
    zoom = int(min(ZOOM, data.i.max(), data.j.max()))
    limits = [None] if max(data.i.max(), data.j.max()) <= ZOOM else [None, zoom]   # a small grid is its own zoom
    fig, axes = new_figure(len(limits), len(panels), size=(2.3, 2.1))
    for col, (name, df, value, title) in enumerate(panels):
        for row, limit in enumerate(limits):
            d = df if limit is None else df[(df.i <= limit) & (df.j <= limit)]
            im = _heatmap(axes[row, col], _grid(d, value), gid=f"{name}:{'full' if limit is None else 'zoom'}")
            axes[row, col].set_title(title if limit is None else f"zoom: i, j ≤ {limit}")
            axes[row, col].set_xlabel(xlabel)
            axes[row, col].set_ylabel(ylabel)
    fig.colorbar(im, ax=axes, label="φ(i, j)", shrink=0.8)
    fig.suptitle(suptitle)
    return fig


def _of_variant(data: pd.DataFrame) -> str:
    """' (PiSSA)' where figures 2-4 show a LoRA variant's A (a sweep without plain LoRA pairs), else ''."""
    variant = data["variant"].iloc[0] if "variant" in data else "lora"
    return "" if variant == "lora" else f" ({label_of(variant)})"


@styled
def plot_phi_rank(data: pd.DataFrame):
    ra, rb, seed, layer, setup = (data[c].iloc[0] for c in ("rank_a", "rank_b", "seed", "layer", "setup"))
    return _phi_two_rows(data, f"i (A, r={ra})", f"j (A, r={rb})",
                         f"φ of A's right-singular directions{_of_variant(data)}, r={ra} vs r={rb}, seed {seed}, "
                         f"layer {layer} (setup {setup}, one pair)")


def figure_2(tables, out_dir: Path, layer: int | None = None) -> Drawn:
    data = phi_rank_data(tables["subspace"], tables["runs"], layer)
    return _write(out_dir, "fig2_phi_rank", plot_phi_rank(data), data, table=phi_table(data))


@styled
def plot_phi_seed(data: pd.DataFrame):
    r, sa, sb, layer, setup = (data[c].iloc[0] for c in ("rank", "seed_a", "seed_b", "layer", "setup"))
    return _phi_two_rows(data, f"i (A, seed {sa})", f"j (A, seed {sb})",
                         f"φ of A's right-singular directions{_of_variant(data)}, seeds {sa} vs {sb}, r={r}, "
                         f"layer {layer} (setup {setup}, one pair)")


def figure_3(tables, out_dir: Path, layer: int | None = None) -> Drawn:
    data = phi_seed_data(tables["subspace"], tables["runs"], layer)
    return _write(out_dir, "fig3_phi_seed", plot_phi_seed(data), data, table=phi_table(data))


@styled
def plot_phi_layers(data: pd.DataFrame):
    """Rows: layers; columns: per comparison, each matrix type and the random baseline."""
    columns = []
    for comparison in dict.fromkeys(data.comparison):
        d = data[data.comparison == comparison]
        columns += [(comparison, k) for k in sorted(d.matrix_type.unique(), key=matrix_order)] + [(comparison, None)]
    layers = sorted(data.layer.unique())
    fig, axes = new_figure(len(layers), len(columns), size=(2.0, 1.95))
    for row, layer in enumerate(layers):
        for col, (comparison, kind) in enumerate(columns):
            ax = axes[row, col]
            c = data[data.comparison == comparison]
            d = c[(c.matrix_type == (kind or c.matrix_type.iloc[0])) & (c.layer == layer)]
            if d.empty:
                ax.set_axis_off()
                continue
            value = "phi" if kind else "random_baseline"
            im = _heatmap(ax, _grid(d, value), gid=f"{comparison}:{kind or 'random'}:{layer}")
            if row == 0:
                ax.set_title(f"{comparison}\n" + (_panel_title(kind) if kind else "random subspaces: E[φ]"))
            ax.set_xlabel(f"j ({d.label_b.iloc[0]})")
            ax.set_ylabel(f"layer {layer}\ni ({d.label_a.iloc[0]})")
    fig.colorbar(im, ax=axes, label="φ(i, j)", shrink=0.6)
    fig.suptitle(f"φ of A's right-singular directions at the first, middle and last layer "
                 f"(setup {', '.join(sorted(set(data.setup)))}; one pair per comparison)")
    return fig


def figure_4(tables, out_dir: Path) -> Drawn:
    data = phi_layers_data(tables["subspace"], tables["runs"])
    return _write(out_dir, "fig4_phi_layers", plot_phi_layers(data), data, table=phi_table(data))


# ---- Figure 5: amplification (paper Table 7) and the overlap of ΔW's directions with W's (Figure 8 analogue) ------

@styled
def plot_amplification(data: dict):
    """Per setup two rows (amplification, φ) and one column per matrix type. Full fine-tuning is one line over r
    (the same runs at every r); each LoRA configuration is one point at its own rank (different runs: no line)."""
    summary = data["summary"]
    setups = sorted(summary.setup.unique())
    kinds = {s: sorted(summary.loc[summary.setup == s, "matrix_type"].unique(), key=matrix_order) for s in setups}
    ncols = max(len(k) for k in kinds.values())
    fig, axes = new_figure(2 * len(setups), ncols, size=(3.3, 2.7))
    for row0, setup in enumerate(setups):
        s = summary[summary.setup == setup]
        families = sorted(s.family.unique(), key=lambda f: (f != "full", f))
        log_amp = s.amplification.max() / max(s.amplification.min(), 1e-12) > 20
        for col in range(ncols):
            amp_ax, phi_ax = axes[2 * row0, col], axes[2 * row0 + 1, col]
            if col >= len(kinds[setup]):
                amp_ax.set_axis_off()
                phi_ax.set_axis_off()
                continue
            kind = kinds[setup][col]
            for f_i, family in enumerate(families):
                d = s[(s.family == family) & (s.matrix_type == kind)].sort_values("r")
                if d.empty:
                    continue
                full = family == "full"
                lora_i = f_i - ("full" in families)
                c = FULL_COLOR if full else color(lora_i)
                style = dict(color=c, marker="o" if full else marker(lora_i), ls="-" if full else "none",
                             label=_series_label("full FT" if full else family, d.n))
                # LoRA points of several target sets at one rank: side by side (a factor on the log axis)
                x = d.r if full else d.r * 2 ** (0.12 * (lora_i - (len(families) - 1 - ("full" in families)) / 2))
                amp_ax.errorbar(x, d.amplification, yerr=_yerr(d.amplification, d.amp_lo, d.amp_hi),
                                gid=f"amp:{family}:{kind}", **style)
                phi_ax.plot(x, d.phi_out, gid=f"phi:{family}:{kind}", **style)
                _annotate_n(amp_ax, x, d.amplification, d.n, c)
            base = s[s.matrix_type == kind].groupby("r").random_phi_out.mean()
            phi_ax.plot(base.index, base.values, color=RANDOM_COLOR, ls="--", lw=1.6, zorder=5,
                        label="random subspaces (r/d)", gid=f"phi:random:{kind}")
            for ax in (amp_ax, phi_ax):
                ax.set_xscale("log", base=2)
                _log2_ticks(ax, s.r.unique())
                ax.set_xlabel("r (ΔW's top-r directions)")
            if log_amp:
                amp_ax.set_yscale("log")
            amp_ax.set(ylabel="amplification" + (" (log)" if log_amp else ""),   # the caption defines it
                       ylim=_decades(s.amplification) if log_amp else (0, None),
                       title=_setup_title(setup, f"amplification, {SHORT.get(kind, kind)}"))
            positive = (s.loc[s.matrix_type == kind, ["phi_out", "random_phi_out"]] > 0).all().all()
            if positive:   # r/d spans decades: on a log axis the data's distance from it reads as a ratio
                phi_ax.set_yscale("log")
            phi_ax.set(ylabel="φ(ΔW, W, r, r), output side" + (" (log)" if positive else ""),
                       ylim=_decades(s.loc[s.matrix_type == kind, ["phi_out", "random_phi_out"]].to_numpy().ravel())
                       if positive else (0, None),
                       title=_setup_title(setup, f"ΔW vs W directions, {SHORT.get(kind, kind)}"))
            _legend_below(amp_ax)
            _legend_below(phi_ax)
    return fig


def figure_5(tables, out_dir: Path) -> Drawn:
    data = amplification_data(tables["amplification"], tables["runs"])
    return _write(out_dir, "fig5_amplification", plot_amplification(data), data["summary"],
                  table=amplification_table(data["summary"]), note=data["note"])


# ---- Figure 6: singular values of full fine-tuning's ΔW vs LoRA's, per matrix type, r90 marked --------------------

SPECTRUM_FLOOR = 1e-3   # σ_k / σ_1 below this carries < 1e-6 of the energy per value: the y axis stops there


def _decades(values) -> tuple[float, float]:
    """The whole decades around positive values: a log axis with labelled powers of ten at both ends, where one
    spanning less than a decade labels its minor ticks until they collide."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return 10.0 ** math.floor(math.log10(v.min())), 10.0 ** math.ceil(math.log10(v.max()) + 1e-12)


def _r90_text(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


@styled
def plot_spectra(data: dict):
    curves, r90 = data["curves"], data["r90"]
    setups = sorted(curves.setup.unique())
    kinds = {s: sorted(curves.loc[curves.setup == s, "matrix_type"].unique(), key=matrix_order) for s in setups}
    ncols = min(3, max(len(k) for k in kinds.values()))
    rows = [(s, kinds[s][i:i + ncols]) for s in setups for i in range(0, len(kinds[s]), ncols)]
    fig, axes = new_figure(len(rows), ncols, size=(2.9, 2.9))
    configs = _ordered(curves.config, data["order"])
    colors = config_colors(configs)
    for row, (setup, row_kinds) in enumerate(rows):
        for col in range(ncols):
            ax = axes[row, col]
            if col >= len(row_kinds):
                ax.set_axis_off()
                continue
            kind = row_kinds[col]
            panel = curves[(curves.setup == setup) & (curves.matrix_type == kind)]
            for config in configs:
                c = panel[panel.config == config]
                if c.empty:
                    continue
                col_ = colors[config]
                mark = r90[(r90.setup == setup) & (r90.matrix_type == kind) & (r90.config == config)]
                label = ("full FT" if config == "full" else config)
                if len(mark):
                    label += f", r90={_r90_text(mark.r90.iloc[0])}, n={int(mark.n.iloc[0])}"
                ax.plot(c["index"], c["mean"], color=col_, label=label,
                        lw=1.4 if config == "full" else 1, marker="o" if len(c) == 1 else None, ms=3,
                        gid=f"sigma:{config}")
                if config == "full":
                    ax.fill_between(c["index"], c["min"].clip(lower=SPECTRUM_FLOOR / 10), c["max"], color=col_,
                                    alpha=0.12, lw=0)
                if len(mark):
                    ax.axvline(mark.r90.iloc[0], color=col_, ls=":", lw=0.9, gid=f"r90:{config}")
            lowest = panel["mean"][panel["mean"] > 0].min()   # a decade below the lowest value, down to the floor
            bottom = max(SPECTRUM_FLOOR, 10 ** math.floor(math.log10(lowest))) if lowest > 0 else SPECTRUM_FLOOR
            ax.set(xscale="log", yscale="log", xlabel="index k (log)", ylabel="σ_k / σ_1 (log)",
                   title=f"{setup}: {_panel_title(kind)}", ylim=(bottom, 1.3))
            _log2_ticks(ax, _index_ticks(int(panel["index"].max())))
            _legend_below(ax)
    return fig


def figure_6(tables, out_dir: Path) -> Drawn:
    data = spectra_data(tables["singular_values"], tables["spectrum"], tables["runs"])
    return _write(out_dir, "fig6_spectra", plot_spectra(data), data["curves"], table=energy_rank_table(data["r90"]),
                  note=data["note"], r90=data["r90"])


# ---- Figure 7: measured peak memory, the memory model's estimate, and steady throughput -----------------------

PART_LABELS = {"weights_bytes": "weights", "grads_bytes": "gradients", "optimizer_bytes": "optimizer state",
               "weight_copies_bytes": "bf16 weight copies", "activations_bytes": "activations"}
PART_COLORS = {"weights_bytes": "#999999", "grads_bytes": "#E69F00", "optimizer_bytes": "#D55E00",
               "weight_copies_bytes": "#CC79A7", "activations_bytes": "#56B4E9"}


def _config_ticks(ax, y, s: pd.DataFrame, show: bool) -> None:
    ax.set_yticks(y, [f"{c} (n={n})" for c, n in zip(s.config, s.n)] if show else [])
    ax.invert_yaxis()  # full first, at the top
    ax.grid(axis="y", visible=False)


@styled
def plot_memory(data: dict):
    summary, points = data["summary"], data["points"]
    setups = list(dict.fromkeys(summary.setup))
    height = max(2.4, 0.28 * summary.groupby("setup").size().max() + 1.6)
    fig, axes = new_figure(len(setups), 3, size=(3.0, height))
    colors = config_colors(list(dict.fromkeys(summary.config)))  # summary is in plotting order
    for row, setup in enumerate(setups):
        s, p = summary[summary.setup == setup].reset_index(drop=True), points[points.setup == setup]
        y = np.arange(len(s))
        measured = s.measured.iloc[0]
        cpu = measured == "CPU peak RSS"
        ax = axes[row, 0]   # what was measured, as measured
        ax.barh(y, s.peak_mean / GIB, color="#DDDDDD", height=0.6, gid="measured_bar",
                label=f"{measured}, mean")
        for i, config in enumerate(s.config):
            pts = p[p.config == config]
            ax.scatter(pts.peak_memory_bytes / GIB, np.full(len(pts), i), color="black", marker="D", s=10, zorder=3,
                       label="each run" if i == 0 else None, gid=f"peak:{config}")
        ax.set(xlabel=f"{measured} (GiB)" + (", runtime included" if cpu else ""),
               title=_setup_title(setup, f"measured {measured}"))
        _config_ticks(ax, y, s, True)
        _legend_below(ax)
        ax = axes[row, 1]   # the memory model's estimate, by part
        has_estimate = s[[f"estimate_{q}" for q in MEMORY_PARTS]].notna().any(axis=1).to_numpy()
        left = np.zeros(len(s))
        for part in MEMORY_PARTS:
            v = s[f"estimate_{part}"].fillna(0).to_numpy() / GIB
            if v.any():
                ax.barh(y, v, left=left, color=PART_COLORS[part], label=PART_LABELS[part], height=0.6,
                        gid=f"estimate:{part}")
                left += v
        total = s["estimate_total_bytes"].to_numpy() / GIB
        if has_estimate.any():  # the model's peak is not the sum of the parts: activations free as grads appear
            ax.scatter(total[has_estimate], y[has_estimate], marker="|", s=150, color="black", linewidths=1.5,
                       zorder=3, label="estimated peak", gid="estimate:total")
            if not cpu:   # the same quantity: CUDA max allocated against the model of the allocations
                for i, config in enumerate(s.config):
                    pts = p[p.config == config]
                    ax.scatter(pts.peak_memory_bytes / GIB, np.full(len(pts), i), color="white", edgecolors="black",
                               marker="D", s=12, zorder=4, label="max allocated, each run" if i == 0 else None,
                               gid=f"estimate_vs_peak:{config}")
        for i in np.flatnonzero(~has_estimate):
            ax.annotate("no estimate recorded", (0, i), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=6, color="grey")
        ax.set(xlabel="memory model estimate (GiB)",
               title=f"{setup}: estimate, training tensors only" if cpu else f"{setup}: estimate vs max allocated")
        _config_ticks(ax, y, s, False)
        _legend_below(ax, ncols=2)
        ax = axes[row, 2]   # steady throughput
        ax.barh(y, s.tokens_per_second_mean, xerr=_yerr(s.tokens_per_second_mean, s.tokens_per_second_lo,
                                                         s.tokens_per_second_hi),
                color=[colors[c] for c in s.config], alpha=0.75, height=0.6, gid="tokens_per_second",
                label="real tokens/s, mean")
        for i, config in enumerate(s.config):
            pts = p[p.config == config]
            ax.scatter(pts.tokens_per_second, np.full(len(pts), i), color="black", s=8, zorder=3,
                       label="each run" if i == 0 else None)
        if s.padded_tokens_per_second_mean.notna().any():
            ax.scatter(s.padded_tokens_per_second_mean, y, marker="o", facecolors="none", edgecolors="black", s=16,
                       zorder=3, label="padded tokens/s, mean", gid="padded_tokens_per_second")
        device = s.device.iloc[0] or "device not recorded"
        ax.set(xlabel="real tokens/s over the steady steps\n(as recorded by each run)",
               title=f"{setup}: throughput ({device})")
        _config_ticks(ax, y, s, False)
        _legend_below(ax)
    return fig


def figure_7(tables, out_dir: Path) -> Drawn:
    data = memory_data(tables["runs"])
    return _write(out_dir, "fig7_memory_throughput", plot_memory(data), data["summary"],
                  table=memory_table(data["summary"]), note=data["note"])


# ---- Figure 8: accuracy against peak memory, one point per configuration, with the Pareto front -------------------

@styled
def plot_accuracy_memory(data: dict):
    summary, points = data["summary"], data["points"]
    fig, panel = panels(summary, size=(5.2, 3.0))
    configs = _ordered(summary.config, summary.assign(order=[(c != "full", i) for i, c in enumerate(summary.config)]))
    colors = config_colors(configs)
    for ax, setup, s in panel:
        p = points[points.setup == setup]
        for k, config in enumerate(configs):
            row = s[s.config == config]
            if row.empty:
                continue
            row = row.iloc[0]
            c = colors[config]
            ax.errorbar([row.peak_gib], [row["mean"]], yerr=_yerr([row["mean"]], [row.test_lo], [row.test_hi]),
                        color=c, alpha=0.35, lw=3, capsize=0, ls="none", gid=f"test:{config}")
            ax.errorbar([row.peak_gib], [row["mean"]], yerr=_yerr([row["mean"]], [row.seed_lo], [row.seed_hi]),
                        xerr=_yerr([row.peak_gib], [row.peak_min], [row.peak_max]), color=c, marker=marker(k), ms=5,
                        ls="none", label=f"{config}, {n_label(row.n)}", gid=f"config:{config}")
            pts = p[p.config == config]
            ax.scatter(pts.peak_gib, pts.eval_accuracy, color=c, s=6, alpha=0.4, linewidths=0, gid=f"runs:{config}")
        front = s[s.pareto].sort_values("peak_gib")
        ax.step(front.peak_gib, front["mean"], where="post", color="grey", lw=0.8, ls="--",
                label="Pareto front (configuration means)", gid="pareto")
        _majority(ax, data["majority"].get(setup))
        measured = s.measured.iloc[0]
        ax.set(xlabel=f"{measured} (GiB)" + (", runtime included" if measured == "CPU peak RSS" else ""),
               ylabel="test accuracy", title=_setup_title(setup, "accuracy vs measured peak memory"))
        _legend_right(ax)
    return fig


def figure_8(tables, out_dir: Path) -> Drawn:
    data = accuracy_memory_data(tables["runs"])
    return _write(out_dir, "fig8_accuracy_vs_memory", plot_accuracy_memory(data), data["summary"],
                  table=accuracy_memory_table(data["summary"]), note=data["note"], runs=data["points"])


# ---- Figure 9: train vs test accuracy against training-set size, full vs LoRA -------------------------------------

@styled
def plot_data_scarce(data: dict):
    summary = data["summary"]
    fig, panel = panels(summary, size=(3.8, 3.8), by="group")
    for ax, group, d in panel:
        for k, config in enumerate(dict.fromkeys(d.config)):
            g = d[d.config == config]
            c = FULL_COLOR if config == "full" else color(k)
            ax.fill_between(g.train_examples, g.test_lo, g.test_hi, color=c, alpha=0.1, lw=0, gid=f"wilson:{config}")
            ax.errorbar(g.train_examples, g.test_mean, yerr=_yerr(g.test_mean, g.test_seed_lo, g.test_seed_hi),
                        color=c, marker=marker(k), label=_series_label(f"{config}: test", g.n), gid=f"test:{config}")
            ax.errorbar(g.train_examples, g.train_mean, yerr=_yerr(g.train_mean, g.train_seed_lo, g.train_seed_hi),
                        color=c, marker=marker(k), ls="--", mfc="white", label=_series_label(f"{config}: train", g.n),
                        gid=f"train:{config}")
        shared = d.groupby("train_examples").n.nunique().max() == 1
        if shared:   # the same n for every line at each size: one row of n's
            per_size = d.groupby("train_examples").n.first()
            _n_row(ax, per_size.index, per_size.values)
        else:
            for k, config in enumerate(dict.fromkeys(d.config)):
                g = d[d.config == config]
                _annotate_n(ax, g.train_examples, g.test_mean, g.n, FULL_COLOR if config == "full" else color(k), k)
        _majority(ax, data["majority"].get(group))
        ax.set_xscale("log")
        _log2_ticks(ax, d.train_examples.unique())
        ax.set(xlabel="training examples", ylabel="accuracy", title=f"setups {group}: train vs test accuracy")
        _legend_below(ax)
    return fig


def figure_9(tables, out_dir: Path) -> Drawn:
    data = data_scarce_data(tables["runs"], tables["setups"])
    return _write(out_dir, "fig9_data_scarce", plot_data_scarce(data), data["summary"],
                  table=data_scarce_table(data["summary"]), note=data["note"])


# ---- Figure 10: checkpoint size per setup, full model vs adapter ---------------------------------------------------

@styled
def plot_checkpoints(data: pd.DataFrame):
    setups = list(dict.fromkeys(data.setup))
    configs = _ordered(data.config, data.assign(order=range(len(data))))
    colors = config_colors(configs)
    height = max(2.2, 0.3 * data.groupby("setup").size().max() + 1.2)
    fig, axes = new_figure(len(setups), 1, size=(5.2, height))
    for ax, setup in zip(axes[:, 0], setups):
        d = data[data.setup == setup].reset_index(drop=True)
        y = np.arange(len(d))
        for i, row in d.iterrows():
            ax.barh([i], [row.checkpoint_mib], color=colors[row.config], height=0.6, gid=f"ckpt:{row.config}")
            share = "" if row.config == "full" or not np.isfinite(row.fraction_of_full) else \
                f" ({100 * row.fraction_of_full:.2g} % of full)"
            ax.annotate(f"{row.checkpoint_mib:.3g} MiB{share}", (row.checkpoint_mib, i), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks(y, [f"{c} (n={n})" for c, n in zip(d.config, d.n)])
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        ax.set_xscale("log")
        ax.set_xlim(right=d.checkpoint_mib.max() * 40)   # room for the labels
        ax.set(xlabel="checkpoint size (MiB, log scale)",
               title=_setup_title(setup, "saved state: full model vs LoRA adapter + head"))
    return fig


def figure_10(tables, out_dir: Path) -> Drawn:
    data = checkpoint_data(tables["runs"])
    d = data["data"]
    return _write(out_dir, "fig10_checkpoint_size", plot_checkpoints(d), d,
                  table=d[["setup", "config", "checkpoint_mib", "fraction_of_full", "n"]], note=data["note"])
