"""Factor-gradient GEMM formulations: kernel count (splitK reduce?) and time; then interleaved full vs ours."""
import json, sys
import torch
from timing import OUT, time_us
from torch.profiler import profile, ProfilerActivity
M, s = 8192, 2.0
bf = dict(device="cuda", dtype=torch.bfloat16)


def bench(fn, reps=40):
    us = time_us(fn, reps, 5)
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn(0); torch.cuda.synchronize()
    names = [e.key[:40] for e in p.key_averages() if e.self_device_time_total > 0]
    return round(us, 1), len(names), names


res = {}
for K, R in ((2048, 48), (2048, 32), (2048, 16), (5632, 16)):
    X = [torch.randn(M, K, **bf) for _ in range(4)]; T = [torch.randn(M, R, **bf) for _ in range(4)]
    res[f"gA K={K} R={R}"] = {"mm(Tt,x)": bench(lambda k: torch.mm(T[k].t(), X[k])),
                              "mm(xt,T).t()": bench(lambda k: torch.mm(X[k].t(), T[k]).t()),
                              "mm(xt,T).t().contig": bench(lambda k: torch.mm(X[k].t(), T[k]).t().contiguous())}
for N, ld in ((2048, 48), (256, 48), (5632, 32), (2048, 16)):
    G = [torch.randn(M, N, **bf) for _ in range(4)]; H = [torch.randn(M, ld, **bf)[:, :16] for _ in range(4)]
    B = torch.randn(N, 16, **bf)
    res[f"gB N={N} h-ld={ld}"] = {"addmm(gt,h)": bench(lambda k: torch.addmm(B, G[k].t(), H[k], beta=0, alpha=s)),
                                  "addmm(ht,g).t()": bench(lambda k: torch.addmm(B.t(), H[k].t(), G[k], beta=0, alpha=s).t()),
                                  "addmm(gt,h.contig)": bench(lambda k: torch.addmm(B, G[k].t(), H[k].contiguous(), beta=0, alpha=s))}
for k, v in res.items():
    print(k, {a: b[:2] for a, b in v.items()}, flush=True)
    for a, b in v.items():
        print("     ", a, b[2], flush=True)
(OUT / "factor_grad_layouts.json").write_text(json.dumps(res, indent=1))

if "steps" in sys.argv:
    sys.path.insert(0, ".")
    from experiments.bench import measure, SHAPES, ALL_LINEAR
    rows = []
    for rep in range(3):
        for method, impl, rank, targets in (("full", "torch", None, None), ("lora", "ours", 16, ALL_LINEAR)):
            r = measure("llama-1.1b", SHAPES["llama-1.1b"], method, impl, rank, targets, "compile+graphs",
                        torch.device("cuda"), torch.bfloat16, 4, 15, 0)
            rows.append((rep, impl, r["tokens_per_second"], r["step_time_s"] * 1e3, r["gpu_busy_s"] * 1e3))
            print(rows[-1], flush=True)
    (OUT / "factor_grad_layouts_steps.json").write_text(json.dumps(rows))
