"""The command line of `python -m analysis.report`, checked before anything is written: a bad argument exits
with status 2 and one line `error: ...` naming the argument and what would be valid.

    opts = parse_args(["runs", "--out", "reports/paper", "--threads", "1"])   # argparse.Namespace
"""
import argparse
import math
import os
from pathlib import Path

import torch

from lowrank.errors import fail
from lowrank.rundir.layout import CONFIG_FILE, METRICS_FILE

from analysis.runs import find_run_dirs, roots_problem
from lowrank.linalg.spectra import default_device
from analysis.tables import FIGURES_DIR, REPORT_FILE, TABLES_DIR

DESCRIPTION = "Analyse every run below one or more roots and write the tables the figures are built from."


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors (usage line + message, over two lines) as one line `error: ...`, exit 2."""

    def error(self, message):
        fail(f"{message} (see --help)")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer ≥ {low}, got {text!r}")
        return value
    parse.__name__ = f"integer ≥ {low}"
    return parse


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers ≥ 1 such as 8,64, got {text!r}")
    return values


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= 1):  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] (a |cos| threshold), got {text!r}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= 1):
        raise argparse.ArgumentTypeError(f"expected a share of ‖ΔW‖_F² in (0, 1], such as 0.9, got {text!r}")
    return value


def _device(text: str):
    """'auto', or a torch.device that is here: cpu, cuda, cuda:N."""
    if text == "auto":
        return default_device()
    valid = "auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {valid}, got {text!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but no CUDA device is available here; "
                                             f"use auto or cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but the CUDA devices here are "
                                             f"cuda:0..cuda:{count - 1}")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected {valid}, got {text!r}")
    return device


def _path(text: str) -> Path:
    if not text:  # Path("") would be the current directory
        raise argparse.ArgumentTypeError("expected a directory path, got ''")
    return Path(text)


def _out_problem(out: Path) -> str | None:
    """Why `out` cannot hold the report (checked before anything is written), else None."""
    if out.exists():
        if not out.is_dir():
            return f"{str(out)!r} exists and is not a directory; pass a directory (created if missing)"
        for sub, want_dir in ((TABLES_DIR, True), (FIGURES_DIR, True), (REPORT_FILE, False)):
            p = out / sub
            if p.exists() and p.is_dir() != want_dir:
                return f"{str(p)!r} is {'a directory' if p.is_dir() else 'not a directory'}; pass another --out"
        if not os.access(out, os.W_OK | os.X_OK):
            return f"{str(out)!r} is not writable"
        return None
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{str(out)!r} cannot be created: {str(parent)!r} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{str(out)!r} cannot be created: {str(parent)!r} is not writable"
    return None


def no_runs_problem(roots) -> str | None:
    """Why there is nothing to report below these (readable) roots: no run directory at all, else None. Roots whose
    run directories all fail their checks still get a report, which lists each with the reason."""
    if find_run_dirs(roots):
        return None
    where = ", ".join(repr(str(r)) for r in roots)
    return (f"no run directories below {where} (a run directory holds {CONFIG_FILE} or {METRICS_FILE}); pass the "
            f"runs root a sweep wrote (runs_root, e.g. runs)")


def parse_args(argv=None):
    """The options, checked: a bad one exits with status 2 and one line naming it and what would be valid."""
    p = _Parser(description=DESCRIPTION)
    p.add_argument("roots", nargs="+", help="directories holding run directories (searched recursively)")
    p.add_argument("--out", required=True, type=_path, help="output directory (tables/ and report.md)")
    p.add_argument("--max-dim", type=_int_at_least(1), default=64,
                   help="largest i, j in the φ grids (LoRA grids also stop at the rank)")
    p.add_argument("--intruder-k", type=_int_at_least(1), default=10, help="top-k singular vectors of W0+ΔW checked")
    p.add_argument("--intruder-eps", type=_fraction, default=0.5, help="max |cos| below which a vector intrudes")
    p.add_argument("--amp-ranks", type=_int_list, default=None,
                   help="r values for full-FT amplification, e.g. 8,64 (default: the LoRA ranks found)")
    p.add_argument("--exact-max-dim", type=_int_at_least(1), default=None,
                   help="dense matrices with min(out, in) above this get a randomised top-k SVD (default: all exact)")
    p.add_argument("--topk", type=_int_at_least(1), default=256, help="singular values kept by the randomised SVD")
    p.add_argument("--energy-share", type=_share, default=0.9,
                   help="rank advice: each module's rank reaches this share of ‖ΔW‖_F² (rank_pattern.json)")
    p.add_argument("--rank-budget", type=_int_at_least(1), default=None,
                   help="rank advice: LoRA parameters to allocate by energy (rank_pattern_budget.json; default: "
                        "uniform rank 8's count over the same modules)")
    p.add_argument("--device", type=_device, default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="write the tables and report.md without the figures")
    p.add_argument("--wandb", choices=["auto", "on", "off"], default="auto",
                   help="log figures and tables to W&B as an `analysis` run (auto: when the runs used logger=wandb)")
    p.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="CPU threads for torch (default: torch's); 1 is fastest on a CPU other jobs keep busy, "
                        "where OpenMP threads otherwise wait on each other")
    opts = p.parse_args(argv)
    if why := roots_problem(opts.roots) or no_runs_problem(opts.roots):
        fail(f"argument roots: {why}")
    if why := _out_problem(opts.out):
        fail(f"argument --out: {why}")
    try:
        opts.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"argument --out: {str(opts.out)!r} cannot be created ({e.strerror or e})")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    return opts
