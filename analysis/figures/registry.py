"""Every figure of the report: its number, its one-line caption and the sweep its runs come from; building
them all, and the report's figure section.

    built = write_figures(out, tables)      # OUT/figures/figN_*; a figure whose runs are missing, or that raises,
                                             # is skipped with the reason (the second also on stderr)
    figures_markdown(built, out)             # "## Figures" with each image, caption and table, or why it is missing
"""
import sys
from dataclasses import dataclass
from pathlib import Path

from analysis.figures.data import MissingRuns
from analysis.figures.draw import (Drawn, figure_1, figure_2, figure_3, figure_4, figure_5, figure_6, figure_7,
                                   figure_8, figure_9, figure_10)
from analysis.figures.curves import figure_16
from analysis.figures.lm import figure_11, figure_12, figure_13
from analysis.figures.params import figure_14, figure_15
from analysis.sections import failure
from analysis.tables import FIGURES_DIR, markdown_table

SWEEPS = {  # the experiment files (conf/experiment/) whose runs each figure needs; demo_*: the small versions
    "rank": "rank_sweep + full_baseline (`python -m experiments.train -m experiment=rank_sweep`, then "
            "`experiment=full_baseline`; demo: demo_lora, demo_targets, demo_full)",
    "subspace": "subspace (`python -m experiments.train -m experiment=subspace`; demo: demo_lora)",
    "subspace_full": "subspace + subspace_full (`python -m experiments.train -m experiment=subspace`, then "
                     "`experiment=subspace_full`; demo: demo_lora, demo_full)",
    "scarce": "data_scarce (`python -m experiments.train -m experiment=data_scarce`; demo: demo_scarce with "
              "demo_lora and demo_full)",
    "lm_rank": "lm_rank_sweep + lm_full (`python -m experiments.train -m experiment=lm_rank_sweep`, then "
               "`experiment=lm_full`)",
    "intrinsic": "intrinsic_dim + rank_sweep + full_baseline (`python -m experiments.train -m "
                 "experiment=intrinsic_dim`, then `experiment=full_baseline`)",
    "dynamics": "any sweep trained with trainer.dynamics=true (the default), e.g. rank_sweep + full_baseline",
    "history": "any run trained since run directories hold history.csv (older runs have none)",
    "lm_lr": "lm_lr_sweep + lm_lr_sweep_full (`python -m experiments.train -m experiment=lm_lr_sweep`, then "
             "`experiment=lm_lr_sweep_full`)",
}


@dataclass(frozen=True)
class Spec:
    number: int         # figure N writes OUT/figures/figN_*
    build: object       # figure_N(tables, out_dir) -> Drawn
    caption: str        # one line, under the image in report.md
    sweep: str          # key of SWEEPS: the experiment files whose runs it needs


FIGURES = [
    Spec(1, figure_1,
         "Test accuracy against LoRA rank per target set, one panel per setup on the whole training set (line: mean "
         "over seeds, error bar: 95 % stratified-bootstrap interval over seeds, none at n=1 and the range of the two "
         "seeds at n=2; band: Wilson 95 % interval of a test-set accuracy, n = test examples; dots: seeds); dashed: "
         "full fine-tuning (band: Wilson, bar at the right: seeds). The LoRA paper's Table 6 on this task.", "rank"),
    Spec(2, figure_2,
         "φ(A_r1, A_r2, i, j) between the right-singular directions of A at two ranks (same seed and setup; r=8 and "
         "r=64 where run) for each adapted matrix at the middle layer (bottom: i, j ≤ 8; a grid of at most 8 a side "
         "is written out in numbers), next to random subspaces (paper Fig. 3). One pair of runs: no interval.",
         "subspace"),
    Spec(3, figure_3,
         "φ between A from two seeds at one rank (r=64 where run, else the largest with two seeds), middle layer "
         "(bottom: i, j ≤ 8; small grids in numbers), next to random subspaces: how many directions two runs share "
         "(paper Fig. 4). One pair "
         "of runs.", "subspace"),
    Spec(4, figure_4,
         "The comparisons of Figures 2 and 3 at the first, middle and last layer, each with the random-subspace "
         "expectation (paper Appendix H.1, Figs. 6-7).", "subspace"),
    Spec(5, figure_5,
         "Top: amplification ‖ΔW_r‖_F / ‖UᵀWV‖_F, U, V ΔW's top-r directions and ΔW_r its top-r part (so full "
         "fine-tuning and LoRA compare alike), as the ratio of sums over layers and seeds (not the mean of "
         "per-layer ratios); error bars: stratified bootstrap over seeds within layers. Full fine-tuning is one line "
         "(the same runs at every r); each LoRA configuration is a point at its rank. Bottom: φ between ΔW's and "
         "W's top-r output directions vs random subspaces (paper Table 7, Fig. 8).", "subspace_full"),
    Spec(6, figure_6,
         "Normalised singular values σ_k/σ_1 of ΔW per setup and matrix type (mean over layers and runs; band: full "
         "FT min-max over them; dotted: the mean energy rank r90; y axis stops at 10⁻³), full fine-tuning vs LoRA: "
         "how high full fine-tuning's rank is next to LoRA's ranks.", "subspace_full"),
    Spec(7, figure_7,
         "Left: the measured peak as recorded (CUDA max allocated, or on CPU the process's peak RSS, which includes "
         "the Python and PyTorch runtime), mean and each run; middle: the memory model's estimate by part (training "
         "tensors only; beside CUDA max allocated, the same quantity, and on CPU not comparable with RSS); right: "
         "training throughput in real (non-padding) tokens/s over the steady steps after the warm-up, as recorded by "
         "each run (whether runs shared the machine is not recorded), with the padded rate.", "rank"),
    Spec(8, figure_8,
         "Test accuracy against the measured peak memory, one marker per configuration (mean over seeds; vertical "
         "bar: seed interval, wide pale bar: Wilson test-set interval, horizontal bar: the range of the runs' "
         "peaks; dots: runs); dashed: the Pareto front of the configuration means.", "rank"),
    Spec(9, figure_9,
         "Train (dashed) and test (solid) accuracy against training-set size, full fine-tuning vs LoRA, within setups "
         "that differ only in task.train_size (mean over seeds; error bars: seed intervals, none at n=1; band: "
         "Wilson test-set interval): the gap is over-fitting.", "scarce"),
    Spec(10, figure_10,
         "Checkpoint size per setup: the whole fine-tuned model vs LoRA's adapter plus classifier head (log scale).",
         "rank"),
    Spec(11, figure_11,
         "Causal LMs: held-out in-domain loss against forgetting (perplexity on out-of-domain text after / before "
         "fine-tuning), one point per run; star: the base model. Down and left is better: LoRA learns less and "
         "forgets less where its points lie up-left of full fine-tuning's frontier (Biderman et al. 2024).", "lm_rank"),
    Spec(12, figure_12,
         "Causal LMs: final held-out loss against learning rate per method and LoRA rank (mean over seeds; circle: "
         "each curve's best, with its ratio to full fine-tuning's best learning rate in the legend and table).",
         "lm_lr"),
    Spec(13, figure_13,
         "Causal LMs: the energy rank r90 of full fine-tuning's ΔW per layer and matrix type (mean over runs; "
         "dashed: the LoRA ranks run in the setup): how far full fine-tuning's update is from LoRA's rank.",
         "lm_rank"),
    Spec(14, figure_14,
         "Test accuracy against the numbers each method trains (log axis; the head, which every method trains, not "
         "counted): full fine-tuning, LoRA over ranks, the subspace method (intrinsic dimension) over d; mean over "
         "seeds at each point's best learning rate (chosen on this test accuracy, an upper envelope over the lrs "
         "run). Dashed lines: d90 and the LoRA rank that first reach 90 % of full fine-tuning's best accuracy on "
         "the same seeds (table below with the lrs, analysis/intrinsic_dim.py).", "intrinsic"),
    Spec(15, figure_15,
         "Rank over training time: top, the energy rank r90 of ΔW at each evaluation (mean over the matrices a run "
         "tracked, then over seeds); bottom, φ(1,1) between ΔW's top output direction and the previous snapshot's "
         "(1: it stayed; near 0: a new one). Full fine-tuning against LoRA per configuration (trainer.dynamics).",
         "dynamics"),
    Spec(16, figure_16,
         "Loss over training per configuration, one panel per setup: train loss (solid) at every logged step and "
         "eval loss (dashed, circles) at each evaluation, the mean over seeds with a band from the lowest to the "
         "highest seed (from each run's history.csv; tables/loss_curves.csv).", "history"),
]


@dataclass(frozen=True)
class Built:
    spec: Spec
    drawn: Drawn | None   # None when skipped
    reason: str = ""      # why it was skipped


def write_figures(out_dir: Path, tables: dict, numbers=None) -> list[Built]:
    """Every figure (or those in `numbers`) from the tables into OUT/figures/; skipped ones are reported and
    their stale files removed. A figure that raises (anything but MissingRuns, and OSError: a full disk is the
    report's) costs that figure alone: it is skipped with the error, said on stderr too, and the next one drawn."""
    fig_dir = Path(out_dir) / FIGURES_DIR
    built = []
    for spec in (s for s in FIGURES if numbers is None or s.number in numbers):
        _remove(fig_dir, spec)  # a figure that is skipped now must not show an earlier run's picture
        try:
            built.append(Built(spec, spec.build(tables, fig_dir)))
            print(f"analysis: figure {spec.number}: {built[-1].drawn.path}", flush=True)
        except MissingRuns as e:
            built.append(Built(spec, None, f"{e}; its runs come from {SWEEPS[spec.sweep]}"))
            print(f"analysis: figure {spec.number} skipped: {built[-1].reason}", flush=True)
        except OSError:
            raise
        except Exception as e:  # a bug or an unforeseen table: this figure is lost, not the report
            _remove(fig_dir, spec)  # what it wrote before it failed
            built.append(Built(spec, None, f"it could not be made: {failure(e)}"))
            print(f"analysis: figure {spec.number} skipped: {built[-1].reason}", file=sys.stderr, flush=True)
    return built


def _remove(fig_dir: Path, spec: Spec) -> None:
    for old in fig_dir.glob(f"fig{spec.number}_*"):
        old.unlink()


def figures_markdown(built: list[Built], out_dir: Path) -> str:
    """The report's figure section: each figure with its one-line caption and table, or why it is missing."""
    lines = ["## Figures", ""]
    for b in built:
        title = f"### Figure {b.spec.number}"
        if b.drawn is None:
            lines += [title, "", f"Skipped: {b.reason}.", ""]
            continue
        rel = b.drawn.path.relative_to(out_dir).as_posix()
        note = f" {b.drawn.note}" if b.drawn.note else ""
        lines += [title, "", f"![Figure {b.spec.number}]({rel})", "", f"*{b.spec.caption}*{note} "
                  f"([PDF]({rel[:-4]}.pdf), [data]({rel[:-4]}.csv))", ""]
        if b.drawn.table is not None:
            lines += [markdown_table(b.drawn.table), ""]
    return "\n".join(lines)
