"""Property: any mix of valid and invalid overrides either runs a 1-step job or stops with one clear line."""
import re
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank.cli import check_group_overrides, check_value_overrides
from lowrank.errors import ConfigError
from lowrank.train.recipe import train
from tests.conftest import TINY, compose_cfg

VALUES = {
    "method": ["lora", "full", "qlora"],
    "method.rank": ["1", "2", "0", "-1", "abc", "1.5", "400"],
    "method.alpha": ["8", "0", "-3", "x"],
    "method.targets": ["[query]", "[nope]", "all-linear", "[]", "[attention.output.dense]"],
    "method.scaling": ["standard", "rslora", "sqrt"],
    "trainer.lr": ["1e-3", "0", "-1", "fast"],
    "trainer.batch_size": ["4", "0", "100000"],
    "trainer.precision": ["auto", "fp16"],
    "trainer.schedule": ["cosine", "step"],
    "task.train_size": ["16", "0", "99999", "null"],
    "trainer.unknown_key": ["1"],
    "seed": ["0", "x"],
}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(VALUES)), st.integers(0, 6), max_size=4))
def test_overrides_run_or_fail_in_one_line(capsys, choice):
    overrides = [f"{k}={VALUES[k][i % len(VALUES[k])]}" for k, i in sorted(choice.items())]
    overrides.sort(key=lambda o: not o.startswith("method="))  # a group choice first, as on a command line
    with tempfile.TemporaryDirectory() as tmp:
        args = TINY + ["trainer.max_steps=1", "trainer.eval_interval=1", f"runs_root={tmp}"] + overrides
        try:
            check_group_overrides(args)
            check_value_overrides(args)
        except SystemExit as e:
            assert e.code == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and err.startswith("error: "), err
            return
        cfg = compose_cfg(args)
        try:
            metrics = train(cfg, run_dir=f"{tmp}/run")
        except ConfigError as e:
            message = str(e)
            assert "\n" not in message and re.search(r"\b(method|trainer|task|model|budget|seed)\b", message), message
            return
        assert metrics["status"] in ("complete", "diverged")
