"""Run directories: a function of the resolved config, found again however it was reached, never shared by
two configs, never rewritten once finished, inside runs_root, and worked in by one process at a time."""
import json
import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from lowrank.rundir import atomic
from lowrank.rundir import layout as rundir
from lowrank.cli import register_resolvers
from lowrank.errors import ConfigError
from tests.cli_batch import run_cli_batch
from tests.conftest import CONF, TINY, compose_cfg, run_cli


def run_dir_of(overrides: list[str], runs_root) -> str:
    """The directory `python -m experiments.train OVERRIDES` would use (Hydra resolves hydra.run.dir)."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"runs_root={runs_root}", *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return str(cfg.hydra.run.dir)


def test_settings_from_an_experiment_file_give_another_directory(tmp_path):
    lora = run_dir_of(["experiment=demo_lora", "seed=0", "method.rank=8"], tmp_path)
    targets = run_dir_of(["experiment=demo_targets", "seed=0", "method.rank=8"], tmp_path)
    assert lora != targets  # same command-line overrides, different targets from the experiment files
    assert os.path.basename(lora).startswith("method.rank=8,seed=0-")


def test_one_config_one_name_however_it_is_spelled(tmp_path):
    assert run_dir_of(["trainer.lr=1e4"], tmp_path) == run_dir_of(["trainer.lr=10000.0"], tmp_path)
    assert run_dir_of(["trainer.lr=1e4"], tmp_path).endswith("/trainer.lr=10000.0-" +
                                                              run_dir_of(["trainer.lr=1e4"], tmp_path)[-10:])
    default = run_dir_of([], tmp_path)
    assert default.startswith(f"{tmp_path}/default/defaults-")
    os.makedirs(default)  # once it exists, the same config reached by other overrides finds it
    assert run_dir_of(["seed=0"], tmp_path) == default
    assert run_dir_of(["seed=1"], tmp_path) != default
    assert run_dir_of(["logger=none", "trainer.progress_bar=false"], tmp_path) == default  # not identity


def test_config_hash_ignores_only_where_and_how_it_is_watched():
    cfg = {"seed": 0, "name": "a", "runs_root": "x", "logger": {"name": "wandb"}, "trainer": {"lr": 1e-3,
                                                                                              "progress_bar": True}}
    moved = json.loads(json.dumps(cfg)) | {"name": "b", "runs_root": "y", "logger": {"name": "none"}}
    moved["trainer"]["progress_bar"] = False
    assert rundir.config_hash(cfg) == rundir.config_hash(moved)
    other = json.loads(json.dumps(cfg))
    other["trainer"]["lr"] = 2e-3
    assert rundir.config_hash(cfg) != rundir.config_hash(other)


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


BAD_NAMES = ["../../escape", "..", "a/b", ""]


@pytest.fixture(scope="module")
def bad_location_results(tmp_path_factory):
    """`python -m experiments.train` with each bad name (runs_root=F/deep/runs), and with a runs_root that is a
    file (F/file), each from a folder F of its own, all from one tests.cli_batch process (a process each, the
    imports paid once): {case: (result, F)}."""
    cases = {name: tmp_path_factory.mktemp("bad_name") for name in BAD_NAMES}
    argvs = [["-m", "experiments.train", f"runs_root={d / 'deep' / 'runs'}", f"name={name}", *TINY]
             for name, d in cases.items()]
    file_root = tmp_path_factory.mktemp("file_root")
    (file_root / "file").write_text("x")
    cases["runs_root file"] = file_root
    argvs.append(["-m", "experiments.train", f"runs_root={file_root / 'file'}", *TINY])
    results = run_cli_batch(argvs, list(cases.values()), timeout=600, preload=["torch._dynamo"])
    return {case: (res, d) for (case, d), res in zip(cases.items(), results)}


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_cannot_leave_runs_root(bad_location_results, name):
    result, tmp_path = bad_location_results[name]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "name=" in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # nothing written anywhere


def test_train_refuses_a_run_dir_outside_runs_root(tmp_path):
    from lowrank.train.recipe import train
    cfg = compose_cfg([*TINY, f"runs_root={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match="outside runs_root"):
        train(cfg, run_dir=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_runs_root_that_is_a_file_is_one_line(bad_location_results):
    result, _ = bad_location_results["runs_root file"]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "runs_root=" in result.stderr


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


def test_stale_temp_files_of_live_writers_are_kept(tmp_path):
    live = tmp_path / f".x~{os.getpid()}@{os.uname().nodename}~abc.tmp"
    dead = tmp_path / f".x~999999999@{os.uname().nodename}~abc.tmp"
    foreign = tmp_path / ".x~999999999@another-host~abc.tmp"
    for p in (live, dead, foreign):
        p.write_text("")
    assert atomic.remove_stale_temps(tmp_path) == [dead]
    assert live.exists() and foreign.exists()
