"""How much of ΔW does a fine-tune need? Each run's model is evaluated with its target matrices at W0 + ΔW_r, ΔW kept to
its top-r singular directions, on the run's own evaluation.

    python -m analysis.truncate RUNS... --ranks 1,2,4,8,16,32,64 --out DIR

For every complete run with a ΔW (full fine-tuning, DoRA, ReLoRA, subspace, LoRA) whose task can be evaluated here,
the points are: W0 alone (kind `w0`, r = 0), each r of the grid (`truncated`; r ≥ a matrix's rank keeps its whole
ΔW), each matrix kept to the rank holding a share of its ‖ΔW‖_F² (`energy`, --shares), a random rank-r projection
of ΔW (`random`, the baseline: ΔW Q Qᵀ, Q a seeded random subspace of the input space; lowrank.linalg.truncation)
and the whole ΔW (`full`). Only the targets change: every other tensor the fine-tune trained (its trained.safetensors
or head) stays as trained, and each row says how many there were. One SVD per matrix, streamed; each point is then a
product of kept factors. The model and data come from lowrank.data.rebuild: this is the one analysis module that
evaluates models. Runs that cannot be rebuilt (written before trained.safetensors, imported without a task) are
listed as skipped with one line each.

Writes DIR/tables/truncation.csv (one row per run × point), DIR/tables/functional_rank.csv (analysis.functional_rank:
r_f90 per run and per setup), DIR/figures/truncation.{png,pdf} and DIR/truncation.md. `python -m analysis.report
RUNS --out DIR` afterwards shows the functional-rank table in report.md.
"""
import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open

from lowrank.data.rebuild import RebuiltModel
from lowrank.errors import ConfigError, fail
from lowrank.linalg.spectra import energy_rank
from lowrank.linalg.truncation import TopSingular, projection_seed, random_projection
from lowrank.rundir.atomic import write_text
from lowrank.rundir.integrity import CorruptArtifact, verify_safetensors
from lowrank.rundir.layout import trained_file

from analysis.checked_reads import SkippedRun
from analysis.functional_rank import FUNCTIONAL_RANK_TABLE, functional_rank_table
from analysis.report_cli import _Parser, _device, _int_at_least, _int_list, _out_problem, _path, no_runs_problem
from analysis.runs import LowRank, Run, collect_runs, config_keys, roots_problem
from analysis.provenance import add_setups
from analysis.tables import FIGURES_DIR, markdown_table, table_path, write_csv

TRUNCATION_TABLE, TRUNCATION_REPORT = "truncation", "truncation.md"
KINDS = ("w0", "truncated", "energy", "random", "full")


def _shares(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated shares of ‖ΔW‖_F² in (0, 1] such as "
                                         f"0.5,0.9,0.99, got {text!r}")
    return values


def parse_args(argv=None):
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="+", help="directories holding run directories (searched recursively), or runs")
    p.add_argument("--out", required=True, type=_path, help="output directory (tables/, figures/, truncation.md)")
    p.add_argument("--ranks", type=_int_list, default=[1, 2, 4, 8, 16, 32, 64], help="the uniform ranks r")
    p.add_argument("--shares", type=_shares, default=[0.5, 0.9, 0.99], help="energy shares each matrix keeps")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-projection baseline")
    p.add_argument("--methods", type=lambda t: t.split(","), default=None,
                   help="truncate only runs of these methods, e.g. full (default: every run with a ΔW); the others "
                        "still count, by their metrics, as trained at their rank")
    p.add_argument("--eval-batch-size", type=_int_at_least(1), default=None,
                   help="examples per evaluation batch (default: the run's trainer.eval_batch_size)")
    p.add_argument("--device", type=_device, default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="tables and truncation.md only")
    p.add_argument("--redraw", action="store_true",
                   help="evaluate nothing: the tables, figure and truncation.md again from OUT/tables/truncation.csv")
    p.add_argument("--threads", type=_int_at_least(1), default=None, help="CPU threads for torch")
    opts = p.parse_args(argv)
    if why := roots_problem(opts.roots) or no_runs_problem(opts.roots):
        fail(f"argument roots: {why}")
    if why := _out_problem(opts.out):
        fail(f"argument --out: {why}")
    opts.out.mkdir(parents=True, exist_ok=True)
    opts.ranks = sorted(set(opts.ranks))
    if opts.threads:
        torch.set_num_threads(opts.threads)
    return opts


def trained_tensors(run: Run, required: bool = True) -> dict[str, torch.Tensor]:
    """The run's other trained tensors (trained.safetensors, or head.safetensors of older runs), checked against their
    hashes; {} where it trained none. `required`: SkippedRun when the run did not keep them (a rebuild needs them);
    else {} (a LoRA export carries whatever head there is)."""
    path, why_not = trained_file(run.path, run.metrics)
    if why_not and required:
        raise SkippedRun(why_not)
    if path is None or not path.exists():
        return {}
    try:
        keys, _ = verify_safetensors(path)
    except CorruptArtifact as e:
        raise SkippedRun(str(e)) from None
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in keys}


def check_evaluable(run: Run) -> None:
    if run.config.get("imported") or run.config.get("task", {}).get("name") == "imported":
        raise SkippedRun("imported (experiments.import_delta): it names no task to evaluate on")
    if run.config.get("model", {}).get("shape") or run.config.get("task", {}).get("loader") == "synthetic":
        raise SkippedRun("a shape model or synthetic data: no pretrained W0 or real evaluation to score")


class Spectra:
    """Per target matrix: W0, its top singular triplets (enough for the grid and the energy shares) and the random
    baseline's factors per r, read one matrix at a time."""

    def __init__(self, run: Run, ranks: list[int], shares: list[float], seed: int, device):
        self.run, self.w0, self.top, self.random, self.energy = run, {}, {}, {}, {}
        for name in run.names:
            delta = run.delta(name)
            dense = delta.dense() if isinstance(delta, LowRank) else delta
            top = TopSingular.of_factors(*delta) if isinstance(delta, LowRank) else TopSingular.of_dense(dense, device)
            q = top.max_rank
            self.energy[name] = {s: energy_rank(top.S, s) for s in shares}
            keep = max([r for r in ranks if r < q] + [k for k in self.energy[name].values() if k < q] + [0])
            self.top[name] = top.kept(keep)  # r ≥ q reads the whole ΔW again
            self.random[name] = {r: random_projection(dense, r, projection_seed(seed, name, r))
                                 for r in ranks if r < dense.shape[1]}
            self.w0[name] = run.base_weight(name)

    def whole(self, name: str) -> torch.Tensor:
        d = self.run.delta(name)
        return d.dense() if isinstance(d, LowRank) else d

    def point(self, kind: str, value) -> tuple[dict[str, torch.Tensor], float, float]:
        """({name: W0 + ΔW'}, the share of Σ‖ΔW‖_F² kept, the mean rank kept) of one point."""
        weights, kept, total, ranks = {}, 0.0, 0.0, []
        for name, top in self.top.items():
            energy = (top.S.double() ** 2).sum().item()
            r = {"w0": 0, "full": top.max_rank, "truncated": value, "random": value}.get(kind)
            if kind == "energy":
                r = self.energy[name][value]
            if kind == "random" and value in self.random[name]:
                dw_q, Q = self.random[name][value]
                delta, share = (dw_q @ Q.mT).float(), (dw_q ** 2).sum().item() / energy if energy else 1.0
                r = min(value, top.max_rank)
            elif r == 0:
                delta, share = None, 0.0
            elif r >= top.max_rank:
                delta, share, r = self.whole(name), 1.0, top.max_rank
            else:
                delta, share = top.truncated(r), top.energy_share(r)
            weights[name] = self.w0[name] if delta is None else self.w0[name] + delta
            kept, total, ranks = kept + share * energy, total + energy, ranks + [r]
        return weights, (kept / total if total else 1.0), sum(ranks) / len(ranks)

    def spectral_r90(self) -> float:
        """The mean over the targets of the rank holding 90 % of ‖ΔW‖_F²."""
        return sum(energy_rank(top.S, 0.9) for top in self.top.values()) / len(self.top)


def points(ranks: list[int], shares: list[float]) -> list[tuple[str, object]]:
    return ([("w0", 0)] + [("truncated", r) for r in ranks] + [("energy", s) for s in shares]
            + [("random", r) for r in ranks] + [("full", None)])


def truncate_run(run: Run, opts) -> list[dict]:
    """Every point's evaluation of one run (SkippedRun where it cannot be rebuilt)."""
    check_evaluable(run)
    trained = trained_tensors(run)
    spectra = Spectra(run, opts.ranks, opts.shares, opts.seed, opts.device)
    try:
        model = RebuiltModel(run.config, trained, opts.device, opts.eval_batch_size)
    except ConfigError as e:
        raise SkippedRun(str(e)) from None
    rows = []
    for kind, value in points(opts.ranks, opts.shares):
        weights, share, mean_rank = spectra.point(kind, value)
        model.set_targets(weights)
        scores = model.evaluate()
        rows.append({"run": run.run_id, "kind": kind, "r": value if kind in ("w0", "truncated", "random") else None,
                     "share": value if kind == "energy" else None, "energy_kept": share, "mean_rank": mean_rank,
                     "spectral_r90": spectra.spectral_r90(), "others_as_trained": len(trained), **scores})
        print(f"truncate: {run.run_id} {kind} {value if value is not None else ''}: "
              + ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if k != "examples"), file=sys.stderr, flush=True)
    return rows


def run_truncation(opts) -> dict:
    t0 = time.perf_counter()
    runs, table, skipped = collect_runs(opts.roots)
    rows = []
    for run in ([] if opts.redraw else runs):
        if opts.methods and run.method not in opts.methods:
            continue
        try:
            rows += truncate_run(run, opts)
        except SkippedRun as e:
            skipped.append((run.run_id, str(e)))
            print(f"truncate: skipped {run.run_id}: {e}", file=sys.stderr, flush=True)
    # the report's setups: runs whose model or data digests differ are apart here too
    table = add_setups(table, {k for r in runs for k in config_keys(r)})[0] if runs else table
    truncation = pd.DataFrame(rows)
    if opts.redraw:  # the points evaluated before, without their setup columns (recomputed below from the runs)
        if not table_path(opts.out, TRUNCATION_TABLE).is_file():
            fail(f"--redraw: {table_path(opts.out, TRUNCATION_TABLE)} does not exist; run without --redraw first")
        truncation = pd.read_csv(table_path(opts.out, TRUNCATION_TABLE)).drop(columns=["setup", "variant"],
                                                                              errors="ignore")
    if not truncation.empty:
        setup_of = dict(zip(table.run_id, table.setup))
        variant_of = dict(zip(table.run_id, table.variant))
        truncation.insert(1, "setup", truncation.run.map(setup_of))
        truncation.insert(2, "variant", truncation.run.map(variant_of))
    functional = functional_rank_table(truncation, table)
    write_csv(table_path(opts.out, TRUNCATION_TABLE), truncation)
    write_csv(table_path(opts.out, FUNCTIONAL_RANK_TABLE), functional)
    figure = None
    if opts.figures and not truncation.empty:
        from analysis.figures.truncation import figure_truncation  # matplotlib stays lazy
        figure = figure_truncation(truncation, functional, table, opts.out / FIGURES_DIR)
    write_text(opts.out / TRUNCATION_REPORT, summary(truncation, functional, skipped, figure, time.perf_counter() - t0))
    return {"truncation": truncation, "functional_rank": functional, "skipped": skipped}


def summary(truncation: pd.DataFrame, functional: pd.DataFrame, skipped, figure, seconds: float) -> str:
    lines = ["# Functional rank: how much of ΔW the fine-tune needs", ""]
    if not truncation.empty:
        metric = ", ".join(sorted(set(functional.metric)))
        lines += [f"{truncation.run.nunique()} runs evaluated at {len(truncation) // truncation.run.nunique()} points "
                  f"each (metric: {metric}) in {seconds:.0f} s. Only the targeted matrices were truncated; every other "
                  f"trained tensor stayed as trained (column others_as_trained: how many).", ""]
        lines += ["## Functional rank (tables/functional_rank.csv)", "", markdown_table(functional), ""]
    if figure:
        lines += [f"![truncation]({Path(figure).relative_to(Path(figure).parent.parent).as_posix()})", ""]
    if skipped:
        lines += [f"## Skipped ({len(skipped)})", ""] + [f"- {run}: {why}" for run, why in skipped] + [""]
    return "\n".join(lines)


def main(argv=None) -> None:
    opts = parse_args(argv)
    result = run_truncation(opts)
    print(f"truncation: {result['truncation'].run.nunique() if not result['truncation'].empty else 0} runs, "
          f"{len(result['skipped'])} skipped -> {opts.out / TRUNCATION_REPORT}")


if __name__ == "__main__":
    main()
