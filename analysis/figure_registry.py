"""Every figure of the report: its number, its one-line caption and the sweep its runs come from; building
them all, and the report's figure section.

    built = write_figures(out, tables)      # OUT/figures/figN_*; a figure whose runs are missing is skipped
    figures_markdown(built, out)             # "## Figures" with each image, caption and table, or why it is missing
"""
from dataclasses import dataclass
from pathlib import Path

from .figure_data import MissingRuns
from .figures import (Drawn, figure_1, figure_2, figure_3, figure_4, figure_5, figure_6, figure_7, figure_8,
                      figure_9, figure_10)
from .tables import FIGURES_DIR, markdown_table

SWEEPS = {  # the experiment files (conf/experiment/) whose runs each figure needs; demo_*: the small versions
    "rank": "rank_sweep + full_baseline (`python -m experiments.train -m +experiment=rank_sweep`, then "
            "`+experiment=full_baseline`; demo: demo_lora, demo_targets, demo_full)",
    "subspace": "subspace (`python -m experiments.train -m +experiment=subspace`; demo: demo_lora)",
    "subspace_full": "subspace + subspace_full (`python -m experiments.train -m +experiment=subspace`, then "
                     "`+experiment=subspace_full`; demo: demo_lora, demo_full)",
    "scarce": "data_scarce (`python -m experiments.train -m +experiment=data_scarce`; demo: demo_scarce with "
              "demo_lora and demo_full)",
}


@dataclass(frozen=True)
class Spec:
    number: int         # figure N writes OUT/figures/figN_*
    build: object       # figure_N(tables, out_dir) -> Drawn
    caption: str        # one line, under the image in report.md
    sweep: str          # key of SWEEPS: the experiment files whose runs it needs


FIGURES = [
    Spec(1, figure_1,
         "Test accuracy against LoRA rank per target set (line: mean ± std over seeds, dots: seeds); dashed: full "
         "fine-tuning (band: ± std). The LoRA paper's Table 6 on this task.", "rank"),
    Spec(2, figure_2,
         "φ(A_r1, A_r2, i, j) between the right-singular directions of A at two ranks (same seed; r=8 and r=64 "
         "where run), for each adapted matrix at the middle layer (bottom: i, j ≤ 8, or the smaller rank), next to "
         "random subspaces (paper Fig. 3).", "subspace"),
    Spec(3, figure_3,
         "φ between A from two seeds at one rank (r=64 where run, else the largest with two seeds), middle layer, "
         "next to random subspaces: how many directions two runs share (paper Fig. 4).", "subspace"),
    Spec(4, figure_4,
         "The comparisons of Figures 2 and 3 at the first, middle and last layer (paper Appendix H.1, Figs. 6-7).",
         "subspace"),
    Spec(5, figure_5,
         "Left: amplification ‖ΔW‖_F / ‖UᵀWV‖_F with U, V ΔW's top-r directions (lines: means over layers and seeds, "
         "dots: each); right: φ between ΔW's and W's top-r output directions vs random (paper Table 7, Fig. 8).",
         "subspace_full"),
    Spec(6, figure_6,
         "Normalised singular values of ΔW per matrix type, full fine-tuning vs LoRA, with the energy rank r90 "
         "(dotted): how high full fine-tuning's rank is next to LoRA's ranks.", "subspace_full"),
    Spec(7, figure_7,
         "Peak memory per method and rank (stacked bars: the memory model's weights / gradients / optimizer / bf16 "
         "weight copies / activations where runs record it, a dash: its peak, a plain bar: the measured peak where "
         "they do not; diamonds: measured peak per run) and training throughput (mean ± std, dots: runs).",
         "rank"),
    Spec(8, figure_8,
         "Test accuracy against measured peak memory, one point per run; dashed: the Pareto front (the most "
         "accurate run at each memory).", "rank"),
    Spec(9, figure_9,
         "Train (dashed) and test (solid) accuracy against training-set size, full fine-tuning vs LoRA (mean ± std "
         "over seeds): the gap is over-fitting.", "scarce"),
    Spec(10, figure_10,
         "Checkpoint size per model and task: the whole fine-tuned model vs LoRA's adapter plus classifier head "
         "(log scale).", "rank"),
]


@dataclass(frozen=True)
class Built:
    spec: Spec
    drawn: Drawn | None   # None when skipped
    reason: str = ""      # why it was skipped


def write_figures(out_dir: Path, tables: dict, numbers=None) -> list[Built]:
    """Every figure (or those in `numbers`) from the tables into OUT/figures/; skipped ones are reported and
    their stale files removed."""
    fig_dir = Path(out_dir) / FIGURES_DIR
    built = []
    for spec in (s for s in FIGURES if numbers is None or s.number in numbers):
        for old in fig_dir.glob(f"fig{spec.number}_*"):
            old.unlink()  # a figure that is skipped now must not show an earlier run's picture
        try:
            built.append(Built(spec, spec.build(tables, fig_dir)))
            print(f"figure {spec.number}: {built[-1].drawn.path}")
        except MissingRuns as e:
            built.append(Built(spec, None, f"{e}; its runs come from {SWEEPS[spec.sweep]}"))
            print(f"figure {spec.number} skipped: {built[-1].reason}")
    return built


def figures_markdown(built: list[Built], out_dir: Path) -> str:
    """The report's figure section: each figure with its one-line caption and table, or why it is missing."""
    lines = ["## Figures", ""]
    for b in built:
        title = f"### Figure {b.spec.number}"
        if b.drawn is None:
            lines += [title, "", f"Skipped: {b.reason}.", ""]
            continue
        rel = b.drawn.path.relative_to(out_dir).as_posix()
        lines += [title, "", f"![Figure {b.spec.number}]({rel})", "", f"*{b.spec.caption}* "
                  f"([PDF]({rel[:-4]}.pdf), [data]({rel[:-4]}.csv))", ""]
        if b.drawn.table is not None:
            lines += [markdown_table(b.drawn.table.fillna("")), ""]
    return "\n".join(lines)
