"""`python -m tests.kill_at_step STEP MODE [train overrides]`: run `experiments.train`, and SIGKILL it from
inside when the checkpoint of step STEP is due, so a kill lands at a known point on any machine:
MODE `before` dies before that checkpoint is written (the steps since the last one are lost), `mid` dies
halfway through writing it (a partial temp file is left beside the intact previous checkpoint). Under torchrun
every rank calls save_checkpoint, so `before` kills every rank there; `term` sends SIGTERM to rank 1 alone
(pre-emption reaching one process) and lets the run go on."""
import os
import runpy
import signal
import sys
from pathlib import Path

import lowrank.train.loop as loop
from lowrank.rundir import atomic
from lowrank.rundir.layout import CHECKPOINT_FILE

STEP, MODE = int(sys.argv.pop(1)), sys.argv.pop(1)
_save = loop.save_checkpoint


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def half_written(tmp) -> None:
    Path(tmp).write_bytes(b"PK\x03\x04 half of a checkpoint")
    die()


def save_or_die(run_dir, model, optimizer, scheduler, loop):
    if loop["step"] == STEP:
        if MODE == "term":
            if os.environ.get("RANK") == "1":
                os.kill(os.getpid(), signal.SIGTERM)
            return _save(run_dir, model, optimizer, scheduler, loop)
        if MODE == "before":
            die()
        atomic.write_with(Path(run_dir) / CHECKPOINT_FILE, half_written)
    return _save(run_dir, model, optimizer, scheduler, loop)


loop.save_checkpoint = save_or_die
runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)  # as `python -m experiments.train`
