"""Analyse every run below one or more roots: the tables, the figures built from them, and report.md.

    python -m analysis.report runs [more_roots ...] --out analysis_out

Writes (each file atomically; re-running on the same runs gives identical tables):
  tables/runs.csv             one row per analysed run: run_id, setup, path, flattened config, scalar metrics
  tables/setups.csv           one row per setup (analysis/statistics.py: runs never averaged across setups)
  tables/spectrum.csv         one row per run × matrix: ranks, norms, intruder count
  tables/singular_values.csv  one row per run × matrix × singular value
  tables/subspace.csv         φ(i, j) grids between pairs of runs, with the random-subspace baseline
  tables/amplification.csv    the LoRA paper's Table 7 quantities per run × matrix × r
  figures/figN_*              the figures (analysis/figure_registry.py) from those tables, passed in memory
  report.md                   the setups found and their runs, the figures with captions and tables, runs
                              analysed and skipped (with reasons), key numbers per setup, timing
--no-figures writes the tables and the text report only; --wandb logs figures and tables as an `analysis` run
(analysis/wandb_sync.py). A run whose files fail a check (lowrank.integrity: content hashes, finite values), also
while it is analysed, is listed as skipped with the reason. Bad command-line input exits with status 2 and one
line `error: ...` naming the argument and what would be valid (analysis/report_cli.py).
"""
import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from lowrank.atomic import write_text
from lowrank.errors import fail
from lowrank.integrity import CorruptArtifact
from lowrank.rundir import CONFIG_FILE, METRICS_FILE

from . import amplification as amp
from . import spectra
from . import statistics as st
from .report_cli import parse_args
from .figure_data import prepare, targets_label
from .runs import LowRank, Run, SkippedRun, collect_runs, config_keys, layer_and_matrix
from .subspace import factor_bases, phi_grid, random_phi, random_phi_grid
from .tables import REPORT_FILE, markdown_table, table_path, write_csv
from .wandb_sync import analysis_run_settings, log_analysis_run

SUBSPACE_COLUMNS = ["run_a", "run_b", "kind", "basis", "side", "layer", "matrix_type", "i", "j", "phi",
                    "random_baseline"]
WANDB_TABLES = ["runs", "setups", "spectrum", "amplification"]  # the per-matrix tables; subspace grids stay on disk


class BaseCache:
    """W0, its thin SVD and whether that SVD is truncated, per (base file, matrix): shared by every run of
    one base model."""

    def __init__(self, device, exact_max_dim: int | None, topk: int):
        self.device, self.exact_max_dim, self.topk, self._svd = device, exact_max_dim, topk, {}

    def get(self, run: Run, name: str):
        key = (run.base_path, name)
        if key not in self._svd:
            w0 = run.base_weight(name)
            truncated = self.exact_max_dim is not None and min(w0.shape) > self.exact_max_dim
            self._svd[key] = (w0, spectra.svd_dense(w0, k=self.topk if truncated else None,
                                                    randomized=truncated, device=self.device), truncated)
        return self._svd[key]


def delta_svd(d, opts):
    """Thin SVD of one ΔW: (U, S, Vh, total), total = ‖ΔW‖_F² when the SVD is a randomised top-k one (then S
    is incomplete), else None. LoRA goes through its factors; dense ΔW is exact up to --exact-max-dim."""
    if isinstance(d, LowRank):
        return (*spectra.svd_factored(d.B, d.A, d.scaling), None)
    if opts.exact_max_dim is None or min(d.shape) <= opts.exact_max_dim:
        return (*spectra.svd_dense(d, device=opts.device), None)
    U, S, Vh = spectra.svd_dense(d, k=opts.topk, randomized=True, device=opts.device)
    return U, S, Vh, torch.linalg.matrix_norm(d.double()).item() ** 2


def analyse_run(run: Run, cache: BaseCache, opts) -> dict:
    """Spectrum, singular-value, amplification rows and the subspace bases of every matrix of one run."""
    kinds = layer_and_matrix(dict.fromkeys(run.base_names() + list(run.names)))
    ident = {"run_id": run.run_id, "method": run.method, "rank": run.rank, "seed": run.seed}
    spectrum, sigmas, amps, bases = [], [], [], {}
    t0, spectra_seconds = time.perf_counter(), 0.0
    for name in run.names:
        layer, kind = kinds[name]
        where = {"layer": layer, "matrix_type": kind}
        t_svd = time.perf_counter()
        d = run.delta(name)
        U, S, Vh, total = delta_svd(d, opts)
        spectra_seconds += time.perf_counter() - t_svd  # reading ΔW + its SVD: the cost of a spectrum alone
        w0, w_svd, w_truncated = cache.get(run, name)
        fro = spectra.fro_norm(S) if total is None else total ** 0.5
        intruders = None
        if total is None and not w_truncated:  # intruders need every singular vector of W0
            dense = d.dense() if isinstance(d, LowRank) else d  # W0 + ΔW must be formed here, unlike the spectrum
            U_ft = spectra.svd_dense(w0 + dense, k=opts.intruder_k, device=opts.device)[0]
            intruders = amp.intruder_count(w_svd[0], U_ft, opts.intruder_k, opts.intruder_eps)
        spectrum.append(ident | where | {
            "module": name, "out_features": w0.shape[0], "in_features": w0.shape[1],
            **{f"r{round(p * 100)}": spectra.energy_rank(S, p, total) for p in (0.5, 0.9, 0.99)},
            "effective_rank": spectra.effective_rank(S) if total is None else None,
            "stable_rank": spectra.stable_rank(S) if total is None else total / S[0].item() ** 2,
            "fro_norm": fro, "spectral_norm": S[0].item(), "rel_norm": spectra.relative_norm(fro, w0),
            "intruders": intruders})
        sigmas += [ident | where | {"index": k + 1, "sigma": s} for k, s in enumerate(S.tolist())]
        for r in amplification_ranks(run, opts.amp_ranks, len(S), len(w_svd[1])):
            amps.append(ident | where | {"r": r}
                        | amp.amplification(w0, w_svd, (U, S, Vh), r, seed=0, delta_fro=fro)
                        | {"random_phi_out": random_phi(r, r, w0.shape[0]), "random_phi_in": random_phi(r, r, w0.shape[1])})
        cap = opts.max_dim  # φ grids never look further than this many directions
        bases[name] = where | {"delta": (U[:, :cap], Vh[:cap].mT)}
        if isinstance(d, LowRank):
            U_b, V_a = factor_bases(d.B, d.A)
            bases[name]["factor"] = (U_b[:, :cap], V_a[:, :cap])
    return {"spectrum": spectrum, "sigmas": sigmas, "amps": amps, "bases": bases,
            "seconds": time.perf_counter() - t0, "spectra_seconds": spectra_seconds}


def amplification_ranks(run: Run, amp_ranks: list[int], n_delta: int, n_w: int) -> list[int]:
    """LoRA: its own rank (the paper's Table 7). Full fine-tuning: every r in amp_ranks that fits."""
    ranks = [run.rank] if run.method == "lora" else amp_ranks
    return [r for r in ranks if r <= min(n_delta, n_w)]


def add_setups(table: pd.DataFrame, runs: list[Run]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runs table with a `setup` column after run_id (statistics.find_setups over every identity key of the
    runs' configs but the seed and the configuration), and the setups table."""
    keys = sorted({k for r in runs for k in config_keys(r) if st.is_identity_key(k)})
    ids, setups = st.find_setups(table, st.setup_columns(keys))
    if table.empty:
        return table.assign(setup=pd.Series(dtype=object)), setups
    table = table.copy()
    table.insert(1, "setup", ids.loc[table.run_id].values)
    return table, setups


def select_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """Pairs of runs to compare, within one setup (the `setup` column, add_setups):
      rank:         LoRA runs, same targets and seed, different ranks (run_a has the smaller rank)
      seed:         LoRA runs, same targets and rank, different seeds (run_a has the smaller seed)
      lora_vs_full: every LoRA run vs the full fine-tuning run with its seed, else the one with the smallest
                    seed (run_a is the LoRA run; only the matrices both stored are compared).
    Returns columns run_a, run_b, kind, sorted."""
    if table.empty:
        return pd.DataFrame(columns=["run_a", "run_b", "kind"])
    t = table.copy()
    for c in ["method.targets", "method.rank"]:
        t[c] = t[c].astype(str) if c in t else "None"  # None/NaN must group like any other value
    rows = []
    for _, g in t.groupby("setup", sort=True):
        lora = g[g["method.name"] == "lora"].sort_values(["seed", "method.rank", "run_id"]).to_dict("records")
        full = g[g["method.name"] == "full"].sort_values(["seed", "run_id"]).to_dict("records")
        for a in lora:
            for b in lora:
                if a["run_id"] == b["run_id"] or a["method.targets"] != b["method.targets"]:
                    continue
                ra, rb = int(float(a["method.rank"])), int(float(b["method.rank"]))
                if a["seed"] == b["seed"] and ra < rb:
                    rows.append((a["run_id"], b["run_id"], "rank"))
                if ra == rb and a["seed"] < b["seed"]:
                    rows.append((a["run_id"], b["run_id"], "seed"))
            if full:
                same = [f for f in full if f["seed"] == a["seed"]]
                rows.append((a["run_id"], (same or full)[0]["run_id"], "lora_vs_full"))
    return pd.DataFrame(rows, columns=["run_a", "run_b", "kind"]).sort_values(["kind", "run_a", "run_b"],
                                                                             ignore_index=True)


def subspace_rows(kind: str, run_a: str, run_b: str, bases_a: dict, bases_b: dict) -> list[pd.DataFrame]:
    """φ grids for every matrix both runs stored, on both sides, one block of rows per matrix and side.
    LoRA vs LoRA uses the factors' directions (basis 'factor', as the paper); a comparison with full
    fine-tuning uses ΔW's (basis 'delta')."""
    basis = "factor" if kind in ("rank", "seed") else "delta"
    blocks = []
    for name in sorted(set(bases_a) & set(bases_b)):
        a, b = bases_a[name], bases_b[name]
        for side, col in (("output", 0), ("input", 1)):
            Ua, Ub = a[basis][col], b[basis][col]
            grid, base = phi_grid(Ua, Ub), random_phi_grid(Ua.shape[1], Ub.shape[1], Ua.shape[0])
            i, j = torch.meshgrid(torch.arange(1, grid.shape[0] + 1), torch.arange(1, grid.shape[1] + 1),
                                  indexing="ij")
            blocks.append(pd.DataFrame({
                "run_a": run_a, "run_b": run_b, "kind": kind, "basis": basis, "side": side, "layer": a["layer"],
                "matrix_type": a["matrix_type"], "i": i.flatten().numpy(), "j": j.flatten().numpy(),
                "phi": grid.flatten().numpy(), "random_baseline": base.flatten().numpy()}))
    return blocks


def _frame(rows: list[dict], sort_keys: list[str], int_cols: list[str]) -> pd.DataFrame:
    """Rows as a table sorted by sort_keys, so that re-runs write identical files."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for c in int_cols:
        df[c] = df[c].astype("Int64")  # nullable: rank is empty for full fine-tuning, not "8.0"
    return df.sort_values(sort_keys, ignore_index=True)


def _setup_lines(setups: pd.DataFrame) -> list[str]:
    """report.md's list of setups: what each is and which runs it holds."""
    lines = [f"## Setups ({len(setups)})", "",
             "A setup is every config key of a run but the seed, the configuration compared (`method.*`, "
             "`trainer.lr`) and the keys that never change results (`runs_root`, `name`, `logger.*`, "
             "`trainer.progress_bar`; `config_hash` covers the rest): runs of different setups are never averaged "
             "together. Figures and tables say which setup each number comes from.", ""]
    if len(setups):
        common = st.common_settings(setups)
        lines += ([f"Common to all: {common}.", ""] if common else [])
        for row in setups.itertuples():
            runs = row.runs.split(" ")
            lines.append(f"- **{row.setup}**" + (f" ({row.label})" if row.label else "") + f": {row.n_runs} run"
                         + ("s" if row.n_runs > 1 else "") + ": " + ", ".join(f"`{r}`" for r in runs))
        lines.append("")
    return lines


def _runs_lines(table: pd.DataFrame) -> list[str]:
    lines = [f"## Runs analysed ({len(table)})", ""]
    if not len(table):
        return lines
    t = table.sort_values(["setup", "run_id"]).copy()
    t["targets"] = [targets_label(v) for v in t["method.targets"]] if "method.targets" in t else ""
    if "eval_accuracy" in t and "eval_examples" in t:
        lo, hi = st.wilson_interval(t.eval_accuracy.to_numpy(float), t.eval_examples.to_numpy(float))
        t["test-set interval (Wilson 95 %)"] = [f"[{a:.3f}, {b:.3f}]" if pd.notna(a) else "" for a, b in zip(lo, hi)]
    cols = [c for c in ["run_id", "setup", "method.name", "method.rank", "targets", "seed", "trainer.lr",
                        "eval_examples", "eval_accuracy", "test-set interval (Wilson 95 %)", "config_hash"] if c in t]
    return lines + [markdown_table(t[cols]), ""]


def amplification_summary_table(amps: pd.DataFrame) -> pd.DataFrame:
    """Per setup, configuration (`config`, figure_data.prepare's label), r and matrix type: runs, matrices, mean
    norms, and the amplification as statistics defines it (Σ‖ΔW_r‖_F / Σ‖UᵀWV‖_F), the whole-ΔW ratio of sums
    and the per-matrix median."""
    rows = []
    for key, g in amps.groupby(["setup", "config", "r", "matrix_type"], sort=True):
        rows.append(dict(zip(["setup", "config", "r", "matrix_type"], key)) | {
            "runs": g.run_id.nunique(), "matrices": len(g), "‖ΔW‖_F": g.delta_fro.mean(),
            "‖ΔW_r‖_F": g.delta_top_fro.mean(), "‖UᵀWV‖ ΔW": g.proj_delta.mean(), "‖UᵀWV‖ W": g.proj_w.mean(),
            "‖UᵀWV‖ random": g.proj_random.mean(),
            "amplification Σ‖ΔW_r‖/Σ‖UᵀWV‖": st.amplification_summary(g.delta_top_fro, g.proj_delta),
            "Σ‖ΔW‖/Σ‖UᵀWV‖": st.amplification_summary(g.delta_fro, g.proj_delta),
            "median per matrix": (g.delta_top_fro / g.proj_delta).median()})
    return pd.DataFrame(rows)


def summarise(table, setups, spectrum, subspace, amps, skipped, timing, opts, figures: str = "") -> str:
    """The short report: the setups found and their runs, the figure section (markdown) if any, what was analysed,
    what was skipped and why, key numbers per setup, timing."""
    lines = ["# ΔW analysis report", "", f"Roots: {', '.join(map(str, opts.roots))}", ""] + _setup_lines(setups) + (
        [figures, ""] if figures else []) + _runs_lines(table)
    lines += [f"## Runs skipped ({len(skipped)})", ""] + [f"- `{r}`: {why}" for r, why in skipped] + [""]
    runs = prepare(table).set_index("run_id") if len(table) else None
    setup_of = runs.setup if runs is not None else pd.Series(dtype=object)
    config_of = runs.config if runs is not None else pd.Series(dtype=object)

    if len(subspace):
        s = subspace[(subspace.i == 1) & (subspace.j == 1)].copy()
        s["setup"] = setup_of.loc[s.run_a].values
        s["pair"] = [f"{config_of[a]} vs {config_of[b]}" for a, b in zip(s.run_a, s.run_b)]
        g = s.groupby(["setup", "kind", "pair", "side", "matrix_type"]).agg(
            phi_1_1_median=("phi", "median"), phi_1_1_min=("phi", "min"), phi_1_1_max=("phi", "max"),
            matrices=("phi", "size"), random_baseline=("random_baseline", "mean")).reset_index()
        lines += ["## φ(·,·,1,1): overlap of the top directions (per setup, over layers and pairs)", "",
                  "kind rank: same seed, two ranks; seed: same rank, two seeds (basis 'factor': input side = right "
                  "singular vectors of A, output side = left of B). lora_vs_full: basis 'delta' (ΔW's own). "
                  "Median, min and max over the matrices (layers × pairs).", "", markdown_table(g), ""]
    if len(spectrum):
        sp = spectrum.assign(setup=setup_of.loc[spectrum.run_id].values, config=config_of.loc[spectrum.run_id].values,
                             width=spectrum[["out_features", "in_features"]].min(axis=1))
        full = sp[sp.method == "full"]
        if len(full):
            g = full.groupby(["setup", "config", "matrix_type"]).agg(
                r90_mean=("r90", "mean"), r90_min=("r90", "min"), r90_max=("r90", "max"), r50_mean=("r50", "mean"),
                r99_mean=("r99", "mean"), effective_rank=("effective_rank", "mean"),
                stable_rank=("stable_rank", "mean"), runs=("run_id", "nunique"), matrices=("r90", "size"),
                width=("width", "min")).reset_index()
            share = []
            for setup, f in full.groupby("setup"):
                ranks = sorted(sp.loc[(sp.method == "lora") & (sp.setup == setup), "rank"].dropna().unique().tolist())
                share.append(f"{setup}: " + (", ".join(f"r={r}: {(f.r90 <= r).mean():.2f}" for r in ranks)
                                             or "no LoRA runs"))
            lines += ["## Energy rank of full fine-tuning ΔW (per setup, over layers and full runs)", "",
                      "width = min(out, in), the largest possible rank. Share of full-FT matrices with r90 ≤ each "
                      "LoRA rank of the setup: " + "; ".join(share) + ".", "", markdown_table(g), ""]
        g = sp.groupby(["setup", "config", "matrix_type"], sort=False).agg(
            r90_mean=("r90", "mean"), effective_rank=("effective_rank", "mean"), stable_rank=("stable_rank", "mean"),
            rel_norm=("rel_norm", "mean"), intruders=("intruders", "mean"), runs=("run_id", "nunique"),
            matrices=("r90", "size")).reset_index()
        g = g.sort_values(["setup", "config", "matrix_type"], key=_config_order(runs), ignore_index=True)
        lines += [f"## Per setup, configuration and matrix type (means over matrices; intruders: top-{opts.intruder_k} left "
                  f"singular vectors, ε = {opts.intruder_eps})", "", markdown_table(g), ""]
    if len(amps):
        g = amplification_summary_table(amps.assign(setup=setup_of.loc[amps.run_id].values,
                                                    config=config_of.loc[amps.run_id].values))
        g = g.sort_values(["setup", "config", "r", "matrix_type"], key=_config_order(runs), ignore_index=True)
        lines += ["## Amplification (LoRA paper Table 7: ‖UᵀWV‖_F for U, V from ΔW / W / random)", "",
                  "Norms are means over the matrices (layers × runs). The amplification is the ratio of their sums "
                  "(so the columns divide to it), with ΔW's top-r part ‖ΔW_r‖_F on top so that full fine-tuning (ΔW "
                  "of full rank) and LoRA (ΔW_r = ΔW) are alike; never the mean of per-matrix ratios, which one "
                  "near-zero projection can dominate. Σ‖ΔW‖/Σ‖UᵀWV‖ uses the whole ΔW (the same for LoRA).", "",
                  markdown_table(g), ""]
    lines += ["## Timing", ""] + [f"- {k}: {v}" for k, v in timing.items()] + [""]
    return "\n".join(lines)


def _config_order(runs: pd.DataFrame):
    """A sort key for tables with a `config` column: configurations in figure order (full first)."""
    order = runs.drop_duplicates("config").set_index("config")["order"]

    def key(col: pd.Series) -> pd.Series:
        return col.map(lambda c: order.get(c, (9,))) if col.name == "config" else col
    return key


def progress(line: str) -> None:
    """One line of progress while the report is computed (a full fine-tuning run takes seconds to minutes)."""
    print(f"analysis: {line}", flush=True)


def run_report(opts) -> dict:
    """Compute every table for the runs below opts.roots and write them under opts.out. Returns the tables."""
    t_start = time.perf_counter()
    opts = argparse.Namespace(**vars(opts))  # a copy: the default amp_ranks below depend on the runs found
    runs, table, skipped = collect_runs(opts.roots)
    if opts.amp_ranks is None:  # the LoRA ranks present, so full fine-tuning lines up with them
        opts.amp_ranks = sorted({r.rank for r in runs if r.method == "lora"}) or [8]
    t_load = time.perf_counter() - t_start
    progress(f"{len(runs)} runs to analyse, {len(skipped)} skipped ({t_load:.1f} s)")
    cache = BaseCache(opts.device, opts.exact_max_dim, opts.topk)
    results, failed = {}, set()
    for k, run in enumerate(runs, 1):
        try:
            results[run.run_id] = analyse_run(run, cache, opts)
            progress(f"run {k}/{len(runs)} {run.run_id}: {len(run.names)} matrices, "
                     f"{results[run.run_id]['seconds']:.1f} s")
        except (CorruptArtifact, SkippedRun, torch.linalg.LinAlgError) as e:
            # a file damaged or replaced since it was checked, or an SVD that failed: skip the run, not the report
            skipped.append((run.run_id, f"while analysing: {e}"))
            failed.add(run.run_id)
            progress(f"run {k}/{len(runs)} {run.run_id}: skipped while analysing")
    if failed:
        runs = [r for r in runs if r.run_id not in failed]
        table = table[~table.run_id.isin(failed)].reset_index(drop=True)
        skipped.sort()
    t_runs = time.perf_counter() - t_start - t_load

    table, setups = add_setups(table, runs)
    pairs = select_pairs(table)
    blocks = [block for p in pairs.itertuples() for block in
              subspace_rows(p.kind, p.run_a, p.run_b, results[p.run_a]["bases"], results[p.run_b]["bases"])]
    t_sub = time.perf_counter() - t_start - t_load - t_runs
    progress(f"{len(setups)} setups; subspace grids of {len(pairs)} pairs ({t_sub:.1f} s)")

    keys = ["run_id", "layer", "matrix_type"]
    spectrum = _frame([r for v in results.values() for r in v["spectrum"]], keys,
                      ["rank", "r50", "r90", "r99", "intruders"])
    sigmas = _frame([r for v in results.values() for r in v["sigmas"]], keys + ["index"], ["rank"])
    amps = _frame([r for v in results.values() for r in v["amps"]], keys + ["r"], ["rank"])
    subspace = pd.concat(blocks, ignore_index=True) if blocks else pd.DataFrame(columns=SUBSPACE_COLUMNS)
    subspace = subspace.sort_values(["kind", "run_a", "run_b", "side", "layer", "matrix_type", "i", "j"],
                                    ignore_index=True)
    table = table.sort_values("run_id", ignore_index=True) if len(table) else table

    out = Path(opts.out)
    tables = {"runs": table, "setups": setups, "spectrum": spectrum, "singular_values": sigmas,
              "subspace": subspace, "amplification": amps}
    for name, df in tables.items():
        write_csv(table_path(out, name), df)
    full_ids = [r.run_id for r in runs if r.method == "full"]
    timing = {"device": str(opts.device), "runs found and checked": f"{t_load:.2f} s",
              "spectra, intruders, amplification (all runs)": f"{t_runs:.2f} s",
              "subspace grids": f"{t_sub:.2f} s ({len(pairs)} pairs, {len(subspace)} rows)",
              "total": f"{time.perf_counter() - t_start:.2f} s"}
    for i in full_ids:
        res = results[i]
        timing[f"full-FT run `{i}`, {len(res['spectrum'])} matrices"] = (
            f"ΔW spectra {res['spectra_seconds']:.2f} s; with W0 SVDs, intruders, amplification {res['seconds']:.2f} s")
    timing["subspace.csv size"] = f"{table_path(out, 'subspace').stat().st_size / 1e6:.1f} MB"
    figures = ""
    if getattr(opts, "figures", False):
        t_fig = time.perf_counter()
        figures = make_figures(out, tables, getattr(opts, "wandb", "auto"))
        timing["figures"] = f"{time.perf_counter() - t_fig:.2f} s"
    write_text(out / REPORT_FILE, summarise(table, setups, spectrum, subspace, amps, skipped, timing, opts, figures))
    for k, v in timing.items():
        print(f"{k}: {v}")
    none_found = "" if runs or skipped else (
        f" (no run directories below {', '.join(map(str, opts.roots))}: a run directory holds {CONFIG_FILE} or "
        f"{METRICS_FILE})")
    print(f"{len(runs)} runs analysed, {len(skipped)} skipped -> {out}{none_found}")
    return tables | {"skipped": skipped, "pairs": pairs}


def make_figures(out_dir: Path, tables: dict[str, pd.DataFrame], wandb: str = "auto", numbers=None) -> str:
    """The figures (all, or those in `numbers`) from the tables, their W&B run (wandb: auto | on | off; auto: when
    the runs used logger=wandb), and the report's figure section (markdown)."""
    from .figure_registry import figures_markdown, write_figures  # lazy: matplotlib only when figures are asked for
    built = write_figures(out_dir, tables, numbers)
    settings = analysis_run_settings(tables["runs"], wandb)
    if settings is not None:
        drawn = [b for b in built if b.drawn is not None]
        log_analysis_run(out_dir, settings,
                         images={f"figures/{b.drawn.path.stem}": (b.drawn.path, b.spec.caption) for b in drawn},
                         tables={f"tables/{name}": tables[name] for name in WANDB_TABLES if len(tables[name])}
                         | {f"tables/{b.drawn.path.stem}": b.drawn.data for b in drawn})
    return figures_markdown(built, Path(out_dir))


def main(argv=None) -> None:
    opts = parse_args(argv)
    try:
        run_report(opts)
    except OSError as e:  # the disk filled up, or --out changed under us; a run's own files never get here
        where = Path(e.filename).resolve() if e.filename else None
        if where is None or opts.out.resolve() not in (where, *where.parents):
            raise
        fail(f"cannot write the report under --out {str(opts.out)!r}: {e.strerror or e} ({e.filename})")


if __name__ == "__main__":
    main()
