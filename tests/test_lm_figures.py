"""The generative studies' figures (analysis/lm_figures.py) from hand-made tables: the numbers they show."""
import numpy as np
import pandas as pd
import pytest

from analysis.figure_data import MissingRuns
from analysis.lm_figures import figure_11, figure_12, figure_13, lr_data


def _runs():
    rows = []
    # full: best lr 1e-4 (loss 1.0); LoRA r=1: best 1e-3; LoRA r=16: best 3e-3 (its grid's edge)
    losses = {("full", None): {1e-5: 1.4, 3e-5: 1.2, 1e-4: 1.0, 3e-4: 1.3},
              ("lora", 1): {3e-4: 1.5, 1e-3: 1.1, 3e-3: 1.2},
              ("lora", 16): {3e-4: 1.4, 1e-3: 1.2, 3e-3: 1.05}}
    for (method, rank), by_lr in losses.items():
        for lr, loss in by_lr.items():
            for seed in (0, 1):
                rows.append({"run_id": f"{method}{rank}-{lr}-{seed}", "method.name": method, "seed": seed,
                             "setup": "S1", "method.rank": rank, "method.targets": "all-linear" if rank else None,
                             "trainer.lr": lr, "task.objective": "cpt", "eval_loss": loss + 0.01 * seed,
                             "forgetting": 1.5 if method == "full" else 1.1, "eval_loss_base": 2.0})
    return pd.DataFrame(rows)


def test_best_learning_rates_and_their_ratio_to_full_fine_tuning():
    best = lr_data(_runs())["best"].set_index("curve")
    assert best.loc["full", "lr"] == 1e-4 and best.loc["LoRA r=1", "lr"] == 1e-3
    assert best.loc["LoRA r=1", "lr_over_full"] == pytest.approx(10.0)
    assert best.loc["LoRA r=16", "lr_over_full"] == pytest.approx(30.0)
    assert bool(best.loc["LoRA r=16", "edge"]) and not bool(best.loc["LoRA r=1", "edge"])
    assert best.loc["LoRA r=1", "eval_loss"] == pytest.approx(1.105)  # the mean over the two seeds


def test_lm_figures_draw_from_the_tables(tmp_path):
    runs = _runs()
    spectrum = pd.DataFrame([{"run_id": f"fullNone-0.0001-{s}", "layer": layer, "matrix_type": t, "r90": r,
                              "out_features": 576, "in_features": 576}
                             for s in (0, 1) for layer in range(3) for t, r in (("q_proj", 100 + layer), ("o_proj", 50))])
    tables = {"runs": runs, "spectrum": spectrum}
    frontier = figure_11(tables, tmp_path)
    assert frontier.path.exists() and len(frontier.data) == len(runs)
    lr = figure_12(tables, tmp_path)
    assert "LoRA r=16" in lr.note  # its best lies at the grid's edge
    r90 = figure_13(tables, tmp_path)
    t = r90.table.set_index("matrix_type")
    assert t.loc["q_proj", "r90_mean"] == pytest.approx(101.0) and t.loc["q_proj", "largest_lora_rank"] == 16


def test_classification_runs_have_no_lm_figures(tmp_path):
    runs = _runs().drop(columns="task.objective")
    with pytest.raises(MissingRuns, match="causal-LM"):
        figure_11({"runs": runs}, tmp_path)
    with pytest.raises(MissingRuns):
        figure_12({"runs": _runs().assign(**{"trainer.lr": 1e-3})}, tmp_path)
