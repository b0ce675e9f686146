"""Every sweep in conf/experiment/ composes, job by job, into a config the trainer accepts (one of them runs as a
tiny multirun, and the demo end to end, in tests/integration/experiments/test_sweeps.py)."""
import pytest

from experiments.demo import compose, sweep_jobs
from experiments.demo import main as demo_main
from lowrank.config import validate

from tests.conftest import CONF, ROOT, error_line

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TINY_RUN = ["trainer.max_steps=1", "task.train_size=32", "task.eval_size=16", "trainer.batch_size=8", "logger=none",
            "trainer.progress_bar=false"]


def test_the_paper_sweeps_are_there():
    assert {"rank_sweep", "full_baseline", "subspace", "subspace_full", "data_scarce", "demo", "demo_lora",
            "demo_targets", "demo_full", "demo_scarce"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_file_is_a_global_override_with_its_command(experiment):
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert "python -m experiments." in text.split("\n\n")[0], "the header comment names the command"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_job_of_every_sweep_composes_and_validates(experiment, tmp_path):
    jobs = sweep_jobs(experiment, [f"runs_root={tmp_path}"])
    params = compose([f"experiment={experiment}"], hydra_config=True).hydra.sweeper.params or {}
    assert len({tuple(j) for j in jobs}) == len(jobs)
    assert all(any(o.startswith(f"{key}=") for o in job) for job in jobs for key in params)
    names = set()
    for job in jobs:
        cfg = compose(job)
        validate(cfg)  # the trainer's own checks, before anything is loaded
        names.add(cfg.name)
    assert len(names) == 1, "one sweep writes one study folder"


def test_grid_sizes_of_the_paper_sweeps():
    assert len(sweep_jobs("rank_sweep")) == 5 * 3 * 3          # ranks × target sets × seeds (Table 6 grid)
    assert len(sweep_jobs("data_scarce")) == 4 * 2 * 3         # sizes × {full, LoRA} × seeds
    assert len(sweep_jobs("subspace")) == 2 * 2
    targets = {compose(j).method.targets[-1] for j in sweep_jobs("rank_sweep", ["seed=0", "method.rank=8"])}
    assert targets == {"query", "value", "attention.output.dense"}


def test_command_line_values_replace_a_grid_axis():
    jobs = sweep_jobs("demo_lora", ["method.rank=8", "trainer.max_steps=3"])
    assert [j for j in jobs if "method.rank=8" not in j] == []
    assert len(jobs) == len(sweep_jobs("demo_lora")) // 3        # seeds only
    assert all(compose(j).trainer.max_steps == 3 for j in jobs)


DEMO_BAD_ARGS = {  # arguments -> what the one error line must hold
    "trainer.max_step=5": ["trainer.max_step is not a config key", "max_steps"],
    "method=lorra": ["method='lorra'", "lora"],
    "trainer.lr=abc": ["trainer.lr='abc'", "a number"],
    "--sweeps nope": ["--sweeps", "'nope'", "demo_lora"],
    "--jobs 0": ["--jobs=0", ">= 1"],
    "name=../up": ["name='../up'", "one folder name"],
    "--jobs abc": ["--jobs", "invalid int value"],
    "trainer.device=tpu": ["trainer.device='tpu'", "cuda:N"],
    "budget.gib=-3": ["budget.gib=-3", "GiB > 0"],
}


def demo_argv(tmp, args: str) -> list[str]:
    return ["--runs-root", str(tmp / "runs"), "--out", str(tmp / "out"), *args.split()]


@pytest.mark.parametrize("args", list(DEMO_BAD_ARGS))
def test_demo_checks_every_job_before_it_starts_any(tmp_path, capsys, monkeypatch, args):
    """One line, exit 2, and nothing written: every job's config is checked before any starts (experiments.demo's
    main in this process; the command itself: tests/integration/test_entry_points.py)."""
    # was test_demo_checks_every_job_before_it_starts_any in tests/test_experiments.py (a process each, from
    # tests/cli_batch.py)
    monkeypatch.chdir(ROOT)  # where the command ran
    error_line(capsys, lambda: demo_main(demo_argv(tmp_path, args)), *DEMO_BAD_ARGS[args])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_demo_refuses_an_out_that_is_a_file(tmp_path, capsys, monkeypatch):
    # was test_demo_refuses_an_out_that_is_a_file in tests/test_experiments.py (a fresh `python -m experiments.demo`)
    (tmp_path / "out").write_text("a file")
    monkeypatch.chdir(ROOT)
    error_line(capsys, lambda: demo_main(["--runs-root", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]),
               "--out=")
    assert not (tmp_path / "runs").exists()


def test_a_causal_lm_runs_line_gives_its_loss():
    """A causal-LM run records eval_loss, not eval_accuracy: the demo's line for it must not fail on the key."""
    from experiments.demo import outcome
    assert outcome({"status": "complete", "eval_loss": 2.0691, "wall_seconds": 190.0}, None) == "eval_loss 2.069, 190 s"
    assert outcome({"status": "complete", "eval_accuracy": 0.7775, "wall_seconds": 84.0}, None).startswith(
        "eval_accuracy 0.777")

