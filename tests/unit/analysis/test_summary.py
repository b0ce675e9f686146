"""The summary (analysis/summary.py) on hand-made runs tables whose answers are known, its sentences for each case
(a rank reaches full fine-tuning, none does, no full fine-tuning, full fine-tuning without an interval), and the
command that reads run directories without their ΔW."""
import math

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from analysis import statistics as st
from analysis import summary as S
from lowrank.rundir.layout import COMPLETE, write_metrics
from tests.conftest import compose_cfg, error_line

FULL_PARAMS = 1_000_000


def _run(method, seed, accuracy, rank=None, setup="S1", memory=2.0e9, lm=False):
    trainable = FULL_PARAMS if method == "full" else 1000 * rank
    row = {"run_id": f"{setup}/{method}{rank or ''}-{seed}", "setup": setup, "method.name": method, "seed": seed,
           "method.rank": rank, "method.targets": '["query", "value"]' if rank else None, "trainer.lr": 1e-3,
           "trainable_params": trainable, "total_params": FULL_PARAMS, "peak_memory_bytes": memory,
           "tokens_per_second": 100.0 + seed, "eval_examples": 400}
    if lm:
        return row | {"task.objective": "cpt", "eval_loss": accuracy}
    return row | {"eval_accuracy": accuracy}


def _sweep(lora8=(0.80, 0.82)):
    """full (2 seeds: 0.82, 0.84), LoRA r=1 (0.60, 0.62), r=8 (`lora8`), r=64 (0.83, 0.83)."""
    return pd.DataFrame([_run("full", 0, 0.82), _run("full", 1, 0.84)]
                        + [_run("lora", s, a, 1, memory=1.0e9) for s, a in enumerate((0.60, 0.62))]
                        + [_run("lora", s, a, 8, memory=1.0e9) for s, a in enumerate(lora8)]
                        + [_run("lora", s, 0.83, 64, memory=1.2e9) for s in (0, 1)])


def test_the_table_holds_each_configurations_seed_mean_intervals_and_cost():
    table = S.summary_table(_sweep()).set_index("configuration")
    assert list(table.index) == ["full", "LoRA r=1 (q,v)", "LoRA r=8 (q,v)", "LoRA r=64 (q,v)"]
    r8 = table.loc["LoRA r=8 (q,v)"]
    assert r8["mean"] == pytest.approx(0.81) and r8.n == 2 and r8.metric == S.ACCURACY
    assert (r8.seed_lo, r8.seed_hi) == pytest.approx(st.seed_interval([0.80, 0.82]))   # the range of the two
    lo, hi = st.wilson_interval(0.81, 400)
    assert (r8.test_lo, r8.test_hi) == pytest.approx((lo, hi)) and (r8.compare_lo, r8.compare_hi) == (r8.test_lo,
                                                                                                       r8.test_hi)
    assert r8.trainable_share == pytest.approx(8000 / FULL_PARAMS) and r8["size"] == "r=8" and r8.size_value == 8
    assert r8.peak_memory_bytes == 1.0e9 and r8.tokens_per_second == 100.5 and math.isnan(r8.r90)
    spectrum = pd.DataFrame({"run_id": ["S1/lora8-0"] * 2 + ["S1/lora8-1"], "r90": [2, 4, 6]})
    assert S.summary_table(_sweep(), spectrum).set_index("configuration").loc["LoRA r=8 (q,v)", "r90"] == 4.0
    # a matrix without r90 (too wide for an exact spectrum) is left out of the mean, not counted as zero
    spectrum = pd.DataFrame({"run_id": ["S1/lora8-0"] * 3 + ["S1/lora8-1"], "r90": [2, 4, None, 6]})
    assert S.summary_table(_sweep(), spectrum).set_index("configuration").loc["LoRA r=8 (q,v)", "r90"] == 4.0


def test_the_smallest_rank_within_full_fine_tunings_interval_is_named_with_its_numbers():
    table = S.summary_table(_sweep())
    full = table.set_index("configuration").loc["full"]
    (setup, sentence), = S.summary_sentences(table)
    assert setup == "S1"
    # r=1 (0.61) is below full's Wilson lower end (~0.79); r=8 (0.81) is above it
    assert sentence.startswith("LoRA r=8 (q,v) is the smallest rank of LoRA (q,v) within the interval of full "
                               "fine-tuning")
    assert f"0.810 {S.fmt_interval(*st.wilson_interval(0.81, 400))}" in sentence
    assert f"vs 0.830 {S.fmt_interval(full.test_lo, full.test_hi)}" in sentence
    assert "0.8 % of the model's parameters trained and 50 % of its peak memory" in sentence


def test_no_rank_reaching_full_fine_tuning_is_said_with_the_best_one():
    (_, sentence), = S.summary_sentences(S.summary_table(_sweep(lora8=(0.50, 0.52)).query("`method.rank` != 64")))
    assert sentence.startswith("No rank of LoRA (q,v) reaches the interval of full fine-tuning: its best, r=1, "
                               "has test accuracy 0.610")


def test_a_setup_without_full_fine_tuning_says_so_and_names_its_best():
    runs = _sweep()
    runs = runs[runs["method.name"] == "lora"].assign(setup="S2")
    (setup, sentence), = S.summary_sentences(S.summary_table(runs))
    assert setup == "S2" and sentence.startswith("No full fine-tuning in this setup")
    assert "the best configuration is LoRA r=64 (q,v) (test accuracy 0.830" in sentence


def test_causal_lms_report_loss_and_perplexity_and_need_full_seeds_for_an_interval():
    runs = pd.DataFrame([_run("full", 0, 2.0, lm=True), _run("lora", 0, 2.2, 8, lm=True),
                         _run("lora", 1, 2.4, 8, lm=True)])
    table = S.summary_table(runs).set_index("configuration")
    lora = table.loc["LoRA r=8 (q,v)"]
    assert lora.metric == S.LOSS and lora["mean"] == pytest.approx(2.3)
    assert lora.perplexity == pytest.approx(math.exp(2.3)) and np.isnan(lora.test_lo)
    assert (lora.compare_lo, lora.compare_hi) == pytest.approx((2.2, 2.4))   # the seed interval
    (_, sentence), = S.summary_sentences(S.summary_table(runs))
    assert sentence == "Full fine-tuning has n=1 and no interval: no rank is compared with it (its held-out loss " \
                       "is 2.000)."
    two = pd.concat([runs, pd.DataFrame([_run("full", 1, 2.5, lm=True)])])   # full: [2.0, 2.5]; LoRA 2.3 is within
    (_, sentence), = S.summary_sentences(S.summary_table(two))
    assert sentence.startswith("LoRA r=8 (q,v) is the smallest rank") and "held-out loss 2.300 [2.200, 2.400] vs " \
                                                                           "2.250 [2.000, 2.500]" in sentence
    lines = "\n".join(S.summary_lines(S.summary_table(two), pd.DataFrame({"setup": ["S1"], "label": [""]})))
    assert "| held-out loss |" in lines and "| perplexity |" in lines and S.fmt_metric(math.exp(2.3)) in lines


def test_formats():
    assert [S.fmt_percent(x) for x in (0.41, 0.032, 0.0033, 1.0)] == ["41 %", "3.2 %", "0.33 %", "100 %"]
    assert S.fmt_interval(0.79, float("nan")) == "none" and S.fmt_gib(2 ** 30) == "1.00 GiB"


def _write_run(root, study, name, overrides, metrics):
    config = OmegaConf.to_container(compose_cfg(["logger=none", *overrides]), resolve=True)
    run_dir = root / study / name
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), run_dir / ".hydra" / "config.yaml")
    write_metrics(run_dir, {"status": COMPLETE, "eval_examples": 400, "trainable_params": 74_498,
                            "total_params": 22_787_714, "peak_memory_bytes": 2 ** 30, "tokens_per_second": 1000.0}
                  | metrics, config)


def test_the_command_prints_and_writes_the_summary_from_configs_and_metrics_alone(tmp_path, capsys):
    """No ΔW file anywhere: configs and metrics are enough; a config trained twice counts once."""
    runs = tmp_path / "runs"
    for seed, acc in ((0, 0.80), (1, 0.82)):
        _write_run(runs, "a", f"r8s{seed}", ["method.rank=8", f"seed={seed}"], {"eval_accuracy": acc})
        _write_run(runs, "a", f"full{seed}", ["method=full", f"seed={seed}"],
                   {"eval_accuracy": acc + 0.01, "trainable_params": 22_713_986})
    _write_run(runs, "b", "r8s0", ["method.rank=8", "seed=0"], {"eval_accuracy": 0.80})
    S.main([str(runs), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    written = (tmp_path / "out" / S.SUMMARY_FILE).read_text()
    assert printed.strip() == written.strip()
    assert "4 runs, 1 skipped" in written and "b/r8s0`: the same config as another run" in written
    assert "| LoRA r=8 (q,v) | 2 | 0.810 | [0.800, 0.820] (range of 2) |" in written
    assert "LoRA r=8 (q,v) is the smallest rank of LoRA (q,v) within the interval of full fine-tuning" in written
    table = pd.read_csv(tmp_path / "out" / "tables" / "summary.csv")
    assert list(table.configuration) == ["full", "LoRA r=8 (q,v)"] and list(table.n) == [2, 2]


def test_the_command_names_a_bad_root_in_one_line(tmp_path, capsys):
    error_line(capsys, lambda: S.main([str(tmp_path / "nowhere")]), "argument roots", "does not exist")
    error_line(capsys, lambda: S.main([str(tmp_path)]), "argument roots", "no run directories")
