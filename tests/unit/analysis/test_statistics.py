"""The aggregation rules (analysis/statistics.py) on hand-made arrays and run tables whose answers are known: Wilson
and bootstrap intervals, amplification as a ratio of sums (one near-zero projection does not dominate it),
setups (runs with another task.eval_size are never averaged with these), and a point of one seed drawn with no
seed interval and labelled n=1."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from analysis.figures import data as D
from analysis.figures import draw as F
from analysis import statistics as st
from analysis.report import amplification_summary_table, select_pairs
from analysis.runs import config_keys
from analysis.statistics import add_setups


# ---- intervals ---------------------------------------------------------------------------------------------------

def test_wilson_interval_known_values():
    lo, hi = st.wilson_interval(0.5, 100)          # the textbook case: 0.5 ± 0.0962
    assert (lo, hi) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    lo, hi = st.wilson_interval(0.0, 10)           # 0 of 10: [0, 0.2775], never below 0
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.27753, abs=1e-5)
    lo, hi = st.wilson_interval(np.array([0.78, 1.0]), np.array([400, 20]))
    assert lo[0] == pytest.approx(0.73680, abs=1e-4) and hi[0] == pytest.approx(0.81784, abs=1e-4)
    assert hi[1] == pytest.approx(1.0) and lo[1] < 1.0
    assert all(np.isnan(st.wilson_interval(0.7, n)).all() for n in (0, np.nan))  # no test-set size: no interval


def test_seed_interval_is_none_at_one_seed_the_range_at_two_and_normal_like_at_many():
    assert all(math.isnan(v) for v in st.seed_interval([0.7]))
    assert st.seed_interval([0.70, 0.74]) == pytest.approx((0.70, 0.74))
    values = np.random.default_rng(1).normal(0.8, 0.02, size=200)
    lo, hi = st.seed_interval(values)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert lo == pytest.approx(values.mean() - half, abs=0.3 * half) and hi == pytest.approx(values.mean() + half,
                                                                                           abs=0.3 * half)
    assert st.seed_interval(values) == st.seed_interval(values)   # seeded: the same runs give the same numbers
    summary = st.seed_summary([0.7])
    assert summary["n"] == 1 and summary["mean"] == 0.7 and math.isnan(summary["seed_lo"])
    assert st.n_label(1) == "n=1 seed: no interval" and st.n_label(3) == "n=3 seeds"


def test_stratified_bootstrap_resamples_within_each_stratum():
    """rliable's scheme: rows (runs) are drawn per column (stratum) on its own. A stratum that is constant across
    runs adds no spread; one run per stratum can give no interval."""
    scores = np.array([[0.0, 5.0], [1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])   # (runs, strata)
    lo, hi = st.stratified_bootstrap(scores)
    only_first = st.stratified_bootstrap(scores[:, :1], statistic=lambda x: (x.mean(axis=(-2, -1)) + 5.0) / 2)
    assert (lo, hi) == pytest.approx(only_first)    # the constant column only shifts and halves the spread
    assert lo < 3.25 < hi and hi - lo < 1.5
    num, den = np.array([[2.0, 4.0], [2.0, 4.0]]), np.array([[1.0, 1.0], [1.0, 1.0]])
    assert st.amplification_interval(num, den) == pytest.approx((3.0, 3.0))   # identical seeds: no spread
    with pytest.raises(ValueError, match="differ in shape"):
        st.stratified_bootstrap((np.ones((2, 3)), np.ones((3, 2))))


# ---- amplification: a ratio of sums --------------------------------------------------------------------------------

# One run's six query matrices, like LoRA r=1 (q,k,v,o) of the demo: one projection of W on ΔW's direction is
# nearly zero, so its per-matrix ratio is huge.
DELTA = np.array([3.0, 2.8, 2.9, 3.1, 2.7, 2.864])
PROJ = np.array([0.15, 0.14, 0.16, 0.13, 0.1794, 0.0002])


def test_amplification_summary_is_the_ratio_of_sums_not_the_mean_of_ratios():
    got = st.amplification_summary(DELTA, PROJ)
    assert got == pytest.approx(DELTA.sum() / PROJ.sum())
    assert got == pytest.approx(DELTA.mean() / PROJ.mean())            # the table's mean norms divide to it
    mean_of_ratios = (DELTA / PROJ).mean()
    assert mean_of_ratios > 2000 and 15 < got < 25                     # 2394 vs 22.4: one matrix ruled the mean
    assert st.amplification_summary([1.0], [0.0]) == math.inf


def amplification_rows(run_id, seed, method="lora", rank=1, scale=1.0) -> pd.DataFrame:
    """A run's amplification.csv rows for its six query matrices (at r = its rank)."""
    return pd.DataFrame({"run_id": run_id, "method": method, "rank": rank, "seed": seed, "layer": range(6),
                         "matrix_type": "query", "r": rank, "w_fro": 20.0, "delta_fro": scale * DELTA,
                         "delta_top_fro": scale * DELTA, "proj_delta": PROJ, "proj_w": 8.0, "proj_random": 0.2,
                         "amplification": scale * DELTA / PROJ, "phi_out": 0.01, "phi_in": 0.01,
                         "random_phi_out": 1 / 384, "random_phi_in": 1 / 384})


def runs_table(rows: list[dict]) -> pd.DataFrame:
    """A hand-made runs table (flattened config columns as run_table writes them) with its setups added."""
    base = {"model.name": "minilm", "task.name": "fine_foods", "task.train_size": None, "task.eval_size": 400,
            "trainer.max_steps": 80, "trainer.lr": 2e-3, "method.name": "lora", "method.rank": 1,
            "method.targets": json.dumps(["query", "value"]), "seed": 0, "runs_root": "/r", "name": "demo",
            "logger.name": "none", "trainer.progress_bar": True, "eval_examples": 400}
    table = pd.DataFrame([base | r for r in rows])
    identity = [k for k in table if k not in ("run_id", "eval_accuracy", "eval_examples") and st.is_identity_key(k)]
    ids, setups = st.find_setups(table, st.setup_columns(identity))
    return table.assign(setup=ids.loc[table.run_id].values), setups


def test_figure_5_and_the_report_summarise_amplification_by_the_rule():
    runs, _ = runs_table([{"run_id": "a", "seed": 0}, {"run_id": "b", "seed": 1}])
    amps = pd.concat([amplification_rows("a", 0), amplification_rows("b", 1, scale=1.1)], ignore_index=True)
    summary = D.amplification_data(amps, runs)["summary"].iloc[0]
    want = (DELTA.sum() + 1.1 * DELTA.sum()) / (2 * PROJ.sum())
    assert summary.amplification == pytest.approx(want)
    assert summary.amplification != pytest.approx(amps.amplification.mean(), rel=0.5)
    assert summary.layer_median == pytest.approx(np.median(amps.delta_top_fro / amps.proj_delta))
    assert summary.n == 2 and summary.matrices == 12 and summary.amp_lo <= want <= summary.amp_hi
    table = amplification_summary_table(amps.assign(setup="S1", config="LoRA r=1 (q,v)"))
    assert table["amplification Σ‖ΔW_r‖/Σ‖UᵀWV‖"].iloc[0] == pytest.approx(want)


def test_full_fine_tuning_amplification_uses_the_top_r_part_of_its_update():
    runs, _ = runs_table([{"run_id": "f", "method.name": "full", "method.rank": None, "trainer.lr": 1e-4}])
    rows = amplification_rows("f", 0, method="full", rank=None).assign(r=8, delta_fro=10.0, delta_top_fro=4.0)
    summary = D.amplification_data(rows, runs)["summary"].iloc[0]
    assert summary.amplification == pytest.approx(4.0 * 6 / PROJ.sum())          # like for like with LoRA
    assert summary.amplification_whole == pytest.approx(10.0 * 6 / PROJ.sum())   # the whole ΔW, for reference
    assert summary.top_energy == pytest.approx(0.16)


# ---- setups ---------------------------------------------------------------------------------------------------------

def test_runs_with_another_eval_size_are_another_setup_and_never_averaged():
    runs, setups = runs_table([
        {"run_id": "small_s0", "task.eval_size": 100, "seed": 0, "eval_accuracy": 0.64, "eval_examples": 100},
        {"run_id": "small_s1", "task.eval_size": 100, "seed": 1, "eval_accuracy": 0.66, "eval_examples": 100},
        {"run_id": "large_s0", "task.eval_size": 1000, "seed": 0, "eval_accuracy": 0.70, "eval_examples": 1000},
        {"run_id": "large_s1", "task.eval_size": 1000, "seed": 1, "eval_accuracy": 0.72, "eval_examples": 1000,
         "runs_root": "/elsewhere", "name": "other", "logger.name": "wandb", "trainer.progress_bar": False}])
    assert len(setups) == 2 and set(setups.label) == {"task.eval_size=100", "task.eval_size=1000"}
    by_run = runs.set_index("run_id").setup
    assert by_run["small_s0"] == by_run["small_s1"] != by_run["large_s0"] == by_run["large_s1"]  # seed, runs_root,
    held = setups.set_index("label").runs                          # name, logger.*, progress bar: same setup
    assert held["task.eval_size=100"] == "small_s0 small_s1" and held["task.eval_size=1000"] == "large_s0 large_s1"
    summary = D.accuracy_by_rank(runs)["summary"].set_index("setup")
    assert len(summary) == 2 and list(summary.n) == [2, 2]
    assert summary.loc[by_run["small_s0"], "mean"] == pytest.approx(0.65)     # not 0.68, the pooled mean
    assert summary.loc[by_run["large_s0"], "mean"] == pytest.approx(0.71)
    assert summary.loc[by_run["small_s0"], "eval_examples"] == 100            # each with its own Wilson n
    pairs = select_pairs(runs.assign(**{"method.rank": [1, 1, 1, 1]}))
    assert {tuple(p) for p in pairs[["run_a", "run_b"]].values} == {("small_s0", "small_s1"), ("large_s0", "large_s1")}


def test_a_learning_rate_or_alpha_is_part_of_the_configuration_not_averaged_over():
    runs, setups = runs_table([{"run_id": "a", "trainer.lr": 1e-3}, {"run_id": "b", "trainer.lr": 2e-3},
                               {"run_id": "c", "trainer.lr": 2e-3, "method.alpha": 16},
                               {"run_id": "d", "trainer.lr": 2e-3, "method.alpha": 32}])
    assert len(setups) == 1                          # lr and method.* are what a figure compares, within a setup
    r = D.prepare(runs).set_index("run_id")
    assert r.config.nunique() == 4 and "lr=0.001" in r.config["a"] and "alpha=16" in r.config["c"]
    assert (D.accuracy_by_rank(runs.assign(eval_accuracy=0.7))["summary"].n == 1).all()


def test_setup_columns_leave_out_seed_configuration_and_what_never_changes_results():
    keys = ["seed", "method.rank", "method.name", "trainer.lr", "trainer.max_steps", "runs_root", "name",
            "logger.project", "trainer.progress_bar", "task.eval_size", "task.train_size"]
    assert st.setup_columns(keys) == ["task.eval_size", "task.train_size", "trainer.max_steps"]
    assert st.setup_columns(keys, axis=["task.train_size"]) == ["task.eval_size", "trainer.max_steps"]


def test_add_setups_uses_every_identity_key_of_the_configs():
    class FakeRun:
        def __init__(self, config):
            self.config = config
    a = {"seed": 0, "task": {"eval_size": 100}, "method": {"name": "full"}, "logger": {"name": "wandb"}}
    b = {"seed": 1, "task": {"eval_size": 1000}, "method": {"name": "full"}, "logger": {"name": "none"}}
    table = pd.DataFrame([{"run_id": "a", "seed": 0, "task.eval_size": 100, "method.name": "full",
                           "logger.name": "wandb"},
                          {"run_id": "b", "seed": 1, "task.eval_size": 1000, "method.name": "full",
                           "logger.name": "none"}])
    with_setups, setups = add_setups(table, config_keys(FakeRun(a)) + config_keys(FakeRun(b)))
    assert list(with_setups.columns[:2]) == ["run_id", "setup"] and with_setups.setup.nunique() == 2
    assert list(setups.label) == ["task.eval_size=100", "task.eval_size=1000"]


# ---- a point of one seed ----------------------------------------------------------------------------------------

def test_a_point_with_one_seed_has_no_seed_interval_and_says_n_1():
    runs, _ = runs_table([
        {"run_id": "r1_s0", "method.rank": 1, "seed": 0, "eval_accuracy": 0.70},
        {"run_id": "r1_s1", "method.rank": 1, "seed": 1, "eval_accuracy": 0.74},
        {"run_id": "r8_s0", "method.rank": 8, "seed": 0, "eval_accuracy": 0.76},
        {"run_id": "qkvo_r8", "method.rank": 8, "seed": 0, "eval_accuracy": 0.75,
         "method.targets": json.dumps(["query", "key", "value", "attention.output.dense"])}])
    data = D.accuracy_by_rank(runs)
    s = data["summary"].set_index(["family", "rank"])
    assert s.loc[("LoRA (q,v)", 8), "n"] == 1 and math.isnan(s.loc[("LoRA (q,v)", 8), "seed_lo"])
    assert s.loc[("LoRA (q,v)", 1), ["seed_lo", "seed_hi"]].tolist() == pytest.approx([0.70, 0.74])
    assert np.isfinite(s.loc[("LoRA (q,v)", 8), "test_lo"])         # the test-set interval is still there
    fig = F.plot_accuracy_vs_rank(data)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    container = next(c for c in ax.containers if c.lines[0].get_gid() == "mean:LoRA (q,v)")
    bars = {round(seg[0][0]): abs(seg[1][1] - seg[0][1]) for seg in container.lines[2][0].get_segments()}
    assert bars[8] == 0 and bars[1] == pytest.approx(0.04)          # no seed interval at n=1
    notes = [t.get_text() for t in ax.texts]
    assert "n=1" in notes and "n=2" in notes                        # the series' points differ in n: each says it
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "LoRA (q,k,v,o), n=1 seed: no interval" in legend
    table = D.accuracy_table(data["summary"]).set_index(["configuration", "r"])
    assert table.loc[("LoRA (q,v)", 8), "seed interval (95 %)"] == "n=1: none"
    assert table.loc[("LoRA (q,v)", 1), "seed interval (95 %)"] == "[0.700, 0.740] (range of 2)"


def test_runs_from_before_a_default_changed_share_their_setup():
    """trainer.compile's default became auto and trainer.chunked_loss is new: a run made before (compile false, no
    chunked_loss) and one made after (both auto) are one setup, as they are one run directory; compile true is not."""
    from analysis.statistics import find_setups
    runs = pd.DataFrame([
        {"run_id": "before", "trainer.compile": False, "trainer.chunked_loss": None},
        {"run_id": "after", "trainer.compile": "auto", "trainer.chunked_loss": "auto"},
        {"run_id": "compiled", "trainer.compile": True, "trainer.chunked_loss": "auto"}])
    ids, _ = find_setups(runs, ["trainer.chunked_loss", "trainer.compile"])
    assert ids["before"] == ids["after"] != ids["compiled"]
