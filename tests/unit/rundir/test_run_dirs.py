"""Run directories, checked in-process: a function of the resolved config, found again however it was reached, and
inside runs_root (a name or runs_root that would leave it stops `python -m experiments.train` in one line before
anything is written); temp files of live writers are kept."""
import json
import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from lowrank.cli import register_resolvers
from lowrank.errors import ConfigError
from lowrank.rundir import atomic
from lowrank.rundir import layout as rundir
from tests.conftest import CONF, TINY, compose_cfg, error_line
from tests.unit.experiments.test_cli import train_command


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
    assert os.path.basename(lora).startswith("rank=8,seed=0-")

def test_one_config_one_name_however_it_is_spelled(tmp_path):
    assert run_dir_of(["trainer.lr=1e4"], tmp_path) == run_dir_of(["trainer.lr=10000.0"], tmp_path)
    assert run_dir_of(["trainer.lr=1e4"], tmp_path).endswith("/lr=10000.0-" +
                                                              run_dir_of(["trainer.lr=1e4"], tmp_path)[-10:])
    default = run_dir_of([], tmp_path)
    assert default.startswith(f"{tmp_path}/default/defaults-")
    os.makedirs(default)  # once it exists, the same config reached by other overrides finds it
    assert run_dir_of(["seed=0"], tmp_path) == default
    assert run_dir_of(["seed=1"], tmp_path) != default
    assert run_dir_of(["logger=none", "trainer.progress_bar=false"], tmp_path) == default  # not identity

def test_names_are_short_and_readable(tmp_path):
    name = os.path.basename(run_dir_of(["method.rank=4", "seed=1", "method.targets=[query,key,value,dense]",
                                        "model.path=/home/me/models/minilm16"], tmp_path))
    assert name[:-rundir.HASH_LENGTH] == "rank=4,targets=query+key+value+dense,path=minilm16,seed=1-"


def test_label_keys_are_shortest_unambiguous_suffixes():
    assert rundir.run_label({"method.rank": "4", "seed": "1"}) == "rank=4,seed=1"
    assert rundir.run_label({"a.c.rank": "1", "b.c.rank": "2", "d.rank": "3", "model": "x", "e.model": "y"}) == \
        "a.c.rank=1,b.c.rank=2,d.rank=3,e.model=y,model=x"
    assert rundir.run_label({}) == "defaults"


def test_label_values_are_short():
    f = rundir.format_value
    assert f(["query", "value"]) == "query+value"
    assert f(["query", "key", "value", "attention.output.dense"]) == "query+key+value+1more"
    assert f("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct" and f("/a/b/ckpt/") == "ckpt"
    assert f({"value": 8, "layer.0.query": 16}) == "layer.0.query-16+value-8"
    assert rundir.run_label({"task.text": "a b,'c'"}) == "text=a_b__c_"  # no spaces, quotes or commas inside a setting


def test_a_label_past_the_limit_keeps_whole_settings_then_a_hash():
    settings = {f"trainer.k{i}": "x" * 10 for i in range(10)}
    label = rundir.run_label(settings)
    assert len(label) <= rundir.MAX_LABEL and label.startswith("k0=xxxxxxxxxx,k1=xxxxxxxxxx,") and "~" in label
    assert label.split("~")[0].split(",")[-1].startswith("k") and label.split("~")[0].endswith("x")  # whole ones
    assert rundir.run_label(settings | {"trainer.k9": "y" * 10}) != label  # the hash covers what was cut
    assert len(rundir.run_label({"x": "a" * 200})) == rundir.MAX_LABEL


def test_a_run_named_the_old_way_is_found_again(tmp_path):
    """Before labels were shortened a run's directory held every full key (`method.rank=4,...`); the hash is looked
    up first, so such a directory is the one a re-launch uses, and no second one is made."""
    overrides = ["method.rank=4", "seed=1", "trainer.lr=0.002"]
    new = run_dir_of(overrides, tmp_path)
    old = f"{tmp_path}/default/method.rank=4,seed=1,trainer.lr=0.002-{new[-rundir.HASH_LENGTH:]}"
    assert old != new
    os.makedirs(old)
    assert run_dir_of(overrides, tmp_path) == old and run_dir_of(list(reversed(overrides)), tmp_path) == old
    assert os.listdir(f"{tmp_path}/default") == [os.path.basename(old)]


def test_config_hash_ignores_only_where_and_how_it_is_watched():
    cfg = {"seed": 0, "name": "a", "runs_root": "x", "logger": {"name": "wandb"}, "trainer": {"lr": 1e-3,
                                                                                              "progress_bar": True}}
    moved = json.loads(json.dumps(cfg)) | {"name": "b", "runs_root": "y", "logger": {"name": "none"}}
    moved["trainer"]["progress_bar"] = False
    assert rundir.config_hash(cfg) == rundir.config_hash(moved)
    other = json.loads(json.dumps(cfg))
    other["trainer"]["lr"] = 2e-3
    assert rundir.config_hash(cfg) != rundir.config_hash(other)

def test_train_refuses_a_run_dir_outside_runs_root(tmp_path):
    from lowrank.train.recipe import train
    cfg = compose_cfg([*TINY, f"runs_root={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match="outside runs_root"):
        train(cfg, run_dir=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()

def test_stale_temp_files_of_live_writers_are_kept(tmp_path):
    live = tmp_path / f".x~{os.getpid()}@{os.uname().nodename}~abc.tmp"
    dead = tmp_path / f".x~999999999@{os.uname().nodename}~abc.tmp"
    foreign = tmp_path / ".x~999999999@another-host~abc.tmp"
    for p in (live, dead, foreign):
        p.write_text("")
    assert atomic.remove_stale_temps(tmp_path) == [dead]
    assert live.exists() and foreign.exists()


BAD_NAMES = ["../../escape", "..", "a/b", ""]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_cannot_leave_runs_root(tmp_path, capsys, name):
    # was test_a_name_cannot_leave_runs_root in tests/test_run_dirs.py (a process each, from tests/cli_batch.py)
    argv = [f"runs_root={tmp_path / 'deep' / 'runs'}", f"name={name}", *TINY]
    error_line(capsys, lambda: train_command(argv, tmp_path / "deep" / "runs" / "run"), "name=")
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # nothing written anywhere


def test_runs_root_that_is_a_file_is_one_line(tmp_path, capsys):
    # was test_runs_root_that_is_a_file_is_one_line in tests/test_run_dirs.py (a process, from tests/cli_batch.py)
    (tmp_path / "file").write_text("x")
    argv = [f"runs_root={tmp_path / 'file'}", *TINY]
    error_line(capsys, lambda: train_command(argv, tmp_path / "file" / "run"), "runs_root=")
