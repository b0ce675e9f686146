"""Fine-tune a pretrained model (a classifier or a causal LM), fully, with LoRA or a variant, or in a random subspace,
and write its run directory: a recipe in three phases, as torchtune's.

    metrics = train(cfg, run_dir)      # = setup(...) -> Run, Loop(run).run() -> LoopState, finish(run, state)

`train(cfg) -> metrics` is a plain function (tests call it directly); `experiments/train.py` wraps it in
`@hydra.main`. The run directory (its contract: `lowrank/rundir/layout.py`) ends up with `.hydra/config.yaml`,
`metrics.json`, `delta_w.safetensors` and the log; `RUNS_ROOT/base_weights/` holds W0 once per base model.
Whatever happens, the run directory says so: bad input ends as `status: invalid` and an unexpected error as
`status: failed`, each with its one-line `reason`, and what the run set process-wide is undone (`job_scope`).
`setup` builds the model, method, data, optimizer and step (lowrank/train/setup.py), `Loop` runs the steps
(lowrank/train/loop.py), `finish` evaluates and writes ΔW and metrics (lowrank/train/finish.py).
"""
import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from lowrank.errors import ConfigError
from lowrank.rundir import atomic
from lowrank.rundir import layout as rundir
from lowrank.rundir.layout import CHECKPOINT_FILE, CONFIG_FILE
from lowrank.rundir.record import (RunLog, check_same_config, does_not_fit, record_end, run_dir_and_group,
                                   write_config_once)
from lowrank.train import distributed
from lowrank.train.finish import diverged, finish
from lowrank.train.job_scope import job_scope
from lowrank.train.loop import Loop
from lowrank.train.setup import setup
from lowrank.config import validate

log = logging.getLogger(__name__)


def train(cfg: DictConfig, run_dir=None) -> dict:
    """Fine-tune, evaluate, and write the run directory. Returns the metrics written to metrics.json.

    A finished run directory is returned as it is; one with a checkpoint resumes from it. Raises ConfigError
    for bad input (recorded as `status: invalid`) and RunInProgress when another process holds the run."""
    run_dir, group = run_dir_and_group(run_dir)
    try:
        parallel, not_started = distributed.start(cfg.trainer), None  # under torchrun: join the process group
    except ConfigError as e:
        if os.environ.get("RANK", "0") != "0":
            raise
        parallel, not_started = None, e  # rank 0 records it as invalid, once its config is written
    if not distributed.is_main():
        return _follow(cfg, group, parallel)
    with distributed.followers_told() as tell:
        return _lead(cfg, run_dir, group, tell, parallel, not_started)


def _follow(cfg: DictConfig, group: str | None, parallel: str) -> dict:
    """Ranks other than 0: do what rank 0 decided (train in its run directory, skip a finished run, or stop with
    its error), writing nothing."""
    verdict = distributed.share()
    if verdict[0] == "stop":
        _, kind, message = verdict
        raise {"ConfigError": ConfigError, "RunInProgress": rundir.RunInProgress}.get(kind, RuntimeError)(message)
    if verdict[0] == "done":
        return verdict[1]
    logging.getLogger("lowrank").setLevel(logging.WARNING)  # rank 0 logs the run
    with job_scope():
        validate(cfg)
        return _run(cfg, Path(verdict[1]), group, Path(cfg.runs_root).resolve(), parallel)


def _lead(cfg: DictConfig, run_dir: Path, group: str | None, tell, parallel: str | None,
          not_started: ConfigError | None) -> dict:
    rundir.check_run_location(cfg.name, cfg.runs_root)
    runs_root = Path(cfg.runs_root).resolve()
    if not run_dir.resolve().is_relative_to(runs_root):
        raise ConfigError(f"run directory {run_dir} is outside runs_root={cfg.runs_root}; runs stay inside it")
    with rundir.RunLock(run_dir):
        check_same_config(run_dir, cfg)
        done = rundir.finished_metrics(run_dir)
        if done is not None:
            # A kill between metrics.json and the checkpoint's removal leaves it behind; it is never needed.
            (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
            log.info("%s is finished (%s); skipping it (delete it, or set another `name`, to run again)",
                     run_dir, done["status"])
            tell(("done", done))
            return done
        for folder in (run_dir, run_dir / CONFIG_FILE.parent):  # we hold the lock: every temp file is stale
            if folder.is_dir():
                atomic.remove_stale_temps(folder, everything=True)
        with RunLog(run_dir) as run_log, job_scope():
            try:
                write_config_once(run_dir, cfg)  # first: an invalid run's record says what was asked
                validate(cfg)
                if not_started is not None:  # a bad trainer.parallel or trainer.world_size ends here as invalid
                    raise not_started
                tell(("train", str(run_dir)))
                return _run(cfg, run_dir, group, runs_root, parallel)
            except ConfigError as e:
                run_log.file_only.error("invalid: %s", e)
                record_end(run_dir, cfg, rundir.INVALID, str(e))
                raise
            except Exception as e:
                run_log.file_only.exception("failed")
                record_end(run_dir, cfg, rundir.FAILED, f"{type(e).__name__}: {e}")
                raise


def _run(cfg: DictConfig, run_dir: Path, group: str | None, runs_root: Path, parallel: str) -> dict:
    """The three phases; a run that does not fit its budget, or diverges, is recorded as such."""
    run = setup(cfg, run_dir, group, runs_root, parallel)
    if not run.fit.fits:
        return does_not_fit(run_dir, cfg, run.fit, run.t_start)
    loop = Loop(run)
    state = loop.run()
    if state.out_of_memory_at is not None:  # the probes fit, yet a later step did not: a result of the sweep
        return does_not_fit(run_dir, cfg, run.fit.out_of_memory_at(state.out_of_memory_at), run.t_start)
    if state.diverged_at is not None:
        return diverged(run, state)
    return finish(run, state, loop.clock.summary())
