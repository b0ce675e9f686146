"""How long `analysis.report` takes on a shape-only full fine-tuning run, phase by phase, and its peak memory.

    python -m benchmarks.analysis_bench --model llama2_7b_shape --runs-root /local/disk/r --out benchmarks/results
    python -m benchmarks.analysis_bench --model llama_1b_shape --layers 2 --runs-root /tmp/r1 --out /tmp/ab \
        -- --threads 1
    python -m benchmarks.analysis_bench --smoke --out /tmp/ab          # a tiny shape on the CPU, in seconds
    python -m benchmarks.analysis_bench --runs-root /tmp/r1 --code /tmp/old --tag old --out /tmp/ab   # old checkout

1. Builds the run directory with benchmarks.shape_run unless --runs-root holds one already (then it is reused; the
   build is timed apart and not counted).
2. Runs `python -m analysis.report RUNS_ROOT --out OUT/report_TAG [ARGS after --]` as a user would, in a child
   process (from --code, another checkout's report, for before/after comparisons), and takes its peak RSS from
   resource.getrusage(RUSAGE_CHILDREN) once it has ended: the whole process, CUDA context and libraries included.
3. Reads the seconds per phase from the report's timing.json (or, for a checkout that writes none, from the timing
   lines it prints) and judges the totals against TARGETS where the shape is a whole model, on a GPU.
Writes `analysis_{device}_{MODEL}[_TAG].{json,md}` (no MODEL for --smoke) under --out (benchmarks.harness.record).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness.record import Column, collect_metadata, result_name, write_result
from lowrank.errors import fail
from lowrank.rundir.layout import METRICS_FILE

from benchmarks.shape_run import MODELS, write_shape_run

ROOT = Path(__file__).resolve().parent.parent
# The goals on one H200 for a whole model (no --layers, no size overrides): seconds of the report and of its ΔW
# spectra, peak RSS. A CPU run is not judged.
TARGETS = {"llama2_7b_shape": {"total": 120.0, "spectra": 60.0, "peak_rss_gib": 8.0},
           "llama_1b_shape": {"total": 40.0}}
SMOKE = ["model.shape.hidden_size=64", "model.shape.intermediate_size=172", "model.shape.num_hidden_layers=2",
         "model.shape.num_attention_heads=4", "model.shape.num_key_value_heads=2"]


def has_run(runs_root: Path) -> bool:
    return runs_root.is_dir() and any(runs_root.rglob(METRICS_FILE))


def run_report(code: Path, runs_root: Path, out: Path, args: list[str]) -> dict:
    """analysis.report from checkout `code` in a child process: wall seconds, peak RSS (bytes), the timing it
    reports."""
    path = [str(code), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]  # keep the caller's packages
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "analysis.report", str(runs_root), "--out", str(out), *args]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"analysis.report failed ({res.returncode}): {res.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux; the largest child so far
    timing = out / "timing.json"
    if timing.is_file():
        record = json.loads(timing.read_text())
    else:  # an older checkout: its printed `name: N.NN s` lines
        lines = [ln.split(": ", 1) for ln in res.stdout.splitlines() if ": " in ln and ln.rstrip().endswith(" s")]
        record = {"seconds": {k: float(v.split()[0]) for k, v in lines if v.split()[0].replace(".", "").isdigit()}}
    return {"wall_s": wall, "peak_rss_bytes": peak, "report": record, "command": " ".join(cmd), "stdout": res.stdout}


def phase_rows(measured: dict) -> list[dict]:
    rows = [{"phase": k, "seconds": v} for k, v in measured["report"].get("seconds", {}).items()]
    rows.append({"phase": "report process, wall (start-up included)", "seconds": measured["wall_s"]})
    return rows


def judge(model: str, whole: bool, measured: dict) -> list[str]:
    """Lines: each target of TARGETS for this model, met or not (a reduced shape, or a CPU run, has none)."""
    if not whole or model not in TARGETS:
        return ["No target for this shape (reduced: --layers, size overrides or --smoke)."]
    if not str(measured["report"].get("device", "")).startswith("cuda"):
        return [f"Targets ({TARGETS[model]}) are for one H200: a report on {measured['report'].get('device')} is "
                f"not judged."]
    sec = measured["report"].get("seconds", {})
    have = {"total": measured["wall_s"], "spectra": sec.get("spectra"),
            "peak_rss_gib": measured["peak_rss_bytes"] / 2**30}
    return [f"- {k}: {have[k]:.3g} against ≤ {bound:g}: " + ("met" if have[k] is not None and have[k] <= bound else
                                                              "NOT met") for k, bound in TARGETS[model].items()]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    report_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="llama2_7b_shape")
    p.add_argument("--layers", type=int, default=None, help="fewer blocks than the model (a reduced shape)")
    p.add_argument("--runs-root", type=Path, default=None,
                   help="where the run is built, or found (default: a temp dir)")
    p.add_argument("--out", type=Path, required=True, help="the result files and the report's output folder go here")
    p.add_argument("--code", type=Path, default=ROOT,
                   help="the checkout whose analysis.report runs (default: this one)")
    p.add_argument("--tag", default="", help="appended to the result's name (e.g. old, new)")
    p.add_argument("--smoke", action="store_true", help="a tiny llama shape on the CPU, in seconds")
    opts = p.parse_args(argv)
    if opts.layers is not None and opts.layers < 1:
        fail(f"argument --layers: expected an integer ≥ 1, got {opts.layers}")
    if not (opts.code / "analysis" / "report.py").is_file():
        fail(f"argument --code: {str(opts.code)!r} holds no analysis/report.py")
    meta = collect_metadata()  # before anything is written, so our own files do not count as changes
    overrides = list(SMOKE) if opts.smoke else []
    model = "llama_1b_shape" if opts.smoke else opts.model
    if opts.layers:
        overrides.append(f"model.shape.num_hidden_layers={opts.layers}")
    if opts.smoke:
        report_args = report_args or ["--no-figures", "--threads", "1", "--device", "cpu"]
    runs_root = opts.runs_root or Path(tempfile.mkdtemp(prefix="analysis_bench_"))
    build_s = None
    try:
        if not has_run(runs_root):
            t0 = time.perf_counter()
            write_shape_run(model, runs_root, overrides=tuple(overrides), log=lambda line: print(f"build: {line}"))
            build_s = time.perf_counter() - t0
        measured = run_report(opts.code.resolve(), runs_root, opts.out / f"report_{opts.tag or 'run'}", report_args)
    finally:
        if opts.runs_root is None:  # a run we built in a temp dir: gigabytes, gone with the result
            shutil.rmtree(runs_root, ignore_errors=True)
    # named by model: two shapes measured into one folder keep both results
    name = result_name("analysis") + ("" if opts.smoke else f"_{model}") + (f"_{opts.tag}" if opts.tag else "")
    rows = phase_rows(measured)
    rep = measured["report"]
    summary = [f"Peak RSS of the report process: {measured['peak_rss_bytes'] / 2**30:.2f} GiB; device "
               f"{rep.get('device', 'as the report chose')}; {rep.get('matrices', '?')} matrices, "
               f"{rep.get('bytes read', 0) / 1e9:.2f} GB read" + (f" (run built in {build_s:.0f} s, not counted)"
                                                                   if build_s else " (run reused)") + "."]
    if rep.get("counts"):
        found = ", ".join(f"{k}: {v}" for k, v in sorted(rep["counts"].items()))
        summary.append(f"Top singular vectors found by: {found}.")
    summary += judge(model, not overrides, measured)
    settings = dict(model=model, overrides=overrides, runs_root=str(runs_root), code=str(opts.code),
                    report_args=report_args)
    write_result(opts.out, name, rows, settings, meta=meta,
                 title="analysis.report on a shape-only full fine-tuning run", description=f"`{measured['command']}`",
                 columns=[Column("phase", "phase"), Column("seconds", "seconds", ".3g")],
                 sections=["\n\n".join(summary)], details={k: v for k, v in measured.items() if k != "stdout"})
    for r in rows:
        print(f"{r['phase']}: {r['seconds']:.2f} s")
    print("\n".join(summary))
    print(f"-> {opts.out / name}.md")


if __name__ == "__main__":
    main()
