"""The analysis as one W&B run named `analysis`, in the W&B group of the sweeps it analysed (offline without an
API key; `wandb sync OUT/wandb/offline-run-*` uploads it).

    settings = analysis_run_settings(tables["runs"], "auto")    # None: no W&B (auto: only if the runs used it)
    log_analysis_run(out, settings, images={"figures/fig1": (png, caption)}, tables={"tables/runs": runs})
"""
from pathlib import Path

import numpy as np
import pandas as pd

from lowrank.logger import has_wandb_key


def analysis_run_settings(runs: pd.DataFrame, choice: str = "auto") -> dict | None:
    """project, entity, group and mode for the `analysis` run, or None for no W&B run. choice 'off': None;
    'auto': from the runs logged with logger=wandb (group: their logger.group, else the sweep folder = `name`),
    None when no run used W&B; 'on': those, else project lowrank, group `analysis`."""
    if choice == "off":
        return None
    settings = _settings_from_runs(runs)
    if settings is None and choice == "on":
        settings = {"project": "lowrank", "entity": None, "group": "analysis", "mode": _default_mode()}
    return settings


def _default_mode() -> str:
    return "online" if has_wandb_key() else "offline"


def _settings_from_runs(runs: pd.DataFrame) -> dict | None:
    if "logger.name" not in runs:
        return None
    wb = runs[runs["logger.name"] == "wandb"]
    if wb.empty:
        return None
    groups = sorted({g if isinstance(g, str) else n for g, n in
                     zip(wb.get("logger.group", pd.Series(np.nan, index=wb.index)),
                         wb.get("name", pd.Series("", index=wb.index)))})
    first = wb.iloc[0]
    mode = first.get("logger.mode")
    return {"project": first.get("logger.project") if isinstance(first.get("logger.project"), str) else "lowrank",
            "entity": first.get("logger.entity") if isinstance(first.get("logger.entity"), str) else None,
            "group": "+".join(groups),
            "mode": mode if isinstance(mode, str) else _default_mode()}


def log_analysis_run(out_dir: Path, settings: dict, images: dict[str, tuple[Path, str]],
                     tables: dict[str, pd.DataFrame]) -> None:
    """Log images ({key: (PNG path, caption)}) and tables ({key: DataFrame}, as strings) as one W&B run."""
    import wandb  # lazy: wandb is slow to import, and only this needs it
    run = wandb.init(project=settings["project"], entity=settings["entity"], group=settings["group"], name="analysis",
                     job_type="analysis", dir=str(out_dir), mode=settings["mode"], reinit="create_new",
                     settings=wandb.Settings(silent=True, console="off"))
    run.log({key: wandb.Image(str(path), caption=caption) for key, (path, caption) in images.items()})
    run.log({key: wandb.Table(dataframe=df.astype(str)) for key, df in tables.items()})
    run.finish()
    print(f"W&B: run 'analysis' in group {settings['group']!r} ({settings['mode']})")
