"""The trainer's step through a real run: a step that defers its bookkeeping gives the run the plain step gives."""
from lowrank.train.step import TrainStep


class _Overlapping(TrainStep):
    """The eager step, with its bookkeeping deferred as a graphed step's is (what the trainer's loop does
    when `overlaps`): the loop must give the run it gives without it."""

    @property
    def overlaps(self) -> bool:
        return True

def test_deferred_bookkeeping_gives_the_same_run(tiny_run, monkeypatch):
    import lowrank.train.setup
    from benchmarks.bench_trainer import _loss_curve
    args = ("trainer.max_steps=7", "trainer.eval_interval=3", "trainer.checkpoint_every=5")
    with _loss_curve() as plain_curve:
        plain, _ = tiny_run(*args, name="plain")
    monkeypatch.setattr(lowrank.train.setup, "TrainStep", _Overlapping)
    with _loss_curve() as deferred_curve:
        deferred, _ = tiny_run(*args, name="deferred")
    assert deferred_curve.losses == plain_curve.losses and len(plain_curve.losses) == 7
    assert deferred["eval_history"] == plain["eval_history"]  # evaluated at steps 3, 6, 7 on the same weights
    assert [h["step"] for h in plain["eval_history"]] == [3, 6, 7]
    assert deferred["timed_steps"] == plain["timed_steps"] and deferred["timed_tokens"] == plain["timed_tokens"]
