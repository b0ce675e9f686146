"""The command-line checks read overrides with Hydra's own grammar: every sweep form Hydra documents passes them and
composes its first job, and a bad one still stops with one `error:` line and exit 2."""
import pytest

from lowrank.cli import (check_command_line, command_line, compose_first_job, group_options, sweep_axes)

SWEEP_FORMS = [  # each passes the checks of a multirun
    ["method=lora,full"],
    ["method=choice(lora,full)", "seed=range(0,2)"],
    ["seed=range(0,1,0.5)", "seed=range(3)"],
    ["experiment=glob(demo_*)"],
    ["experiment=glob([demo_*,rank*],exclude=demo_full)"],
    ["trainer.lr=interval(1e-4,1e-2)"],
    ["trainer.lr=tag(log,interval(1e-4,1e-2))", "method.rank=int(interval(1,64))"],
    ["seed=sort(3,1,2)", "method.rank=sort(range(1,9,2),reverse=true)"],
    ["model=shuffle(minilm,smollm2)", "seed=shuffle(0,1)"],
    ["seed=tag(a,b,choice(0,1))"],
    ["name='a,b',plain"],
    ['task=tweets', 'task.path="x,y.csv"'],
    ["method.targets=[query,value]", "method.targets=[query],[query,value]"],
    ["+trainer.extra=1", "++trainer.lr=1e-3", "++trainer.another=2", "~trainer.dynamics"],
    ["method=lora", "method.rank=4,8", "method.alpha=choice(8,16)"],
]


def error_line(capsys, check, *args) -> str:
    """The one `error:` line `check(*args)` stops with (exit 2)."""
    with pytest.raises(SystemExit) as stop:
        check(*args)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("overrides", SWEEP_FORMS, ids=" ".join)
def test_every_sweep_form_passes_and_composes(tmp_path, overrides):
    cfg = check_command_line([*overrides, f"runs_root={tmp_path}"], multirun=True)
    assert cfg.method.name in group_options("method")


def test_first_job_takes_the_first_value_of_each_swept_group():
    assert compose_first_job(["method=choice(full,lora)"], multirun=True).method.name == "full"
    assert compose_first_job(["method=full,lora"]).method.name == "full"
    assert compose_first_job(["experiment=glob(demo_*)"], multirun=True).name == "demo"  # glob: sorted options
    assert compose_first_job(["experiment=glob(demo_l*)"], multirun=True).method.name == "lora"
    assert compose_first_job(["model=glob(smol*)"]).model.name == "smollm2"
    assert compose_first_job(["method=sort(lora,full)"]).method.name == "full"


def test_first_job_in_a_multirun_takes_the_experiments_swept_groups():
    """intrinsic_dim sweeps method: subspace in its hydra.sweeper.params, so method.dim is a key of its first
    job in a multirun (the command line's own choice wins), and not in a single run, which ignores the params."""
    assert compose_first_job(["experiment=intrinsic_dim"], multirun=True).method.name == "subspace"
    assert compose_first_job(["experiment=intrinsic_dim", "method=full"], multirun=True).method.name == "full"
    check_command_line(["experiment=intrinsic_dim", "method.dim=100"], multirun=True)


def test_expansion_follows_the_basic_sweeper():
    axes = sweep_axes(["seed=range(0,3)", "method=choice(lora,full)", "seed=5,6", "trainer.lr=interval(0.1,0.3)",
                       "method.rank=int(interval(1,9))", "experiment=glob(demo_*,exclude=demo)", "name='a,b',c"])
    lines = {key: [o.input_line for o in axis] for key, axis in axes.items()}
    assert list(lines) == ["seed", "method", "trainer.lr", "method.rank", "experiment", "name"]  # first place kept
    assert lines["seed"] == ["seed=5", "seed=6"]                                                   # last values
    assert lines["method"] == ["method=lora", "method=full"]
    assert lines["experiment"] == [f"experiment={e}" for e in ("demo_full", "demo_lora", "demo_scarce", "demo_targets")]
    assert [o.value() for o in axes["name"]] == ["a,b", "c"]
    lr, rank = axes["trainer.lr"][0].value(), axes["method.rank"][0].value()
    assert 0.1 < lr < 0.3 and isinstance(rank, int) and 1 < rank < 9                          # a value inside


def test_options_and_their_values_are_not_overrides():
    assert command_line(["-m", "--cfg", "job", "-cn", "config", "seed=0,1", "~trainer.dynamics"]) == (
        ["seed=0,1", "~trainer.dynamics"], True)
    assert command_line(["seed=0"]) == (["seed=0"], False)


BAD = [  # (overrides, multirun, what the one line holds)
    (["method=lorra"], True, ["method='lorra' is not a known method", "'lora'", "'full'"]),
    (["method=choice(lora,lorra)"], True, ["method='lorra' is not a known method", "'lora'"]),
    (["method=lora,lorra"], True, ["method='lorra' is not a known method"]),
    (["model=glob(nope_*)"], True, ["model=glob(nope_*) matches no model", "'minilm'"]),
    (["experiment=glob(demo_*,exclude=demo*)"], True, ["matches no experiment", "'demo_lora'"]),
    (["trainer.nope=1"], False, ["trainer.nope is not a config key", "valid keys under 'trainer'", "batch_size"]),
    (["trainer.nope=interval(0,1)"], True, ["trainer.nope is not a config key", "lr"]),
    (["method=full", "method.rank=4,8"], True, ["method.rank is not a config key", "valid keys under 'method'"]),
    (["+experiment=demo"], False, ["+experiment=demo is not valid; write experiment=demo (no '+')"]),
    (["method=choice(lora"], True, ["'method=choice(lora' does not parse", "choice(lora"]),
    (["seed"], False, ["'seed' does not parse", "missing EQUAL"]),
    (["seed=range(a,b)"], True, ["'seed=range(a,b)' does not parse", "range(a,b)"]),
    (["seed=nope(1)"], True, ["Unknown function 'nope'", "choice"]),
    (["seed=range(2,0)"], True, ["seed=range(2,0) sweeps over no values"]),
    (["seed=range(0,2,0)"], True, ["seed=range(0,2,0) is not a valid sweep"]),
    (["trainer.lr=glob(x*)"], True, ["glob() picks options of a config group", "trainer.lr is not one"]),
    (["seed=0,1"], False, ["seed=0,1 is a sweep; add -m"]),
    (["trainer.lr=interval(0.1,0.2)"], False, ["is a sweep; add -m"]),
    (["hydra.job.name=a,b"], True, ["Hydra's own settings"]),
    (["name=ok,a/b"], True, ["name='a/b' is not valid", "one folder name"]),
]


@pytest.mark.parametrize("overrides,multirun,needles", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_override_is_one_line(capsys, tmp_path, overrides, multirun, needles):
    line = error_line(capsys, check_command_line, [*overrides, f"runs_root={tmp_path}"], multirun)
    for needle in needles:
        assert needle in line, line


def test_every_swept_runs_root_is_checked(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    line = error_line(capsys, check_command_line, [f"runs_root={tmp_path / 'ok'},{tmp_path / 'file' / 'x'}"], True)
    assert f"runs_root={tmp_path / 'file' / 'x'} is not valid" in line and "is a file, not a folder" in line


def test_a_launcher_whose_plugin_is_missing_names_what_to_install(capsys, monkeypatch):
    """Hydra alone says "Could not load 'hydra/launcher/joblib'" after its set-up; this names the extra."""
    import importlib.util

    from lowrank import cli
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "hydra_plugins.hydra_joblib_launcher" else real(name, *a))
    line = error_line(capsys, cli.check_launcher, ["hydra/launcher=processes", "seed=0"])
    assert line == ("error: hydra/launcher=processes needs the hydra-joblib-launcher plugin, which is not installed; "
                    "pip install -e .[cluster] (or pip install hydra-joblib-launcher)")
    cli.check_launcher(["hydra/launcher=local"])  # submitit is installed with the test extra: no complaint
