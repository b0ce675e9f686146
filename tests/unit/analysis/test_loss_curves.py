"""Loss curves (analysis/loss_curves.py, figure 16) from history.csv files written by hand into run directories: the
table's mean/min/max over seeds per configuration and step, runs without history.csv counted, and the figure drawn
from the table passing the reviewers' look of the other figures."""
import pandas as pd
import pytest

from analysis.figures import curves
from analysis.loss_curves import loss_curves_table, missing_line, read_histories
from lowrank.rundir.layout import HISTORY_FILE
from tests.unit.analysis.figures import test_figures as look


def _history(run_dir, train, evals):
    """history.csv as the trainer writes it: eval columns empty except on evaluation steps."""
    rows = [{"step": s, "train_loss": x, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_second": 500.0,
             "eval_loss": evals.get(s), "eval_accuracy": 0.8 if s in evals else None} for s, x in train.items()]
    run_dir.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(run_dir / HISTORY_FILE, index=False)


def _runs(ids):
    return pd.DataFrame([{"run_id": i, "setup": "S1", "method.name": m, "seed": s, "method.rank": r,
                          "method.targets": '["query", "value"]' if r else None} for i, m, r, s in ids])


@pytest.fixture
def curves_and_runs(tmp_path):
    ids = [("full0", "full", None, 0), ("full1", "full", None, 1), ("lora0", "lora", 8, 0), ("old", "lora", 8, 1)]
    _history(tmp_path / "full0", {1: 1.0, 2: 0.8}, {2: 0.9})
    _history(tmp_path / "full1", {1: 1.2, 2: 0.6}, {2: 0.7})
    _history(tmp_path / "lora0", {1: 1.1, 2: 1.0}, {2: 1.05})
    history, missing = read_histories({i: tmp_path / i for i, *_ in ids})
    return loss_curves_table(history, _runs(ids)), _runs(ids), missing


def test_curves_are_the_seeds_mean_min_and_max_per_configuration_and_step(curves_and_runs):
    table, runs, missing = curves_and_runs
    assert missing == ["old"] and missing_line(missing).startswith("1 run without history.csv")
    full = table[table.config == "full"].set_index("step")
    assert full.loc[2, ["train_loss_mean", "train_loss_min", "train_loss_max"]].tolist() == pytest.approx([0.7, 0.6,
                                                                                                          0.8])
    assert full.loc[2, ["eval_loss_mean", "eval_loss_min", "eval_loss_max"]].tolist() == pytest.approx([0.8, 0.7, 0.9])
    assert full.loc[1, "eval_loss_mean"] != full.loc[1, "eval_loss_mean"]   # NaN: no evaluation at step 1
    assert full.n_runs.tolist() == [2, 2] and full.n_eval.tolist() == [0, 2]
    lora = table[table.config == "LoRA r=8 (q,v)"]
    assert lora.n_runs.tolist() == [1, 1] and lora.train_loss_mean.tolist() == [1.1, 1.0]
    assert list(dict.fromkeys(table.config)) == ["full", "LoRA r=8 (q,v)"]   # figure order


def test_figure_16_draws_the_table_and_counts_the_runs_left_out(curves_and_runs, tmp_path):
    table, runs, _ = curves_and_runs
    drawn = curves.figure_16({"loss_curves": table, "runs": runs}, tmp_path)
    assert drawn.path.is_file() and drawn.note == "1 run without history.csv (trained before it was written) left out."
    assert drawn.table.set_index("config").loc["full", ["final_train_loss", "final_eval_loss"]].tolist() == \
        pytest.approx([0.7, 0.8])
    ax = curves.plot_loss_curves(table).axes[0]
    train = next(line for line in ax.get_lines() if line.get_gid() == "train:full")
    assert train.get_ydata().tolist() == pytest.approx([1.1, 0.7])
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(look.DRAW, 16, lambda t: curves.plot_loss_curves(t["loss_curves"]))
        look.test_figures_pass_a_reviewers_look({"loss_curves": table}, 16)


def test_no_history_at_all_skips_the_figure_naming_why(tmp_path):
    with pytest.raises(curves.MissingRuns, match="2 runs without history.csv"):
        curves.figure_16({"loss_curves": loss_curves_table(*read_histories({})[:1], _runs([])),
                          "runs": _runs([("a", "full", None, 0), ("b", "full", None, 1)])}, tmp_path)
