"""A W&B run, or a stand-in with the same methods, so the training loop has no `if wandb:` branches."""
import netrc
import os
from pathlib import Path


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class NullLogger:
    def log(self, metrics: dict, step: int | None = None) -> None: ...
    def summary(self, metrics: dict) -> None: ...
    def finish(self) -> None: ...


class WandbLogger:
    """Online with an API key (env WANDB_API_KEY or ~/.netrc), otherwise offline into the run directory;
    `logger.mode` forces either."""

    def __init__(self, cfg_logger, run_dir: Path, config: dict, group: str | None, name: str):
        import wandb
        mode = cfg_logger.mode or ("online" if has_wandb_key() else "offline")
        self.run = wandb.init(project=cfg_logger.project, entity=cfg_logger.entity, group=group, name=name,
                              dir=str(run_dir), config=config, mode=mode, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        for k, v in metrics.items():
            if not isinstance(v, (list, dict)):
                self.run.summary[k] = v

    def finish(self) -> None:
        self.run.finish()


def make_logger(cfg_logger, run_dir: Path, config: dict, group: str | None, name: str):
    if cfg_logger.name == "none":
        return NullLogger()
    return WandbLogger(cfg_logger, run_dir, config, group, name)
