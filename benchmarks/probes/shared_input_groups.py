"""Shared-input grouping of adapters (q,k,v; gate,up) vs per-adapter ops, timed in sequence with the gx sum.

    python -m benchmarks.probes.shared_input_groups          # on one GPU, from the repository root

Per group of a 1.1B layer, M = 8192 tokens, r = 16, in µs (CUDA events, four input sets): the adapters'
forward and backward one by one (`now`: h and A gradient per adapter, input gradients summed) against
grouped (one h = x [A_q; A_k; A_v]ᵀ, one A-gradient GEMM, one input-gradient buffer); `bwd_now_nosum` leaves
the sum out. `saving_us` is forward plus backward, one by one less grouped; the details scale it to 22 layers.
The factor gradients' results are not kept: their kernels are what is timed.
"""
import torch

from benchmarks.probes.common import probe_args, rows_by, save, time_us
from benchmarks.harness.record import collect_metadata

M, r, s = 8192, 16, 2.0
bf = dict(device="cuda", dtype=torch.bfloat16)
GROUPS = {"qkv": (2048, [2048, 256, 256]), "gate_up": (2048, [5632, 5632])}


def bench(fn, reps=40):
    return time_us(fn, reps, 5)


def group(K: int, Ns: list[int]) -> dict:
    X = [torch.randn(M, K, **bf) for _ in range(4)]
    Gs = [[torch.randn(M, N, **bf) for N in Ns] for _ in range(4)]
    Ws = [torch.randn(N, K, **bf) * 0.02 for N in Ns]
    As = [torch.randn(r, K, **bf) * 0.02 for _ in Ns]
    Bs = [torch.randn(N, r, **bf) * 0.02 for N in Ns]

    def fwd_now(k):
        hs, ys = [], []
        for W, A, B in zip(Ws, As, Bs):
            h = torch.mm(X[k], A.t())
            hs.append(h)
            ys.append(torch.mm(h, B.t()).addmm_(X[k], W.t(), beta=s))
        return ys, hs

    def fwd_grouped(k):
        H = torch.mm(X[k], torch.cat(As).t())
        ys = [torch.mm(H[:, i * r:(i + 1) * r], B.t()).addmm_(X[k], W.t(), beta=s)
              for i, (W, B) in enumerate(zip(Ws, Bs))]
        return ys, H

    def bwd_now(k, hs):
        gx = None
        for g, W, A, B, h in zip(Gs[k], Ws, As, Bs, hs):
            t = torch.mm(g, B)
            torch.addmm(A, t.t(), X[k], beta=0, alpha=s)  # A gradient
            gxi = torch.mm(t, A).addmm_(g, W, beta=s)
            torch.addmm(B, g.t(), h, beta=0, alpha=s)  # B gradient
            gx = gxi if gx is None else gx + gxi   # eager sum; compiled: fused into a consumer
        return gx

    def bwd_now_nosum(k, hs):
        for g, W, A, B, h in zip(Gs[k], Ws, As, Bs, hs):
            t = torch.mm(g, B)
            torch.addmm(A, t.t(), X[k], beta=0, alpha=s)
            gxi = torch.mm(t, A).addmm_(g, W, beta=s)
            torch.addmm(B, g.t(), h, beta=0, alpha=s)
        return gxi

    def bwd_grouped(k, H):
        T = torch.cat([torch.mm(g, B) * s for g, B in zip(Gs[k], Bs)], 1)
        torch.mm(T.t(), X[k])  # the group's A gradients
        gx = torch.mm(T, torch.cat(As))
        for g, W in zip(Gs[k], Ws):
            gx.addmm_(g, W)
        for i, (g, B) in enumerate(zip(Gs[k], Bs)):
            torch.addmm(B, g.t(), H[:, i * r:(i + 1) * r], beta=0, alpha=s)
        return gx

    y1, h1 = fwd_now(0)
    y2, H2 = fwd_grouped(0)
    ef = max(((a.float() - b.float()).abs().max() / a.float().abs().max()).item() for a, b in zip(y1, y2))
    eb = ((bwd_now(0, h1).float() - bwd_grouped(0, H2).float()).abs().max() / bwd_now(0, h1).float().abs().max()).item()
    row = dict(err_fwd=ef, err_bwd=eb)
    row["fwd_now"] = bench(fwd_now)
    row["fwd_grouped"] = bench(fwd_grouped)
    HS = [fwd_now(k)[1] for k in range(4)]
    HG = [fwd_grouped(k)[1] for k in range(4)]
    row["bwd_now"] = bench(lambda k: bwd_now(k, HS[k]))
    row["bwd_grouped"] = bench(lambda k: bwd_grouped(k, HG[k]))
    row["bwd_now_nosum"] = bench(lambda k: bwd_now_nosum(k, HS[k]))
    row["saving_us"] = row["fwd_now"] + row["bwd_now"] - row["fwd_grouped"] - row["bwd_grouped"]
    return row


def main():
    args = probe_args(__doc__)
    meta = collect_metadata()
    res = {}
    for name, (K, Ns) in GROUPS.items():
        res[name] = group(K, Ns)
        print(name, {k: round(v, 4 if k.startswith("err") else 1) for k, v in res[name].items()}, flush=True)
    per_layer = res["qkv"]["saving_us"] + res["gate_up"]["saving_us"]
    print(f"saving per layer {per_layer:.0f} us; 22 layers {per_layer * 22 / 1e3:.2f} ms")
    save(args.out, "shared_input_groups", __doc__, rows_by("group", res), meta,
         settings=dict(tokens=M, rank=r, scale=s, groups=GROUPS),
         details=dict(saving_per_layer_us=per_layer, saving_22_layers_ms=per_layer * 22 / 1e3))


if __name__ == "__main__":
    main()
