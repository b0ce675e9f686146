"""Run directories through real runs and processes: never shared by two configs, never rewritten once finished, and
worked in by one process at a time; files left by killed writers are cleaned."""
import os

import pytest

from lowrank.rundir import layout as rundir
from lowrank.errors import ConfigError
from tests.conftest import TINY, run_cli


def test_a_skipped_rerun_rewrites_nothing(tmp_path):
    base = [*TINY, f"runs_root={tmp_path}"]
    first = run_cli(["-m", "experiments.train", "trainer.lr=1e-3", *base], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (run,) = tmp_path.glob("default/*/metrics.json")
    run = run.parent
    files = lambda: {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*")  # noqa: E731
                     if p.is_file() and p.name != rundir.LOCK_FILE}  # the lock is taken, and that is all
    before = files()
    again = run_cli(["-m", "experiments.train", "-m", "trainer.lr=0.001", *base], cwd=tmp_path)
    assert again.returncode == 0 and "is finished" in again.stdout, again.stdout[-2000:]
    assert files() == before
    assert len(list(tmp_path.glob("default/*/metrics.json"))) == 1


def test_train_refuses_a_directory_holding_another_config(tiny_run):
    tiny_run("method.rank=1", name="shared")
    with pytest.raises(ConfigError, match="another configuration"):
        tiny_run("method.rank=2", name="shared")


def test_the_same_run_launched_twice_trains_once(tmp_path):
    """A second process finds the run directory locked: one line naming the holder, exit 1, nothing written."""
    base = ["-m", "experiments.train", *TINY, f"runs_root={tmp_path}"]
    assert run_cli(base, cwd=tmp_path).returncode == 0
    (run,) = [p.parent for p in tmp_path.glob("default/*/metrics.json")]
    (run / "metrics.json").unlink()  # as if it were still running
    with rundir.RunLock(run):
        second = run_cli(base, cwd=tmp_path, timeout=120)
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

