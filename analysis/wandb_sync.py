"""The analysis as one W&B run named `analysis`, in the W&B group of the sweeps it analysed (offline without an
API key; `wandb sync OUT/wandb/offline-run-*` uploads it). Its id is a function of the project, entity, group and
output folder, so a re-run of the report updates that run instead of adding another (offline: the older
offline folders of that id are removed, so one sync uploads the latest).

    settings = analysis_run_settings(tables["runs"], "auto")    # None: no W&B (auto: only if the runs used it)
    log_analysis_run(out, settings, images={"figures/fig1": (png, caption)}, tables={"tables/runs": runs})
"""
import hashlib
import shutil
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


def analysis_run_id(out_dir: Path, settings: dict) -> str:
    """The `analysis` run's W&B id: the same for the same project, entity, group and output folder."""
    text = "\0".join(str(x) for x in (settings["project"], settings["entity"], settings["group"],
                                       Path(out_dir).resolve()))
    return "analysis-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def log_analysis_run(out_dir: Path, settings: dict, images: dict[str, tuple[Path, str]],
                     tables: dict[str, pd.DataFrame]) -> None:
    """Log images ({key: (PNG path, caption)}) and tables ({key: DataFrame}, as strings) as one W&B run, the
    same run (analysis_run_id, resumed) at every re-run on the same output folder."""
    import wandb  # lazy: wandb is slow to import, and only this needs it
    run_id = analysis_run_id(out_dir, settings)
    run = wandb.init(project=settings["project"], entity=settings["entity"], group=settings["group"], name="analysis",
                     job_type="analysis", dir=str(out_dir), mode=settings["mode"], reinit="create_new",
                     id=run_id, resume="allow", settings=wandb.Settings(silent=True, console="off"))
    run.log({key: wandb.Image(str(path), caption=caption) for key, (path, caption) in images.items()})
    run.log({key: wandb.Table(dataframe=df.astype(str)) for key, df in tables.items()})
    latest = getattr(run, "dir", None)
    run.finish()
    remove_older_offline_runs(Path(out_dir), run_id, latest)
    print(f"W&B: run 'analysis' ({run_id}) in group {settings['group']!r} ({settings['mode']})")


def remove_older_offline_runs(out_dir: Path, run_id: str, latest) -> None:
    """Delete OUT/wandb/offline-run-*-RUN_ID folders but the one holding `latest` (the run's files folder): an
    offline run cannot resume, so each re-run writes a new folder with the same id, and syncing all of them
    would upload the same run several times."""
    keep = Path(latest).resolve().parent if latest else None
    for folder in sorted((out_dir / "wandb").glob(f"offline-run-*-{run_id}")):
        if folder.is_dir() and folder.resolve() != keep:
            shutil.rmtree(folder, ignore_errors=True)
