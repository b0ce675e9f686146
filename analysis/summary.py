"""The answer first: per setup, one row per configuration with its headline metric and interval, its cost (trainable
parameters, peak memory, tokens/s) and, where ΔW was analysed, its energy rank; and the findings as plain sentences.
From configs and metrics alone (no ΔW read), so it prints in seconds:

    python -m analysis.summary runs [more_roots ...] [--out DIR]   # prints; --out: DIR/tables/summary.csv,
                                                                     DIR/summary.md

analysis.report places the same summary first in report.md, with r90 from its spectrum table. Pure functions over
the runs table (analysis.runs, with its `setup` column: analysis.statistics) and the spectrum table:

    table = summary_table(runs, spectrum)     # one row per setup × configuration
    summary_sentences(table)                  # [(setup, sentence)]
    summary_lines(table, setups)              # report.md's opening section

The headline metric is the test accuracy for classifiers (seed interval, and Wilson's test-set interval at the mean,
as figure 1), the held-out loss for causal LMs (seed interval; perplexity = exp(mean loss)). A configuration "reaches"
full fine-tuning when its mean is no worse than the far end of full fine-tuning's interval: the test-set interval for
an accuracy (it exists at one seed and the seeds share the test set), the seed interval for a loss (nothing else is
recorded for it).
"""
import math
import sys

import numpy as np
import pandas as pd

from lowrank.errors import fail
from lowrank.rundir.atomic import write_text

from analysis import statistics as st
from analysis.figures.data import GIB, interval_text, prepare
from analysis.lm_tables import LM_OBJECTIVES
from analysis.report_cli import _out_problem, _Parser, _path, no_runs_problem
from analysis.runs import outcome_runs, roots_problem
from analysis.tables import markdown_table, table_path, write_csv

SUMMARY_FILE = "summary.md"
ACCURACY, LOSS = "test accuracy", "held-out loss"
COLUMNS = ["setup", "configuration", "family", "method", "variant", "size", "size_value", "metric", "n", "mean",
           "seed_lo", "seed_hi", "test_lo", "test_hi", "eval_examples", "compare_lo", "compare_hi", "perplexity",
           "trainable_params", "total_params", "trainable_share", "peak_memory_bytes", "tokens_per_second", "r90"]


def _mean(g: pd.DataFrame, column: str) -> float:
    return float(pd.to_numeric(g[column], errors="coerce").mean()) if column in g else math.nan


def _is_lm(g: pd.DataFrame) -> bool:
    return "task.objective" in g and g["task.objective"].isin(LM_OBJECTIVES).any()


def _headline(g: pd.DataFrame) -> dict:
    """metric, n, mean, seed interval, test-set interval (accuracy only) and the interval findings compare with."""
    lm = _is_lm(g)
    column = "eval_loss" if lm else "eval_accuracy"
    values = pd.to_numeric(g[column], errors="coerce").dropna().to_numpy(float) if column in g else np.array([])
    s = st.seed_summary(values)
    examples = _mean(g, "eval_examples")
    lo, hi = (math.nan, math.nan) if lm else map(float, st.wilson_interval(s["mean"], examples))
    return {"metric": LOSS if lm else ACCURACY, "n": s["n"], "mean": s["mean"], "seed_lo": s["seed_lo"],
            "seed_hi": s["seed_hi"], "test_lo": lo, "test_hi": hi, "eval_examples": examples,
            "compare_lo": s["seed_lo"] if lm else lo, "compare_hi": s["seed_hi"] if lm else hi,
            "perplexity": math.exp(s["mean"]) if lm and np.isfinite(s["mean"]) else math.nan}


def summary_table(runs: pd.DataFrame, spectrum: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per setup and configuration (figure_data.prepare's `config`: method or variant, rank or dimension,
    targets and any other configuration key that varies), setups in order and configurations in figure order.
    Columns (COLUMNS): setup, configuration, family (the configuration without its size), method, variant, size
    ('r=8', 'd=100', '' for full), size_value, metric, n (seeds), mean, seed_lo, seed_hi, test_lo, test_hi (Wilson at
    the mean; NaN for a loss), eval_examples, compare_lo, compare_hi (the interval findings use), perplexity (causal
    LMs: exp of the mean loss), trainable_params, total_params, trainable_share (of the model), peak_memory_bytes,
    tokens_per_second (means over seeds), r90 (ΔW's energy rank, the mean over every matrix of the configuration's
    runs in `spectrum`; NaN without)."""
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    r = prepare(runs)
    dim = pd.to_numeric(r["method.dim"], errors="coerce") if "method.dim" in r else pd.Series(np.nan, index=r.index)
    r["size_value"] = r["rank"].where(r.method == "lora", dim.where(r.method == "subspace"))
    # count, not size: a matrix whose r90 is missing (too wide for an exact spectrum) is left out of the mean
    r90 = (spectrum.groupby("run_id").r90.agg(["sum", "count"]) if spectrum is not None and len(spectrum)
           else pd.DataFrame(columns=["sum", "count"]))
    rows = []
    for (setup, config), g in r.groupby(["setup", "config"], sort=False):
        first = g.iloc[0]
        size = first.size_value
        held = r90.loc[r90.index.intersection(g.run_id)]
        trainable, total = _mean(g, "trainable_params"), _mean(g, "total_params")
        rows.append({"setup": setup, "configuration": config, "family": first.family, "method": first.method,
                     "variant": first.variant, "size_value": size,
                     "size": "" if pd.isna(size) else f"{'d' if first.method == 'subspace' else 'r'}={size:g}"}
                    | _headline(g) | {
                        "trainable_params": trainable, "total_params": total,
                        "trainable_share": trainable / total if total > 0 else math.nan,
                        "peak_memory_bytes": _mean(g, "peak_memory_bytes"),
                        "tokens_per_second": _mean(g, "tokens_per_second"),
                        "r90": held["sum"].sum() / held["count"].sum() if held["count"].sum() else math.nan,
                        "_order": (st.setup_number(setup), first.order)})
    t = pd.DataFrame(rows)
    return t.sort_values("_order", kind="stable", ignore_index=True)[COLUMNS]


# ---- numbers as the summary prints them: the tests parse them back with these same formats ---------------------

def fmt_metric(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def fmt_interval(lo: float, hi: float) -> str:
    return f"[{fmt_metric(lo)}, {fmt_metric(hi)}]" if np.isfinite(lo) and np.isfinite(hi) else "none"


def fmt_percent(share: float) -> str:
    """A share as percent: '41 %', '3.2 %', '0.33 %'."""
    p = 100 * share
    if not np.isfinite(p):
        return "–"
    return f"{p:.0f} %" if p >= 10 else f"{p:.1f} %" if p >= 1 else f"{p:.2g} %"


def fmt_gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if np.isfinite(nbytes) else "–"


def fmt_count(value: float) -> str:
    return f"{value:,.0f}" if np.isfinite(value) else "–"


def fmt_r90(value: float) -> str:
    return f"{value:.1f}" if np.isfinite(value) else "–"


# ---- findings as sentences -------------------------------------------------------------------------------------

def _reaches(row, ref) -> bool:
    """Whether a configuration's mean is no worse than the far end of the reference's interval."""
    return row["mean"] >= ref.compare_lo if row["metric"] == ACCURACY else row["mean"] <= ref.compare_hi


def _best(g: pd.DataFrame) -> pd.Series:
    return g.loc[g["mean"].idxmax() if g.metric.iloc[0] == ACCURACY else g["mean"].idxmin()]


def _quoted(row) -> str:
    """'0.812 [0.790, 0.830]': the mean and the interval findings compare with."""
    return f"{fmt_metric(row['mean'])} {fmt_interval(row['compare_lo'], row['compare_hi'])}"


def _reference_name(ref) -> str:
    """'full fine-tuning', or 'full fine-tuning, lr=0.0001' where the setup's full runs differ in a key."""
    return "full fine-tuning" + ref.configuration.removeprefix("full")


def _family_sentence(family: pd.DataFrame, ref) -> str:
    word = "dimension" if family.method.iloc[0] == "subspace" else "rank"
    metric = family.metric.iloc[0]
    name = family.family.iloc[0]
    reached = family[[_reaches(row, ref) for _, row in family.iterrows()]]
    if reached.empty:
        best = _best(family)
        return (f"No {word} of {name} reaches the interval of {_reference_name(ref)}: its best, {best['size']}, has "
                f"{metric} {_quoted(best)} vs {_quoted(ref)}.")
    row = reached.iloc[0]
    memory = row.peak_memory_bytes / ref.peak_memory_bytes
    cost = [f"{fmt_percent(row.trainable_share)} of the model's parameters trained"]
    cost += [f"{fmt_percent(memory)} of its peak memory"] if np.isfinite(memory) else []
    return (f"{row.configuration} is the smallest {word} of {name} within the interval of {_reference_name(ref)} "
            f"({metric} {_quoted(row)} vs {_quoted(ref)}), with {' and '.join(cost)}.")


def summary_sentences(table: pd.DataFrame) -> list[tuple[str, str]]:
    """[(setup, sentence)]: per family of configurations with a size (LoRA and each variant per target set, the
    subspace method), the smallest size that reaches full fine-tuning (the best full configuration of the setup),
    or that none does; a setup without full fine-tuning, or whose full fine-tuning has no interval, says so."""
    out = []
    for setup, g in table.groupby("setup", sort=False):
        full = g[g.method == "full"].dropna(subset=["mean"])
        sized = g[g.size_value.notna()].dropna(subset=["mean"])
        metric = g.metric.iloc[0]
        if full.empty:
            best = _best(g.dropna(subset=["mean"])) if g["mean"].notna().any() else None
            out.append((setup, "No full fine-tuning in this setup: no rank is compared with it" + (
                f"; the best configuration is {best.configuration} ({metric} {_quoted(best)})." if best is not None
                else ".")))
            continue
        ref = _best(full)
        if not (np.isfinite(ref.compare_lo) and np.isfinite(ref.compare_hi)):
            out.append((setup, f"{_reference_name(ref).capitalize()} has n={int(ref.n)} and no interval: no rank is "
                               f"compared with it (its {metric} is {fmt_metric(ref['mean'])})."))
            continue
        out += [(setup, _family_sentence(f.sort_values("size_value"), ref)) for _, f in sized.groupby("family",
                                                                                                        sort=False)]
    return out


# ---- the section ---------------------------------------------------------------------------------------------

def display_table(g: pd.DataFrame, with_r90: bool) -> pd.DataFrame:
    """One setup's rows as report.md shows them."""
    metric = g.metric.iloc[0]
    cols = {"configuration": g.configuration, "n seeds": g.n.astype(int), metric: g["mean"].map(fmt_metric),
            "seed interval (95 %)": [interval_text(lo, hi, n) for lo, hi, n in zip(g.seed_lo, g.seed_hi, g.n)]}
    if metric == ACCURACY:
        cols["test-set interval (Wilson 95 %)"] = [fmt_interval(lo, hi) for lo, hi in zip(g.test_lo, g.test_hi)]
    else:
        cols["perplexity"] = g.perplexity.map(fmt_metric)
    cols["trainable parameters (share)"] = [f"{fmt_count(n)} ({fmt_percent(s)})" for n, s in
                                            zip(g.trainable_params, g.trainable_share)]
    if with_r90:
        cols["r90 of ΔW"] = g.r90.map(fmt_r90)
    cols["peak memory"] = g.peak_memory_bytes.map(fmt_gib)
    cols["tokens/s"] = g.tokens_per_second.map(fmt_count)
    return pd.DataFrame(cols)


def summary_lines(table: pd.DataFrame, setups: pd.DataFrame, with_r90: bool = True) -> list[str]:
    """The summary as markdown: per setup its table and its findings as sentences."""
    if table.empty:
        return ["## Summary", "", "No complete runs to summarise.", ""]
    labels = dict(zip(setups.setup, setups.label)) if len(setups) else {}
    sentences = summary_sentences(table)
    lines = ["## Summary", "", "Per setup: the headline metric as the mean over seeds with its intervals, what each "
             "configuration trains and costs" + (", and ΔW's energy rank r90 (mean over matrices and runs)"
                                                 if with_r90 else "") + ". Details in the sections below.", ""]
    for setup, g in table.groupby("setup", sort=False):
        label = labels.get(setup, "")
        lines += [f"### {setup}" + (f" ({label})" if label else ""), "", markdown_table(display_table(g, with_r90)), ""]
        lines += [f"- {s}" for k, s in sentences if k == setup] + [""]
    return lines


# ---- the command ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n")[0])
    p.add_argument("roots", nargs="+", help="directories holding run directories (searched recursively)")
    p.add_argument("--out", type=_path, default=None, help=f"also write OUT/tables/summary.csv and OUT/{SUMMARY_FILE}")
    opts = p.parse_args(argv)
    if why := roots_problem(opts.roots) or no_runs_problem(opts.roots):
        fail(f"argument roots: {why}")
    if opts.out is not None and (why := _out_problem(opts.out)):
        fail(f"argument --out: {why}")
    return opts


def main(argv=None) -> None:
    opts = parse_args(argv)
    runs, setups, skipped, not_pooled = outcome_runs(opts.roots)
    table = summary_table(runs)
    text = "\n".join([f"# Summary of {', '.join(map(str, opts.roots))}", "",
                      f"{len(runs)} runs, {len(skipped)} skipped" + (":" if skipped else "."), ""]
                     + [f"- `{r}`: {why}" for r, why in skipped] + ([""] if skipped else [])
                     + [f"- {line}" for line in not_pooled] + ([""] if not_pooled else [])
                     + summary_lines(table, setups, with_r90=False))
    print(text)
    if opts.out is not None:
        write_csv(table_path(opts.out, "summary"), table)
        write_text(opts.out / SUMMARY_FILE, text + "\n")
        print(f"-> {opts.out / SUMMARY_FILE}", file=sys.stderr)


if __name__ == "__main__":
    main()
