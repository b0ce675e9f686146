"""The demo follows its runs as they train (progress.json read by `Progress.poll`), starts no process for a run that
finished before, and keeps a report built from the same run directories and metrics."""
import subprocess
import threading

import pytest
from omegaconf import OmegaConf

import experiments.demo as demo
from lowrank.rundir import layout as rundir
from lowrank.rundir.progress import ProgressRecord
from tests.conftest import ROOT, outside_hydra
from tests.unit.experiments.test_experiments import TINY_RUN


class FakeClock:
    def __init__(self, t: float = 5000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_bar_counts_the_steps_a_run_in_flight_has_done(tmp_path):
    clock = FakeClock()
    lora, full, stale = tmp_path / "lora", tmp_path / "full", tmp_path / "stale"
    ProgressRecord(stale, 10, clock=FakeClock(clock.t - 60)).step_done(7)  # a previous launch's record
    progress = demo.Progress(total=30, clock=clock)
    for run_dir, name in ((lora, "demo_lora method.rank=1"), (stale, "demo_lora method.rank=8")):
        progress.started(run_dir, name)
    progress.poll()
    assert progress.bar.n == 0                                   # nothing trained yet; the stale record not counted
    clock.t += 20.0                                              # the run's first step, 20 s after it was started
    record = ProgressRecord(lora, 10, clock=clock)               # as the trainer writes it
    record.step_done(1)
    progress.poll()                                              # what the watcher does every POLL_SECONDS
    assert progress.bar.n == 1 and "demo_lora method.rank=1 1/10" in progress.bar.postfix
    for step in range(2, 7):                                     # 1 step/s
        clock.t += 1.0
        record.step_done(step)
    progress.poll()
    assert progress.bar.n == 6
    assert "1/10" not in progress.bar.postfix and "6/10 1.00 step/s, ETA 0:04" in progress.bar.postfix
    assert "all: ETA 0:24" in progress.bar.postfix              # 24 steps left of 30, at 1 step/s in all
    progress.ended(lora, 10)                                     # a run that ends counts all its steps
    progress.started(full, "demo_full seed=0")
    assert progress.bar.n == 10 and "demo_lora method.rank=1" not in progress.bar.postfix
    progress.bar.close()


def test_the_watcher_polls_until_the_block_ends():
    progress = demo.Progress(total=1)
    polled = threading.Event()
    progress.poll = polled.set
    with progress.watch(every=0.01):
        assert polled.wait(timeout=30)   # a poll happens (on a loaded machine, well within the bar's 30 s promise)
    progress.bar.close()


@pytest.fixture
def finished_study(tmp_path, monkeypatch):
    """The demo_scarce sweep shrunk, with both run directories already finished; no training process may start
    and the report is a counted stand-in that writes report.md."""
    monkeypatch.chdir(ROOT)
    argv = ["--runs-root", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--sweeps", "demo_scarce",
            *TINY_RUN]
    run_dirs = {}  # run directory -> its resolved config
    for job, cfg in demo.check_inputs(demo.parse_args(argv)):
        run_dirs[demo.run_dir_of(job)] = OmegaConf.to_container(cfg, resolve=True)
    for run_dir, config in run_dirs.items():
        rundir.write_metrics(run_dir, {"status": "complete", "eval_accuracy": 0.75, "wall_seconds": 3.0}, config)
    outside_hydra()

    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started for a finished run: {args}")
    monkeypatch.setattr(subprocess, "run", no_process)
    built = []

    def report_main(args):
        built.append(args)
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / "report.md").write_text("# report\n")
    monkeypatch.setattr(demo, "report_main", report_main)
    return argv, run_dirs, built


def test_finished_runs_are_skipped_without_starting_a_process(finished_study, capsys):
    argv, run_dirs, _ = finished_study
    assert demo.main([*argv, "--no-report"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished before (complete): skipped") == 2
    assert "training: 2/2 runs ended well (2 finished before: skipped)" in out
    run_dir, config = next(iter(run_dirs.items()))  # a directory holding another config's run: the trainer's to refuse
    assert demo.finished_before(run_dir, rundir.config_hash(config)) is not None
    assert demo.finished_before(run_dir, "0123456789") is None


def test_an_up_to_date_report_is_kept_and_a_changed_run_rebuilds_it(finished_study, capsys):
    argv, run_dirs, built = finished_study
    assert demo.main(argv) == 0 and len(built) == 1                          # first launch: built
    assert (ROOT / argv[3] / demo.REPORT_INPUTS_FILE).is_file()
    capsys.readouterr()
    assert demo.main(argv) == 0 and len(built) == 1                          # same runs, same metrics: kept
    lines = capsys.readouterr().out.strip().splitlines()
    assert "report: up to date (built from the same 2 run directories and metrics); not rebuilt" in lines
    assert lines[-1] == f"report: {argv[3]}/report.md"
    run_dir, config = next(iter(run_dirs.items()))
    rundir.write_metrics(run_dir, {"status": "complete", "eval_accuracy": 0.8, "wall_seconds": 3.0}, config)
    assert demo.main(argv) == 0 and len(built) == 2                          # a changed run: rebuilt
