"""The analysis output as files: the output folder's layout, the CSV writer every table and figure's data goes
through, and the markdown table report.md shows tables in.

    write_csv(table_path(out, "spectrum"), spectrum)   # OUT/tables/spectrum.csv, 7 significant digits
    markdown_table(df)                                 # "| a | b |", "|---|---|", "| 1 | 2 |" as lines
"""
from pathlib import Path

import pandas as pd

from lowrank.rundir.atomic import write_text

# the output folder: OUT/tables/*.csv (analysis.report), OUT/figures/figN_* (figure_registry), OUT/report.md, and
# OUT/timing.json: seconds per phase and peak memory of the analysis itself (not a table: it differs at every run)
TABLES_DIR, FIGURES_DIR, REPORT_FILE, TIMING_FILE = "tables", "figures", "report.md", "timing.json"


def table_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / TABLES_DIR / f"{name}.csv"


def write_csv(path: Path, df: pd.DataFrame) -> None:
    # 7 significant digits: ΔW and W0 are stored in fp32, so more would only be noise (and bytes)
    write_text(path, df.to_csv(index=False, float_format="%.7g", lineterminator="\n"))


def markdown_table(df: pd.DataFrame) -> str:
    """A markdown table without the optional `tabulate` dependency; floats to 4 significant digits."""
    def cell(v):
        return "" if pd.isna(v) else f"{v:.4g}" if isinstance(v, float) else str(v)
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    return "\n".join([head, rule] + ["| " + " | ".join(cell(v) for v in row) + " |"
                                     for row in df.itertuples(index=False)])
