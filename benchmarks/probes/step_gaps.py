"""Where a Llama-1.1B compile+graphs step loses wall time (ours r16 all-linear, and full): synchronizing calls,
kernel count, GPU idle gaps from a profiler trace. Run from the repository root: python3 benchmarks/probes/step_gaps.py"""
import json, sys, time, warnings
import torch
from timing import OUT



def steps():
    sys.path.insert(0, ".")
    from experiments.bench import build, add_lora, make_step, speed_up_blocks, SHAPES, ALL_LINEAR
    shape = SHAPES["llama-1.1b"]; device = torch.device("cuda")
    out = {}
    for impl in ("ours", "torch"):
        torch._dynamo.reset(); torch.cuda.empty_cache()
        model = build(shape, device, torch.bfloat16, 0)
        if impl == "ours":
            model = add_lora(model, "ours", 16, ALL_LINEAR)
        params = [p for p in model.parameters() if p.requires_grad]
        step, opt = make_step(model, params, device, 1e-4, impl)
        torch._dynamo.config.recompile_limit = 64
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
        # per-phase CPU timing without sync
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(batches[0]); step(batches[1])
            torch.cuda.synchronize()
        path = OUT / f"trace_{impl}.json"
        prof.export_chrome_trace(str(path))
        ev = json.load(open(path))["traceEvents"]
        ks = sorted([(e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in ev
                     if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")])
        cpu = [(e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in ev if e.get("cat") in ("cpu_op", "python_function", "user_annotation")]
        # second step only: kernels after the midpoint
        gaps, small, busy = [], [], 0.0
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
            live = [c for c in cpu if c[0] <= at <= c[1]]
            live = sorted(live, key=lambda c: c[1] - c[0])[:3]
            top.append((round(d), nxt[:60], [c[2][:50] for c in live]))
        out[impl] = dict(wall_ms=t_all / 20 * 1e3, launch_ms=t_launch / 20 * 1e3, syncs=syncs,
                         trace_span_ms=span / 1e3, kernel_ms=kt / 1e3, idle_ms=sum(g[0] for g in gaps) / 1e3,
                         n_gaps=len(gaps), top_gaps=top, n_kernels=len(ks) / 2, small_gap_ms=sum(small) / 1e3,
                         n_small=len(small), gaps_over_20us_ms=sum(g[0] for g in gaps if g[0] > 20) / 1e3)
        print(impl, json.dumps(out[impl], indent=1), flush=True)
        path.unlink()
        del model, params, step, opt
    return out


if __name__ == "__main__":
    (OUT / "step_gaps.json").write_text(json.dumps({"steps": steps()}, indent=1))
