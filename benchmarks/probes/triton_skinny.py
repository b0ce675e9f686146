"""Skinny GEMMs out (M, n) = X (M, K) @ W (K, n), n = 16..48 (h = x Aᵀ, t = g B): Triton vs cuBLAS.

    python -m benchmarks.probes.triton_skinny          # on one GPU, from the repository root

Per shape of a 1.1B step (M = 8192 tokens; h for single and grouped adapters, t per output width), in µs
(CUDA events, four input sets): cuBLAS, and the fastest of 14 launch configurations of a Triton kernel whose
result is within 2% of fp32, each with the bandwidth it reaches reading X.
"""
import torch
import triton
import triton.language as tl

from benchmarks.probes.common import probe_args, rows_by, save, time_us
from benchmarks.harness.record import collect_metadata

M = 8192
bf = dict(device="cuda", dtype=torch.bfloat16)
CFGS = [(bm, bk, 4, ns) for bm in (16, 32, 64) for bk in (128, 256)
        for ns in (3, 5)] + [(64, 128, 8, 4), (128, 128, 8, 3)]
# (case, K, n, whether W is stored transposed, as A is)
CASES = (("h q/k/v,o,gate K=2048 n=16", 2048, 16, True), ("h grouped qkv n=48", 2048, 48, True),
         ("h grouped gu n=32", 2048, 32, True), ("h down K=5632", 5632, 16, True),
         ("t N=2048", 2048, 16, False), ("t N=256", 256, 16, False), ("t N=5632", 5632, 16, False))


@triton.jit
def skinny(x_ptr, w_ptr, o_ptr, M, K, N, sxm, sxk, swk, swn, som, son,
           NP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    rn = tl.arange(0, NP)
    rk0 = tl.arange(0, BK)
    acc = tl.zeros((BM, NP), dtype=tl.float32)
    xp = x_ptr + rm[:, None] * sxm + rk0[None, :] * sxk
    wp = w_ptr + rk0[:, None] * swk + rn[None, :] * swn
    for k0 in range(0, K, BK):
        x = tl.load(xp, mask=rm[:, None] < M, other=0.)
        w = tl.load(wp, mask=rn[None, :] < N, other=0.)
        acc = tl.dot(x, w, acc)
        xp += BK * sxk
        wp += BK * swk
    tl.store(o_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(o_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def run(x, w, cfg):
    BM, BK, nw, ns = cfg
    Mx, K = x.shape
    N = w.shape[1]
    o = torch.empty(Mx, N, device=x.device, dtype=x.dtype)
    skinny[(triton.cdiv(Mx, BM),)](x, w, o, Mx, K, N, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                                   o.stride(0), o.stride(1), NP=max(16, triton.next_power_of_2(N)), BM=BM, BK=BK,
                                   num_warps=nw, num_stages=ns)
    return o


def bench(fn, reps=30):
    return time_us(fn, reps, 3)


def case(K: int, n: int, transposed: bool) -> dict:
    X = [torch.randn(M, K, **bf) for _ in range(4)]
    Wm = torch.randn(n, K, **bf) if transposed else torch.randn(K, n, **bf)
    w = Wm.t() if transposed else Wm
    ref = (X[0].float() @ w.float())
    cub = bench(lambda k: torch.mm(X[k], w))
    best, bt = None, 1e9
    for c in CFGS:
        try:
            o = run(X[0], w, c)
            if (o.float() - ref).abs().max() > 2e-2 * ref.abs().max():
                continue
            t = bench(lambda k: run(X[k], w, c), reps=15)
        except Exception:  # a configuration that does not compile or fit
            continue
        if t < bt:
            best, bt = c, t
    gbps = M * K * 2 / (bt * 1e-6) / 1e9
    return dict(cublas_us=cub, triton_us=bt, cfg=best, triton_GBps=gbps, cublas_GBps=M * K * 2 / (cub * 1e-6) / 1e9)


def main():
    args = probe_args(__doc__)
    meta = collect_metadata()
    res = {}
    for name, K, n, transposed in CASES:
        res[name] = case(K, n, transposed)
        print(name, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in res[name].items()}, flush=True)
    save(args.out, "triton_skinny", __doc__, rows_by("case", res), meta, settings=dict(tokens=M, configs=CFGS))


if __name__ == "__main__":
    main()
