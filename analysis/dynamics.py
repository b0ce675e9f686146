"""The runs' rank dynamics (each run directory's dynamics.csv, written by lowrank.train.dynamics during training)
gathered into one table, `tables/dynamics.csv`, for figure 15.
"""
import pandas as pd

from lowrank.rundir.layout import DYNAMICS_FILE


def dynamics_table(runs) -> pd.DataFrame:
    """Every analysed run's rank dynamics (its dynamics.csv, where it has one), with run_id, method, rank and seed in
    front; an unreadable file is left out with a warning (it is not part of the run's checked contract)."""
    frames = []
    for run in runs:
        path = run.path / DYNAMICS_FILE
        if not path.is_file():
            continue
        try:
            d = pd.read_csv(path)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            print(f"warning: {run.run_id}: {DYNAMICS_FILE} unreadable ({type(e).__name__}); its dynamics left out")
            continue
        frames.append(d.assign(run_id=run.run_id, method=run.method, rank=run.rank, seed=run.seed))
    if not frames:
        return pd.DataFrame(columns=["run_id", "method", "rank", "seed", "step", "module"])
    d = pd.concat(frames, ignore_index=True)
    front = ["run_id", "method", "rank", "seed"]
    d = d[front + [c for c in d.columns if c not in front]]
    d["rank"] = d["rank"].astype("Int64")
    return d.sort_values(["run_id", "step", "module"], ignore_index=True)
