"""`python -m experiments.train` on bad input, in this process: the checks the command runs before Hydra starts a job
(lowrank.cli.check_command_line), then the job's own (train(cfg) under one_line_errors, as the command's task), stop
with one `error:` line naming the key and what would be valid, and exit 2. The command itself, in a process of its
own: tests/integration/test_entry_points.py."""
import pytest

from lowrank.cli import check_command_line, command_line, one_line_errors, register_resolvers
from lowrank.train.recipe import train
from tests.conftest import TINY, compose_cfg, error_line, outside_hydra

BAD_INPUTS = {  # override(s) -> what the one error line must hold
    "method.rank=0": ["method.rank=0", "integer > 0"],
    "method.targets=[query,nope]": ["'nope'", "valid suffixes", "value"],
    "model=nope": ["model='nope'", "minilm", "smollm2"],
    "task=nope": ["task='nope'", "fine_foods", "tweets"],
    "method=nope": ["method='nope'", "full", "lora"],
    "model=roberta_base": ["Hub is unreachable", "model.path"],
    "method.foo=1": ["method.foo is not a config key", "rank"],
    "trainer.lr=fast": ["trainer.lr='fast'", "a number"],
    "trainer.compile=maybe": ["trainer.compile='maybe'", "auto, true or false"],
    "model.path=/no/such/folder": ["/no/such/folder", "no such folder"],
    "task.train_size=100000": ["task.train_size=100000", "4000"],
    "+experiment=demo_lora": ["+experiment=demo_lora", "write experiment=demo_lora"],
    "trainer.device=tpu": ["trainer.device='tpu'", "cuda:N"],
    "trainer.lr=nan": ["trainer.lr=nan", "a number > 0"],
    "task.eval_size=abc": ["task.eval_size='abc'", "integer > 0"],
    "budget.gib=-3": ["budget.gib=-3", "GiB > 0"],
    "logger=wandb logger.mode=bogus": ["logger.mode='bogus'", "offline"],
}


def train_command(argv: list[str], run_dir) -> None:
    """`python -m experiments.train ARGV` up to where bad input stops it, in this process: the command line's
    checks, then the job (train(cfg) under one_line_errors) in RUN_DIR, the job directory Hydra would give it."""
    outside_hydra()
    register_resolvers()
    overrides, multirun = command_line(argv)
    check_command_line(overrides, multirun)
    one_line_errors(train)(compose_cfg(overrides), run_dir=run_dir)


def train_argv(runs_root, *overrides: str) -> list[str]:
    return [f"runs_root={runs_root}", *TINY, *overrides]


@pytest.mark.parametrize("override", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_line(tmp_path, capsys, override):
    # was test_bad_input_gives_one_clear_line in tests/test_cli.py: the same lines, then from a process each
    error_line(capsys, lambda: train_command(train_argv(tmp_path, *override.split()), tmp_path / "run"),
               *BAD_INPUTS[override])
