"""The generative studies' figures (analysis/figures/lm.py) from hand-made tables: the numbers they show."""
import pandas as pd
import pytest

from analysis.figures.data import MissingRuns
from analysis.figures.lm import figure_11, figure_12, figure_13, lr_data


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
                             for s in (0, 1) for layer in range(3)
                             for t, r in (("q_proj", 100 + layer), ("o_proj", 50))])
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


@pytest.mark.parametrize("number", [11, 12, 13])
def test_lm_figures_pass_a_reviewers_look(number, tmp_path):
    """As tests/unit/analysis/figures/test_figures.py looks at the others: labels and titles, texts and legends
    inside the figure, no two texts overlapping, every legend entry with its n or a reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from analysis.figures import lm as L
    from tests.unit.analysis.figures.test_figures import drawn_texts, inside, overlaps
    runs = _runs()
    spectrum = pd.DataFrame([{"run_id": f"fullNone-0.0001-{s}", "layer": layer, "matrix_type": t, "r90": 100 + layer,
                              "out_features": 576, "in_features": 576}
                             for s in (0, 1) for layer in range(3) for t in ("q_proj", "o_proj", "up_proj")])
    fig = {11: lambda: L.plot_frontier(L.frontier_data(runs)), 12: lambda: L.plot_lr(L.lr_data(runs)),
           13: lambda: L.plot_r90_layers(L.r90_layer_data(spectrum, runs))}[number]()
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip() and "setup S1" in ax.get_title()
        legend = ax.get_legend()
        assert inside(legend.get_window_extent(renderer), fig.bbox)
        assert all("n=" in t.get_text() or "base model" in t.get_text() or number == 13 for t in legend.get_texts())
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_texts(fig)]
    assert all(inside(b, fig.bbox) for _, b in boxes), [t for t, b in boxes if not inside(b, fig.bbox)]
    clashes = [(ta, tb) for k, (ta, a) in enumerate(boxes) for tb, b in boxes[k + 1:] if overlaps(a, b)]
    assert not clashes, clashes[:5]
