"""CPU demo speed, side by side in one run: the same sweep one run at a time (all cores to one run), as the
demo runs it (runs side by side, one thread each), and that plus bf16 autocast.

    python -m benchmarks.demo_speed --out benchmarks/results            # demo_targets: 2 runs per variant

Each variant is `python -m experiments.demo --sweeps SWEEP` into its own fresh runs root; the time is the whole
command (start-up, training, evaluation, the report). Writes demo_speed_cpu.{json,md} under --out
(benchmarks.harness.record).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness.record import Column, collect_metadata, result_name, write_result

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [  # (name, demo arguments)
    ("one run at a time", ["--jobs", "1"]),
    ("side by side, --jobs 2 (the demo's default on 2 cores: 1 thread each)", ["--jobs", "2"]),
    ("side by side + trainer.precision=bf16", ["--jobs", "2", "trainer.precision=bf16"]),
]


def accuracies(runs_root: Path) -> dict:
    out = {}
    for m in sorted(runs_root.rglob("metrics.json")):
        metrics = json.loads(m.read_text())
        out[str(m.parent.relative_to(runs_root))] = metrics.get("eval_accuracy")
    return out


def main():
    ap = argparse.ArgumentParser(description="CPU demo speed: one run at a time, side by side, side by side + bf16")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--sweep", default="demo_targets")
    args = ap.parse_args()
    meta = collect_metadata("cpu")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the demo sets threads per job
    rows = []
    for name, extra in VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "experiments.demo", "--sweeps", args.sweep, "--runs-root", f"{tmp}/runs",
                   "--out", f"{tmp}/report", *extra, "logger=none"]
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = time.perf_counter() - t0
            rows.append(dict(variant=name, args=" ".join(extra), seconds=seconds,
                             eval_accuracy=accuracies(Path(tmp) / "runs")))
        print(f"{name}: {seconds:.0f} s {rows[-1]['eval_accuracy']}", flush=True)
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup"] = base / r["seconds"]
    columns = [Column("variant", "variant"), Column("demo arguments", lambda r: f"`{r['args']}`"),
               Column("seconds", "seconds", ".0f"), Column("speed-up", "speedup", ".2f", "×"),
               Column("eval accuracy per run", lambda r: ", ".join(f"{v:.4f}" for v in r["eval_accuracy"].values()))]
    _, md = write_result(args.out, result_name("demo_speed", "cpu"), rows, dict(sweep=args.sweep, variants=VARIANTS),
                         meta=meta, title=f"CPU demo speed ({args.sweep})", columns=columns)
    print(md.read_text())


if __name__ == "__main__":
    main()
