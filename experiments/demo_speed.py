"""CPU demo speed, side by side in one run: the same sweep one run at a time (all cores to one run), as the
demo runs it (runs side by side, one thread each), and that plus bf16 autocast.

    python -m experiments.demo_speed --out benchmarks/results            # demo_targets: 2 runs per variant

Each variant is `python -m experiments.demo --sweeps SWEEP` into its own fresh runs root; the time is the whole
command (start-up, training, evaluation, the report). Writes demo_speed_cpu.{json,md} under --out.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [  # (name, demo arguments)
    ("one run at a time", ["--jobs", "1"]),
    ("side by side, --jobs 2 (the demo's default on 2 cores: 1 thread each)", ["--jobs", "2"]),
    ("side by side + trainer.precision=bf16", ["--jobs", "2", "trainer.precision=bf16"]),
]


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    bf16 = [f for f in flags if "bf16" in f]
    return f"{name or platform.machine()} ({', '.join(bf16) or 'no bf16 instructions'})"


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
    meta = dict(machine=f"{cpu_name()}, {os.cpu_count()} cores",
                torch=torch.__version__, python=platform.python_version(), sweep=args.sweep,
                command="python -m experiments.demo_speed " + " ".join(sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_speed_cpu.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    lines = [f"# CPU demo speed ({meta['sweep']})", "", f"Command: `{meta['command']}`  ",
             f"{meta['machine']}, torch {meta['torch']}, Python {meta['python']}.", "",
             "| variant | demo arguments | seconds | speed-up | eval accuracy per run |", "|---|---|---|---|---|"]
    for r in rows:
        acc = ", ".join(f"{v:.4f}" for v in r["eval_accuracy"].values())
        lines.append(f"| {r['variant']} | `{r['args']}` | {r['seconds']:.0f} | {r['speedup']:.2f}× | {acc} |")
    (out / "demo_speed_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
