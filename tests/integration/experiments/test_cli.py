"""The Hydra entry point: multirun, W&B offline, and one-line errors for bad input."""
import json

import pytest

from tests.cli_batch import run_cli_batch
from tests.conftest import TINY, run_cli


def one_error_line(result, *needles):
    assert result.returncode != 0
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


BAD_INPUTS = {  # override(s) -> what the one error line must hold
    "method.rank=0": ["method.rank=0", "integer > 0"],
    "method.targets=[query,nope]": ["'nope'", "valid suffixes", "value"],
    "model=nope": ["model='nope'", "minilm", "smollm2"],
    "task=nope": ["task='nope'", "fine_foods", "tweets"],
    "method=nope": ["method='nope'", "full", "lora"],
    "model=roberta_base": ["Hub is unreachable", "model.path"],
    "method.foo=1": ["method.foo is not a config key", "rank"],
    "trainer.lr=fast": ["trainer.lr='fast'", "a number"],
    "trainer.compile=maybe": ["trainer.compile='maybe'", "true or false"],
    "model.path=/no/such/folder": ["/no/such/folder", "no such folder"],
    "task.train_size=100000": ["task.train_size=100000", "4000"],
    "+experiment=demo_lora": ["+experiment=demo_lora", "write experiment=demo_lora"],
    "trainer.device=tpu": ["trainer.device='tpu'", "cuda:N"],
    "trainer.lr=nan": ["trainer.lr=nan", "a number > 0"],
    "task.eval_size=abc": ["task.eval_size='abc'", "integer > 0"],
    "budget.gib=-3": ["budget.gib=-3", "GiB > 0"],
    "logger=wandb logger.mode=bogus": ["logger.mode='bogus'", "offline"],
}


def train_argv(runs_root, override: str) -> list[str]:
    return ["-m", "experiments.train", f"runs_root={runs_root}", *TINY, *override.split()]


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory):
    """{override: result} of `python -m experiments.train ... OVERRIDE`, each from a folder of its own (its
    runs_root and working directory), all from one tests.cli_batch process: a process each, the imports paid once
    (torch._dynamo too: the trainer imports it before it validates the config)."""
    dirs = {o: tmp_path_factory.mktemp("bad_input") for o in BAD_INPUTS}
    results = run_cli_batch([train_argv(dirs[o], o) for o in BAD_INPUTS], list(dirs.values()), timeout=600,
                            preload=["torch._dynamo"])
    return dict(zip(BAD_INPUTS, results))


@pytest.mark.parametrize("override", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_line(bad_input_results, override):
    one_error_line(bad_input_results[override], *BAD_INPUTS[override])


def test_bad_input_in_a_fresh_interpreter_is_the_same_line(bad_input_results, tmp_path):
    """The real command line, `python -m experiments.train` in a new interpreter (its imports and its teardown
    included), gives one line, and the same line and exit status as the batch above."""
    override = "method.rank=0"
    result = run_cli(train_argv(tmp_path, override), cwd=tmp_path, timeout=120)
    one_error_line(result, *BAD_INPUTS[override])
    batched = bad_input_results[override]
    assert (result.returncode, result.stdout, result.stderr) == (batched.returncode, batched.stdout, batched.stderr)


def test_multirun_with_offline_wandb(tmp_path):
    result = run_cli(["-m", "experiments.train", "-m", "method=lora", "method.rank=1,4", "seed=0,1",
                      "trainer.max_steps=5", *[o for o in TINY if not o.startswith(("logger", "trainer.max_steps"))],
                      "logger=wandb", f"runs_root={tmp_path}"], cwd=tmp_path, env_extra={"WANDB_API_KEY": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent for p in tmp_path.glob("default/*/metrics.json"))
    assert len(runs) == 4
    seen = set()
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "complete"
        assert (run / "delta_w.safetensors").exists() and (run / ".hydra" / "config.yaml").exists()
        offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(offline) == 1, list((run / "wandb").rglob("*"))
        seen.add((metrics["adapted_params"], (run / ".hydra/overrides.yaml").read_text()))
    assert len(seen) == 4
