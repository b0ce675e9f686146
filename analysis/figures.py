"""The paper's figures, from the analysis tables: one function per figure, `figure_N(tables, out_dir) -> path`.

    python -m analysis.figures runs/rank_sweep runs/subspace runs/data_scarce --out reports/paper
    python -m analysis.report  runs/demo --out reports/demo          # the same: tables, figures, report.md

Each figure is computed apart from drawing: a pure function turns the tables (DataFrames, as
`analysis.report` writes them to DIR/tables/) into the plotted data, a `plot_*` function draws that data and
returns the Figure, and `figure_N` writes DIR/figures/figN_*.{png,pdf,csv} (the CSV holds the plotted
summary; `*_table.csv`, where present, is the table the report shows). A figure whose runs are missing raises
MissingRuns naming the sweep that produces them, and is skipped. Same tables, same files (PNG and PDF carry no
dates or versions). With `--wandb` (default: when the runs were logged with logger=wandb) the figures and
tables also go to W&B as an `analysis` run in the sweeps' group, offline without an API key.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lowrank.logger import has_wandb_key

from .style import FULL_COLOR, GIB, MIB, color, marker, new_figure, save, styled

FIG_DIR = "figures"
PAPER_RANKS = (8, 64)        # Figure 3 of the paper compares A at r = 8 and r = 64
ZOOM = 8                     # the paper's zoom into i, j <= 8
SHORT = {"query": "q", "key": "k", "value": "v", "attention.output.dense": "o", "q_proj": "q", "k_proj": "k",
         "v_proj": "v", "o_proj": "o", "c_attn": "qkv", "attn.c_proj": "o"}  # target names as the paper's W_q...
MEMORY_PARTS = ["weights_bytes", "grads_bytes", "optimizer_bytes", "weight_copies_bytes", "activations_bytes"]


class MissingRuns(Exception):
    """The tables lack the runs a figure needs; the message says what is missing."""


# ---------------------------------------------------------------------------------------------------------------
# Reading: the tables as analysis.report wrote them, plus the memory breakdown from each run's metrics.json
# ---------------------------------------------------------------------------------------------------------------

def read_tables(out_dir: Path) -> dict[str, pd.DataFrame]:
    """DIR/tables/*.csv as DataFrames."""
    tables = {}
    for name in ["runs", "spectrum", "singular_values", "subspace", "amplification"]:
        path = Path(out_dir) / "tables" / f"{name}.csv"
        try:
            tables[name] = pd.read_csv(path)
        except (FileNotFoundError, pd.errors.EmptyDataError):
            tables[name] = pd.DataFrame()
    return tables


def targets_label(value) -> str:
    """'["query", "value"]' -> 'q,v'; 'all-linear' stays; unknown names stay whole."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "?"
    try:
        names = json.loads(value)
    except (TypeError, json.JSONDecodeError):
        return str(value)
    if isinstance(names, str):
        return names
    return ",".join(SHORT.get(n, n) for n in names)


def prepare(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs table with the labels every figure uses:
      method ('full' | 'lora'), rank (LoRA, else NaN), targets ('q,v'; '' for full), config ('full' or
      'LoRA r=8 (q,v)'), family ('full' or 'LoRA (q,v)'), setup ('minilm · fine_foods · 80 steps': runs are
      compared only within one), data ('minilm · fine_foods': checkpoint sizes), full_data (no task.train_size)."""
    need(runs, ["run_id", "method.name", "seed"], "runs")
    r = runs.copy()

    def col(name, default=np.nan) -> pd.Series:  # a column, or a constant where the runs lack the key
        return r[name] if name in r else pd.Series(default, index=r.index, dtype=object)

    r["method"] = r["method.name"]
    r["rank"] = pd.to_numeric(col("method.rank"), errors="coerce").where(r.method == "lora")
    r["targets"] = [targets_label(t) if m == "lora" else "" for m, t in zip(r.method, col("method.targets"))]
    r["family"] = ["full" if m == "full" else f"LoRA ({t})" for m, t in zip(r.method, r.targets)]
    r["config"] = ["full" if m == "full" else f"LoRA r={int(k)} ({t})" for m, k, t in zip(r.method, r["rank"], r.targets)]
    r["data"] = [f"{m} · {t}" for m, t in zip(col("model.name", "?"), col("task.name", "?"))]
    r["setup"] = [f"{d} · {s:g} steps" if pd.notna(s) else d for d, s in zip(r.data, col("trainer.max_steps"))]
    r["full_data"] = col("task.train_size").isna()
    r["order"] = [(0, "", 0) if m == "full" else (1, t, k) for m, t, k in zip(r.method, r.targets, r["rank"])]
    return r


def need(df: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in df]
    if df.empty or missing:
        raise MissingRuns(f"no {what} in the tables" + (f" (columns {missing} absent)" if missing and not df.empty
                                                         else ""))


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


def _mean_std(g: pd.DataFrame, col: str) -> dict:
    v = g[col].astype(float)
    return {"mean": v.mean(), "std": v.std(ddof=1), "n": len(v)}  # std of one value: NaN


def _md(df: pd.DataFrame) -> str:
    from .report import _md as md
    return md(df)


def write_table(path: Path, df: pd.DataFrame) -> None:
    from .report import write_csv
    write_csv(path, df)


SWEEPS = {  # the experiment files (conf/experiment/) whose runs each figure needs; demo_*: the small versions
    "rank": "rank_sweep + full_baseline (`python -m experiments.train -m +experiment=rank_sweep`, then "
            "`+experiment=full_baseline`; demo: demo_lora, demo_targets, demo_full)",
    "subspace": "subspace (`python -m experiments.train -m +experiment=subspace`; demo: demo_lora)",
    "subspace_full": "subspace + subspace_full (`python -m experiments.train -m +experiment=subspace`, then "
                     "`+experiment=subspace_full`; demo: demo_lora, demo_full)",
    "scarce": "data_scarce (`python -m experiments.train -m +experiment=data_scarce`; demo: demo_scarce with "
              "demo_lora and demo_full)",
}


# ---------------------------------------------------------------------------------------------------------------
# Figure 1: accuracy against LoRA rank per target set, full fine-tuning as the reference (Table 6 analogue)
# ---------------------------------------------------------------------------------------------------------------

def accuracy_by_rank(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Full-data runs only. points: setup, config, method, targets, rank, seed, eval_accuracy (one row per run);
    summary: setup, method, targets, rank, mean, std (ddof 1; empty for one seed), n. Full fine-tuning has
    method 'full', empty targets and no rank."""
    need(runs, ["eval_accuracy"], "runs with eval_accuracy")
    r = prepare(runs)
    r = r[r.full_data & r.eval_accuracy.notna()]
    if not (r.method == "lora").any():
        raise MissingRuns("no full-data LoRA runs")
    points = r[["setup", "config", "method", "targets", "rank", "seed", "eval_accuracy", "run_id"]]
    points = points.sort_values(["setup", "method", "targets", "rank", "seed", "run_id"], ignore_index=True)
    summary = pd.DataFrame([{"setup": s, "method": m, "targets": t, "rank": k} | _mean_std(g, "eval_accuracy")
                            for (s, m, t, k), g in points.groupby(["setup", "method", "targets", "rank"],
                                                                  dropna=False, sort=True)])
    return {"points": points, "summary": summary}


def accuracy_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 6 layout: one row per setup and target set, one column per rank, and full fine-tuning."""
    def cell(row):
        std = "" if pd.isna(row["std"]) else f" ± {row['std']:.3f}"
        return f"{row['mean']:.3f}{std} (n={row['n']})"
    s = summary.assign(cell=summary.apply(cell, axis=1))
    lora = s[s.method == "lora"]
    table = lora.pivot(index=["setup", "targets"], columns="rank", values="cell")
    table.columns = [f"r={int(c)}" for c in table.columns]
    table = table.reset_index()
    full = s[s.method == "full"].set_index("setup")["cell"]
    table["full FT"] = [full.get(x, "") for x in table.setup]
    return table.fillna("")


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


def figure_1(tables, out_dir: Path) -> Path:
    data = accuracy_by_rank(tables["runs"])
    write_table(out_dir / "fig1_accuracy_vs_rank.csv", data["summary"])
    write_table(out_dir / "fig1_accuracy_vs_rank_table.csv", accuracy_table(data["summary"]))
    return save(plot_accuracy_vs_rank(data), out_dir, "fig1_accuracy_vs_rank")


# ---------------------------------------------------------------------------------------------------------------
# Figures 2-4: φ heat maps (paper Figures 3, 4; Appendix H.1 Figures 6, 7)
# ---------------------------------------------------------------------------------------------------------------

def subspace_pairs(subspace: pd.DataFrame, runs: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The (run_a, run_b) pairs of one kind with their ranks, seeds, targets and setup, sorted."""
    need(subspace, ["run_a", "run_b", "kind"], "subspace grids")
    pairs = subspace.loc[subspace.kind == kind, ["run_a", "run_b"]].drop_duplicates()
    r = prepare(runs).set_index("run_id")
    for side in "ab":
        ids = pairs[f"run_{side}"]
        pairs[f"rank_{side}"] = r.loc[ids, "rank"].values
        pairs[f"seed_{side}"] = r.loc[ids, "seed"].values
    pairs["targets"] = r.loc[pairs.run_a, "targets"].values
    pairs["setup"] = r.loc[pairs.run_a, "setup"].values
    pairs["full_data"] = r.loc[pairs.run_a, "full_data"].values
    pairs = pairs[pairs.full_data].sort_values(["setup", "targets", "seed_a", "rank_a", "rank_b", "run_a", "run_b"],
                                               ignore_index=True)
    # the paper adapts W_q and W_v: its target set goes first where a sweep has several
    return pairs.sort_values("targets", key=lambda t: t != "q,v", kind="stable", ignore_index=True)


def pick_rank_pair(subspace, runs) -> pd.Series:
    """LoRA at r=8 vs r=64 (same seed and targets) when present, else the pair with the largest rank ratio;
    targets q,v first, then the smallest seed."""
    pairs = subspace_pairs(subspace, runs, "rank")
    if pairs.empty:
        raise MissingRuns("no LoRA runs at two ranks with the same seed")
    paper = pairs[(pairs.rank_a == PAPER_RANKS[0]) & (pairs.rank_b == PAPER_RANKS[1])]
    if len(paper):
        return paper.iloc[0]
    ratio = pairs.rank_b / pairs.rank_a
    return pairs[ratio == ratio.max()].iloc[0]


def pick_seed_pair(subspace, runs) -> pd.Series:
    """Two seeds at r=64 when present, else at the largest rank with two seeds."""
    pairs = subspace_pairs(subspace, runs, "seed")
    if pairs.empty:
        raise MissingRuns("no LoRA runs at one rank with two seeds")
    best = PAPER_RANKS[1] if (pairs.rank_a == PAPER_RANKS[1]).any() else pairs.rank_a.max()
    return pairs[pairs.rank_a == best].iloc[0]


def middle_layer(layers) -> int:
    layers = sorted(set(int(x) for x in layers))
    return layers[len(layers) // 2]


def phi_grids(subspace: pd.DataFrame, pair: pd.Series, layers, side: str = "input") -> pd.DataFrame:
    """φ(i, j) of one pair at the given layers on one side (input: right-singular directions of A, the paper's
    choice): columns layer, matrix_type, i, j, phi, random_baseline (E[φ] for random subspaces)."""
    g = subspace[(subspace.run_a == pair.run_a) & (subspace.run_b == pair.run_b) & (subspace.side == side)
                 & subspace.layer.isin(list(layers))]
    return g[["layer", "matrix_type", "i", "j", "phi", "random_baseline"]].sort_values(
        ["layer", "matrix_type", "i", "j"], ignore_index=True)


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


def _pair_grids(subspace, pair, layer: int | None) -> pd.DataFrame:
    """φ grids of one pair of runs at one layer (default: the middle one)."""
    g = subspace[(subspace.run_a == pair.run_a) & (subspace.run_b == pair.run_b)]
    layer = middle_layer(g.layer) if layer is None else layer
    grids = phi_grids(subspace, pair, [layer])
    if grids.empty:
        raise MissingRuns(f"no φ grids at layer {layer} for {pair.run_a} vs {pair.run_b}")
    return grids


def _phi_panels(data: pd.DataFrame) -> list:
    """(name, rows, value column, title) per matrix type, and the random baseline last."""
    kinds = sorted(data.matrix_type.unique())
    panels = [(k, data[data.matrix_type == k], "phi", _panel_title(k)) for k in kinds]
    return panels + [("random", data[data.matrix_type == kinds[0]], "random_baseline", "random subspaces: E[φ]")]


def phi_rank_data(subspace, runs, layer: int | None = None) -> pd.DataFrame:
    """Figure 2's data: φ between LoRA's A at two ranks (same seed), at one layer (default: the middle one).
    Columns: run_a, run_b, rank_a, rank_b, seed, layer, matrix_type, i, j, phi, random_baseline."""
    pair = pick_rank_pair(subspace, runs)
    grids = _pair_grids(subspace, pair, layer)
    return grids.assign(run_a=pair.run_a, run_b=pair.run_b, rank_a=int(pair.rank_a), rank_b=int(pair.rank_b),
                        seed=pair.seed_a)[["run_a", "run_b", "rank_a", "rank_b", "seed"] + list(grids.columns)]


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


def figure_2(tables, out_dir: Path, layer: int | None = None) -> Path:
    data = phi_rank_data(tables["subspace"], tables["runs"], layer)
    write_table(out_dir / "fig2_phi_rank.csv", data)
    return save(plot_phi_rank(data), out_dir, "fig2_phi_rank")


def phi_seed_data(subspace, runs, layer: int | None = None) -> pd.DataFrame:
    """Figure 3's data: φ between LoRA's A from two seeds at r=64 (else the largest rank with two seeds), at one
    layer (default: the middle one). Columns: run_a, run_b, rank, seed_a, seed_b, layer, matrix_type, i, j, phi,
    random_baseline."""
    pair = pick_seed_pair(subspace, runs)
    grids = _pair_grids(subspace, pair, layer)
    return grids.assign(run_a=pair.run_a, run_b=pair.run_b, rank=int(pair.rank_a), seed_a=pair.seed_a,
                        seed_b=pair.seed_b)[["run_a", "run_b", "rank", "seed_a", "seed_b"] + list(grids.columns)]


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


def figure_3(tables, out_dir: Path, layer: int | None = None) -> Path:
    data = phi_seed_data(tables["subspace"], tables["runs"], layer)
    write_table(out_dir / "fig3_phi_seed.csv", data)
    return save(plot_phi_seed(data), out_dir, "fig3_phi_seed")


def phi_layers_data(subspace, runs) -> pd.DataFrame:
    """Figure 4's data: the comparisons of Figures 2 and 3 (whichever exist) at the first, middle and last layer.
    Columns: comparison, run_a, run_b, layer, matrix_type, i, j, phi, random_baseline."""
    blocks = []
    for pick, label in ((pick_rank_pair, lambda p: f"r={int(p.rank_a)} vs r={int(p.rank_b)}, seed {p.seed_a}"),
                        (pick_seed_pair, lambda p: f"seeds {p.seed_a} vs {p.seed_b}, r={int(p.rank_a)}")):
        try:
            pair = pick(subspace, runs)
        except MissingRuns:
            continue
        layers = sorted(subspace.loc[(subspace.run_a == pair.run_a) & (subspace.run_b == pair.run_b), "layer"].unique())
        chosen = sorted({layers[0], middle_layer(layers), layers[-1]})
        blocks.append(phi_grids(subspace, pair, chosen).assign(comparison=label(pair), run_a=pair.run_a,
                                                               run_b=pair.run_b))
    if not blocks:
        raise MissingRuns("no LoRA runs at two ranks or two seeds")
    data = pd.concat(blocks, ignore_index=True)
    return data[["comparison", "run_a", "run_b", "layer", "matrix_type", "i", "j", "phi", "random_baseline"]]


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


def figure_4(tables, out_dir: Path) -> Path:
    data = phi_layers_data(tables["subspace"], tables["runs"])
    write_table(out_dir / "fig4_phi_layers.csv", data)
    return save(plot_phi_layers(data), out_dir, "fig4_phi_layers")


# ---------------------------------------------------------------------------------------------------------------
# Figure 5: amplification (paper Table 7) and the overlap of ΔW's directions with W's (Figure 8 analogue)
# ---------------------------------------------------------------------------------------------------------------

AMP_COLUMNS = ["w_fro", "delta_fro", "proj_delta", "proj_w", "proj_random", "amplification", "phi_out", "phi_in",
               "random_phi_out", "random_phi_in"]


def amplification_data(amplification: pd.DataFrame, runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Full-data runs; the matrix types every LoRA target set adapted (all when there is no LoRA run).
    points: one row per run × layer × matrix × r (setup, family, config, matrix_type, r, seed, layer, ...);
    summary: means over runs and layers per setup, family, config, matrix_type, r, with amplification_std, n."""
    need(amplification, ["run_id", "r", "amplification"], "amplification rows")
    r = prepare(runs).set_index("run_id")
    a = amplification[amplification.run_id.isin(r.index[r.full_data])].copy()
    for c in ("setup", "family", "config", "order"):
        a[c] = r.loc[a.run_id, c].values
    lora = a[a.method == "lora"]
    per_family = [set(g.matrix_type) for _, g in lora.groupby("family")]
    if per_family:  # the matrices every LoRA target set adapted (W_q, W_v for the paper's), else any LoRA adapted
        a = a[a.matrix_type.isin(set.intersection(*per_family) or set.union(*per_family))]
    if a.empty:
        raise MissingRuns("no full-data amplification rows")
    keys = ["setup", "family", "config", "matrix_type", "r"]
    points = a[keys + ["run_id", "seed", "layer"] + AMP_COLUMNS].sort_values(keys + ["run_id", "layer"],
                                                                            ignore_index=True)
    summary = points.groupby(keys, sort=True).agg(
        **{c: (c, "mean") for c in AMP_COLUMNS}, amplification_std=("amplification", "std"),
        n=("amplification", "size")).reset_index()
    order = a.drop_duplicates("config").set_index("config")["order"]
    summary = summary.assign(order=summary.config.map(order)).sort_values(
        ["setup", "order", "matrix_type", "r"], ignore_index=True).drop(columns="order")
    return {"points": points, "summary": summary}


def amplification_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 7's rows, in the paper's notation: ‖UᵀWVᵀ‖_F with U, V from ΔW, from W and random; ‖W‖_F,
    ‖ΔW‖_F; their ratio."""
    t = summary.rename(columns={"proj_delta": "‖UᵀWV‖ ΔW", "proj_w": "‖UᵀWV‖ W", "proj_random": "‖UᵀWV‖ random",
                                "w_fro": "‖W‖_F", "delta_fro": "‖ΔW‖_F", "phi_out": "φ(ΔW, W) out",
                                "random_phi_out": "random φ out"})
    return t[["setup", "config", "matrix_type", "r", "‖UᵀWV‖ ΔW", "‖UᵀWV‖ W", "‖UᵀWV‖ random", "‖W‖_F", "‖ΔW‖_F",
              "amplification", "φ(ΔW, W) out", "random φ out", "n"]]


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


def figure_5(tables, out_dir: Path) -> Path:
    data = amplification_data(tables["amplification"], tables["runs"])
    write_table(out_dir / "fig5_amplification.csv", data["summary"])
    write_table(out_dir / "fig5_amplification_table.csv", amplification_table(data["summary"]))
    return save(plot_amplification(data), out_dir, "fig5_amplification")


# ---------------------------------------------------------------------------------------------------------------
# Figure 6: singular values of full fine-tuning's ΔW vs LoRA's, per matrix type, r90 marked
# ---------------------------------------------------------------------------------------------------------------

def spectra_data(singular_values: pd.DataFrame, spectrum: pd.DataFrame, runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Full-data runs, matrix types with a full fine-tuning ΔW. curves: setup, config, matrix_type, index,
    mean / min / max of σ_index / σ_1 over runs and layers, n; r90: setup, config, matrix_type, r90 (mean over
    runs and layers), r90_min, r90_max, width (min(out, in))."""
    need(singular_values, ["run_id", "sigma", "index"], "singular values")
    need(spectrum, ["run_id", "r90"], "spectra")
    r = prepare(runs).set_index("run_id")
    sv = singular_values[singular_values.run_id.isin(r.index[r.full_data])].copy()
    full_types = set(sv.loc[sv.method == "full", "matrix_type"])
    if not full_types:
        raise MissingRuns("no full fine-tuning ΔW")
    sv = sv[sv.matrix_type.isin(full_types)]
    sv["setup"], sv["config"] = r.loc[sv.run_id, "setup"].values, r.loc[sv.run_id, "config"].values
    first = sv[sv["index"] == 1].set_index(["run_id", "layer", "matrix_type"]).sigma
    sv["norm"] = sv.sigma.values / first.loc[list(zip(sv.run_id, sv.layer, sv.matrix_type))].values
    keys = ["setup", "config", "matrix_type"]
    curves = sv.groupby(keys + ["index"], sort=True).agg(mean=("norm", "mean"), min=("norm", "min"),
                                                          max=("norm", "max"), n=("norm", "size")).reset_index()
    sp = spectrum[spectrum.run_id.isin(sv.run_id.unique()) & spectrum.matrix_type.isin(full_types)].copy()
    sp["setup"], sp["config"] = r.loc[sp.run_id, "setup"].values, r.loc[sp.run_id, "config"].values
    sp["width"] = sp[["out_features", "in_features"]].min(axis=1) if "in_features" in sp else np.nan
    r90 = sp.groupby(keys, sort=True).agg(r90=("r90", "mean"), r90_min=("r90", "min"), r90_max=("r90", "max"),
                                          width=("width", "min")).reset_index()
    return {"curves": curves, "r90": r90, "order": r.reset_index()[["config", "order"]]}


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


def figure_6(tables, out_dir: Path) -> Path:
    data = spectra_data(tables["singular_values"], tables["spectrum"], tables["runs"])
    write_table(out_dir / "fig6_spectra.csv", data["curves"])
    write_table(out_dir / "fig6_spectra_r90.csv", data["r90"])
    return save(plot_spectra(data), out_dir, "fig6_spectra")


# ---------------------------------------------------------------------------------------------------------------
# Figure 7: peak memory (stacked estimate where known) and throughput by method and rank
# ---------------------------------------------------------------------------------------------------------------

def memory_data(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Full-data runs. points: setup, config, run_id, seed, peak_memory_bytes, tokens_per_second;
    summary per setup and config: peak mean/std, tokens/s mean/std, n, and the mean of each memory_estimate
    part (runs.csv's `memory_estimate.*` columns, from budget-aware trainers: weights, grads, optimizer,
    weight copies, activations, total; NaN where no run has an estimate)."""
    need(runs, ["peak_memory_bytes", "tokens_per_second"], "runs with peak memory and throughput")
    r = prepare(runs)
    r = r[r.full_data & r.peak_memory_bytes.notna()]
    if r.empty:
        raise MissingRuns("no full-data runs with a measured peak")
    parts = [f"estimate_{p}" for p in MEMORY_PARTS + ["total_bytes"]]
    for p in MEMORY_PARTS + ["total_bytes"]:
        r[f"estimate_{p}"] = r[f"memory_estimate.{p}"] if f"memory_estimate.{p}" in r else np.nan
    points = r[["setup", "config", "run_id", "seed", "peak_memory_bytes", "tokens_per_second"]].sort_values(
        ["setup", "config", "run_id"], ignore_index=True)
    rows = []
    for (setup, config), g in r.groupby(["setup", "config"], sort=True):
        peak, tps = _mean_std(g, "peak_memory_bytes"), _mean_std(g, "tokens_per_second")
        rows.append({"setup": setup, "config": config, "order": g.order.iloc[0], "peak_mean": peak["mean"],
                     "peak_std": peak["std"], "tokens_per_second_mean": tps["mean"], "tokens_per_second_std": tps["std"],
                     "n": peak["n"], "device": g["device"].iloc[0] if "device" in g else ""}
                    | {p: g[p].astype(float).mean() for p in parts})
    summary = pd.DataFrame(rows).sort_values(["setup", "order"], ignore_index=True).drop(columns="order")
    return {"points": points, "summary": summary}


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


def figure_7(tables, out_dir: Path) -> Path:
    data = memory_data(tables["runs"])
    write_table(out_dir / "fig7_memory_throughput.csv", data["summary"])
    return save(plot_memory(data), out_dir, "fig7_memory_throughput")


# ---------------------------------------------------------------------------------------------------------------
# Figure 8: accuracy against peak memory, one point per run, with the Pareto front
# ---------------------------------------------------------------------------------------------------------------

def accuracy_memory_data(runs: pd.DataFrame) -> pd.DataFrame:
    """Full-data runs: setup, config, run_id, seed, peak_gib, eval_accuracy, pareto (no run of the setup has both
    less or equal memory and higher accuracy)."""
    need(runs, ["peak_memory_bytes", "eval_accuracy"], "runs with peak memory and accuracy")
    r = prepare(runs)
    r = r[r.full_data & r.peak_memory_bytes.notna() & r.eval_accuracy.notna()]
    if r.empty:
        raise MissingRuns("no full-data runs with accuracy and peak memory")
    d = r.assign(peak_gib=r.peak_memory_bytes / GIB)[["setup", "config", "order", "run_id", "seed", "peak_gib",
                                                      "eval_accuracy"]]
    d = d.sort_values(["setup", "peak_gib", "eval_accuracy", "run_id"], ascending=[True, True, False, True],
                      ignore_index=True)
    best = d.groupby("setup").eval_accuracy.cummax()
    d["pareto"] = d.eval_accuracy >= best  # the most accurate run so far, in increasing memory
    d["pareto"] &= ~d.duplicated(["setup", "eval_accuracy"]) | ~d.pareto  # ties: the cheaper run only
    return d


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


def figure_8(tables, out_dir: Path) -> Path:
    data = accuracy_memory_data(tables["runs"])
    write_table(out_dir / "fig8_accuracy_vs_memory.csv", data.drop(columns="order"))
    return save(plot_accuracy_memory(data), out_dir, "fig8_accuracy_vs_memory")


# ---------------------------------------------------------------------------------------------------------------
# Figure 9: train vs test accuracy against training-set size, full vs LoRA
# ---------------------------------------------------------------------------------------------------------------

def data_scarce_data(runs: pd.DataFrame) -> pd.DataFrame:
    """Configurations run at two or more training-set sizes (same model, task, steps and learning rate):
    setup, config, lr, train_examples, test_mean/std, train_mean/std, n."""
    need(runs, ["eval_accuracy", "train_accuracy", "train_examples"], "runs with train and test accuracy")
    r = prepare(runs)
    r = r[r.eval_accuracy.notna() & r.train_accuracy.notna()]
    r = r.assign(lr=r["trainer.lr"] if "trainer.lr" in r else np.nan)
    rows = []
    for (setup, config, lr), g in r.groupby(["setup", "config", "lr"], sort=True, dropna=False):
        if g.train_examples.nunique() < 2:
            continue
        for n_train, h in g.groupby("train_examples", sort=True):
            test, train = _mean_std(h, "eval_accuracy"), _mean_std(h, "train_accuracy")
            rows.append({"setup": setup, "config": config, "lr": lr, "train_examples": int(n_train),
                         "test_mean": test["mean"], "test_std": test["std"], "train_mean": train["mean"],
                         "train_std": train["std"], "n": test["n"], "order": g.order.iloc[0]})
    if not rows:
        raise MissingRuns("no configuration run at two training-set sizes")
    return pd.DataFrame(rows).sort_values(["setup", "order", "lr", "train_examples"], ignore_index=True)


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


def figure_9(tables, out_dir: Path) -> Path:
    data = data_scarce_data(tables["runs"])
    write_table(out_dir / "fig9_data_scarce.csv", data.drop(columns="order"))
    return save(plot_data_scarce(data), out_dir, "fig9_data_scarce")


# ---------------------------------------------------------------------------------------------------------------
# Figure 10: checkpoint size per task, full model vs adapter
# ---------------------------------------------------------------------------------------------------------------

def checkpoint_data(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run with checkpoint_bytes, per model · task and config: checkpoint_mib (mean; equal across seeds),
    n, and the fraction of the full model's checkpoint (NaN without a full run)."""
    need(runs, ["checkpoint_bytes"], "runs with checkpoint_bytes")
    r = prepare(runs)
    r = r[r.checkpoint_bytes.notna()]
    if r.empty:
        raise MissingRuns("no runs with checkpoint_bytes")
    d = r.groupby(["data", "config"], sort=True).agg(checkpoint_bytes=("checkpoint_bytes", "mean"),
                                                     n=("checkpoint_bytes", "size"), order=("order", "first"))
    d = d.reset_index()
    d["checkpoint_mib"] = d.checkpoint_bytes / MIB
    full = d[d.config == "full"].set_index("data").checkpoint_bytes
    d["fraction_of_full"] = [b / full[t] if t in full else np.nan for t, b in zip(d.data, d.checkpoint_bytes)]
    return d.sort_values(["data", "order"], ignore_index=True)


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


def figure_10(tables, out_dir: Path) -> Path:
    data = checkpoint_data(tables["runs"])
    write_table(out_dir / "fig10_checkpoint_size.csv", data.drop(columns="order"))
    write_table(out_dir / "fig10_checkpoint_size_table.csv",
                data[["data", "config", "checkpoint_mib", "fraction_of_full", "n"]])
    return save(plot_checkpoints(data), out_dir, "fig10_checkpoint_size")


# ---------------------------------------------------------------------------------------------------------------
# All figures, the report section, W&B
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    number: int
    name: str           # file stem under DIR/figures/
    build: object       # figure_N
    caption: str        # one line, under the image in report.md
    table: str | None   # a CSV next to the figure that report.md shows as a table
    sweep: str          # key of SWEEPS: the experiment files whose runs it needs


FIGURES = [
    Spec(1, "fig1_accuracy_vs_rank", figure_1,
         "Test accuracy against LoRA rank per target set (line: mean ± std over seeds, dots: seeds); dashed: full "
         "fine-tuning (band: ± std). The LoRA paper's Table 6 on this task.", "fig1_accuracy_vs_rank_table.csv", "rank"),
    Spec(2, "fig2_phi_rank", figure_2,
         "φ(A_r1, A_r2, i, j) between the right-singular directions of A at two ranks (same seed; r=8 and r=64 "
         "where run), for each adapted matrix at the middle layer (bottom: i, j ≤ 8, or the smaller rank), next to "
         "random subspaces (paper Fig. 3).", None, "subspace"),
    Spec(3, "fig3_phi_seed", figure_3,
         "φ between A from two seeds at one rank (r=64 where run, else the largest with two seeds), middle layer, "
         "next to random subspaces: how many directions two runs share (paper Fig. 4).", None, "subspace"),
    Spec(4, "fig4_phi_layers", figure_4,
         "The comparisons of Figures 2 and 3 at the first, middle and last layer (paper Appendix H.1, Figs. 6-7).",
         None, "subspace"),
    Spec(5, "fig5_amplification", figure_5,
         "Left: amplification ‖ΔW‖_F / ‖UᵀWV‖_F with U, V ΔW's top-r directions (lines: means over layers and seeds, "
         "dots: each); right: φ between ΔW's and W's top-r output directions vs random (paper Table 7, Fig. 8).",
         "fig5_amplification_table.csv", "subspace_full"),
    Spec(6, "fig6_spectra", figure_6,
         "Normalised singular values of ΔW per matrix type, full fine-tuning vs LoRA, with the energy rank r90 "
         "(dotted): how high full fine-tuning's rank is next to LoRA's ranks.", None, "subspace_full"),
    Spec(7, "fig7_memory_throughput", figure_7,
         "Peak memory per method and rank (stacked bars: the memory model's weights / gradients / optimizer / bf16 "
         "weight copies / activations where runs record it, a dash: its peak, a plain bar: the measured peak where "
         "they do not; diamonds: measured peak per run) and training throughput (mean ± std, dots: runs).",
         None, "rank"),
    Spec(8, "fig8_accuracy_vs_memory", figure_8,
         "Test accuracy against measured peak memory, one point per run; dashed: the Pareto front (the most "
         "accurate run at each memory).", None, "rank"),
    Spec(9, "fig9_data_scarce", figure_9,
         "Train (dashed) and test (solid) accuracy against training-set size, full fine-tuning vs LoRA (mean ± std "
         "over seeds): the gap is over-fitting.", None, "scarce"),
    Spec(10, "fig10_checkpoint_size", figure_10,
         "Checkpoint size per model and task: the whole fine-tuned model vs LoRA's adapter plus classifier head "
         "(log scale).", "fig10_checkpoint_size_table.csv", "rank"),
]


@dataclass
class Built:
    spec: Spec
    path: Path | None   # the PNG, or None when skipped
    reason: str = ""    # why it was skipped


def write_figures(out_dir: Path, tables: dict | None = None, numbers=None) -> list[Built]:
    """Every figure (or those in `numbers`) from DIR/tables (or the given tables) into DIR/figures/; skipped ones
    are reported and their stale files removed."""
    out_dir = Path(out_dir)
    tables = read_tables(out_dir) if tables is None else tables
    fig_dir = out_dir / FIG_DIR
    built = []
    for spec in (s for s in FIGURES if numbers is None or s.number in numbers):
        for old in fig_dir.glob(f"{spec.name}[._]*"):
            old.unlink()  # a figure that is skipped now must not show an earlier run's picture
        try:
            path = spec.build(tables, fig_dir)
            built.append(Built(spec, path))
            print(f"figure {spec.number}: {path}")
        except MissingRuns as e:
            built.append(Built(spec, None, f"{e}; its runs come from {SWEEPS[spec.sweep]}"))
            print(f"figure {spec.number} skipped: {built[-1].reason}")
    return built


def markdown(built: list[Built], out_dir: Path) -> str:
    """The report's figure section: each figure with its one-line caption and table, or why it is missing."""
    lines = ["## Figures", ""]
    for b in built:
        title = f"### Figure {b.spec.number}"
        if b.path is None:
            lines += [title, "", f"Skipped: {b.reason}.", ""]
            continue
        rel = b.path.relative_to(out_dir).as_posix()
        lines += [title, "", f"![Figure {b.spec.number}]({rel})", "", f"*{b.spec.caption}* "
                  f"([PDF]({rel[:-4]}.pdf), [data]({rel[:-4]}.csv))", ""]
        if b.spec.table:
            lines += [_md(pd.read_csv(b.path.parent / b.spec.table).fillna("")), ""]
    return "\n".join(lines)


def wandb_settings(runs: pd.DataFrame) -> dict | None:
    """project, entity, group and mode for the `analysis` run, from the runs logged with logger=wandb (group: their
    logger.group, else the sweep folder = `name`); None when no run used W&B."""
    if "logger.name" not in runs:
        return None
    wb = runs[runs["logger.name"] == "wandb"]
    if wb.empty:
        return None
    groups = sorted({g if isinstance(g, str) else n for g, n in
                     zip(wb.get("logger.group", pd.Series(np.nan, index=wb.index)),
                         wb.get("name", pd.Series("", index=wb.index)))})
    first = wb.iloc[0]
    mode = first.get("logger.mode")
    return {"project": first.get("logger.project") if isinstance(first.get("logger.project"), str) else "lowrank",
            "entity": first.get("logger.entity") if isinstance(first.get("logger.entity"), str) else None,
            "group": "+".join(groups),
            "mode": mode if isinstance(mode, str) else ("online" if has_wandb_key() else "offline")}


def log_to_wandb(out_dir: Path, built: list[Built], tables: dict, settings: dict) -> None:
    """The figures (images) and tables as one W&B run named `analysis` in the sweeps' group."""
    import wandb
    run = wandb.init(project=settings["project"], entity=settings["entity"], group=settings["group"], name="analysis",
                     job_type="analysis", dir=str(out_dir), mode=settings["mode"], reinit="create_new",
                     settings=wandb.Settings(silent=True, console="off"))
    run.log({f"figures/{b.spec.name}": wandb.Image(str(b.path), caption=b.spec.caption) for b in built if b.path})
    logged = {}
    for name in ["runs", "spectrum", "amplification"]:  # the per-matrix tables; subspace grids stay on disk
        if len(tables.get(name, [])):
            logged[f"tables/{name}"] = wandb.Table(dataframe=tables[name].astype(str))
    for b in built:
        if b.path is not None:
            logged[f"tables/{b.spec.name}"] = wandb.Table(dataframe=pd.read_csv(b.path.with_suffix(".csv")).astype(str))
    run.log(logged)
    run.finish()
    print(f"W&B: run 'analysis' in group {settings['group']!r} ({settings['mode']})")


def make_figures(out_dir: Path, wandb: str = "auto", numbers=None) -> str:
    """Figures from DIR/tables, their W&B run (wandb: auto | on | off), and the report's figure section."""
    tables = read_tables(out_dir)
    built = write_figures(out_dir, tables, numbers)
    settings = wandb_settings(tables["runs"]) if wandb != "off" else None
    if wandb == "on" and settings is None:
        settings = {"project": "lowrank", "entity": None, "group": "analysis",
                    "mode": "online" if has_wandb_key() else "offline"}
    if settings is not None:
        log_to_wandb(Path(out_dir), built, tables, settings)
    return markdown(built, Path(out_dir))


def main(argv=None) -> None:
    """`python -m analysis.figures ROOT... --out DIR`: the report's tables, then the figures (same options)."""
    from .report import main as report_main
    report_main(argv)


if __name__ == "__main__":
    main()
