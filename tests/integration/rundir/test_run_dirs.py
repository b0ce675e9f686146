"""Run directories through real runs and processes: never shared by two configs, never rewritten once finished, and
worked in by one process at a time; files left by killed writers are cleaned."""
import os

import pytest

from lowrank.rundir import layout as rundir
from lowrank.errors import ConfigError
from tests.cli_batch import run_cli_batch
from tests.conftest import TINY


# The name `seed=1 *TINY` had when a label held every full key, unshortened
OLD_NAME = ("seed=1,task.eval_size=32,task.train_size=64,trainer.batch_size=8,trainer.eval_interval=3,"
            "trainer.max_length=64,trainer.max_steps=3")


def finished_files(run):
    """Every file of a run directory, its bytes and mtime, but the lock (taken by every launch, and that is all)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*")
            if p.is_file() and p.name != rundir.LOCK_FILE}


@pytest.fixture(scope="module")
def launched_again(tmp_path_factory):
    """Two tiny runs launched as processes side by side, each in a runs root F of its own, then launched again, side by
    side: `rerun` once finished (as a multirun, the lr spelled another way), `locked` while this process holds its
    run's lock, its metrics.json removed as if it were still running. Each a process forked from one tests.cli_batch
    process per stage: {case: (F, first result, its run dir, its files before the second launch, second result)}."""
    roots = {case: tmp_path_factory.mktemp(case) for case in ("rerun", "locked", "old_name")}
    first_args = {"rerun": ["-m", "experiments.train", "trainer.lr=1e-3", *TINY, f"runs_root={roots['rerun']}"],
                  "locked": ["-m", "experiments.train", *TINY, f"runs_root={roots['locked']}"],
                  "old_name": ["-m", "experiments.train", "seed=1", *TINY, f"runs_root={roots['old_name']}"]}
    second_args = {"rerun": ["-m", "experiments.train", "-m", "trainer.lr=0.001", *TINY, f"runs_root={roots['rerun']}"],
                   "locked": first_args["locked"], "old_name": first_args["old_name"]}
    first = dict(zip(roots, run_cli_batch(list(first_args.values()), list(roots.values()), timeout=600,
                                          preload=["torch._dynamo"])))
    for case, result in first.items():
        assert result.returncode == 0, (case, result.stderr[-2000:])
    runs = {case: next(root.glob("default/*/metrics.json")).parent for case, root in roots.items()}
    (runs["locked"] / "metrics.json").unlink()  # as if it were still running
    runs["old_name"] = runs["old_name"].rename(runs["old_name"].with_name(OLD_NAME + runs["old_name"].name[-11:]))
    before = {case: finished_files(run) for case, run in runs.items()}
    with rundir.RunLock(runs["locked"]):
        second = dict(zip(roots, run_cli_batch(list(second_args.values()), list(roots.values()), timeout=600,
                                               preload=["torch._dynamo"])))
    return {case: (roots[case], first[case], runs[case], before[case], second[case]) for case in roots}


def test_a_skipped_rerun_rewrites_nothing(launched_again):
    # was a fresh `python -m experiments.train` each launch; now forked from tests/cli_batch.py
    root, _, run, before, again = launched_again["rerun"]
    assert again.returncode == 0 and "is finished" in again.stdout, again.stdout[-2000:]
    assert finished_files(run) == before
    assert len(list(root.glob("default/*/metrics.json"))) == 1


def test_a_run_named_before_labels_were_shortened_is_found_and_skipped(launched_again):
    root, _, run, before, again = launched_again["old_name"]
    assert again.returncode == 0 and "is finished" in again.stdout, again.stdout[-2000:]
    assert finished_files(run) == before
    assert [p.name for p in (root / "default").iterdir()] == [run.name]  # no second directory


def test_train_refuses_a_directory_holding_another_config(tiny_run):
    tiny_run("method.rank=1", name="shared")
    with pytest.raises(ConfigError, match="another configuration"):
        tiny_run("method.rank=2", name="shared")


def test_the_same_run_launched_twice_trains_once(launched_again):
    """A second process finds the run directory locked: one line naming the holder, exit 1, nothing written."""
    # was a fresh `python -m experiments.train` each launch; now forked from tests/cli_batch.py
    _, _, run, _, second = launched_again["locked"]
    assert second.returncode == 1, second.stderr
    assert second.stderr.strip().splitlines() == [second.stderr.strip()]
    assert f"pid {os.getpid()}" in second.stderr and "not started a second time" in second.stderr
    assert not (run / "metrics.json").exists()


def test_litter_of_killed_writers_is_cleaned_and_files_are_readable_by_others(tiny_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".metrics.json~999999999@{}~abc.tmp".format(os.uname().nodename)
    stale.write_text("half")
    metrics, _ = tiny_run()
    assert metrics["status"] == "complete" and not stale.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (run / "delta_w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    # A checkpoint left by a kill right after metrics.json was written is removed by the next launch.
    (run / "checkpoint.pt").write_bytes(b"left behind")
    assert tiny_run()[0] == metrics and not (run / "checkpoint.pt").exists()

