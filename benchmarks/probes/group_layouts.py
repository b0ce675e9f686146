"""Group adapter math: H/T as (n, Σr) row-major slices (as built) vs (Σr, n) member-major (h col-major views).

    python -m benchmarks.probes.group_layouts          # on one GPU, from the repository root

Per shared-input group of a 1.1B layer (q,k,v; gate,up; and o and down alone), M = 8192 tokens, r = 16: the
group's forward and backward in each layout, in µs (CUDA events, four input sets), the B gradient also
computed transposed (`_gbT`), and the largest relative difference between the two layouts' outputs.
"""
import torch

from benchmarks.probes.common import probe_args, rows_by, save, time_us
from benchmarks.harness.record import collect_metadata

M, r, s = 8192, 16, 2.0
bf = dict(device="cuda", dtype=torch.bfloat16)
GROUPS = {"qkv": (2048, [2048, 256, 256]), "gate_up": (2048, [5632, 5632]), "o": (2048, [2048]), "down": (5632, [2048])}


def bench(fn, reps=30):
    return round(time_us(fn, reps, 4), 1)


def group(K: int, Ns: list[int]) -> dict:
    X = [torch.randn(M, K, **bf) for _ in range(4)]
    G = [[torch.randn(M, N, **bf) for N in Ns] for _ in range(4)]
    Ws = [torch.randn(N, K, **bf) * 0.02 for N in Ns]
    As = [torch.randn(r, K, **bf) * 0.02 for _ in Ns]
    Bs = [torch.randn(N, r, **bf) * 0.02 for N in Ns]

    def fwd(k, layout):
        Ac = torch.cat(As)
        if layout == "row":
            H = torch.mm(X[k], Ac.t())
            hs = H.split(r, 1)
        else:
            H = torch.mm(Ac, X[k].t())
            hs = [h.t() for h in H.split(r, 0)]
        ys = [torch.mm(h, B.t()).addmm_(X[k], W.t(), beta=s) for h, B, W in zip(hs, Bs, Ws)]
        return ys, hs

    def bwd(k, hs, layout, gb_t=False):
        gs = G[k]
        if layout == "row":
            T = torch.cat([torch.addmm(h, g, B, beta=0, alpha=s) for h, g, B in zip(hs, gs, Bs)], 1)
            gA = torch.mm(T.t(), X[k])
        else:
            T = torch.cat([torch.addmm(h.t(), B.t(), g.t(), beta=0, alpha=s) for h, g, B in zip(hs, gs, Bs)], 0).t()
            gA = torch.mm(T.t(), X[k])
        gx = torch.mm(T, torch.cat(As))
        for g, W in zip(gs, Ws):
            gx.addmm_(g, W)
        if gb_t:
            gB = [torch.addmm(B.t(), h.t(), g, beta=0, alpha=s).t().contiguous() for h, g, B in zip(hs, gs, Bs)]
        else:
            gB = [torch.addmm(B, g.t(), h, beta=0, alpha=s) for h, g, B in zip(hs, gs, Bs)]
        return gx, gA, gB

    ref = None
    row = {}
    for layout in ("row", "col"):
        ys, hs = fwd(0, layout)
        out = bwd(0, hs, layout)
        flat = [*ys, out[0], out[1], *out[2]]
        if ref is None:
            ref = flat
        else:
            err = max(((a.float() - b.float()).abs().max() / a.float().abs().max()).item() for a, b in zip(ref, flat))
            row["err_col_vs_row"] = err
        row[f"fwd_{layout}"] = bench(lambda k: fwd(k, layout))
        HS = [fwd(k, layout)[1] for k in range(4)]
        row[f"bwd_{layout}"] = bench(lambda k: bwd(k, HS[k], layout))
        row[f"bwd_{layout}_gbT"] = bench(lambda k: bwd(k, HS[k], layout, True))
    return row


def main():
    args = probe_args(__doc__)
    meta = collect_metadata()
    res = {}
    for name, (K, Ns) in GROUPS.items():
        res[name] = group(K, Ns)
        print(name, res[name], flush=True)
    save(args.out, "group_layouts", __doc__, rows_by("group", res), meta,
         settings=dict(tokens=M, rank=r, scale=s, groups=GROUPS))


if __name__ == "__main__":
    main()
