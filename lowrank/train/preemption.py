"""SLURM pre-emption: SIGTERM sets a flag the training loop acts on between steps (where the state is
consistent: it writes a checkpoint and exits with 143, the code a re-launch resumes from)."""
import signal


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
