"""What the probes share: where results go ($OUT), and CUDA-event timing over rotating inputs."""
import os
from pathlib import Path

import torch

OUT = Path(os.environ.get("OUT", "/tmp/out"))
OUT.mkdir(parents=True, exist_ok=True)


def time_us(fn, reps: int = 40, warmup: int = 5) -> float:
    """Mean microseconds per call of fn(i), i cycling over 0..3: four input sets, so that the H200's 50 MB
    L2 cache cannot hold a probe's inputs from one call to the next. CUDA events, after warm-up calls."""
    for _ in range(warmup):
        fn(0)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for i in range(reps):
        fn(i % 4)
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps * 1e3
