"""A report that cannot make one part still writes the rest: a figure or table that raises is left out with one line
(stderr and report.md); full fine-tuning with no gain over the majority class gives no share of that gain rather
than a ZeroDivisionError; a root without run directories is one `error:` line and exit 2, before anything is
written; and a LoRA variant is never paired with plain LoRA. On a small hand-written runs root (the one of
test_analysis_report.py)."""
import dataclasses

import pandas as pd
import pytest
import torch

from analysis import report as report_mod
from analysis.figures import registry
from analysis.figures.params import figure_14
from analysis.intrinsic_dim import threshold_table
from analysis.report import main, select_pairs, subspace_rows
from tests.conftest import error_line
from tests.unit.analysis.test_analysis_report import write_base, write_run


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    base = write_base(root)
    for name, method, seed, rank in (("lora_r2_s0", "lora", 0, 2), ("lora_r2_s1", "lora", 1, 2),
                                     ("full_s0", "full", 0, None)):
        write_run(root, base, name, method, seed, rank)
    return root


def _row(method, seed, acc, rank=None):
    return {"setup": "S1", "method.name": method, "seed": seed, "eval_accuracy": acc, "method.rank": rank,
            "method.targets": '["query", "value"]', "adapted_params": 0 if method == "full" else 6 * rank,
            "run_id": f"{method}{rank}_s{seed}"}


# ---- full fine-tuning at the majority-class rate ------------------------------------------------------------------

def test_no_gain_over_the_majority_class_is_said_not_divided(tmp_path):
    """Full fine-tuning ending at the majority-class rate (20 steps on a skewed test set): its gain is 0, so there is
    no share of it; the table says so, and figure 14 draws with the note under it."""
    runs = pd.DataFrame([_row("full", 0, 0.625), _row("full", 1, 0.625), _row("lora", 0, 0.625, 1),
                         _row("lora", 1, 0.625, 1), _row("lora", 0, 0.5, 4), _row("lora", 1, 0.75, 4)])
    t = threshold_table(runs, majority={"S1": 0.625}).set_index("method")
    assert t.loc["lora", "size"] == 1 and t.loc["lora", "gain_share"] is None
    assert t.loc["lora", "note"] == ("full fine-tuning (0.625) gains nothing over the majority class (0.625): no "
                                     "share of its gain")
    runs["eval_label_counts.0"], runs["eval_label_counts.1"] = 5, 3  # a test set of 8: majority 0.625
    drawn = figure_14({"runs": runs}, tmp_path)
    assert drawn.path.is_file() and "Setup S1: full fine-tuning (0.625) gains nothing" in drawn.note
    assert threshold_table(runs, majority={"S1": 0.5}).set_index("method").loc["lora", "gain_share"] == 1.0


# ---- a part that raises -------------------------------------------------------------------------------------------

def boom(*args, **kwargs):
    raise RuntimeError("boom")


def left_out_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "boom" in line]


def test_a_figure_that_raises_is_left_out_with_one_line(runs_root, tmp_path, capsys, monkeypatch):
    figures = {spec.number: spec for spec in registry.FIGURES}
    monkeypatch.setattr(registry, "FIGURES", [dataclasses.replace(figures[14], build=boom), figures[1]])
    out = tmp_path / "out"
    main([str(runs_root), "--out", str(out), "--max-dim", "8"])
    err = capsys.readouterr().err
    assert left_out_lines(err) == [line for line in err.splitlines() if line.strip()]  # only this on stderr
    (line,) = left_out_lines(err)
    assert line.startswith("analysis: figure 14 skipped: it could not be made: RuntimeError: boom")
    text = (out / "report.md").read_text()
    assert left_out_lines(text) == [line.removeprefix("analysis: figure 14 skipped: ").join(["Skipped: ", "."])]
    assert text.index("### Figure 14") < text.index("Skipped: it could not be made") < text.index("### Figure 1\n")
    assert (out / "figures" / "fig1_accuracy_vs_rank.png").is_file() and not list(out.glob("figures/fig14_*"))
    assert all(len(pd.read_csv(out / "tables" / f"{t}.csv")) for t in ("runs", "spectrum", "subspace", "amplification"))


@pytest.mark.parametrize("part, target, table", [
    ("rank dynamics (tables/dynamics.csv)", "dynamics_table", "dynamics"),
    ("subspace grids (tables/subspace.csv)", "subspace_rows", "subspace"),
    ("summary (tables/summary.csv)", "summary_table", "summary"),
    ("report.md section 'amplification'", "amplification_summary_table", None),
])
def test_a_table_or_section_that_raises_is_left_out_with_one_line(part, target, table, runs_root, tmp_path, capsys,
                                                                   monkeypatch):
    out = tmp_path / "out"
    if table:
        (out / "tables").mkdir(parents=True)
        (out / "tables" / f"{table}.csv").write_text("from an earlier report\n")
    monkeypatch.setattr(report_mod, target, boom)
    main([str(runs_root), "--out", str(out), "--max-dim", "8", "--no-figures"])
    captured = capsys.readouterr()
    assert left_out_lines(captured.err) == [line for line in captured.err.splitlines() if line.strip()]
    (line,) = left_out_lines(captured.err)
    assert line.startswith(f"analysis: {part} left out: RuntimeError: boom (analysis/report.py:")
    text = (out / "report.md").read_text()
    assert "## Parts left out (1)" in text and left_out_lines(text) == [
        f"- {part}: {line.split(' left out: ')[1]}"]
    assert "1 parts left out" in captured.out.splitlines()[-1]
    written = {p.stem for p in (out / "tables").glob("*.csv")}
    assert written == {"runs", "setups", "spectrum", "singular_values", "subspace", "amplification", "rank_advice",
                       "dynamics", "lm_findings", "summary", "loss_curves"} - {table}  # and no stale file from before
    assert "## Energy rank of full fine-tuning" in text and "## Timing" in text


# ---- a root without run directories -------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [[], ["base_weights", "notes/wandb"]])
def test_a_root_without_run_directories_is_one_error_line(layout, tmp_path, capsys, monkeypatch):
    for folder in layout:
        (tmp_path / "empty" / folder).mkdir(parents=True)
    (tmp_path / "empty").mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path)
    error_line(capsys, lambda: main(["empty", "--out", "out"]), "argument roots", "no run directories below 'empty'",
               ".hydra/config.yaml or metrics.json")
    assert not (tmp_path / "out").exists()  # nothing written


# ---- LoRA variants ------------------------------------------------------------------------------------------------

def test_a_variant_is_paired_within_itself_and_without_factors_through_delta():
    rows = [{"run_id": f"{name}_s{seed}", "setup": "S1", "method.name": "lora", "method.rank": 8, "seed": seed,
             "method.targets": '["query"]', **flags}
            for name, flags in (("lora", {}), ("dora", {"method.dora": True}), ("relora", {"method.relora_every": 2}))
            for seed in (0, 1)]
    pairs = select_pairs(pd.DataFrame(rows))
    assert pairs.values.tolist() == [[f"{m}_s0", f"{m}_s1", "seed"] for m in ("dora", "lora", "relora")]
    g = torch.Generator().manual_seed(0)
    dense = {"m": {"layer": 0, "matrix_type": "query", "delta": (torch.linalg.qr(torch.randn(6, 3, generator=g))[0],
                                                                  torch.linalg.qr(torch.randn(5, 3, generator=g))[0])}}
    blocks = subspace_rows("seed", "dora_s0", "dora_s1", dense, dense)
    assert {b.basis.iloc[0] for b in blocks} == {"delta"} and all((b.phi[b.i == b.j] > 1 - 1e-6).all() for b in blocks)
