"""Many small runs on one GPU: a sweep one run at a time against several side by side, same runs, same results.

    python -m benchmarks.concurrency_bench --jobs 6 --out benchmarks/results -- method.rank=1,8 seed=0,1
    python -m benchmarks.concurrency_bench --smoke --out /tmp/cc      # two tiny runs on the CPU, in a minute

Each pass is `python -m experiments.demo --sweeps SWEEP --jobs N --no-report` (its runs are `experiments.train`
subprocesses, so N of them share the GPU) into a fresh runs root, timed from start to the last run's end; the record
gives the wall time of both passes, their ratio and, run by run, the test accuracy of each pass and the largest
difference (`benchmarks.harness.record`: commit, command, versions). Overrides after `--` go to every run.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness.record import Column, collect_metadata, result_name, write_result

SMOKE = ["trainer.max_steps=2", "trainer.eval_interval=2", "trainer.batch_size=4", "task.train_size=16",
         "task.eval_size=8", "trainer.max_length=32", "method.rank=1", "method.targets=[query]", "seed=0,1"]


def one_pass(sweep: str, jobs: int, overrides: list[str], root: Path) -> tuple[float, dict[str, dict]]:
    """(wall seconds, {run directory name: metrics}) of one demo-driver pass over the sweep."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "experiments.demo", "--sweeps", sweep, "--jobs", str(jobs),
                    "--runs-root", str(root / "runs"), "--out", str(root / "report"), "--no-report", "logger=none",
                    "trainer.progress_bar=false", *overrides], check=True)
    seconds = time.perf_counter() - t0
    runs = {p.parent.name: json.loads(p.read_text()) for p in (root / "runs").glob("*/*/metrics.json")}
    return seconds, runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", default="rank_sweep", help="an experiment file (conf/experiment/)")
    ap.add_argument("--jobs", type=int, default=6, help="runs side by side in the second pass")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    overrides = (SMOKE + ["trainer.device=cpu"] if args.smoke else []) + args.overrides
    meta = collect_metadata(device)
    with tempfile.TemporaryDirectory() as tmp:
        one_s, one = one_pass(args.sweep, 1, overrides, Path(tmp) / "one")
        many_s, many = one_pass(args.sweep, args.jobs, overrides, Path(tmp) / "many")
    rows = [dict(run=name, one_at_a_time=one[name].get("eval_accuracy"), side_by_side=many[name].get("eval_accuracy"),
                 status=f"{one[name]['status']} / {many[name]['status']}") for name in sorted(one) if name in many]
    diffs = [abs(r["one_at_a_time"] - r["side_by_side"]) for r in rows
             if r["one_at_a_time"] is not None and r["side_by_side"] is not None]
    summary = dict(runs=len(rows), one_at_a_time_s=one_s, side_by_side_s=many_s, jobs=args.jobs,
                   speedup=one_s / many_s, max_accuracy_diff=max(diffs) if diffs else None)
    print(summary, flush=True)
    write_result(Path(args.out), result_name("concurrency", device), rows, dict(sweep=args.sweep, jobs=args.jobs,
                 overrides=overrides), meta=meta,
                 title=f"One run at a time vs {args.jobs} side by side on {meta['device']}",
                 description=(f"`experiments.demo --sweeps {args.sweep}`: {len(rows)} runs, one at a time in "
                              f"{one_s / 60:.2f} min, {args.jobs} side by side in {many_s / 60:.2f} min "
                              f"({summary['speedup']:.2f}× fewer minutes); largest test-accuracy difference "
                              f"between the passes {summary['max_accuracy_diff']}."),
                 columns=[Column("run", "run"), Column("accuracy, one at a time", "one_at_a_time", ".4f"),
                          Column(f"accuracy, {args.jobs} side by side", "side_by_side", ".4f"),
                          Column("status", "status")], details=summary)


if __name__ == "__main__":
    main()
