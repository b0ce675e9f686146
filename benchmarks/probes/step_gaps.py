"""Where a Llama-1.1B compile+graphs step loses wall time (ours r16 all-linear, and full fine-tuning).

    python -m benchmarks.probes.step_gaps          # on one GPU, from the repository root, a few minutes

Per method, built as benchmarks.bench builds it: the calls that synchronize the host with the GPU
(`torch.cuda.set_sync_debug_mode`), the wall time of 20 steps (and the time to launch them), and from a
profiler trace of two steps: kernels per step, kernel time, the GPU's idle gaps over 5 µs (the 25 longest,
with the host ops running at the time) and the small ones.
"""
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.probes.common import probe_args, rows_by, save
from benchmarks.bench import SHAPES, add_lora, build, make_step, speed_up_blocks
from benchmarks.harness.record import collect_metadata
from lowrank.adapters.targets import ALL_LINEAR


def gaps_of(trace: Path) -> dict:
    """Kernel count and time, and the GPU's idle gaps, from a chrome trace of two steps."""
    ev = json.loads(trace.read_text())["traceEvents"]
    ks = sorted([(e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in ev
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")])
    cpu = [(e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in ev
           if e.get("cat") in ("cpu_op", "python_function", "user_annotation")]
    gaps, small = [], []
    end = ks[0][1]
    for a, b, n in ks[1:]:
        if a > end + 5:
            gaps.append((a - end, end, n))
        elif a > end:
            small.append(a - end)
        end = max(end, b)
    span = ks[-1][1] - ks[0][0]
    kt = sum(b - a for a, b, _ in ks)
    gaps.sort(reverse=True)
    top = []
    for d, at, nxt in gaps[:25]:
        live = sorted([c for c in cpu if c[0] <= at <= c[1]], key=lambda c: c[1] - c[0])[:3]
        top.append((round(d), nxt[:60], [c[2][:50] for c in live]))
    return dict(trace_span_ms=span / 1e3, kernel_ms=kt / 1e3, idle_ms=sum(g[0] for g in gaps) / 1e3,
                n_gaps=len(gaps), top_gaps=top, n_kernels=len(ks) / 2, small_gap_ms=sum(small) / 1e3,
                n_small=len(small), gaps_over_20us_ms=sum(g[0] for g in gaps if g[0] > 20) / 1e3)


def steps() -> dict:
    shape = SHAPES["llama-1.1b"]
    device = torch.device("cuda")
    out = {}
    for impl in ("ours", "torch"):
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        model = build(shape, device, torch.bfloat16, 0)
        if impl == "ours":
            model = add_lora(model, "ours", 16, ALL_LINEAR)
        params = [p for p in model.parameters() if p.requires_grad]
        step, opt = make_step(model, params, device, 1e-4, impl)
        speed_up_blocks(model, "compile+graphs", shape, device)
        g = torch.Generator(device=device).manual_seed(0)
        batches = [torch.randint(0, 32000, (8, 1024), device=device, generator=g) for _ in range(4)]
        for i in range(5):
            step(batches[i % 4])
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step(batches[0])
            torch.cuda.set_sync_debug_mode(0)
        syncs = sorted({f"{w.filename}:{w.lineno} {str(w.message)[:80]}" for w in ws})
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(20):
            step(batches[i % 4])
        t_launch = time.perf_counter() - t0
        torch.cuda.synchronize()
        t_all = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(batches[0])
            step(batches[1])
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / f"trace_{impl}.json"
            prof.export_chrome_trace(str(trace))
            out[impl] = dict(wall_ms=t_all / 20 * 1e3, launch_ms=t_launch / 20 * 1e3, syncs=syncs, **gaps_of(trace))
        print(impl, json.dumps(out[impl], indent=1), flush=True)
        del model, params, step, opt
    return out


def main():
    args = probe_args(__doc__)
    meta = collect_metadata()
    save(args.out, "step_gaps", __doc__, rows_by("impl", steps()), meta,
         settings=dict(model="llama-1.1b", mode="compile+graphs", rank=16, targets=ALL_LINEAR, warmup_steps=5,
                       timed_steps=20, profiled_steps=2))


if __name__ == "__main__":
    main()
