"""The trainer's throughput record through a real run, on a fake clock."""
import pytest

from lowrank.train import throughput


def test_the_trainer_records_the_steady_rate_of_real_tokens(tiny_run, monkeypatch):
    """A fixed schedule: every step takes 1 s but the first, which takes 100 s. tokens_per_second is the real
    tokens of the timed steps over their seconds: as if the warm-up never happened."""
    ticks = {"t": 0.0, "calls": 0}

    def fake_clock():
        ticks["calls"] += 1
        if ticks["calls"] % 2 == 0:  # the end of a step: 100 s for the first, 1 s after
            ticks["t"] += 100.0 if ticks["calls"] == 2 else 1.0
        return ticks["t"]
    monkeypatch.setattr(throughput, "perf_counter", fake_clock)
    metrics, _ = tiny_run("trainer.max_steps=6", "trainer.eval_interval=6", "trainer.timing_warmup_steps=1")
    assert (metrics["warmup_steps"], metrics["timed_steps"]) == (1, 5)
    assert metrics["warmup_seconds"] == 100.0 and metrics["timed_seconds"] == 5.0
    assert metrics["tokens_per_second"] == pytest.approx(metrics["timed_tokens"] / 5.0)
    # MiniLM on reviews cut at 64 tokens, batches padded to their longest: fewer real tokens than padded ones
    assert metrics["timed_tokens"] < metrics["padded_tokens_per_second"] * 5.0 <= 5 * 8 * 64
    assert metrics["compile_seconds"] is None  # trainer.compile is off
