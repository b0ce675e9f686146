"""Throughput as it is: the warm-up window is left out of tokens/s, real tokens are counted apart from padding."""
from lowrank.train.throughput import StepClock


def test_warmup_steps_are_left_out_of_the_steady_rate():
    times = iter([0, 30, 30, 31, 31, 32, 32, 33, 33, 34])  # step 1 takes 30 s (compile), then 1 s each
    clock = StepClock(warmup_steps=1, steps_this_process=5, now=lambda: next(times))
    for _ in range(5):
        clock.record(clock.now(), tokens=100, padded_tokens=128)
    s = clock.summary()
    assert (s["timed_steps"], s["timed_seconds"], s["warmup_seconds"]) == (4, 4, 30)
    assert s["tokens_per_second"] == 100 and s["padded_tokens_per_second"] == 128
    assert s["step_seconds_p50"] == 1


def test_the_window_is_at_most_half_the_steps_and_resumes_keep_the_sums():
    assert StepClock(warmup_steps=10, steps_this_process=6).warmup_steps == 3
    assert StepClock(warmup_steps=10, steps_this_process=1).warmup_steps == 0
    resumed = StepClock(warmup_steps=0, steps_this_process=2, now=iter([0, 2, 2, 4]).__next__)
    resumed.load_state_dict({"seconds": 6.0, "steps": 3, "tokens": 600, "padded_tokens": 900})
    for _ in range(2):
        resumed.record(resumed.now(), 100, 150)
    assert resumed.summary()["tokens_per_second"] == 800 / 10 and resumed.summary()["timed_steps"] == 5

