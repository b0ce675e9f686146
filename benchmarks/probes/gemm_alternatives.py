"""One adapter's GEMMs per Llama-1.1B shape (M = 8192 tokens, r = 16): cuBLAS orders and a Triton kernel.

    python -m benchmarks.probes.gemm_alternatives          # on one GPU, from the repository root

Per shape (q/o, k/v, gate/up, down), each timed in µs with CUDA events over four input sets: the big GEMM
alone, the forward pair (base + rank-16 expansion h Bᵀ) in both orders and with a Triton expansion kernel
(best of 6 launch configurations, checked against fp32), the input-gradient pair likewise, and the factor
GEMMs (h, t, the A and B gradients as fresh outputs or accumulated in place).
"""
import json

import torch
import triton
import triton.language as tl

from benchmarks.probes.common import probe_args, rows_by, save, time_us
from benchmarks.harness.record import collect_metadata

dev = "cuda"
M, r, s = 8192, 16, 2.0
SH = {"q/o": (2048, 2048), "k/v": (2048, 256), "gate/up": (2048, 5632), "down": (5632, 2048)}
CFGS = [(128, 128, 4, 1), (64, 256, 4, 1), (128, 256, 8, 1), (256, 128, 8, 1), (64, 128, 4, 1), (128, 64, 4, 1)]


@triton.jit
def expand_kernel(h, b, o, M, N, shm, shk, sbk, sbn, som, son, scale,
                  R: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, RP)
    hv = tl.load(h + rm[:, None] * shm + rk[None, :] * shk, mask=(rm[:, None] < M) & (rk[None, :] < R), other=0.)
    bv = tl.load(b + rk[:, None] * sbk + rn[None, :] * sbn, mask=(rk[:, None] < R) & (rn[None, :] < N), other=0.)
    acc = tl.dot(hv, bv) * scale
    ptr = o + rm[:, None] * som + rn[None, :] * son
    msk = (rm[:, None] < M) & (rn[None, :] < N)
    if ACC:
        acc += tl.load(ptr, mask=msk).to(tl.float32)
    tl.store(ptr, acc.to(o.dtype.element_ty), mask=msk)


def expand(h, bmat, scale, out=None, cfg=(128, 128, 4, 3)):
    """out (+)= scale * h @ bmat ; h (M,R), bmat (R,N)."""
    Mh, R = h.shape
    N = bmat.shape[1]
    acc = out is not None
    if out is None:
        out = torch.empty(Mh, N, device=h.device, dtype=h.dtype)
    BM, BN, nw, ns = cfg
    grid = (triton.cdiv(Mh, BM), triton.cdiv(N, BN))
    expand_kernel[grid](h, bmat, out, Mh, N, h.stride(0), h.stride(1), bmat.stride(0), bmat.stride(1),
                        out.stride(0), out.stride(1), scale, R=R, RP=max(16, triton.next_power_of_2(R)),
                        BM=BM, BN=BN, ACC=acc, num_warps=nw, num_stages=ns)
    return out


def bench(fn, reps=40):
    return time_us(fn, reps, 5)


def shape_row(i: int, o: int) -> dict:
    """The timings for one shape: input width i, output width o."""
    bf = dict(device=dev, dtype=torch.bfloat16)
    X = [torch.randn(M, i, **bf) for _ in range(4)]
    G = [torch.randn(M, o, **bf) for _ in range(4)]
    H = [torch.randn(M, r, **bf) for _ in range(4)]
    T = [torch.randn(M, r, **bf) for _ in range(4)]
    W = torch.randn(o, i, **bf) * 0.02
    A = torch.randn(r, i, **bf) * 0.02
    B = torch.randn(o, r, **bf) * 0.02
    gAbuf = torch.zeros(r, i, **bf)
    gBbuf = torch.zeros(o, r, **bf)
    ref = s * (H[0].float() @ B.float().t())  # correctness of the Triton expansion
    for c in CFGS:
        err = (expand(H[0], B.t(), s, cfg=c).float() - ref).abs().max().item()
        assert err < 1e-2 * ref.abs().max().item(), (i, o, c, err)
    row = {}
    row["big_bz"] = bench(lambda k: torch.mm(X[k], W.t()))
    row["pair_now"] = bench(lambda k: torch.mm(H[k], B.t()).addmm_(X[k], W.t(), beta=s))
    row["yl_mm"] = bench(lambda k: torch.mm(H[k], B.t()))
    tri = {c: bench(lambda k, c=c: expand(H[k], B.t(), s, cfg=c)) for c in CFGS}
    bc = min(tri, key=tri.get)
    row["yl_triton"] = {str(c): v for c, v in tri.items()}
    row["yl_triton_best"] = (str(bc), tri[bc])
    row["pair_triton"] = bench(lambda k: expand(H[k], B.t(), s, cfg=bc).addmm_(X[k], W.t()))
    row["pair_rev"] = bench(lambda k: torch.mm(X[k], W.t()).addmm_(H[k], B.t(), alpha=s))
    row["pair_rev_triton"] = bench(lambda k: expand(H[k], B.t(), s, out=torch.mm(X[k], W.t()), cfg=bc))
    # backward
    row["gx_big_bz"] = bench(lambda k: torch.mm(G[k], W))
    row["gx_pair_now"] = bench(lambda k: torch.mm(T[k], A).addmm_(G[k], W, beta=s))
    row["gxl_mm"] = bench(lambda k: torch.mm(T[k], A))
    tri2 = {c: bench(lambda k, c=c: expand(T[k], A, s, cfg=c)) for c in CFGS}
    b2 = min(tri2, key=tri2.get)
    row["gxl_triton_best"] = (str(b2), tri2[b2])
    row["gx_pair_triton"] = bench(lambda k: expand(T[k], A, s, cfg=b2).addmm_(G[k], W))
    row["h"] = bench(lambda k: torch.mm(X[k], A.t()))
    row["t"] = bench(lambda k: torch.mm(G[k], B))
    row["gA_beta0"] = bench(lambda k: torch.addmm(A, T[k].t(), X[k], beta=0, alpha=s))
    row["gA_acc"] = bench(lambda k: gAbuf.addmm_(T[k].t(), X[k], alpha=s))
    row["gA_xt"] = bench(lambda k: torch.mm(X[k].t(), T[k]))
    row["gB_beta0"] = bench(lambda k: torch.addmm(B, G[k].t(), H[k], beta=0, alpha=s))
    row["gB_acc"] = bench(lambda k: gBbuf.addmm_(G[k].t(), H[k], alpha=s))
    row["gB_ht"] = bench(lambda k: torch.mm(H[k].t(), G[k]))
    row["grad_add"] = bench(lambda k: gAbuf.add_(A))
    return row


def micro() -> dict:
    res = {}
    for name, (i, o) in SH.items():
        res[name] = row = shape_row(i, o)
        print(name, json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()
                                if k != "yl_triton"}), flush=True)
        print("   yl triton cfgs", {k: round(v, 1) for k, v in row["yl_triton"].items()}, flush=True)
    return res


def main():
    args = probe_args(__doc__)
    meta = collect_metadata()
    res = micro()
    by_config = {name: row.pop("yl_triton") for name, row in res.items()}  # per launch configuration: details
    save(args.out, "gemm_alternatives", __doc__, rows_by("shape", res), meta,
         settings=dict(tokens=M, rank=r, scale=s, shapes=SH, triton_configs=CFGS),
         details=dict(yl_triton_by_config=by_config))


if __name__ == "__main__":
    main()
