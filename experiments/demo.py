"""The main command: a small but complete study on the CPU (the demo sweeps), then its report and figures.

    python -m experiments.demo                                   # runs/demo/  ->  reports/demo/report.md
    python -m experiments.demo --runs-root runs --out reports/demo --jobs 2 [hydra overrides for every run]

Each run of the sweeps in conf/experiment/demo_{lora,targets,full,scarce}.yaml is one
`python -m experiments.train -m experiment=demo_X <its grid values> runs_root=...` subprocess: the same run
directory a plain `-m experiment=demo_X` sweep writes, so runs that finished are skipped when the demo is
launched again, and the sweeps' group on W&B is the same. `--jobs` runs go side by side (default: 2 on a machine
with two or more cores, each with cores/jobs threads: small models train faster as two one-thread processes than as one
two-thread process). A run that finished before is counted as done without starting a process. One progress bar
counts training steps over all runs as they train (each run's progress.json, read every second), naming the runs
in flight with their steps/s and ETA; then `analysis.report` writes the tables, figures and report (or, where its
run directories and their metrics are those it was built from, `--out/.inputs.json`, keeps it), and the last line
names the report.
"""
import argparse
import contextlib
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from tqdm.auto import tqdm

from analysis.report import main as report_main
from analysis.runs import find_run_dirs
from analysis.tables import REPORT_FILE
from lowrank.rundir import layout as rundir
from lowrank.rundir.atomic import write_json
from lowrank.rundir.progress import read_progress
from lowrank.cli import (check_group_overrides, check_locations, check_value_overrides, compose, compose_first_job,
                         group_options, parse, sweep_axes)
from lowrank.errors import ConfigError, fail
from lowrank.config import validate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = ["demo_full", "demo_scarce", "demo_lora", "demo_targets"]  # full fine-tuning first: the longest runs
POLL_SECONDS = 1.0  # how often the bar reads the progress records of the runs in flight
REPORT_INPUTS_FILE = ".inputs.json"  # in --out: what the report there was built from


def sweep_jobs(experiment: str, overrides: list[str] = ()) -> list[list[str]]:
    """The overrides of every job `python -m experiments.train -m experiment=EXPERIMENT OVERRIDES` launches: the
    experiment's `hydra.sweeper.params` grid (command-line values replace a key's list, as in Hydra), expanded as
    the basic sweeper does, one list of `key=value` per job, each starting with `experiment=EXPERIMENT`."""
    arguments = [f"experiment={experiment}", *overrides]
    fixed = [o.input_line for o in parse(arguments) if not o.is_sweep_override()]
    params = compose(fixed, hydra_config=True).hydra.sweeper.params or {}
    axes = sweep_axes(arguments, params)
    return [[o.input_line for o in job] for job in itertools.product(*axes.values())]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


class Progress:
    """One bar over the training steps of every run: a run that ended counts all its steps, a run in flight the steps
    its progress.json says it has done (`poll`, every POLL_SECONDS while `watch`ing); the runs in flight are named
    with their steps/s and ETA. `clock` is the trainer's (unix time): a record written before its run was started
    here is a previous launch's, not counted."""

    def __init__(self, total: int, clock=time.time):
        self.bar = tqdm(total=total, desc="demo: training", unit="step", dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]{postfix}")
        self.lock = threading.Lock()
        self.clock = clock
        self.done = 0            # steps of the runs that ended
        self.in_flight = {}      # run_dir -> (name, when it was started)

    def started(self, run_dir: Path, name: str) -> None:
        with self.lock:
            self.in_flight[run_dir] = (name, self.clock())

    def ended(self, run_dir: Path, steps: int) -> None:
        with self.lock:
            self.in_flight.pop(run_dir, None)
            self.done += steps
        self.poll()

    def poll(self) -> None:
        """Read the progress records of the runs in flight and show them."""
        with self.lock:
            records = {}
            for run_dir, (name, started) in self.in_flight.items():
                record = read_progress(run_dir)
                if record is not None and record["updated"] >= started:
                    records[name] = record
            steps = self.done + sum(min(r["step"], r["max_steps"]) for r in records.values())
            self.bar.update(max(0, min(steps, self.bar.total) - self.bar.n))  # never backwards
            self.bar.set_postfix_str(self._describe(records), refresh=True)

    def _describe(self, records: dict) -> str:
        """The runs in flight (step/steps, steps/s, ETA) and the whole demo's ETA at their summed speed."""
        parts, rate = [], 0.0
        for name, r in records.items():
            speed, eta = r.get("steps_per_second"), r.get("eta_seconds")
            parts.append(f"{name} {r['step']}/{r['max_steps']}"
                         + (f" {speed:.2f} step/s, ETA {_duration(eta)}" if speed else ""))
            rate += speed or 0.0
        if rate:
            parts.append(f"all: ETA {_duration((self.bar.total - self.bar.n) / rate)}")
        return "; ".join(parts)

    @contextlib.contextmanager
    def watch(self, every: float = POLL_SECONDS):
        """Poll every `every` seconds in a thread while the block runs."""
        stop = threading.Event()

        def loop():
            while not stop.wait(every):
                self.poll()
        thread = threading.Thread(target=loop, name="demo-progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def write(self, line: str) -> None:
        with self.lock:
            self.bar.write(line)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def run_dir_of(job: list[str]) -> Path:
    """The run directory `python -m experiments.train -m JOB` uses (Hydra's sweep dir and subdir, resolved)."""
    cfg = compose(job, hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


def outcome(metrics: dict | None, before: dict | None) -> str:
    """One line on how a run ended, from its metrics.json (and whether it had ended before this launch)."""
    if metrics is None:
        return "no metrics.json"
    if before is not None and before.get("status") in rundir.FINAL_STATUSES and before == metrics:
        return f"finished before ({metrics['status']}): skipped"
    if metrics["status"] == rundir.COMPLETE:
        quality = next((f"{k} {metrics[k]:.3f}" for k in ("eval_accuracy", "eval_loss") if k in metrics), "")
        return f"{quality}, {metrics['wall_seconds']:.0f} s"
    return f"{metrics['status']}" + (f": {metrics['reason']}" if metrics.get("reason") else "")


def finished_before(run_dir: Path, config_hash: str) -> dict | None:
    """The metrics of a run of this config (its hash) that reached a final status: the trainer would skip it, so
    no process is started for it. Anything else (unfinished, damaged, another config's) goes to the trainer."""
    metrics = rundir.finished_metrics(run_dir)
    return metrics if metrics is not None and metrics.get("config_hash") == config_hash else None


def run_job(job: list[str], name: str, run_dir: Path, steps: int, log_path: Path, env: dict,
            progress: Progress) -> bool:
    """One training run as a subprocess, its output in log_path; how it ended comes from its exit code and its
    metrics.json. True if it ended well."""
    cmd = [sys.executable, "-m", "experiments.train", "-m", *job]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    before = rundir.read_metrics(run_dir)
    t0 = time.perf_counter()
    progress.started(run_dir, name)
    with open(log_path, "wb") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    progress.ended(run_dir, steps)
    result = outcome(rundir.read_metrics(run_dir), before)
    if code != 0:
        progress.write(f"FAILED ({code}) {name}: {result}; see {log_path}")
        return False
    progress.write(f"{name}: {result} [{time.perf_counter() - t0:.0f} s]")
    return True


def report_inputs(roots: list[Path]) -> dict:
    """What a report is built from: each run directory below the roots with its metrics.json content hash (a hash of
    the file's bytes where it has none, None where there is no file), and the analysis code that reads them."""
    runs = {str(run_dir): _metrics_digest(run_dir) for _, run_dir in find_run_dirs(roots)}
    code = hashlib.sha256()
    for path in sorted((ROOT / "analysis").rglob("*.py")):
        code.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return {"roots": [str(r) for r in roots], "runs": runs, "analysis_sha256": code.hexdigest()}


def _metrics_digest(run_dir: Path) -> str | None:
    try:
        data = (run_dir / rundir.METRICS_FILE).read_bytes()
    except OSError:
        return None
    try:
        digest = json.loads(data).get(rundir.METRICS_DIGEST_KEY)
    except (ValueError, AttributeError):
        digest = None
    return digest if isinstance(digest, str) else hashlib.sha256(data).hexdigest()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def report(roots: list[Path], out: Path) -> None:
    """analysis.report over the study's roots into `out`, unless the report there was built from exactly these
    inputs (`out/.inputs.json`, written after each build): then it is kept, with one line saying so."""
    inputs = report_inputs(roots) if all(r.is_dir() for r in roots) else None
    stamp = out / REPORT_INPUTS_FILE
    if inputs is not None and (out / REPORT_FILE).is_file() and _read_json(stamp) == inputs:
        print(f"report: up to date (built from the same {len(inputs['runs'])} run directories and metrics); "
              f"not rebuilt")
        return
    stamp.unlink(missing_ok=True)  # a build stopped half-way is never taken for up to date
    report_main([*map(str, roots), "--out", str(out)])
    if inputs is not None:
        write_json(stamp, inputs)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad option as one `error: ...` line (its own usage + error is two)."""

    def error(self, message: str):
        fail(f"{message} (see --help)")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs-root", default="runs", help="runs go to RUNS_ROOT/demo/ (default: runs)")
    p.add_argument("--out", default="reports/demo", help="report, tables and figures (default: reports/demo)")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p.add_argument("--jobs", type=int, default=min(2, cpus), help="runs side by side (default: min(2, cores))")
    p.add_argument("--sweeps", default=",".join(SWEEPS), help=f"experiment files to run (default: {','.join(SWEEPS)})")
    p.add_argument("--no-report", action="store_true", help="train only: leave out analysis.report")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.device=cuda")
    opts = p.parse_args(argv)
    opts.threads = max(1, cpus // max(1, opts.jobs))
    return opts


def check_inputs(opts) -> list:
    """Every job's config, each checked as `experiments.train` checks one, before anything runs: one line
    naming the bad option, override or value, and exit 2."""
    if opts.jobs < 1:
        fail(f"--jobs={opts.jobs} is not valid; it must be an integer >= 1")
    for flag, path in (("--out", Path(opts.out)), ("--runs-root", Path(opts.runs_root))):
        existing = next((q for q in (path, *path.parents) if q.exists()), None)
        if existing is not None and not existing.is_dir():
            fail(f"{flag}={opts.out if flag == '--out' else opts.runs_root} is not valid; {existing} is a file, "
                 f"not a folder")
    sweeps = opts.sweeps.split(",")
    known = group_options("experiment")
    for sweep in sweeps:
        if sweep not in known:
            fail(f"--sweeps: {sweep!r} is not an experiment file; choose from {known}")
    for arg in opts.overrides:
        if "=" not in arg:
            fail(f"{arg!r} is not an override; write key=value (e.g. trainer.max_steps=20)")
    common = [f"runs_root={Path(opts.runs_root).resolve()}", *opts.overrides]
    check_group_overrides(common)
    check_value_overrides(common, compose_first_job([f"experiment={sweeps[0]}", *common], multirun=True))
    jobs = [job for sweep in sweeps for job in sweep_jobs(sweep, common)]
    configs = [compose(job) for job in jobs]
    check_locations(common, configs[0])
    for job, cfg in zip(jobs, configs):
        try:
            validate(cfg)
        except ConfigError as e:
            fail(f"{e} (in {' '.join(job)})")
    return list(zip(jobs, configs))


def main(argv=None) -> int:
    opts = parse_args(argv)
    t0 = time.perf_counter()
    runs_root, out = Path(opts.runs_root).resolve(), Path(opts.out).resolve()
    common = [f"runs_root={runs_root}", *opts.overrides]
    common_keys = {_key(a) for a in common}
    jobs, configs = map(list, zip(*check_inputs(opts)))
    study = {c.name for c in configs}
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.setdefault("OMP_NUM_THREADS", str(opts.threads))
    print(f"demo: {len(jobs)} runs ({opts.sweeps}) into {runs_root}/{','.join(sorted(study))}, {opts.jobs} at a "
          f"time with {env['OMP_NUM_THREADS']} thread(s) each; logs in {out}/logs/")
    progress = Progress(sum(c.trainer.max_steps for c in configs))

    run_dirs = [run_dir_of(job) for job in jobs]  # here, not in the threads: Hydra's config is process-wide
    before = [finished_before(d, rundir.config_hash(OmegaConf.to_container(c, resolve=True)))
              for d, c in zip(run_dirs, configs)]

    def one(job_cfg_dir_before):
        job, cfg, run_dir, done = job_cfg_dir_before
        experiment = next(a for a in job if a.startswith("experiment=")).split("=", 1)[1]
        own = ",".join(a for a in job if _key(a) not in common_keys | {"experiment"})  # the grid values
        if done is not None:  # what the trainer would skip: no interpreter started for it
            progress.ended(run_dir, cfg.trainer.max_steps)
            progress.write(f"{experiment} {own}: {outcome(done, done)}")
            return True
        log = out / "logs" / experiment / (re.sub(r"[^\w=.,+-]", "_", own or "defaults") + ".log")
        return run_job(job, f"{experiment} {own}", run_dir, cfg.trainer.max_steps, log, env, progress)

    with progress.watch(), ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
        ok = list(pool.map(one, zip(jobs, configs, run_dirs, before)))
    progress.bar.close()
    t_train = time.perf_counter() - t0
    skipped = sum(b is not None for b in before)
    print(f"training: {sum(ok)}/{len(ok)} runs ended well ({skipped} finished before: skipped) in "
          f"{t_train / 60:.1f} min")

    if not opts.no_report:
        report([runs_root / s for s in sorted(study)], out)
    print(f"demo finished in {(time.perf_counter() - t0) / 60:.1f} min")
    if not opts.no_report:
        print(f"report: {out / REPORT_FILE}")
    return 0 if all(ok) else 1

if __name__ == "__main__":
    sys.exit(main())
