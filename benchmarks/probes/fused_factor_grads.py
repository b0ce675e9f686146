"""One Triton kernel for both products of the output gradient in a LoRA backward, against cuBLAS's two GEMMs.

    python -m benchmarks.probes.fused_factor_grads          # on one GPU, a few minutes

For g (n, d): t = s g B (n, r) and the B gradient s gᵀ h (d, r), reading g once, against cuBLAS's two GEMMs
(the second split-K, plus its reduction kernel). The kernel is the library's
(`lowrank.adapters.fused._t_and_b_grad_kernel`: each program owns BM rows, loops over g's columns, accumulates t in
registers and adds its share of the B gradient into an fp32 buffer with atomics); here it is timed over launch
configurations (BM, BK, warps, stages, and whether programs stagger their first column slice so that their atomics
fall on different addresses), with the zero fill before and the bf16 cast after, both sides replayed from CUDA
graphs. The read floor: cuBLAS's t = g B alone, one read of g and nothing else. Its tests, in Triton's CPU
interpreter, are in tests/integration/adapters/test_fused_kernel.py.
"""
import torch
import triton

from benchmarks.probes.common import probe_args, save
from benchmarks.harness.record import collect_metadata
from lowrank.adapters.fused import _t_and_b_grad_kernel

R = 16


def fused(g, B, h, s, cfg):
    BM, BK, nw, ns, stagger = cfg
    n, d = g.shape
    t = torch.empty(n, R, device=g.device, dtype=g.dtype)
    gb = torch.zeros(d, R, device=g.device, dtype=torch.float32)
    _t_and_b_grad_kernel[(triton.cdiv(n, BM),)](g, B, h, t, gb, n, d, R, s, g.stride(0), g.stride(1), B.stride(0),
                                                B.stride(1), h.stride(0), h.stride(1), t.stride(0), t.stride(1),
                                                RP=R, BM=BM, BK=BK, STAGGER=stagger, num_warps=nw,
                                                num_stages=ns)
    return t, gb.to(g.dtype)


def cublas(g, B, h, s):
    t = torch.addmm(g.new_empty(g.shape[0], R), g, B, beta=0, alpha=s)
    gb = torch.addmm(B, g.t(), h, beta=0, alpha=s)
    return t, gb


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def check(device, dtype, n, d, cfg):
    g = torch.randn(n, d, device=device, dtype=dtype)
    B = torch.randn(d, R, device=device, dtype=dtype)
    h = torch.randn(n, R, device=device, dtype=dtype)
    t, gb = fused(g, B, h, 2.0, cfg)
    t_ref, gb_ref = 2.0 * g.double() @ B.double(), 2.0 * g.double().t() @ h.double()
    return rel(t, t_ref), rel(gb, gb_ref)


def graph_time_us(fn, reps=20):
    """Microseconds per call, the calls replayed from one CUDA graph (no launch cost), over four input sets."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i % 4)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i % 4)
    graph.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(5):
        graph.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / (5 * reps) * 1e3


# (model, tokens, width d, adapters of that width per step): 1.1B at 8 × 1024 tokens, q/o/down 2048 wide, k/v 256,
# gate/up 5632; 7B at 2 × 1024, q/k/v/o/down 4096, gate/up 11008 (where the trainer now keeps cuBLAS: too few rows)
CASES = (("1.1b", 8192, 2048, 66), ("1.1b", 8192, 256, 44), ("1.1b", 8192, 5632, 44),
         ("7b", 2048, 4096, 160), ("7b", 2048, 11008, 64))


def main():
    args = probe_args(__doc__)
    meta = collect_metadata()
    bf = dict(device="cuda", dtype=torch.bfloat16)
    # First the launch shipped before staggering (64-row programs; `shipped` in the rows and results at b559437),
    # then staggered ones, the library's now among them (64, 128, 4, 4, True). The unstaggered sweep: the H200 file.
    cfgs = [(64, 128, 4, 4, False)]
    cfgs += [(bm, 128, 4, 4, True) for bm in (16, 32, 64, 128)] + [(32, 64, 4, 4, True), (16, 256, 4, 3, True),
                                                                    (64, 256, 8, 3, True)]
    rows, configs, saved = [], {}, {}
    for model, n, d, count in CASES:
        G = [torch.randn(n, d, **bf) for _ in range(4)]
        H = [torch.randn(n, R, **bf) for _ in range(4)]
        B = torch.randn(d, R, **bf) * 0.02
        base = graph_time_us(lambda i: cublas(G[i], B, H[i], 2.0))
        read = graph_time_us(lambda i: torch.mm(G[i], B))  # t alone: the read of g, nothing else
        timed = {}
        for cfg in cfgs:
            try:
                err = check("cuda", torch.bfloat16, n, d, cfg)
                timed[str(cfg)] = dict(us=graph_time_us(lambda i: fused(G[i], B, H[i], 2.0, cfg)), rel_err=err)
            except Exception as e:  # a config that does not compile or fit
                timed[str(cfg)] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
        best = min((v["us"], k) for k, v in timed.items() if "us" in v)
        shipped = timed[str(cfgs[0])]["us"]
        rows.append(dict(model=model, tokens=n, width=d, cublas_us=base, read_floor_us=read, shipped_us=shipped,
                         best_fused_us=best[0], best_cfg=best[1], adapters_per_step=count,
                         step_ms_saved=(base - best[0]) * count / 1e3,
                         step_ms_saved_over_shipped=(shipped - best[0]) * count / 1e3))
        saved[model] = saved.get(model, 0.0) + rows[-1]["step_ms_saved"]
        configs[f"{model} d={d}"] = timed
        print(f"{model} n={n} d={d}: cuBLAS pair {base:.1f} us, read floor {read:.1f} us, shipped {shipped:.1f} us, "
              f"fused best {best[0]:.1f} us {best[1]}, x{count} a step: {(base - best[0]) * count / 1e3:+.2f} ms "
              f"against cuBLAS, {(shipped - best[0]) * count / 1e3:+.2f} ms against the shipped launch", flush=True)
        for k, v in timed.items():
            print("    ", k, v, flush=True)
    print(f"per step against cuBLAS: {saved}", flush=True)
    save(args.out, "fused_factor_grads", __doc__, rows, meta, settings=dict(rank=R, cases=CASES, configs=cfgs),
         details=dict(step_ms_saved=saved, configs=configs))


if __name__ == "__main__":
    main()
