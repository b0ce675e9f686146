"""progress.json (lowrank.rundir.progress): written after the first step, then at most every `every_seconds` of an
injected clock, and at the end; its speed and ETA over this process's steps after its first."""
import json

from lowrank.rundir.layout import PROGRESS_FILE
from lowrank.rundir.progress import ENDED, RUNNING, ProgressRecord, read_progress


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def written(run_dir) -> dict | None:
    path = run_dir / PROGRESS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def test_written_after_the_first_step_then_at_most_every_few_seconds_then_at_the_end(tmp_path):
    clock = FakeClock()
    record = ProgressRecord(tmp_path, max_steps=100, every_seconds=5.0, clock=clock)
    assert written(tmp_path) is None
    record.step_done(1)
    first = written(tmp_path)
    assert first == {"step": 1, "max_steps": 100, "steps_per_second": None, "eta_seconds": None,
                     "updated": 1000.0, "state": RUNNING}   # no speed from one step (its time is warm-up)
    for step in range(2, 10):                                # 0.5 s a step: 4 s later, not yet
        clock.t += 0.5
        record.step_done(step)
    assert written(tmp_path) == first
    clock.t += 1.0                                           # 5 s after the first write
    record.step_done(10)
    now = written(tmp_path)
    assert now["step"] == 10 and now["updated"] == 1005.0 and now["state"] == RUNNING
    assert now["steps_per_second"] == 9 / 5.0 and now["eta_seconds"] == 90 / (9 / 5.0)
    clock.t += 0.5
    record.end(11)
    assert written(tmp_path) | {"steps_per_second": None} == {
        "step": 11, "max_steps": 100, "steps_per_second": None, "eta_seconds": 0.0, "updated": 1005.5,
        "state": ENDED}


def test_a_resumed_run_counts_its_speed_from_its_own_first_step(tmp_path):
    clock = FakeClock()
    record = ProgressRecord(tmp_path, max_steps=50, start_step=40, every_seconds=0.0, clock=clock)
    record.step_done(41)
    clock.t += 2.0
    record.step_done(42)
    assert read_progress(tmp_path)["steps_per_second"] == 0.5 and read_progress(tmp_path)["eta_seconds"] == 16.0


def test_only_the_writing_process_writes(tmp_path):
    record = ProgressRecord(tmp_path, max_steps=10, clock=FakeClock(), write=False)
    record.step_done(1)
    record.end(10)
    assert written(tmp_path) is None and read_progress(tmp_path) is None


def test_an_unreadable_record_reads_as_none(tmp_path):
    (tmp_path / PROGRESS_FILE).write_text('{"step": 3, "max')   # never from our writer; a reader must not stop
    assert read_progress(tmp_path) is None
    (tmp_path / PROGRESS_FILE).write_text("[1, 2]")
    assert read_progress(tmp_path) is None
