"""Stacked storage [W;A] / [W|B] vs the adapter's op sequence as built, per shape, timed in sequence.

    python -m benchmarks.probes.stacked_weights          # on one GPU, from the repository root

Per 1.1B shape, M = 8192 tokens, r = 16, in µs (CUDA events, four input sets): forward and backward with A
stored under W (one big GEMM also yields h = x Aᵀ) and B beside it (one big GEMM also yields t = g B),
against separate W, A, B; the big GEMMs alone; the largest relative difference of the outputs. The details
scale the saving to a layer (two q/o, two k/v, two gate/up, one down) and 22 layers.
"""
import torch

from benchmarks.probes.common import probe_args, rows_by, save, time_us
from benchmarks.harness.record import collect_metadata

M, r, s = 8192, 16, 2.0
SH = {"q/o": (2048, 2048), "k/v": (2048, 256), "gate/up": (2048, 5632), "down": (5632, 2048)}
bf = dict(device="cuda", dtype=torch.bfloat16)


def bench(fn, reps=40):
    return time_us(fn, reps, 5)


def shape(K: int, N: int) -> dict:
    X = [torch.randn(M, K, **bf) for _ in range(4)]
    G = [torch.randn(M, N, **bf) for _ in range(4)]
    Z = torch.randn(N + r, K + r, **bf) * 0.02
    W, A, B = Z[:N, :K], Z[N:, :K], Z[:N, K:]
    Wc, Ac, Bc = W.contiguous(), A.contiguous(), B.contiguous()
    gAb, gBb = torch.zeros(r, K, **bf), torch.zeros(N, r, **bf)

    def fwd_now(k):
        h = torch.mm(X[k], Ac.t())
        return torch.mm(h, Bc.t()).addmm_(X[k], Wc.t(), beta=s), h

    def fwd_stacked(k):
        Y = torch.mm(X[k], Z[:, :K].t())
        y, h = Y[:, :N], Y[:, N:].clone()
        y.addmm_(h, Bc.t(), alpha=s)
        return y, h

    def bwd_now(k, h):
        g = G[k]
        t = torch.mm(g, Bc)
        gA = torch.addmm(Ac, t.t(), X[k], beta=0, alpha=s)
        gx = torch.mm(t, Ac).addmm_(g, Wc, beta=s)
        gB = torch.addmm(Bc, g.t(), h, beta=0, alpha=s)
        gAb.add_(gA)
        gBb.add_(gB)
        return gx

    def bwd_stacked(k, h):
        g = G[k]
        GX = torch.mm(g, Z[:N, :])
        gx, t = GX[:, :K], GX[:, K:]
        gAb.addmm_(t.t(), X[k], alpha=s)
        gx.addmm_(t, Ac, alpha=s)
        gBb.addmm_(g.t(), h, alpha=s)
        return gx

    # correctness of stacked vs as built
    y1, h1 = fwd_now(0)
    y2, h2 = fwd_stacked(0)
    e_f = ((y1.float() - y2.float()).abs().max() / y1.float().abs().max()).item()
    gAb.zero_()
    gBb.zero_()
    g1 = bwd_now(0, h1)
    a1, b1 = gAb.clone(), gBb.clone()
    gAb.zero_()
    gBb.zero_()
    g2 = bwd_stacked(0, h2)
    a2, b2 = gAb.clone(), gBb.clone()
    e_b = max(((u.float() - v.float()).abs().max() / u.float().abs().max()).item()
              for u, v in ((g1, g2), (a1, a2), (b1, b2)))
    row = dict(err_fwd=e_f, err_bwd=e_b)
    row["fwd_big"] = bench(lambda k: torch.mm(X[k], Wc.t()))
    row["fwd_now"] = bench(lambda k: fwd_now(k))
    row["fwd_stacked"] = bench(lambda k: fwd_stacked(k))
    H = [fwd_now(k)[1] for k in range(4)]
    row["bwd_big"] = bench(lambda k: torch.mm(G[k], Wc))
    row["bwd_now"] = bench(lambda k: bwd_now(k, H[k]))
    row["bwd_stacked"] = bench(lambda k: bwd_stacked(k, H[k]))
    row["saving_us"] = row["fwd_now"] + row["bwd_now"] - row["fwd_stacked"] - row["bwd_stacked"]
    return row


def main():
    args = probe_args(__doc__)
    meta = collect_metadata()
    res = {}
    for name, (K, N) in SH.items():
        res[name] = shape(K, N)
        print(name, {k: round(v, 4 if k.startswith("err") else 1) for k, v in res[name].items()}, flush=True)
    per_layer = sum(res[n]["saving_us"] * c for n, c in (("q/o", 2), ("k/v", 2), ("gate/up", 2), ("down", 1)))
    print(f"saving per layer {per_layer:.0f} us; 22 layers {per_layer * 22 / 1e3:.2f} ms")
    save(args.out, "stacked_weights", __doc__, rows_by("shape", res), meta, settings=dict(tokens=M, rank=r, shapes=SH),
         details=dict(saving_per_layer_us=per_layer, saving_22_layers_ms=per_layer * 22 / 1e3))


if __name__ == "__main__":
    main()
