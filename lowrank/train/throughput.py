"""Throughput as it really is: tokens per second over the steady steps after a warm-up window (torch.compile,
CUDA-graph capture and allocator warm-up happen there), real (non-padding) tokens counted apart from padded
ones, so MFU and the speed figures describe training, not start-up.

    clock = StepClock(warmup_steps=10, steps_this_process=max_steps - start_step)
    t0 = clock.now(); ...one optimizer step...; clock.record(t0, real_tokens, padded_tokens)
    clock.summary()   # tokens_per_second, padded_tokens_per_second, warmup_seconds, timed_steps, ...

The window is counted per process: a resumed run compiles again, so its first steps are warm-up too. The
timed sums are kept across a resume (`state_dict` goes into the checkpoint).
"""
import statistics
from time import perf_counter


def compile_seconds() -> float | None:
    """Seconds torch.compile spent compiling in this process (dynamo's own count; None where torch does not
    keep one). Forward graphs compile inside `_compile.compile_inner`; backward graphs compile on the first
    backward, outside it."""
    try:
        from torch._dynamo.utils import compilation_time_metrics as metrics
    except ImportError:
        return None
    keys = [k for k in metrics if k == "_compile.compile_inner" or k.endswith("bw_compiler")]
    return float(sum(sum(metrics[k]) for k in keys))


class StepClock:
    """Times optimizer steps. The first `warmup_steps` steps of this process (at most half of those it will
    run, so short runs still have timed steps) are warm-up; the rest are timed."""

    def __init__(self, warmup_steps: int, steps_this_process: int, now=None):
        self._now = now
        self.warmup_steps = min(warmup_steps, steps_this_process // 2)
        self.seen = 0                     # steps recorded in this process
        self.warmup_seconds = 0.0
        self.timed = {"seconds": 0.0, "steps": 0, "tokens": 0, "padded_tokens": 0}
        self.step_seconds: list[float] = []   # timed steps of this process, for the percentiles

    def now(self) -> float:
        return (self._now or perf_counter)()  # looked up at each call, so a test can fix the clock

    def record(self, t0: float, tokens: int, padded_tokens: int) -> float:
        """One step that began at `t0` (after a host-device sync, so its time is real) is over; returns the
        real tokens per second of that step, for the per-step log."""
        seconds = self.now() - t0
        if self.seen < self.warmup_steps:
            self.warmup_seconds += seconds
        else:
            self.timed["seconds"] += seconds
            self.timed["steps"] += 1
            self.timed["tokens"] += tokens
            self.timed["padded_tokens"] += padded_tokens
            self.step_seconds.append(seconds)
        self.seen += 1
        return tokens / seconds if seconds > 0 else float("inf")

    def state_dict(self) -> dict:
        return dict(self.timed)

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.timed = dict(state)

    def summary(self) -> dict:
        t = self.timed
        seconds = t["seconds"]
        q = statistics.quantiles(self.step_seconds, n=10) if len(self.step_seconds) >= 2 else None
        return {
            "tokens_per_second": t["tokens"] / seconds if seconds else None,
            "padded_tokens_per_second": t["padded_tokens"] / seconds if seconds else None,
            "timed_steps": t["steps"],
            "timed_seconds": seconds,
            "timed_tokens": t["tokens"],
            "warmup_steps": self.warmup_steps,
            "warmup_seconds": self.warmup_seconds,
            "step_seconds_p50": statistics.median(self.step_seconds) if self.step_seconds else None,
            "step_seconds_p90": q[-1] if q else None,
        }
