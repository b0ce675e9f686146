"""report.md opens with the summary: on a report over real tiny runs (full fine-tuning and LoRA at two ranks, two
seeds), every number of the summary equals what the tables below it give (tables/runs.csv, setups.csv, spectrum.csv,
parsed back), its sentences name the smallest rank within full fine-tuning's interval, and the loss curves are the
history.csv files written into the runs in place of the trainer's (one removed: older runs are counted out)."""
import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import statistics as st
from analysis.figures.data import interval_text, prepare
from analysis.report import main as report
from lowrank.rundir.layout import HISTORY_FILE
from lowrank.train.recipe import train
from tests.conftest import compose_cfg

pytestmark = pytest.mark.slow

SMALLEST = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.max_length=16", "task.train_size=16",
            "task.eval_size=8", "trainer.eval_interval=2", "logger=none", "trainer.progress_bar=false"]
RUNS = {  # name -> overrides
    **{f"full_s{s}": ["method=full", "method.targets=[query,value]", f"seed={s}"] for s in (0, 1)},
    **{f"lora_r1_s{s}": ["method.rank=1", f"seed={s}"] for s in (0, 1)},
    "lora_r4_s0": ["method.rank=4", "seed=0"],
}
WITH_HISTORY = ["full_s0", "full_s1", "lora_r1_s0", "lora_r1_s1"]   # lora_r4_s0 stands for a run from before


def write_history(run_dir: Path, shift: float) -> None:
    pd.DataFrame({"step": [1, 2], "train_loss": [0.7 + shift, 0.6 + shift], "lr": [1e-3, 0.0],
                  "grad_norm": [1.0, 0.9], "tokens_per_second": [100.0, 110.0], "eval_loss": [None, 0.65 + shift],
                  "eval_accuracy": [None, 0.5]}).to_csv(run_dir / HISTORY_FILE, index=False)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    root = tmp_path_factory.mktemp("summary") / "runs"
    for name, overrides in RUNS.items():
        train(compose_cfg(SMALLEST + overrides + [f"runs_root={root}"]), run_dir=root / "study" / name)
    for k, name in enumerate(WITH_HISTORY):  # known curves in place of the trainer's own
        write_history(root / "study" / name, 0.01 * k)
    (root / "study" / "lora_r4_s0" / HISTORY_FILE).unlink()  # as a run trained before runs wrote history.csv
    out = root.parent / "report"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report([str(root), "--out", str(out), "--max-dim", "8", "--threads", "1", "--no-figures"])
    tables = {name: pd.read_csv(out / "tables" / f"{name}.csv") for name in ("runs", "setups", "spectrum",
                                                                              "loss_curves")}
    return tables, (out / "report.md").read_text(), printed.getvalue()


def summary_section(text: str) -> str:
    head = text.split("\n## ", 2)
    assert head[1].startswith("Summary\n"), "report.md does not open with the summary"
    return head[1]


def parse_tables(section: str) -> dict[str, pd.DataFrame]:
    """{setup: its summary table as strings}, read back from the markdown."""
    out = {}
    for block in section.split("\n### ")[1:]:
        setup = block.split()[0]
        rows = [ln for ln in block.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
        cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
        out[setup] = pd.DataFrame(cells[1:], columns=cells[0])
    return out


def expected_rows(tables) -> pd.DataFrame:
    """What each summary cell must say, from runs.csv and spectrum.csv alone."""
    runs = prepare(tables["runs"])
    r90 = tables["spectrum"].groupby("run_id").r90.agg(["sum", "size"])
    rows = []
    for (setup, config), g in runs.groupby(["setup", "config"]):
        acc = g.eval_accuracy.to_numpy(float)
        mean = acc.mean()
        lo, hi = st.wilson_interval(mean, g.eval_examples.iloc[0])
        held = r90.loc[g.run_id]
        rows.append({"setup": setup, "configuration": config, "n seeds": str(len(g)), "test accuracy": mean,
                     "seed interval (95 %)": interval_text(*st.seed_interval(acc), len(g)),
                     "test_lo": float(lo), "test_hi": float(hi), "mean": mean,
                     "trainable": g.trainable_params.mean(), "share": g.trainable_params.mean() / g.total_params.mean(),
                     "r90 of ΔW": held["sum"].sum() / held["size"].sum(), "memory": g.peak_memory_bytes.mean(),
                     "tokens/s": g.tokens_per_second.mean(), "rank": g["rank"].iloc[0]})
    return pd.DataFrame(rows).set_index(["setup", "configuration"])


def test_report_md_opens_with_the_summary_whose_numbers_are_the_tables(reported):
    tables, text, _ = reported
    assert text.index("## Summary") < text.index("## Setups")
    shown = parse_tables(summary_section(text))
    labels = dict(zip(tables["setups"].setup, tables["setups"].label.fillna("")))
    assert set(shown) == set(labels)
    for setup, label in labels.items():
        assert f"### {setup}" + (f" ({label})" if label else "") + "\n" in text
    want = expected_rows(tables)
    n = 0
    for setup, t in shown.items():
        for row in t.to_dict("records"):
            e = want.loc[(setup, row["configuration"])]
            assert row["n seeds"] == e["n seeds"]
            assert float(row["test accuracy"]) == pytest.approx(e["test accuracy"], abs=5.01e-4)
            assert row["seed interval (95 %)"] == e["seed interval (95 %)"]
            lo, hi = map(float, re.findall(r"[\d.]+", row["test-set interval (Wilson 95 %)"]))
            assert (lo, hi) == pytest.approx((e.test_lo, e.test_hi), abs=5.01e-4)
            count, share = re.fullmatch(r"([\d,]+) \(([\d.]+) %\)", row["trainable parameters (share)"]).groups()
            assert int(count.replace(",", "")) == e.trainable
            assert float(share) == pytest.approx(100 * e.share, rel=0.05)
            assert float(row["r90 of ΔW"]) == pytest.approx(e["r90 of ΔW"], abs=0.05)
            assert float(row["peak memory"].removesuffix(" GiB")) == pytest.approx(e.memory / 2 ** 30, abs=5e-3)
            assert float(row["tokens/s"].replace(",", "")) == pytest.approx(e["tokens/s"], abs=0.5)
            n += 1
    assert n == len(want) == 3   # full, LoRA r=1, LoRA r=4 in one setup


def test_the_sentences_name_the_smallest_rank_within_full_fine_tunings_interval(reported):
    tables, text, _ = reported
    want = expected_rows(tables).loc["S1"]
    full = want.loc["full"]
    sentences = [ln[2:] for ln in summary_section(text).splitlines() if ln.startswith("- ")]
    (sentence,) = sentences   # one LoRA family (q,v)
    numbers = [float(x) for x in re.findall(r"\d+\.\d+|\d+", sentence.split(" is the smallest")[-1])]
    if " is the smallest rank" in sentence:
        config = sentence.split(" is the smallest rank")[0]
        e = want.loc[config]
        assert e["mean"] >= full.test_lo   # it reaches full fine-tuning's interval ...
        smaller = want[(want["rank"] < e["rank"])]
        assert (smaller["mean"] < full.test_lo).all()   # ... and no smaller rank does
        expected = [e["mean"], e.test_lo, e.test_hi, full["mean"], full.test_lo, full.test_hi, 100 * e.share,
                    100 * e.memory / full.memory]
        assert numbers[:6] == pytest.approx(expected[:6], abs=5.01e-4)
        assert numbers[6:] == pytest.approx(expected[6:], rel=0.05)
    else:
        assert sentence.startswith("No rank of LoRA (q,v) reaches the interval of full fine-tuning")
        assert (want.loc[want["rank"].notna(), "mean"] < full.test_lo).all()


def test_loss_curves_are_the_runs_histories_and_older_runs_are_counted_out(reported):
    tables, _, printed = reported
    curves = tables["loss_curves"].set_index(["config", "step"])
    full = curves.loc[("full", 2)]
    assert (full.train_loss_mean, full.train_loss_min, full.train_loss_max) == pytest.approx((0.605, 0.6, 0.61))
    assert (full.eval_loss_mean, full.n_eval) == (pytest.approx(0.655), 2)
    assert np.isnan(curves.loc[("full", 1), "eval_loss_mean"])
    assert curves.loc[("LoRA r=1 (q,v)", 1), "train_loss_mean"] == pytest.approx(0.725)
    assert "LoRA r=4 (q,v)" not in set(tables["loss_curves"].config)
    assert "analysis: 1 run without history.csv (trained before runs wrote it) left out of the loss curves" in printed
