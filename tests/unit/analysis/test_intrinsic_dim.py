"""d90 and LoRA's r90 from a runs table, against hand counts."""
import pandas as pd

from analysis.intrinsic_dim import threshold_table


def _row(method, seed, acc, dim=None, rank=None, params=0):
    return {"setup": "s1", "method.name": method, "seed": seed, "eval_accuracy": acc, "method.dim": dim,
            "method.rank": rank, "method.targets": '["query", "value"]' if method != "full" else "all-linear",
            "adapted_params": params}


def test_d90_is_the_smallest_d_reaching_ninety_percent_on_common_seeds():
    runs = pd.DataFrame([
        _row("full", 0, 0.80), _row("full", 1, 0.90),                                   # mean 0.85 -> goal 0.765
        _row("subspace", 0, 0.70, dim=100, params=100), _row("subspace", 1, 0.74, dim=100, params=100),  # 0.72
        _row("subspace", 0, 0.74, dim=300, params=300), _row("subspace", 1, 0.80, dim=300, params=300),  # 0.77
        _row("subspace", 0, 0.79, dim=1000, params=1000), _row("subspace", 1, 0.85, dim=1000, params=1000),
        _row("lora", 0, 0.70, rank=1, params=6), _row("lora", 1, 0.72, rank=1, params=6),
        # rank 8 ran seed 0 only: judged against full's seed 0 alone (goal 0.72)
        _row("lora", 0, 0.73, rank=8, params=48),
    ])
    t = threshold_table(runs).set_index("method")
    assert t.loc["subspace", "size"] == 300 and abs(t.loc["subspace", "goal"] - 0.765) < 1e-12
    assert t.loc["subspace", "adapted_params"] == 300 and t.loc["subspace", "seeds"] == 2
    assert t.loc["lora", "size"] == 8 and abs(t.loc["lora", "goal"] - 0.72) < 1e-12 and t.loc["lora", "seeds"] == 1


def test_each_size_and_full_fine_tuning_are_judged_at_their_best_learning_rate():
    def at(lr, *row_args, **kw):
        return {**_row(*row_args, **kw), "trainer.lr": lr}
    runs = pd.DataFrame([
        at(1e-4, "full", 0, 0.80), at(1e-4, "full", 1, 0.90),                 # best full: 0.85 -> goal 0.765
        at(5e-5, "full", 0, 0.60), at(5e-5, "full", 1, 0.62),
        at(0.1, "subspace", 0, 0.70, dim=100, params=100), at(0.1, "subspace", 1, 0.72, dim=100, params=100),
        at(0.3, "subspace", 0, 0.76, dim=100, params=100), at(0.3, "subspace", 1, 0.78, dim=100, params=100),
        at(0.03, "subspace", 0, 0.64, dim=300, params=300), at(0.03, "subspace", 1, 0.66, dim=300, params=300),
        at(0.1, "subspace", 0, 0.80, dim=300, params=300), at(0.1, "subspace", 1, 0.82, dim=300, params=300)])
    t = threshold_table(runs).set_index("method")
    assert t.loc["subspace", "size"] == 100 and t.loc["subspace", "lr"] == 0.3   # 0.77 >= 0.765; 0.71 is not
    assert abs(t.loc["subspace", "goal"] - 0.765) < 1e-12 and t.loc["subspace", "full_lr"] == 1e-4
    # of full fine-tuning's gain over a majority class of 0.6, d = 100 reached (0.77 − 0.6) / (0.85 − 0.6)
    g = threshold_table(runs, majority={"s1": 0.6}).set_index("method")
    assert abs(g.loc["subspace", "gain_share"] - 0.68) < 1e-12 and g.loc["subspace", "majority"] == 0.6
    assert t.loc["subspace", "gain_share"] is None   # no majority rate known: no share of the gain
    # mixing the two lrs of d = 100 would give 0.74 and miss the goal: each lr is judged on its own
    from analysis.figures.params import params_data
    d = params_data(runs).set_index(["curve", "size"])
    best_100 = d.loc[("subspace (q,v)", 100)]
    assert abs(best_100["accuracy"] - 0.77) < 1e-12 and best_100["lr"] == 0.3
    assert abs(d.loc[("subspace (q,v)", 300), "accuracy"] - 0.81) < 1e-12 and d.loc[("full", 0), "lr"] == 1e-4
    assert d.loc[("full", 0), "n"] == 2   # the runs at the best lr


def test_nothing_reaching_the_goal_gives_none_and_no_full_gives_no_row():
    runs = pd.DataFrame([_row("full", 0, 0.9), _row("subspace", 0, 0.5, dim=10, params=10)])
    t = threshold_table(runs)
    assert len(t) == 1 and t.iloc[0]["size"] is None
    assert threshold_table(runs[runs["method.name"] != "full"]).empty


def test_figure_14_draws_every_curve_and_marks_d90(tmp_path):
    from analysis.figures.params import figure_14
    runs = pd.DataFrame([
        _row("full", 0, 0.80, params=22_000_000), _row("full", 1, 0.90, params=22_000_000),
        _row("subspace", 0, 0.70, dim=100, params=100), _row("subspace", 1, 0.74, dim=100, params=100),
        _row("subspace", 0, 0.74, dim=300, params=300), _row("subspace", 1, 0.80, dim=300, params=300),
        _row("lora", 0, 0.70, rank=1, params=6144), _row("lora", 0, 0.80, rank=8, params=49152)])
    runs["eval_label_counts.0"], runs["eval_label_counts.1"] = 257, 143   # the test set's labels: majority 0.6425
    drawn = figure_14({"runs": runs}, tmp_path)
    assert drawn.path.is_file() and set(drawn.table.majority) == {0.6425}
    from analysis.figures.params import plot_params
    fig = plot_params(drawn.data, drawn.table)
    (line,) = [a for a in fig.findobj() if a.get_gid() == "majority"]
    assert set(line.get_ydata()) == {0.6425}
    assert set(drawn.data.curve) == {"full", "subspace (q,v)", "LoRA (q,v)"}
    marks = drawn.table.set_index("method")
    assert marks.loc["subspace", "size"] == 300 and marks.loc["lora", "size"] == 8


def test_figure_15_averages_matrices_then_seeds(tmp_path):
    from analysis.figures.params import figure_15
    runs = pd.DataFrame([{"run_id": f"r{s}", "setup": "s1", "method.name": "lora", "method.rank": 4, "seed": s,
                          "method.targets": '["query", "value"]'} for s in (0, 1)]
                        + [{"run_id": "f0", "setup": "s1", "method.name": "full", "method.rank": None, "seed": 0,
                            "method.targets": "all-linear"}])
    dyn = pd.DataFrame([
        {"run_id": "r0", "step": 2, "module": "a", "r90": 2, "phi_1": None, "phi_8": None},
        {"run_id": "r0", "step": 2, "module": "b", "r90": 4, "phi_1": None, "phi_8": None},
        {"run_id": "r1", "step": 2, "module": "a", "r90": 3, "phi_1": None, "phi_8": None},
        {"run_id": "r1", "step": 2, "module": "b", "r90": 3, "phi_1": None, "phi_8": None},
        {"run_id": "r0", "step": 4, "module": "a", "r90": 4, "phi_1": 1.0, "phi_8": 0.5},
        {"run_id": "r0", "step": 4, "module": "b", "r90": 4, "phi_1": 0.0, "phi_8": 0.5},
        {"run_id": "r1", "step": 4, "module": "a", "r90": 2, "phi_1": 1.0, "phi_8": 0.5},
        {"run_id": "r1", "step": 4, "module": "b", "r90": 2, "phi_1": 1.0, "phi_8": 0.5},
        {"run_id": "f0", "step": 4, "module": "a", "r90": 90, "phi_1": 0.9, "phi_8": 0.9}])
    drawn = figure_15({"runs": runs, "dynamics": dyn}, tmp_path)
    d = drawn.data.set_index(["config", "step"])
    lora = [c for c in drawn.data.config.unique() if c != "full"][0]
    assert d.loc[(lora, 2), "r90"] == 3.0 and d.loc[(lora, 4), "r90"] == 3.0  # (3 + 3) / 2, (4 + 2) / 2
    assert d.loc[(lora, 4), "phi_1"] == 0.75 and d.loc[(lora, 4), "n"] == 2
    assert d.loc[("full", 4), "r90"] == 90 and drawn.path.is_file()
