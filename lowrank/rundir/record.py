"""The trainer's writes into its run directory besides ΔW: the resolved config once, metrics.json tied to it (rank 0
only), train.log, and the record of a run that ended early (invalid, failed, does not fit its budget).
"""
import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lowrank.rundir import atomic
from lowrank.train import distributed
from lowrank.rundir import layout as rundir
from lowrank.train.budget import BudgetFit
from lowrank.errors import ConfigError
from lowrank.rundir.layout import CONFIG_FILE, METRICS_FILE, OVERRIDES_FILE

log = logging.getLogger("lowrank.train.recipe")


def run_dir_and_group(run_dir) -> tuple[Path, str | None]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    group = None
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        run_dir = run_dir or hc.runtime.output_dir
        if hc.mode == RunMode.MULTIRUN:
            group = Path(hc.sweep.dir).name
    if run_dir is None:
        raise ValueError("train(cfg) outside Hydra needs run_dir")
    return Path(run_dir), group


def does_not_fit(run_dir: Path, cfg, fit: BudgetFit, t_start: float) -> dict:
    """A run that cannot fit its budget is a result of the sweep, not a crash."""
    metrics = {"status": "does_not_fit", "method": cfg.method.name, "fits": False, "budget_bytes": fit.budget_bytes,
               "reason": fit.reason, "failed_at": fit.failed_at, "tried": fit.tried,
               "memory_estimate": fit.memory_estimate, "wall_seconds": time.perf_counter() - t_start}
    log.warning("budget.gib=%g: does not fit (%s); recorded in %s", fit.budget_bytes / 2**30, fit.reason,
                run_dir / METRICS_FILE)
    return write_run_metrics(run_dir, cfg, metrics)


def hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def check_same_config(run_dir: Path, cfg: DictConfig) -> None:
    """A directory that already holds another configuration is refused: it would mix two configs' results
    (or hand back another config's metrics as this one's)."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return
    try:
        stored = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception:
        stored = None  # unreadable: a kill can't leave that (atomic writes), but an edit or a disk fault can
    if not isinstance(stored, dict) or rundir.config_hash(stored) != rundir.config_hash(
            OmegaConf.to_container(cfg, resolve=True)):
        raise ConfigError(f"{run_dir} already holds a run of another configuration ({CONFIG_FILE} differs); "
                          f"give this run another `name` or run_dir")


def write_config_once(run_dir: Path, cfg: DictConfig) -> None:
    """The resolved config and the overrides, written when the run starts and never again."""
    if not (run_dir / CONFIG_FILE).exists():
        atomic.write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        atomic.write_text(run_dir / OVERRIDES_FILE, OmegaConf.to_yaml(OmegaConf.create(hydra_overrides())))


class RunLog:
    """train.log: this run's log records (the trainer owns the file; Hydra only prints to the console)."""

    def __init__(self, run_dir: Path):
        self.handler = logging.FileHandler(run_dir / rundir.LOG_FILE)
        self.handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        self.file_only = logging.getLogger("lowrank.run_log")  # why a run ended: the entry point prints it
        self.file_only.propagate = False

    def __enter__(self):
        root = logging.getLogger()
        self.level = root.level
        root.addHandler(self.handler)
        root.setLevel(min(root.level, logging.INFO) or logging.INFO)  # train() outside Hydra logs INFO too
        self.file_only.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeHandler(self.handler)
        self.file_only.removeHandler(self.handler)
        root.setLevel(self.level)
        self.handler.close()
        return False


def write_run_metrics(run_dir: Path, cfg: DictConfig, metrics: dict) -> dict:
    """metrics.json, tied to .hydra/config.yaml as stored: the same config as `cfg` (checked when the run
    started) but for where it lives, which may have moved (`runs_root`) since the run began. Other ranks
    write nothing."""
    if not distributed.is_main():
        return metrics
    try:
        config = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_FILE), resolve=True)
    except Exception:  # not written yet (bad input found before it) or unreadable
        config = OmegaConf.to_container(cfg, resolve=True)
    return rundir.write_metrics(run_dir, metrics, config)


def record_end(run_dir: Path, cfg: DictConfig, status: str, reason: str) -> None:
    write_run_metrics(run_dir, cfg, {"status": status, "reason": reason,
                                     "method": OmegaConf.select(cfg, "method.name")})
