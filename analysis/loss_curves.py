"""Loss over training: each run directory's history.csv (step, train_loss, lr, grad_norm, tokens_per_second, and
eval_loss with eval_accuracy or eval_perplexity on evaluation steps only) gathered per configuration into
`tables/loss_curves.csv`, which figure 16 draws. Runs trained before history.csv was written have none: they are left
out, and counted.

    history, missing = read_histories({"demo/r8": Path("runs/demo/r8")})   # every row of every history.csv
    curves = loss_curves_table(history, runs)                               # per setup, configuration and step
"""
from pathlib import Path

import pandas as pd

from lowrank.rundir.layout import HISTORY_FILE

from analysis.figures.data import prepare
from analysis.statistics import setup_number

STATS = {"mean": "mean", "min": "min", "max": "max"}
CURVE_COLUMNS = (["setup", "config", "step"] + [f"{c}_{s}" for c in ("train_loss", "eval_loss") for s in STATS]
                 + ["n_train", "n_eval", "n_runs"])


def read_histories(run_dirs: dict[str, Path]) -> tuple[pd.DataFrame, list[str]]:
    """(every run's history.csv rows with run_id in front, [run_id of runs without a readable one]). An unreadable
    file counts as missing, with a warning (it is not part of the run's checked contract)."""
    frames, missing = [], []
    for run_id, run_dir in run_dirs.items():
        path = Path(run_dir) / HISTORY_FILE
        if not path.is_file():
            missing.append(run_id)
            continue
        try:
            h = pd.read_csv(path)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            print(f"warning: {run_id}: {HISTORY_FILE} unreadable ({type(e).__name__}); its loss curve left out")
            missing.append(run_id)
            continue
        if "step" not in h or "train_loss" not in h:
            print(f"warning: {run_id}: {HISTORY_FILE} lacks step or train_loss; its loss curve left out")
            missing.append(run_id)
            continue
        frames.append(h.assign(run_id=run_id))
    if not frames:
        return pd.DataFrame(columns=["run_id", "step", "train_loss", "eval_loss"]), missing
    h = pd.concat(frames, ignore_index=True)
    h = h[["run_id"] + [c for c in h.columns if c != "run_id"]]
    return h.sort_values(["run_id", "step"], ignore_index=True), missing


def missing_line(missing: list[str]) -> str:
    """The one line on runs without history.csv ('' when there are none)."""
    if not missing:
        return ""
    k = len(missing)
    return (f"{k} run{'s' * (k > 1)} without {HISTORY_FILE} (trained before runs wrote it) left out of the loss "
            f"curves")


def loss_curves_table(history: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per setup, configuration (figure_data.prepare's `config`) and step: train_loss_mean/min/max and
    eval_loss_mean/min/max over the seeds that logged it at that step (NaN where none did: eval_loss exists on
    evaluation steps only), n_train and n_eval (those seeds), n_runs (the configuration's runs with a history); rows in
    plotting order (setups, then configurations as the figures order them).
    runs: the runs table with its `setup` column."""
    if history.empty or runs.empty:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    labels = prepare(runs)[["run_id", "setup", "config", "order"]]
    h = history.merge(labels, on="run_id")
    if "eval_loss" not in h:
        h["eval_loss"] = float("nan")
    h[["train_loss", "eval_loss"]] = h[["train_loss", "eval_loss"]].apply(pd.to_numeric, errors="coerce")
    keys = ["setup", "config", "step"]
    agg = {f"{c}_{s}": (c, f) for c in ("train_loss", "eval_loss") for s, f in STATS.items()}
    t = h.groupby(keys, sort=False).agg(**agg, n_train=("train_loss", "count"), n_eval=("eval_loss", "count"))
    t = t.reset_index()
    per_config = h.groupby(["setup", "config"]).agg(n_runs=("run_id", "nunique"), order=("order", "first"))
    t = t.merge(per_config.reset_index(), on=["setup", "config"])
    t["_key"] = [(setup_number(s), o) for s, o in zip(t.setup, t.order)]
    return t.sort_values(["_key", "step"], ignore_index=True)[CURVE_COLUMNS]
