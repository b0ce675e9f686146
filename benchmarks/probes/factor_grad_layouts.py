"""Factor-gradient GEMM formulations: kernel count (split-K reduction or not) and time; then full vs ours.

    python -m benchmarks.probes.factor_grad_layouts            # the GEMM orders (about a minute on one H200)
    python -m benchmarks.probes.factor_grad_layouts --steps    # and then three interleaved 1.1B steps each

Per shape of a 1.1B step (M = 8192 tokens): the A gradient (rank R × width K, summed over the tokens) and the
B gradient (width N × rank 16) in the orders cuBLAS could be given, each timed with CUDA events and profiled
once for the kernels it launches. `--steps` then measures full fine-tuning and ours (r=16, all linear layers)
in compile+graphs, three times interleaved, through benchmarks.bench.measure, into factor_grad_layouts_steps.
"""
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.probes.common import probe_args, save, time_us
from benchmarks.bench import SHAPES, measure
from benchmarks.harness.record import collect_metadata
from lowrank.adapters.targets import ALL_LINEAR

M, s = 8192, 2.0
bf = dict(device="cuda", dtype=torch.bfloat16)


def bench(fn, reps=40):
    """(µs per call, kernels launched, their names)."""
    us = time_us(fn, reps, 5)
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn(0)
        torch.cuda.synchronize()
    names = [e.key[:40] for e in p.key_averages() if e.self_device_time_total > 0]
    return round(us, 1), len(names), names


def layouts() -> dict:
    res = {}
    for K, R in ((2048, 48), (2048, 32), (2048, 16), (5632, 16)):
        X = [torch.randn(M, K, **bf) for _ in range(4)]
        T = [torch.randn(M, R, **bf) for _ in range(4)]
        res[f"gA K={K} R={R}"] = {"mm(Tt,x)": bench(lambda k: torch.mm(T[k].t(), X[k])),
                                  "mm(xt,T).t()": bench(lambda k: torch.mm(X[k].t(), T[k]).t()),
                                  "mm(xt,T).t().contig": bench(lambda k: torch.mm(X[k].t(), T[k]).t().contiguous())}
    for N, ld in ((2048, 48), (256, 48), (5632, 32), (2048, 16)):
        G = [torch.randn(M, N, **bf) for _ in range(4)]
        H = [torch.randn(M, ld, **bf)[:, :16] for _ in range(4)]
        B = torch.randn(N, 16, **bf)
        res[f"gB N={N} h-ld={ld}"] = {
            "addmm(gt,h)": bench(lambda k: torch.addmm(B, G[k].t(), H[k], beta=0, alpha=s)),
            "addmm(ht,g).t()": bench(lambda k: torch.addmm(B.t(), H[k].t(), G[k], beta=0, alpha=s).t()),
            "addmm(gt,h.contig)": bench(lambda k: torch.addmm(B, G[k].t(), H[k].contiguous(), beta=0, alpha=s))}
    return res


def layout_rows(res: dict) -> list[dict]:
    return [dict(case=case, variant=variant, us=us, kernels=n, kernel_names=names)
            for case, variants in res.items() for variant, (us, n, names) in variants.items()]


def interleaved_steps() -> list[dict]:
    rows = []
    for rep in range(3):
        for method, impl, rank, targets in (("full", "torch", None, None), ("lora", "ours", 16, ALL_LINEAR)):
            r = measure("llama-1.1b", SHAPES["llama-1.1b"], method, impl, rank, targets, "compile+graphs",
                        torch.device("cuda"), torch.bfloat16, 4, 15, 0)
            rows.append(dict(repeat=rep, impl=impl, tokens_per_second=r["tokens_per_second"],
                             step_ms=r["step_time_s"] * 1e3, gpu_busy_ms=r["gpu_busy_s"] * 1e3))
            print(rows[-1], flush=True)
    return rows


def main():
    args = probe_args(__doc__, flags=(("--steps", "then full and ours, 1.1B compile+graphs, interleaved 3 times"),))
    meta = collect_metadata()
    res = layouts()
    for k, v in res.items():
        print(k, {a: b[:2] for a, b in v.items()}, flush=True)
        for a, b in v.items():
            print("     ", a, b[2], flush=True)
    save(args.out, "factor_grad_layouts", __doc__, layout_rows(res), meta, settings=dict(tokens=M, scale=s))
    if args.steps:
        save(args.out, "factor_grad_layouts_steps", __doc__, interleaved_steps(), meta,
             settings=dict(model="llama-1.1b", mode="compile+graphs", warmup_steps=4, timed_steps=15, repeats=3))


if __name__ == "__main__":
    main()
