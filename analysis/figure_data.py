"""What each figure plots: pure functions from the analysis tables (DataFrames, as `analysis.report` makes
them) to the plotted DataFrames, with no drawing, so the numbers are tested apart from the pictures.

    data = accuracy_by_rank(tables["runs"])    # {"points": one row per run, "summary": mean ± std per rank}
    accuracy_table(data["summary"])            # the Table 6 layout report.md shows

A function raises MissingRuns, saying what is missing, when the tables lack the runs its figure needs.
Each function's docstring lists the columns it returns.
"""
import json
import math

import numpy as np
import pandas as pd

PAPER_RANKS = (8, 64)        # Figure 3 of the paper compares A at r = 8 and r = 64
SHORT = {"query": "q", "key": "k", "value": "v", "attention.output.dense": "o", "q_proj": "q", "k_proj": "k",
         "v_proj": "v", "o_proj": "o", "c_attn": "qkv", "attn.c_proj": "o"}  # target names as the paper's W_q...
MEMORY_PARTS = ["weights_bytes", "grads_bytes", "optimizer_bytes", "weight_copies_bytes", "activations_bytes"]
GIB, MIB = 2 ** 30, 2 ** 20    # bytes per GiB, MiB


class MissingRuns(Exception):
    """The tables lack the runs a figure needs; the message says what is missing."""


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


def _mean_std(g: pd.DataFrame, col: str) -> dict:
    v = g[col].astype(float)
    return {"mean": v.mean(), "std": v.std(ddof=1), "n": len(v)}  # std of one value: NaN


# ---- Figure 1: accuracy against LoRA rank per target set (Table 6) ------------------------------------------------

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


# ---- Figures 2-4: φ grids of pairs of LoRA runs (paper Figures 3, 4; Appendix H.1) --------------------------------

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
    Columns: run_a, run_b, rank_a, rank_b, seed, layer, matrix_type, i, j, phi, random_baseline."""
    pair = pick_rank_pair(subspace, runs)
    grids = _pair_grids(subspace, pair, layer)
    return grids.assign(run_a=pair.run_a, run_b=pair.run_b, rank_a=int(pair.rank_a), rank_b=int(pair.rank_b),
                        seed=pair.seed_a)[["run_a", "run_b", "rank_a", "rank_b", "seed"] + list(grids.columns)]


def phi_seed_data(subspace, runs, layer: int | None = None) -> pd.DataFrame:
    """Figure 3's data: φ between LoRA's A from two seeds at r=64 (else the largest rank with two seeds), at one
    layer (default: the middle one). Columns: run_a, run_b, rank, seed_a, seed_b, layer, matrix_type, i, j, phi,
    random_baseline."""
    pair = pick_seed_pair(subspace, runs)
    grids = _pair_grids(subspace, pair, layer)
    return grids.assign(run_a=pair.run_a, run_b=pair.run_b, rank=int(pair.rank_a), seed_a=pair.seed_a,
                        seed_b=pair.seed_b)[["run_a", "run_b", "rank", "seed_a", "seed_b"] + list(grids.columns)]


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


# ---- Figure 5: amplification (paper Table 7) and the overlap of ΔW's directions with W's --------------------------

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


# ---- Figure 6: singular values of ΔW per matrix type, r90 ---------------------------------------------------------

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
    sp["r90"] = sp.r90.astype(float)  # the report's nullable integers: NaN where a truncated SVD left r90 open
    r90 = sp.groupby(keys, sort=True).agg(r90=("r90", "mean"), r90_min=("r90", "min"), r90_max=("r90", "max"),
                                          width=("width", "min")).reset_index()
    return {"curves": curves, "r90": r90, "order": r.reset_index()[["config", "order"]]}


# ---- Figure 7: peak memory and throughput; Figure 8: accuracy against peak memory ---------------------------------

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


# ---- Figure 9: train vs test accuracy against training-set size; Figure 10: checkpoint size -----------------------

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
