"""A run's per-step history: one row per optimizer step (training loss, learning rate, gradient norm, real tokens
per second), with the evaluation metrics on evaluation steps, in `history.csv` (lowrank/rundir/layout.py).

    rows.append(step_row(step, loss, lr, grad_norm, tokens_per_second))
    add_eval(rows, step, {"eval_loss": 0.41, "eval_accuracy": 0.81})
    write_history(run_dir, rows)

The rows live in the loop's state (lowrank/train/loop_state.py), so a checkpoint carries them and a resumed run
continues them with neither gaps nor repeats; the file is written whole, at evaluations, checkpoints and the end
(never every step), so it always holds the rows up to a step the run has reached.
"""
import csv
import io
import math
from pathlib import Path

from lowrank.rundir.atomic import write_text
from lowrank.rundir.layout import HISTORY_COLUMNS, HISTORY_FILE


def step_row(step: int, train_loss: float, lr: float, grad_norm: float, tokens_per_second: float) -> dict:
    return dict(zip(HISTORY_COLUMNS, (step, train_loss, lr, grad_norm, tokens_per_second)))


def add_eval(rows: list[dict], step: int, metrics: dict) -> None:
    """Put the evaluation metrics (`eval_*`) on the row of `step`: the last one, as the loop evaluates right after
    the step it has just recorded."""
    if not rows or rows[-1]["step"] != step:
        raise ValueError(f"evaluation at step {step}, but the last recorded step is "
                         f"{rows[-1]['step'] if rows else 'none'}")
    rows[-1].update(metrics)


def columns(rows: list[dict]) -> list[str]:
    """HISTORY_COLUMNS, then the evaluation metrics in the order they first appear."""
    extra = [k for row in rows for k in row if k not in HISTORY_COLUMNS]
    return [*HISTORY_COLUMNS, *dict.fromkeys(extra)]


def _cell(value):
    return "" if value is None or isinstance(value, float) and not math.isfinite(value) else value


def write_history(run_dir, rows: list[dict]) -> Path:
    """history.csv, written whole and atomically; a step's missing metrics (not evaluated there) are empty."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    return write_text(Path(run_dir) / HISTORY_FILE, text.getvalue())
