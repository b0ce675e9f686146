"""What the probes share: their command line, CUDA-event timing over rotating inputs, and their record.

    python -m benchmarks.probes.NAME --out benchmarks/results/probes     # on one GPU, from the repository root

Each probe writes `NAME_{device}.{json,md}` under --out through benchmarks.harness.record (commit, command,
versions, device): one row per case it times, and in `details` what is not a row (sums, per-config sweeps).
"""
import argparse

import torch

from benchmarks.harness.record import result_name, write_result

DEFAULT_OUT = "benchmarks/results/probes"


def probe_args(doc: str, flags: tuple[tuple[str, str], ...] = (), argv=None) -> argparse.Namespace:
    """--out, plus each (flag, help) of `flags` as a switch."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="where NAME_{device}.{json,md} are written")
    for flag, text in flags:
        ap.add_argument(flag, action="store_true", help=text)
    return ap.parse_args(argv)


def rows_by(label: str, results: dict) -> list[dict]:
    """{case: {measurement: value}} as rows [{label: case, measurement: value, ...}], in order."""
    return [{label: case, **values} for case, values in results.items()]


def save(out, name: str, doc: str, rows: list[dict], meta: dict, settings: dict | None = None,
         details: dict | None = None):
    """`{name}_{device}.{json,md}` under `out`, titled by the first line of the probe's docstring."""
    return write_result(out, result_name(name), rows, settings, meta=meta,
                        title=f"{name}: {doc.strip().splitlines()[0]}", details=details)


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
