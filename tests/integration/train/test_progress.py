"""A tiny real run leaves what a watcher reads: history.csv (one row per step, evaluation metrics on evaluation
steps), progress.json (ended at the last step) and a last line with its headline metric."""
import csv
import json
import logging
import math
import time

from lowrank.rundir.layout import HISTORY_COLUMNS, HISTORY_FILE, PROGRESS_FILE


def test_a_run_writes_its_history_and_progress_and_ends_with_its_headline(tiny_run, caplog):
    started = time.time()
    with caplog.at_level(logging.INFO, logger="lowrank.train.recipe"):
        metrics, run_dir = tiny_run("trainer.max_steps=4", "trainer.eval_interval=2")
    assert metrics["status"] == "complete"

    with open(run_dir / HISTORY_FILE, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    assert header == [*HISTORY_COLUMNS, "eval_loss", "eval_accuracy"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert math.isfinite(float(r["train_loss"])) and float(r["train_loss"]) > 0
        assert float(r["lr"]) >= 0 and float(r["grad_norm"]) > 0 and float(r["tokens_per_second"]) > 0
    assert [bool(r["eval_loss"]) for r in rows] == [False, True, False, True]  # evaluated every 2 steps
    assert float(rows[-1]["eval_accuracy"]) == metrics["eval_accuracy"]
    assert [float(r["eval_loss"]) for r in rows if r["eval_loss"]] == [h["eval_loss"] for h in metrics["eval_history"]]

    progress = json.loads((run_dir / PROGRESS_FILE).read_text())
    assert progress["step"] == progress["max_steps"] == 4 and progress["state"] == "ended"
    assert progress["steps_per_second"] > 0 and progress["eta_seconds"] == 0
    assert started <= progress["updated"] <= time.time()

    last = [r.getMessage() for r in caplog.records if r.name == "lowrank.train.recipe"][-1]
    assert last.startswith(f"complete: eval_accuracy {metrics['eval_accuracy']:.3f} (32 test examples) after 4 steps")
    assert last.endswith(f" s -> {run_dir}")
