"""The report pools runs only when their provenance agrees: two runs of one setup whose data digests differ are named
in one line and kept apart (each digest its own setup); runs without provenance (written before it was recorded) pool
as before and are counted as unknown; training data that the seed picks differs between seeds and still pools. The
runs are test_analysis_report's synthetic run directories, their metrics re-written with write_metrics so that their
content hashes stay valid."""
import contextlib
import io

import pandas as pd
import pytest

from analysis.report import main
from lowrank.rundir import layout as rundir
from tests.unit.analysis.test_analysis_report import write_base, write_metrics, write_run

MODEL, TRAIN, EVAL = "f3" * 32, "aa" * 32, "e1" * 32


def provenance(train=TRAIN, evaluation=EVAL, seeded=False, model=MODEL) -> dict:
    return {"lowrank": {"version": "0.1.0", "commit": "c0ffee" * 6 + "abcd", "dirty": False, "why": None},
            "packages": {"torch": "2.13.0", "transformers": "5.25.0", "peft": "0.21.2", "hydra-core": "1.3.8"},
            "device": "AMD EPYC",
            "model": {"source": "nowhere", "hub_commit": None, "files_sha256": model, "why": None},
            "data": {"train_sha256": train, "eval_sha256": evaluation, "train_seeded": seeded}}


def set_provenance(run, prov) -> None:
    """The run's metrics.json with `provenance` (None: removed, as a run written before it was recorded)."""
    metrics = rundir.load_metrics(run)
    metrics = {k: v for k, v in metrics.items() if k not in ("config_hash", "config_sha256", "provenance")}
    write_metrics(run, metrics | ({"provenance": prov} if prov is not None else {}))


def report(root, tmp_path):
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        main([str(root), "--out", str(out), "--max-dim", "8", "--no-figures"])
    return (out / "report.md").read_text(), pd.read_csv(out / "tables" / "runs.csv")


@pytest.fixture
def two_seeds(tmp_path):
    """LoRA r=2, seeds 0 and 1: one setup, one configuration (so they would be averaged together)."""
    root = tmp_path / "runs"
    base = write_base(root)
    return root, write_run(root, base, "lora_s0", "lora", 0, 2), write_run(root, base, "lora_s1", "lora", 1, 2)


def test_runs_whose_data_digests_differ_are_named_in_one_line_and_not_pooled(two_seeds, tmp_path):
    root, a, b = two_seeds
    set_provenance(a, provenance())
    set_provenance(b, provenance(evaluation="9a" * 32))
    text, runs = report(root, tmp_path)
    lines = [line for line in text.splitlines() if "not pooled" in line]
    assert len(lines) == 1, text
    assert "`2026-01-01/lora_s0` has eval data digest e1e1e1e1e1" in lines[0]
    assert "`2026-01-01/lora_s1` has 9a9a9a9a9a" in lines[0]
    assert runs.setup.nunique() == 2  # kept apart: each digest its own setup
    assert sorted(runs.provenance_group) == ["model f3f3f3f3f3, eval data 9a9a9a9a9a, train data aaaaaaaaaa",
                                             "model f3f3f3f3f3, eval data e1e1e1e1e1, train data aaaaaaaaaa"]


def test_another_model_is_not_pooled_either(two_seeds, tmp_path):
    root, a, b = two_seeds
    set_provenance(a, provenance())
    set_provenance(b, provenance(model="0b" * 32))
    text, runs = report(root, tmp_path)
    assert "has model digest f3f3f3f3f3" in text and runs.setup.nunique() == 2


def test_runs_without_provenance_pool_as_before_and_are_counted_unknown(two_seeds, tmp_path):
    root, a, _ = two_seeds
    set_provenance(a, provenance())  # the other has none
    text, runs = report(root, tmp_path)
    assert runs.setup.nunique() == 1 and "not pooled" not in text
    assert "## Provenance (per setup)" in text and "Provenance is unknown for 1 run" in text
    row = next(line for line in text.splitlines() if line.startswith("| S1 |"))
    assert "| 2 | 1 | 0.1.0 c0ffeec0ff |" in row and "f3f3f3f3f3" in row and "AMD EPYC" in row


def test_training_data_the_seed_picks_differs_between_seeds_and_still_pools(two_seeds, tmp_path):
    root, a, b = two_seeds
    set_provenance(a, provenance(seeded=True))
    set_provenance(b, provenance(train="bb" * 32, seeded=True))
    text, runs = report(root, tmp_path)
    assert runs.setup.nunique() == 1 and "not pooled" not in text
    assert "2 digests (the seed picks the examples)" in text


def test_one_seeds_runs_on_other_training_data_are_split_off(tmp_path):
    root = tmp_path / "runs"
    base = write_base(root)
    r2 = write_run(root, base, "lora_r2_s0", "lora", 0, 2)
    r4 = write_run(root, base, "lora_r4_s0", "lora", 0, 4)
    r2_s1 = write_run(root, base, "lora_r2_s1", "lora", 1, 2)
    set_provenance(r2, provenance(seeded=True))
    set_provenance(r4, provenance(train="cc" * 32, seeded=True))  # seed 0 again, yet other examples
    set_provenance(r2_s1, provenance(train="bb" * 32, seeded=True))
    text, runs = report(root, tmp_path)
    line = next(line for line in text.splitlines() if "not pooled" in line)
    assert ("runs `2026-01-01/lora_r2_s0`, `2026-01-01/lora_r2_s1` have train data digest their seed's usual, "
            "run `2026-01-01/lora_r4_s0` has cccccccccc; not pooled") in line
    setups = dict(zip(runs.run_id, runs.setup))
    assert setups["2026-01-01/lora_r2_s0"] == setups["2026-01-01/lora_r2_s1"] != setups["2026-01-01/lora_r4_s0"]
