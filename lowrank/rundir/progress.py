"""progress.json: where a training run is, for whoever watches it (the demo's bar): `step`, `max_steps`,
`steps_per_second`, `eta_seconds`, `updated` (unix time) and `state` (`running`, then `ended` when its steps stop).

    record = ProgressRecord(run_dir, max_steps, start_step)   # the trainer's main process
    record.step_done(step)    # after each step: written after the first, then at most every `every_seconds`
    record.end(step)          # the loop is over (finished, diverged, out of memory or pre-empted)
    read_progress(run_dir)    # the record, or None where there is none (yet) or it cannot be read

The speed is over the steps since this process's first (its warm-up, compile included, left out), so a resumed
run's ETA is its own. The clock is injectable: tests move time by hand.
"""
import json
import time
from pathlib import Path

from lowrank.rundir.atomic import write_json
from lowrank.rundir.layout import PROGRESS_FILE

RUNNING, ENDED = "running", "ended"
EVERY_SECONDS = 5.0  # a record costs a small file write: seconds apart, never every step


class ProgressRecord:
    def __init__(self, run_dir, max_steps: int, start_step: int = 0, every_seconds: float = EVERY_SECONDS,
                 clock=time.time, write: bool = True):
        self.path = Path(run_dir) / PROGRESS_FILE
        self.max_steps, self.every_seconds, self.clock, self.write = max_steps, every_seconds, clock, write
        self.first = None            # (step, time) of this process's first step
        self.last_written = None     # when the record was last written
        self.step = start_step

    def step_done(self, step: int) -> None:
        self.step = step
        now = self.clock()
        if self.first is None:
            self.first = (step, now)
        if self.last_written is None or now - self.last_written >= self.every_seconds:
            self._write(RUNNING, now)

    def end(self, step: int | None = None) -> None:
        self.step = self.step if step is None else step
        self._write(ENDED, self.clock())

    def steps_per_second(self, now: float) -> float | None:
        if self.first is None or self.step <= self.first[0] or now <= self.first[1]:
            return None
        return (self.step - self.first[0]) / (now - self.first[1])

    def _write(self, state: str, now: float) -> None:
        self.last_written = now
        if not self.write:
            return
        rate = self.steps_per_second(now)
        eta = 0.0 if state == ENDED else (self.max_steps - self.step) / rate if rate else None
        write_json(self.path, {"step": self.step, "max_steps": self.max_steps, "steps_per_second": rate,
                               "eta_seconds": eta, "updated": now, "state": state})


def read_progress(run_dir) -> dict | None:
    """The run's progress record, or None (none yet, or unreadable: a reader never stops on it)."""
    try:
        record = json.loads((Path(run_dir) / PROGRESS_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(record, dict) and all(isinstance(record.get(k), int) for k in ("step", "max_steps"))
            and isinstance(record.get("updated"), (int, float))):
        return None
    return record
