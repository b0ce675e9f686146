"""The per-step history (lowrank.train.history): one row per step, evaluation metrics on their step, written whole;
kept in the loop's state, so a resumed run's history.csv goes on with neither gaps nor repeats."""
import copy
import csv

import pytest

from lowrank.rundir.layout import HISTORY_COLUMNS, HISTORY_FILE
from lowrank.train.history import add_eval, step_row, write_history
from lowrank.train.loop_state import LoopState


def read_rows(run_dir):
    with open(run_dir / HISTORY_FILE, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def train_steps(state: LoopState, upto: int, eval_every: int = 3) -> None:
    """What the loop records for steps state.step+1 .. upto: a row each, an evaluation every `eval_every` steps."""
    for step in range(state.step + 1, upto + 1):
        state.step = step
        state.step_rows.append(step_row(step, 1.0 / step, 1e-3, 0.5, 100.0 * step))
        if step % eval_every == 0:
            add_eval(state.step_rows, step, {"eval_loss": 2.0 / step, "eval_perplexity": 7.0})


def test_rows_have_the_step_columns_and_eval_metrics_only_where_evaluated(tmp_path):
    state = LoopState()
    train_steps(state, 4)
    write_history(tmp_path, state.step_rows)
    header, rows = read_rows(tmp_path)
    assert header == ["step", "train_loss", "lr", "grad_norm", "tokens_per_second", "eval_loss", "eval_perplexity"]
    assert tuple(header[:5]) == HISTORY_COLUMNS
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["eval_loss"] for r in rows] == ["", "", str(2.0 / 3), ""]
    assert float(rows[1]["train_loss"]) == 0.5 and float(rows[3]["tokens_per_second"]) == 400.0


def test_a_non_finite_rate_is_an_empty_cell_not_inf(tmp_path):
    write_history(tmp_path, [step_row(1, 0.7, 1e-3, 0.2, float("inf"))])
    assert read_rows(tmp_path)[1][0]["tokens_per_second"] == ""


def test_evaluation_metrics_go_on_the_step_just_recorded():
    rows = [step_row(1, 0.7, 1e-3, 0.2, 10.0)]
    with pytest.raises(ValueError, match="evaluation at step 2"):
        add_eval(rows, 2, {"eval_loss": 1.0})


def test_a_resumed_run_continues_its_history_without_gaps_or_repeats(tmp_path):
    """Checkpointed at step 4, history.csv written at step 6 (an evaluation), then killed: the resumed run starts
    from the checkpoint's rows, and its next write replaces the file with steps 1..8, each once."""
    state = LoopState()
    train_steps(state, 4)
    checkpoint = copy.deepcopy(state.state_dict())   # what checkpoint.pt's `loop` entry holds
    train_steps(state, 6)
    write_history(tmp_path, state.step_rows)         # on disk: steps 1..6, then the kill
    resumed = LoopState.from_dict(checkpoint)
    assert resumed.step == 4 and [r["step"] for r in resumed.step_rows] == [1, 2, 3, 4]
    train_steps(resumed, 8)
    write_history(tmp_path, resumed.step_rows)
    _, rows = read_rows(tmp_path)
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [int(r["step"]) for r in rows if r["eval_loss"]] == [3, 6]


def test_a_checkpoint_from_before_step_rows_still_resumes():
    old = {"step": 5, "history": [{"step": 5, "eval_loss": 0.3, "train_loss": 0.4}], "recent_losses": [0.4],
           "timing": None}   # the loop entry as runs wrote it before history.csv
    state = LoopState.from_dict(old)
    assert state.step == 5 and state.step_rows == [] and state.history == old["history"]
    train_steps(state, 6)
    assert [r["step"] for r in state.step_rows] == [6]   # its history starts where it resumed
