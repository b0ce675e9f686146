"""What each figure plots: pure functions from the analysis tables (DataFrames, as `analysis.report` makes
them) to the plotted DataFrames, with no drawing, so the numbers are tested apart from the pictures. Every
aggregate follows `analysis.statistics`: runs are pooled only within one setup (the runs table's `setup`
column) and one configuration, seed means carry a bootstrap interval and n, accuracies a Wilson interval.

    data = accuracy_by_rank(tables["runs"])    # {"points": one row per run, "summary": one per point, ...}
    accuracy_table(data["summary"])            # the table report.md shows under the figure

A function raises MissingRuns, saying what is missing, when the tables lack the runs its figure needs.
Each function's docstring lists the columns it returns. The ten figures' data, each with the table report.md
shows under it, share the helpers at the top (labels, setup selection, the majority class), which is why the
file runs past 600 lines.
"""
import json
import math

import numpy as np
import pandas as pd

from analysis import statistics as st
from analysis.runs import layer_and_matrix
from analysis.variants import variants

PAPER_RANKS = (8, 64)        # Figure 3 of the paper compares A at r = 8 and r = 64
SHORT = {"query": "q", "key": "k", "value": "v", "attention.output.dense": "o", "q_proj": "q", "k_proj": "k",
         "v_proj": "v", "o_proj": "o", "c_attn": "qkv", "attn.c_proj": "o"}  # target names as the paper's W_q...
MEMORY_PARTS = ["weights_bytes", "grads_bytes", "optimizer_bytes", "weight_copies_bytes", "activations_bytes"]
GIB, MIB = 2 ** 30, 2 ** 20    # bytes per GiB, MiB
ZOOM = 8                       # the paper's zoom into i, j <= 8
LABEL_COUNTS = "eval_label_counts."  # runs.csv columns of a metrics.json `eval_label_counts` {label: count}
SCARCE_AXIS = "task.train_size"      # figure 9's swept axis
KEY_NAMES = {"trainer.lr": "lr"}     # configuration keys as labels show them (method.X: X)


class MissingRuns(Exception):
    """The tables lack the runs a figure needs; the message says what is missing."""


def targets_label(value) -> str:
    """'["query", "value"]' -> 'q,v'; 'all-linear' stays; unknown names stay whole. Full module paths (an imported
    adapter's or an exported run's target_modules, a pair's every block matrix) become their matrix types and the
    count: 'q,v; 12 modules' (analysis.runs.layer_and_matrix), so a label stays short whatever the model."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "?"
    try:
        names = json.loads(value)
    except (TypeError, json.JSONDecodeError):
        return str(value)
    if isinstance(names, str):
        return names
    try:
        kinds = {n: kind for n, (_, kind) in layer_and_matrix(names).items()}
    except ValueError:  # suffixes such as "query": no layer index, the names are the types
        return ",".join(SHORT.get(n, n) for n in names)
    short = ",".join(SHORT.get(k, k) for k in sorted(set(kinds.values()), key=matrix_order))
    return f"{short}; {len(names)} modules"


def need(df: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in df]
    if df.empty or missing:
        raise MissingRuns(f"no {what} in the tables" + (f" (columns {missing} absent)" if missing and not df.empty
                                                         else ""))


def _col(r: pd.DataFrame, name: str, default=np.nan) -> pd.Series:
    """A column, or a constant where the runs lack the key."""
    return r[name] if name in r else pd.Series(default, index=r.index, dtype=object)


def _fmt(value, key: str = "") -> str:
    if key == "method.targets":   # a list of module paths: its short label, never hundreds of characters
        return targets_label(json.dumps(value))
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def prepare(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs table with the labels every figure uses:
      method ('full' | 'lora' | 'subspace': method.name), variant (analysis.variants: 'lora', 'dora', 'pissa', ...,
      'imported lora'), rank (LoRA and its variants, else NaN), targets ('q,v'; '' for full), config ('full',
      'LoRA r=8 (q,v)', 'DoRA r=8 (q,v)', 'subspace d=100 (q,v)', followed by ', lr=0.001' etc. where runs of one
      setup and variant differ in another configuration key (statistics.is_configuration_key): runs of one label never
      differ in one), family (the config without its rank: 'LoRA (q,v)', 'DoRA (q,v)'), config_key (JSON of the
      configuration keys), full_data (no task.train_size), eval_examples (NaN where not recorded), order (plotting
      order: full, then per target set plain LoRA and each variant by rank, then the subspace method). The `setup`
      column (statistics.find_setups, as analysis.report adds it) must be there."""
    need(runs, ["run_id", "method.name", "seed", "setup"], "runs")
    r = runs.reset_index(drop=True)
    kinds = variants(r)
    r["method"] = r["method.name"]
    r["variant"] = [v.name for v in kinds]
    r["rank"] = pd.to_numeric(_col(r, "method.rank"), errors="coerce").where(r.method == "lora")
    r["targets"] = [targets_label(t) if m != "full" else "" for m, t in zip(r.method, _col(r, "method.targets"))]
    dim = pd.to_numeric(_col(r, "method.dim"), errors="coerce")
    family = [v.label if v.method == "full" else f"{v.label} ({t})" for v, t in zip(kinds, r.targets)]
    size = [f"d={d:g}" if v.method == "subspace" else f"r={int(k)}" if v.method == "lora" else ""
            for v, k, d in zip(kinds, r["rank"], dim)]
    base = [v.label if v.method == "full" else f"{v.label} {z} ({t})" for v, z, t in zip(kinds, size, r.targets)]
    conf_cols = sorted(c for c in r.columns if st.is_configuration_key(c) and c != "method")
    values = [{c: st.canonical(row[c]) for c in conf_cols} for row in r[conf_cols].to_dict("records")]
    r["config_key"] = [json.dumps(v, sort_keys=True) for v in values]
    extras = [""] * len(r)
    for _, idx in r.groupby(["setup", pd.Series(base, index=r.index)]).groups.items():
        rows = [r.index.get_loc(i) for i in idx]
        varying = [c for c in conf_cols if len({json.dumps(values[k][c]) for k in rows}) > 1]
        for k in rows:
            extras[k] = "".join(f", {KEY_NAMES.get(c, c.removeprefix('method.'))}={_fmt(values[k][c], c)}"
                                for c in varying)
    r["config"] = [b + e for b, e in zip(base, extras)]
    r["family"] = [f + e for f, e in zip(family, extras)]
    r["full_data"] = _col(r, "task.train_size").isna()
    r["eval_examples"] = pd.to_numeric(_col(r, "eval_examples"), errors="coerce")
    r["order"] = [(0, "", v.order, 0, e) if v.method == "full" else (2, t, v.order, d, e) if v.method == "subspace"
                  else (1, t, v.order, k, e) for v, t, k, d, e in zip(kinds, r.targets, r["rank"], dim, extras)]
    return r


def full_data_setups(r: pd.DataFrame, fallback: bool = False) -> tuple[list[str], list[str]]:
    """(shown, left out): the setups of prepared runs trained on the whole training set (no task.train_size;
    figure 9 shows the others against data size). With `fallback`, every setup when there is none such."""
    setups = sorted(set(r.setup), key=st.setup_number)
    whole = [s for s in setups if r.loc[r.setup == s, "full_data"].all()]
    if fallback and not whole:
        return setups, []
    return whole, [s for s in setups if s not in whole]


def left_out_note(left_out: list[str], why: str = "task.train_size set: figure 9 shows it against data size") -> str:
    if not left_out:
        return ""
    which = f"Setup {left_out[0]} is" if len(left_out) == 1 else f"Setups {', '.join(left_out)} are"
    return f"{which} not shown here ({why})."


def matrix_order(matrix_type: str) -> tuple:
    """Matrix types in a block's order: q, k, v, o (SHORT's order), then the others by name."""
    known = list(SHORT)
    return (known.index(matrix_type), "") if matrix_type in known else (len(known), matrix_type)


def majority_by_setup(r: pd.DataFrame) -> dict[str, float]:
    """The majority-class rate of each setup's test set, from the runs' `eval_label_counts` (NaN where no run
    of the setup records them, or where its runs disagree)."""
    cols = [c for c in r.columns if c.startswith(LABEL_COUNTS)]
    out = {}
    for setup, g in r.groupby("setup"):
        rates = {st.majority_fraction(row) for row in g[cols].to_numpy(dtype=float)} if cols else {math.nan}
        out[setup] = rates.pop() if len(rates) == 1 else math.nan
    return out


def majority_note(majority: dict[str, float]) -> str:
    """The caption's line on the majority-class line: drawn, or why not."""
    missing = sorted(s for s, v in majority.items() if not np.isfinite(v))
    if not missing:
        return "Grey dash-dot: the majority-class rate of the test set (from the runs' label counts)."
    return (f"No majority-class line for {', '.join(missing)}: the runs do not record their test-set label counts "
            f"(metrics.json has no `eval_label_counts`), and it is not guessed.")


def _summary(g: pd.DataFrame, col: str) -> dict:
    """mean, seed interval and n of one column over the runs of one group (one value per seed)."""
    return st.seed_summary(g[col].astype(float).to_numpy())


def _with_test_interval(row: dict, accuracy: float, n_examples) -> dict:
    lo, hi = st.wilson_interval(accuracy, n_examples)
    return row | {"eval_examples": n_examples, "test_lo": float(lo), "test_hi": float(hi)}


def _first(values):
    v = pd.Series(values).dropna()
    return v.iloc[0] if len(v) else np.nan


# ---- Figure 1: accuracy against LoRA rank per target set (Table 6) ------------------------------------------------

def accuracy_by_rank(runs: pd.DataFrame) -> dict:
    """Setups on the whole training set (full_data_setups). points: setup, config, family, method, targets, rank, seed,
    run_id, eval_accuracy, eval_examples, test_lo, test_hi (Wilson, one run); summary per setup, family and rank:
    setup, family, method, targets, rank, mean, seed_lo, seed_hi (bootstrap over seeds; NaN at n = 1), n,
    eval_examples, test_lo, test_hi (Wilson at the mean: the test-set error the seeds share). majority: {setup:
    majority-class rate or NaN}; note: the caption's lines on left-out setups and the majority class."""
    need(runs, ["eval_accuracy"], "runs with eval_accuracy")
    r = prepare(runs)
    r = r[r.eval_accuracy.notna()]
    shown, left_out = full_data_setups(r)
    r = r[r.setup.isin(shown)]
    if not (r.method == "lora").any():
        raise MissingRuns("no full-data LoRA runs (every LoRA run has task.train_size set)")
    lo, hi = st.wilson_interval(r.eval_accuracy.to_numpy(float), r.eval_examples.to_numpy(float))
    points = r.assign(test_lo=lo, test_hi=hi)[["setup", "config", "family", "method", "targets", "rank", "seed",
                                               "run_id", "eval_accuracy", "eval_examples", "test_lo", "test_hi",
                                               "order"]]
    points = points.sort_values(["setup", "order", "seed", "run_id"], ignore_index=True)
    rows = []
    for (setup, family, rank), g in points.groupby(["setup", "family", "rank"], dropna=False, sort=False):
        s = _summary(g, "eval_accuracy")
        rows.append(_with_test_interval({"setup": setup, "family": family, "method": g.method.iloc[0],
                                         "targets": g.targets.iloc[0], "rank": rank} | s,
                                        s["mean"], _first(g.eval_examples)) | {"order": g.order.iloc[0]})
    summary = pd.DataFrame(rows).sort_values(["setup", "order"], ignore_index=True).drop(columns="order")
    majority = majority_by_setup(r)
    note = " ".join(x for x in [left_out_note(left_out), majority_note(majority)] if x)
    return {"points": points.drop(columns="order"), "summary": summary, "majority": majority, "note": note}


def interval_text(lo, hi, n: int, digits: int = 3) -> str:
    """'[0.770, 0.792]', or 'n=1: none'."""
    if n < 2 or not np.isfinite(lo):
        return "n=1: none"
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]" + (" (range of 2)" if n == 2 else "")


def accuracy_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per point of figure 1: setup, configuration, r, n (seeds), mean test accuracy, its seed interval
    (bootstrap; the range at n = 2, none at n = 1) and its test-set interval (Wilson, n = test examples)."""
    return pd.DataFrame({
        "setup": summary.setup, "configuration": summary.family, "r": summary["rank"].astype("Int64"),
        "n seeds": summary.n,
        "test accuracy": summary["mean"],
        "seed interval (95 %)": [interval_text(lo, hi, n) for lo, hi, n in zip(summary.seed_lo, summary.seed_hi,
                                                                               summary.n)],
        "test-set interval (Wilson 95 %)": [f"[{lo:.3f}, {hi:.3f}] (n={int(e)})" if np.isfinite(lo) else "not recorded"
                                            for lo, hi, e in zip(summary.test_lo, summary.test_hi,
                                                                 summary.eval_examples.fillna(0))]})


# ---- Figures 2-4: φ grids of pairs of LoRA runs (paper Figures 3, 4; Appendix H.1) --------------------------------

def subspace_pairs(subspace: pd.DataFrame, runs: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The (run_a, run_b) pairs of one kind compared through their factors (basis 'factor': A's directions, which
    figures 2-4 show; DoRA and ReLoRA pairs have none), with their ranks, seeds, targets, setup and variant, sorted:
    plain LoRA first, then the paper's target set."""
    need(subspace, ["run_a", "run_b", "kind"], "subspace grids")
    factor = subspace.basis == "factor" if "basis" in subspace else True
    pairs = subspace.loc[(subspace.kind == kind) & factor, ["run_a", "run_b"]].drop_duplicates()
    r = prepare(runs).set_index("run_id")
    for side in "ab":
        ids = pairs[f"run_{side}"]
        pairs[f"rank_{side}"] = r.loc[ids, "rank"].values
        pairs[f"seed_{side}"] = r.loc[ids, "seed"].values
    pairs["targets"] = r.loc[pairs.run_a, "targets"].values
    pairs["setup"] = r.loc[pairs.run_a, "setup"].values
    pairs["full_data"] = r.loc[pairs.run_a, "full_data"].values
    pairs["variant"] = r.loc[pairs.run_a, "variant"].values
    pairs = pairs.sort_values(["full_data", "setup", "targets", "seed_a", "rank_a", "rank_b", "run_a", "run_b"],
                              ascending=[False] + [True] * 7, ignore_index=True)
    # the paper adapts W_q and W_v with plain LoRA: its target set goes first where a sweep has several, its method
    # before any variant
    pairs = pairs.sort_values("targets", key=lambda t: t != "q,v", kind="stable", ignore_index=True)
    return pairs.sort_values("variant", key=lambda v: v != "lora", kind="stable", ignore_index=True)


def pick_rank_pair(subspace, runs) -> pd.Series:
    """LoRA at r=8 vs r=64 (same seed, targets and setup) when present, else the pair with the largest rank
    ratio; runs on the whole training set, targets q,v first, then the smallest seed."""
    pairs = subspace_pairs(subspace, runs, "rank")
    if pairs.empty:
        raise MissingRuns("no LoRA runs at two ranks with the same seed")
    pairs = pairs[pairs.variant == pairs.variant.iloc[0]]  # plain LoRA where it ran
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
    pairs = pairs[pairs.variant == pairs.variant.iloc[0]]  # plain LoRA where it ran
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


def _pair_grids(subspace, pair, layer: int | None) -> pd.DataFrame:
    """φ grids of one pair of runs at one layer (default: the middle one)."""
    g = subspace[(subspace.run_a == pair.run_a) & (subspace.run_b == pair.run_b)]
    layer = middle_layer(g.layer) if layer is None else layer
    grids = phi_grids(subspace, pair, [layer])
    if grids.empty:
        raise MissingRuns(f"no φ grids at layer {layer} for {pair.run_a} vs {pair.run_b}")
    return grids


def phi_rank_data(subspace, runs, layer: int | None = None) -> pd.DataFrame:
    """Figure 2's data: φ between LoRA's A at two ranks (same seed), at one layer (default: the middle one).
    Columns: setup, variant (plain 'lora' where it ran, else a variant with factors), run_a, run_b, rank_a, rank_b,
    seed, layer, matrix_type, i, j, phi, random_baseline."""
    pair = pick_rank_pair(subspace, runs)
    grids = _pair_grids(subspace, pair, layer)
    return grids.assign(setup=pair.setup, variant=pair.variant, run_a=pair.run_a, run_b=pair.run_b,
                        rank_a=int(pair.rank_a), rank_b=int(pair.rank_b), seed=pair.seed_a)[
        ["setup", "variant", "run_a", "run_b", "rank_a", "rank_b", "seed"] + list(grids.columns)]


def phi_seed_data(subspace, runs, layer: int | None = None) -> pd.DataFrame:
    """Figure 3's data: φ between LoRA's A from two seeds at r=64 (else the largest rank with two seeds), at one
    layer (default: the middle one). Columns: setup, variant (as figure 2's), run_a, run_b, rank, seed_a, seed_b,
    layer, matrix_type, i, j, phi, random_baseline."""
    pair = pick_seed_pair(subspace, runs)
    grids = _pair_grids(subspace, pair, layer)
    return grids.assign(setup=pair.setup, variant=pair.variant, run_a=pair.run_a, run_b=pair.run_b,
                        rank=int(pair.rank_a), seed_a=pair.seed_a, seed_b=pair.seed_b)[
        ["setup", "variant", "run_a", "run_b", "rank", "seed_a", "seed_b"] + list(grids.columns)]


def phi_layers_data(subspace, runs) -> pd.DataFrame:
    """Figure 4's data: the comparisons of Figures 2 and 3 (whichever exist) at the first, middle and last layer.
    Columns: comparison, setup, run_a, run_b, label_a, label_b (what i and j index: 'A, r=8' or 'A, seed 0'),
    layer, matrix_type, i, j, phi, random_baseline."""
    blocks = []
    for pick, label in ((pick_rank_pair, lambda p: (f"r={int(p.rank_a)} vs r={int(p.rank_b)}, seed {p.seed_a}",
                                                    f"A, r={int(p.rank_a)}", f"A, r={int(p.rank_b)}")),
                        (pick_seed_pair, lambda p: (f"seeds {p.seed_a} vs {p.seed_b}, r={int(p.rank_a)}",
                                                    f"A, seed {p.seed_a}", f"A, seed {p.seed_b}"))):
        try:
            pair = pick(subspace, runs)
        except MissingRuns:
            continue
        layers = sorted(subspace.loc[(subspace.run_a == pair.run_a) & (subspace.run_b == pair.run_b), "layer"].unique())
        chosen = sorted({layers[0], middle_layer(layers), layers[-1]})
        comparison, label_a, label_b = label(pair)
        blocks.append(phi_grids(subspace, pair, chosen).assign(comparison=comparison, setup=pair.setup,
                                                               run_a=pair.run_a, run_b=pair.run_b,
                                                               label_a=label_a, label_b=label_b))
    if not blocks:
        raise MissingRuns("no LoRA runs at two ranks or two seeds")
    data = pd.concat(blocks, ignore_index=True)
    return data[["comparison", "setup", "run_a", "run_b", "label_a", "label_b", "layer", "matrix_type", "i", "j",
                 "phi", "random_baseline"]]


def phi_table(data: pd.DataFrame, zoom: int = ZOOM) -> pd.DataFrame:
    """Per comparison (when the data has one), layer and matrix type of a φ figure: φ(1, 1), the mean φ over
    i, j ≤ zoom and over the whole grid, each next to the random-subspace expectation, and the grid's size."""
    keys = [k for k in ("comparison", "layer", "matrix_type") if k in data]
    rows = []
    for key, g in data.groupby(keys, sort=True):
        z = g[(g.i <= zoom) & (g.j <= zoom)]
        first = g[(g.i == 1) & (g.j == 1)]
        rows.append(dict(zip(keys, key if isinstance(key, tuple) else (key,))) | {
            "φ(1,1)": first.phi.iloc[0], "random φ(1,1)": first.random_baseline.iloc[0],
            f"mean φ, i,j ≤ {min(zoom, g.i.max(), g.j.max())}": z.phi.mean(),
            "random, same cells": z.random_baseline.mean(),
            "mean φ, whole grid": g.phi.mean(), "random, whole grid": g.random_baseline.mean(),
            "grid": f"{g.i.max()} × {g.j.max()}"})
    return pd.DataFrame(rows)


# ---- Figure 5: amplification (paper Table 7) and the overlap of ΔW's directions with W's --------------------------

AMP_COLUMNS = ["w_fro", "delta_fro", "delta_top_fro", "proj_delta", "proj_w", "proj_random", "phi_out", "phi_in",
               "random_phi_out", "random_phi_in"]


def amplification_data(amplification: pd.DataFrame, runs: pd.DataFrame) -> dict:
    """Setups on the whole training set; the matrix types every LoRA target set of a setup adapted (all when it has no
    LoRA run). points: one row per run × layer × matrix × r (setup, family, config, matrix_type, r, run_id, seed,
    layer, the amplification table's norms); summary per setup, family, config, matrix_type and r (statistics:
    amplification is a ratio of sums over every layer of every seed, with ΔW's top-r norm so that full
    fine-tuning and LoRA are alike): n (seeds), matrices, the mean of each norm, top_energy (Σ‖ΔW_r‖² /
    Σ‖ΔW‖²), amplification (Σ‖ΔW_r‖_F / Σ‖UᵀWV‖_F), amp_lo / amp_hi (stratified bootstrap over seeds within
    layers; NaN at n = 1), amplification_whole (Σ‖ΔW‖_F / Σ‖UᵀWV‖_F: the whole update, as the paper's Table 7
    prints for LoRA, where the two agree), layer_median (median of the per-matrix top-r ratios, for reference).
    note: the caption's line on left-out setups."""
    need(amplification, ["run_id", "r", "delta_top_fro", "proj_delta"], "amplification rows")
    r = prepare(runs)
    shown, left_out = full_data_setups(r)
    r = r[r.setup.isin(shown)].set_index("run_id")
    a = amplification[amplification.run_id.isin(r.index)].copy()
    zero = a[a.delta_fro == 0].drop_duplicates(["run_id", "layer", "matrix_type"]) if "delta_fro" in a else a[:0]
    a = a[a.delta_fro > 0] if "delta_fro" in a else a   # ΔW = 0: no directions, a ratio 0 / 0
    for c in ("setup", "family", "config", "order"):
        a[c] = r.loc[a.run_id, c].values
    kept = []
    for setup, g in a.groupby("setup"):
        per_family = [set(f.matrix_type) for _, f in g[g.method == "lora"].groupby("family")]
        if per_family:  # the matrices every LoRA target set adapted (W_q, W_v for the paper's), else any LoRA adapted
            g = g[g.matrix_type.isin(set.intersection(*per_family) or set.union(*per_family))]
        kept.append(g)
    a = pd.concat(kept) if kept else a
    if a.empty:
        raise MissingRuns("no full-data amplification rows")
    keys = ["setup", "family", "config", "matrix_type", "r"]
    points = a[keys + ["order", "run_id", "seed", "layer"] + AMP_COLUMNS].sort_values(keys + ["run_id", "layer"],
                                                                                     ignore_index=True)
    rows = []
    for key, g in points.groupby(keys, sort=False):
        num = g.pivot(index="run_id", columns="layer", values="delta_top_fro").dropna(axis=1)
        den = g.pivot(index="run_id", columns="layer", values="proj_delta")[num.columns]
        lo, hi = st.amplification_interval(num.to_numpy(), den.to_numpy())
        rows.append(dict(zip(keys, key)) | {"order": g.order.iloc[0], "n": g.run_id.nunique(), "matrices": len(g)}
                    | {c: g[c].mean() for c in AMP_COLUMNS}
                    | {"top_energy": st.ratio_of_sums(g.delta_top_fro ** 2, g.delta_fro ** 2),
                       "amplification": st.amplification_summary(g.delta_top_fro, g.proj_delta),
                       "amp_lo": lo, "amp_hi": hi,
                       "amplification_whole": st.amplification_summary(g.delta_fro, g.proj_delta),
                       "layer_median": float(np.median(g.delta_top_fro / g.proj_delta))})
    summary = pd.DataFrame(rows).sort_values(["setup", "order", "matrix_type", "r"], ignore_index=True)
    return {"points": points.drop(columns="order"), "summary": summary.drop(columns="order"),
            "note": " ".join(n for n in (left_out_note(left_out), zero_note(zero)) if n)}


def amplification_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 7's rows, in the paper's notation (means over the matrices, so that the norm columns divide to the
    amplification): ‖UᵀWV‖_F with U, V from ΔW, from W and random; ‖W‖_F, ‖ΔW‖_F, ‖ΔW_r‖_F; the amplification
    (ratio of sums, top-r) with its seed interval and n, the whole-ΔW ratio, the per-matrix median."""
    t = summary.rename(columns={"proj_delta": "‖UᵀWV‖ ΔW", "proj_w": "‖UᵀWV‖ W", "proj_random": "‖UᵀWV‖ random",
                                "w_fro": "‖W‖_F", "delta_fro": "‖ΔW‖_F", "delta_top_fro": "‖ΔW_r‖_F",
                                "top_energy": "top-r energy", "phi_out": "φ(ΔW, W) out",
                                "random_phi_out": "random φ out", "amplification": "amplification (‖ΔW_r‖)",
                                "amplification_whole": "‖ΔW‖ / ‖UᵀWV‖", "layer_median": "median per matrix",
                                "n": "n seeds"})
    t["seed interval"] = [interval_text(lo, hi, n, 3 if hi < 10 else 1) if np.isfinite(hi) or n < 2 else "inf"
                          for lo, hi, n in zip(summary.amp_lo, summary.amp_hi, summary.n)]
    return t[["setup", "config", "matrix_type", "r", "n seeds", "matrices", "‖UᵀWV‖ ΔW", "‖UᵀWV‖ W", "‖UᵀWV‖ random",
              "‖W‖_F", "‖ΔW‖_F", "‖ΔW_r‖_F", "top-r energy", "amplification (‖ΔW_r‖)", "seed interval",
              "‖ΔW‖ / ‖UᵀWV‖", "median per matrix", "φ(ΔW, W) out", "random φ out"]]


# ---- Figure 6: singular values of ΔW per matrix type, r90 ---------------------------------------------------------

def spectra_data(singular_values: pd.DataFrame, spectrum: pd.DataFrame, runs: pd.DataFrame) -> dict:
    """Setups on the whole training set; per setup the matrix types with a full fine-tuning ΔW, or, in a setup without
    one, those its LoRA runs adapted. curves: setup, config, matrix_type, index, mean / min / max of σ_index / σ_1
    over runs and layers, matrices (how many); r90: setup, config, matrix_type, r90 (mean over runs and layers),
    r90_min, r90_max, n (runs), matrices, width (min(out, in), the largest possible rank); order; note."""
    need(singular_values, ["run_id", "sigma", "index"], "singular values")
    need(spectrum, ["run_id", "r90"], "spectra")
    r = prepare(runs)
    shown, left_out = full_data_setups(r)
    r = r[r.setup.isin(shown)].set_index("run_id")
    sv = singular_values[singular_values.run_id.isin(r.index)].copy()
    if sv.empty:
        raise MissingRuns("no full-data singular values")
    sv["setup"], sv["config"] = r.loc[sv.run_id, "setup"].values, r.loc[sv.run_id, "config"].values
    types = {}
    for setup, g in sv.groupby("setup"):
        full = set(g.loc[g.method == "full", "matrix_type"])
        types[setup] = full or set(g.matrix_type)
    sv = sv[[t in types[s] for s, t in zip(sv.setup, sv.matrix_type)]]
    matrix = ["run_id", "layer", "matrix_type"]
    first = sv[sv["index"] == 1].set_index(matrix).sigma
    sigma_1 = first.loc[list(zip(sv.run_id, sv.layer, sv.matrix_type))].values
    zero = sv[sigma_1 == 0].drop_duplicates(matrix)   # an unchanged matrix (ΔW = 0): no direction, nothing to normalise
    sv = sv[sigma_1 > 0].copy()
    if sv.empty:
        raise MissingRuns("ΔW is zero in every matrix: no spectrum to draw")
    sv["norm"] = sv.sigma.values / sigma_1[sigma_1 > 0]
    keys = ["setup", "config", "matrix_type"]
    curves = sv.groupby(keys + ["index"], sort=True).agg(mean=("norm", "mean"), min=("norm", "min"),
                                                          max=("norm", "max"), matrices=("norm", "size")).reset_index()
    sp = spectrum[spectrum.run_id.isin(sv.run_id.unique())].copy()
    sp["setup"], sp["config"] = r.loc[sp.run_id, "setup"].values, r.loc[sp.run_id, "config"].values
    sp = sp[[t in types[s] for s, t in zip(sp.setup, sp.matrix_type)]]
    sp = sp.merge(sv[matrix].drop_duplicates(), on=matrix)   # the matrices drawn: those with ΔW ≠ 0
    sp["width"] = sp[["out_features", "in_features"]].min(axis=1) if "in_features" in sp else np.nan
    sp["r90"] = sp.r90.astype(float)  # the report's nullable integers: NaN where a truncated SVD left r90 open
    r90 = sp.groupby(keys, sort=True).agg(r90=("r90", "mean"), r90_min=("r90", "min"), r90_max=("r90", "max"),
                                          n=("run_id", "nunique"), matrices=("r90", "size"),
                                          width=("width", "min")).reset_index()
    return {"curves": curves, "r90": r90, "order": r.reset_index()[["config", "order"]],
            "note": " ".join(n for n in (left_out_note(left_out), zero_note(zero)) if n)}


def zero_note(zero: pd.DataFrame) -> str:
    """The caption's line on matrices left out because their ΔW is zero (rows: run_id, layer, matrix_type)."""
    if zero.empty:
        return ""
    per_type = zero.groupby("matrix_type").size()
    kinds = ", ".join(f"{SHORT.get(k, k)} ({n})" for k, n in sorted(per_type.items(), key=lambda x: matrix_order(x[0])))
    return (f"Left out: {len(zero)} matrices whose ΔW is zero (unchanged by fine-tuning; per type: {kinds}); "
            "they have no singular directions.")


def energy_rank_table(r90: pd.DataFrame) -> pd.DataFrame:
    """Figure 6's table: r90 per setup, configuration and matrix type (mean, range), n runs, matrices, width."""
    return r90.rename(columns={"r90": "r90 mean", "r90_min": "r90 min", "r90_max": "r90 max", "n": "n runs",
                               "width": "width min(out, in)"})


# ---- Figure 7: peak memory and throughput; Figure 8: accuracy against peak memory ---------------------------------

def measured_memory(device) -> str:
    """What peak_memory_bytes measured on this device (lowrank.train.perf.peak_memory_bytes)."""
    return "CPU peak RSS" if str(device) == "cpu" else "CUDA max allocated"


def memory_data(runs: pd.DataFrame) -> dict:
    """Setups on the whole training set. points: setup, config, run_id, seed, peak_memory_bytes, tokens_per_second,
    padded_tokens_per_second; summary per setup and config: n, device, measured (what the peak is), peak_mean /
    peak_min / peak_max (bytes), tokens_per_second mean with seed_lo / seed_hi (bootstrap), padded tokens/s mean,
    timed_steps and warmup_seconds (means), world_size (processes) and grad_sync_bytes_per_step (mean; NaN for
    one-process runs), and the mean of each memory_estimate part (runs.csv's
    `memory_estimate.*`: weights, grads, optimizer, weight copies, activations, total; NaN where no run has an
    estimate). tokens_per_second counts real (non-padding) tokens over the steady steps after the warm-up."""
    need(runs, ["peak_memory_bytes", "tokens_per_second"], "runs with peak memory and throughput")
    r = prepare(runs)
    shown, left_out = full_data_setups(r)
    r = r[r.setup.isin(shown) & r.peak_memory_bytes.notna()].copy()
    if r.empty:
        raise MissingRuns("no full-data runs with a measured peak")
    parts = [f"estimate_{p}" for p in MEMORY_PARTS + ["total_bytes"]]
    for p in MEMORY_PARTS + ["total_bytes"]:
        r[f"estimate_{p}"] = r[f"memory_estimate.{p}"] if f"memory_estimate.{p}" in r else np.nan
    for c in ("padded_tokens_per_second", "timed_steps", "warmup_seconds", "device", "grad_sync_bytes_per_step",
              "world_size"):
        r[c] = _col(r, c)
    points = r[["setup", "config", "order", "run_id", "seed", "peak_memory_bytes", "tokens_per_second",
                "padded_tokens_per_second"]].sort_values(["setup", "order", "run_id"], ignore_index=True)
    rows = []
    for (setup, config), g in r.groupby(["setup", "config"], sort=True):
        tps = _summary(g, "tokens_per_second")
        device = _first(g.device)
        rows.append({"setup": setup, "config": config, "order": g.order.iloc[0], "n": len(g),
                     "device": device if isinstance(device, str) else "", "measured": measured_memory(device),
                     "peak_mean": g.peak_memory_bytes.mean(), "peak_min": g.peak_memory_bytes.min(),
                     "peak_max": g.peak_memory_bytes.max(), "tokens_per_second_mean": tps["mean"],
                     "tokens_per_second_lo": tps["seed_lo"], "tokens_per_second_hi": tps["seed_hi"],
                     "padded_tokens_per_second_mean": g.padded_tokens_per_second.astype(float).mean(),
                     "timed_steps": g.timed_steps.astype(float).mean(),
                     "warmup_seconds": g.warmup_seconds.astype(float).mean(),
                     "world_size": g.world_size.astype(float).max(),
                     "grad_sync_bytes_per_step": g.grad_sync_bytes_per_step.astype(float).mean()}
                    | {p: g[p].astype(float).mean() for p in parts})
    summary = pd.DataFrame(rows).sort_values(["setup", "order"], ignore_index=True).drop(columns="order")
    notes = [left_out_note(left_out)]
    if (summary.device == "cpu").any():
        notes.append("On CPU the measured peak is the process's peak RSS, which includes the Python and PyTorch "
                     "runtime; the memory model counts the training tensors only, so the two are drawn apart, not "
                     "compared.")
    return {"points": points.drop(columns="order"), "summary": summary, "note": " ".join(n for n in notes if n)}


def memory_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Figure 7's table: per setup and configuration, n, the measured peak (what it is, mean and range, GiB),
    the estimate's total (GiB), steady tokens/s (real tokens; mean, seed interval), padded tokens/s, timed
    steps, warm-up seconds, processes and the gradient traffic per step (runs under torchrun)."""
    return pd.DataFrame({
        "setup": summary.setup, "configuration": summary.config, "n": summary.n, "measured": summary.measured,
        "peak GiB (mean)": summary.peak_mean / GIB,
        "peak GiB range": [f"{a / GIB:.3f}-{b / GIB:.3f}" for a, b in zip(summary.peak_min, summary.peak_max)],
        "estimate GiB (model tensors)": summary.estimate_total_bytes / GIB,
        "tokens/s (real, steady)": summary.tokens_per_second_mean,
        "seed interval": [interval_text(lo, hi, n, 0) for lo, hi, n in zip(summary.tokens_per_second_lo,
                                                                           summary.tokens_per_second_hi, summary.n)],
        "padded tokens/s": summary.padded_tokens_per_second_mean, "timed steps": summary.timed_steps,
        "warm-up s": summary.warmup_seconds, "processes": summary.world_size,
        # bytes reduced across processes per optimizer step, as DDP's hook or FSDP's reduce-scatter counted them
        "gradient sync MiB/step": summary.grad_sync_bytes_per_step / 2**20})


def accuracy_memory_data(runs: pd.DataFrame) -> dict:
    """Setups on the whole training set. points: setup, config, run_id, seed, peak_gib, eval_accuracy; summary per setup
    and config: n, measured, peak_gib (mean), peak_min / peak_max, mean accuracy with seed_lo / seed_hi and the
    Wilson test_lo / test_hi, pareto (no configuration of the setup has a smaller or equal mean peak and a higher
    mean accuracy); majority; note."""
    need(runs, ["peak_memory_bytes", "eval_accuracy"], "runs with peak memory and accuracy")
    r = prepare(runs)
    shown, left_out = full_data_setups(r)
    r = r[r.setup.isin(shown) & r.peak_memory_bytes.notna() & r.eval_accuracy.notna()]
    if r.empty:
        raise MissingRuns("no full-data runs with accuracy and peak memory")
    r = r.assign(peak_gib=r.peak_memory_bytes / GIB)
    r["device"] = _col(r, "device")
    points = r[["setup", "config", "order", "run_id", "seed", "peak_gib", "eval_accuracy"]].sort_values(
        ["setup", "order", "run_id"], ignore_index=True)
    rows = []
    for (setup, config), g in r.groupby(["setup", "config"], sort=True):
        s = _summary(g, "eval_accuracy")
        rows.append(_with_test_interval({"setup": setup, "config": config, "order": g.order.iloc[0],
                                         "measured": measured_memory(_first(g.device)),
                                         "peak_gib": g.peak_gib.mean(), "peak_min": g.peak_gib.min(),
                                         "peak_max": g.peak_gib.max()} | s, s["mean"], _first(g.eval_examples)))
    summary = pd.DataFrame(rows).sort_values(["setup", "peak_gib", "mean", "order"],
                                             ascending=[True, True, False, True], ignore_index=True)
    best = summary.groupby("setup")["mean"].cummax()
    summary["pareto"] = summary["mean"] >= best   # the most accurate configuration so far, in increasing memory
    summary["pareto"] &= ~summary.duplicated(["setup", "mean"]) | ~summary.pareto  # ties: the cheaper one only
    summary = summary.sort_values(["setup", "order"], ignore_index=True).drop(columns="order")
    majority = majority_by_setup(r)
    notes = [left_out_note(left_out), majority_note(majority)]
    if (summary.measured == "CPU peak RSS").any():
        notes.append("On CPU the peak is the process's RSS, runtime included; differences smaller than the spread "
                     "between seeds (horizontal bars) are noise.")
    return {"points": points.drop(columns="order"), "summary": summary, "majority": majority,
            "note": " ".join(n for n in notes if n)}


def accuracy_memory_table(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "setup": summary.setup, "configuration": summary.config, "n": summary.n, "measured": summary.measured,
        "peak GiB (mean)": summary.peak_gib, "peak GiB range": [f"{a:.3f}-{b:.3f}" for a, b in
                                                               zip(summary.peak_min, summary.peak_max)],
        "test accuracy": summary["mean"],
        "seed interval": [interval_text(lo, hi, n) for lo, hi, n in zip(summary.seed_lo, summary.seed_hi, summary.n)],
        "test-set interval (Wilson)": [f"[{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "not recorded"
                                       for lo, hi in zip(summary.test_lo, summary.test_hi)],
        "on the front": summary.pareto.map({True: "yes", False: ""})})


# ---- Figure 9: train vs test accuracy against training-set size; Figure 10: checkpoint size -----------------------

def scarce_groups(setups: pd.DataFrame) -> dict[str, str]:
    """{setup: group}: setups whose keys differ only in task.train_size (figure 9's axis) form one group,
    named by its setups ('S1+S2')."""
    need(setups, ["setup", "key"], "setups")
    other = {s: json.dumps({k: v for k, v in json.loads(key).items() if k != SCARCE_AXIS}, sort_keys=True)
             for s, key in zip(setups.setup, setups.key)}
    members = {}
    for s, k in other.items():
        members.setdefault(k, []).append(s)
    return {s: "+".join(sorted(members[k], key=lambda x: int(x[1:]))) for s, k in other.items()}


def data_scarce_data(runs: pd.DataFrame, setups: pd.DataFrame) -> dict:
    """Configurations run at two or more training-set sizes within one group of setups (scarce_groups).
    summary: group, config, train_examples, n, test mean, test_seed_lo / _hi, test_lo / test_hi (Wilson),
    train mean, train_seed_lo / _hi; majority ({group: rate}); note."""
    need(runs, ["eval_accuracy", "train_accuracy", "train_examples"], "runs with train and test accuracy")
    r = prepare(runs)
    r = r[r.eval_accuracy.notna() & r.train_accuracy.notna()]
    groups = scarce_groups(setups)
    r["group"] = r.setup.map(groups)
    rows = []
    for (group, config_key), g in r.groupby(["group", "config_key"], sort=True):
        if g.train_examples.nunique() < 2:
            continue
        config = g.sort_values("full_data", ascending=False).config.iloc[0]
        for n_train, h in g.groupby("train_examples", sort=True):
            test, train = _summary(h, "eval_accuracy"), _summary(h, "train_accuracy")
            lo, hi = st.wilson_interval(test["mean"], _first(h.eval_examples))
            rows.append({"group": group, "config": config, "train_examples": int(n_train), "n": test["n"],
                         "test_mean": test["mean"], "test_seed_lo": test["seed_lo"], "test_seed_hi": test["seed_hi"],
                         "test_lo": float(lo), "test_hi": float(hi), "train_mean": train["mean"],
                         "train_seed_lo": train["seed_lo"], "train_seed_hi": train["seed_hi"],
                         "order": g.order.iloc[0]})
    if not rows:
        raise MissingRuns("no configuration run at two training-set sizes")
    summary = pd.DataFrame(rows).sort_values(["group", "order", "train_examples"], ignore_index=True)
    majority = {}
    for s, v in majority_by_setup(r).items():
        majority.setdefault(groups[s], set()).add(v)
    majority = {g: v.pop() if len(v) == 1 else math.nan for g, v in majority.items() if g in set(summary.group)}
    return {"summary": summary.drop(columns="order"), "majority": majority, "note": majority_note(majority)}


def data_scarce_table(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "setups": summary.group, "configuration": summary.config, "train examples": summary.train_examples,
        "n seeds": summary.n, "test accuracy": summary.test_mean,
        "seed interval": [interval_text(lo, hi, n) for lo, hi, n in zip(summary.test_seed_lo, summary.test_seed_hi,
                                                                        summary.n)],
        "test-set interval (Wilson)": [f"[{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "not recorded"
                                       for lo, hi in zip(summary.test_lo, summary.test_hi)],
        "train accuracy": summary.train_mean,
        "train seed interval": [interval_text(lo, hi, n) for lo, hi, n in
                                zip(summary.train_seed_lo, summary.train_seed_hi, summary.n)]})


def checkpoint_data(runs: pd.DataFrame) -> dict:
    """Setups on the whole training set (else every setup): per setup and config, checkpoint_bytes (mean; equal
    across seeds), n, and the fraction of the full model's checkpoint (NaN without a full run in the setup). note."""
    need(runs, ["checkpoint_bytes"], "runs with checkpoint_bytes")
    r = prepare(runs)
    r = r[r.checkpoint_bytes.notna()]
    if r.empty:
        raise MissingRuns("no runs with checkpoint_bytes")
    shown, left_out = full_data_setups(r, fallback=True)
    r = r[r.setup.isin(shown)]
    d = r.groupby(["setup", "config"], sort=True).agg(checkpoint_bytes=("checkpoint_bytes", "mean"),
                                                      n=("checkpoint_bytes", "size"), order=("order", "first"))
    d = d.reset_index()
    d["checkpoint_mib"] = d.checkpoint_bytes / MIB
    full = d[d.config == "full"].set_index("setup").checkpoint_bytes
    d["fraction_of_full"] = [b / full[s] if s in full else np.nan for s, b in zip(d.setup, d.checkpoint_bytes)]
    return {"data": d.sort_values(["setup", "order"], ignore_index=True).drop(columns="order"),
            "note": left_out_note(left_out)}
