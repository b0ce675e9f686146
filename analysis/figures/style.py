"""One look for every figure (as tueplots: a dict of rcParams, applied while a figure is drawn), the colours
of methods and target sets, and saving that gives the same bytes for the same figure.

    @styled
    def plot_something(data) -> Figure: ...
    save(fig, out_dir, "fig1_accuracy_vs_rank")   # fig1_accuracy_vs_rank.png and .pdf
"""
import functools
import textwrap
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lowrank.rundir.atomic import write_with

STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "figure.titlesize": 9,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "grid.linewidth": 0.5, "lines.linewidth": 1.2, "lines.markersize": 4, "errorbar.capsize": 2,
    "legend.frameon": False, "image.cmap": "viridis",
    "pdf.fonttype": 42,             # TrueType in the PDF: editable text, and no Type 3 font dates
    "svg.hashsalt": "lowrank",      # fixed ids if anyone saves SVG
    "figure.constrained_layout.use": True,
}
DPI = 150
PANEL = (2.6, 2.2)                  # inches per panel: figures grow with their panel count
FULL_COLOR = "black"                # full fine-tuning, everywhere
RANDOM_COLOR = "#777777"            # random-subspace baselines
MAJORITY_COLOR = "#AA3377"          # the majority-class rate on accuracy plots
COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#999999"]  # Okabe-Ito
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def marker(i: int) -> str:
    return MARKERS[i % len(MARKERS)]


def styled(plot):
    """Draw `plot` under STYLE, whatever the caller's rcParams are, with its titles fitted (fit_titles)."""
    @functools.wraps(plot)
    def wrapped(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            fig = plot(*args, **kwargs)
            fit_titles(fig)
            return fig
    return wrapped


def fit_titles(fig: Figure) -> None:
    """Wrap each panel's title to its grid cell's width and the figure's title to the figure's, so that no title is
    clipped at the edge or runs into its neighbour's; constrained layout then makes room for the extra lines."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    for ax in fig.axes:
        spec = ax.get_subplotspec()
        if spec is not None:
            _wrap(ax.title, 0.92 * spec.get_position(fig).width * fig.bbox.width, renderer)
    if fig._suptitle is not None:
        _wrap(fig._suptitle, 0.96 * fig.bbox.width, renderer)


def _wrap(text, width: float, renderer) -> None:
    """Re-break `text` (a matplotlib Text) at spaces so that each line fits `width` display units."""
    s = text.get_text()
    drawn = text.get_window_extent(renderer).width
    if not s.strip() or drawn <= width:
        return
    per_char = drawn / max(len(line) for line in s.split("\n"))
    chars = max(10, int(width / per_char))
    text.set_text("\n".join(textwrap.fill(line, chars, break_long_words=False) for line in s.split("\n")))


def new_figure(nrows: int = 1, ncols: int = 1, size=PANEL, **kwargs):
    """A Figure (no pyplot: nothing global to close) and its axes grid, always 2-D."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def panels(data, size, by: str = "setup"):
    """One panel per value of data[by], side by side in first-seen order: the Figure and, per panel, (its axes, the
    value, data's rows with that value)."""
    values = list(dict.fromkeys(data[by]))
    fig, axes = new_figure(1, len(values), size=size)
    return fig, [(ax, v, data[data[by] == v]) for ax, v in zip(axes[0], values)]


def save(fig: Figure, out_dir: Path, name: str) -> Path:
    """Write NAME.png and NAME.pdf atomically, without the dates and versions that would make two saves of
    the same figure differ. Returns the PNG's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(STYLE):
        for ext, metadata in (("png", {"Software": None}),
                              ("pdf", {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None})):
            write_with(out_dir / f"{name}.{ext}",
                       lambda tmp: fig.savefig(tmp, format=ext, dpi=DPI, metadata=metadata))
    return out_dir / f"{name}.png"
