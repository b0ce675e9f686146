"""SLURM pre-emption: SIGTERM sets a flag the training loop acts on between steps (where the state is
consistent: it writes a checkpoint and exits with 143, the code a re-launch resumes from)."""
import logging
import os
import signal
import sys
from typing import NoReturn


class Preempted(SystemExit):
    """SIGTERM (SLURM pre-emption): a checkpoint was written; re-run the same command to resume."""


def sigterm_flag():
    """Install the handler; returns (the flag, the handler it replaced, None off the main thread)."""
    flag = {"set": False}

    def handler(signum, frame):
        flag["set"] = True  # acted on between steps, where the state is consistent
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    return flag, previous


def under_torchrun() -> bool:
    dist = sys.modules.get("torch.distributed")  # not imported: no process group
    return dist is not None and dist.is_available() and dist.is_initialized()


def exit_now(code: int) -> NoReturn:
    """End a pre-empted torchrun process with CODE once everything is written: flush the logs, then os._exit.
    The interpreter's teardown is skipped because gloo's worker threads can still hold work whose release needs
    the interpreter there, and abort the process ("terminate called without an active exception"): the launcher
    would then see SIGABRT instead of 143, the code a re-launch resumes on."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
