"""Backward of one adapter: factor gradients on a side stream, overlapping the big input-gradient GEMM.

    python -m benchmarks.probes.side_stream          # on one GPU, from the repository root

Per 1.1B shape, M = 8192 tokens, r = 16, in µs (CUDA events, four input sets): the big GEMM alone, the
adapter's backward in sequence (`now`), and with the A and B gradients on a second stream (`overlap`;
`overlap_late` starts the rank-16 input-gradient term before the fork). The details scale the saving to a
layer (two q/o, two k/v, two gate/up, one down) and 22 layers, and say whether the overlapped backward
survives CUDA-graph capture.
"""
import torch

from benchmarks.probes.common import probe_args, rows_by, save, time_us
from benchmarks.harness.record import collect_metadata

M, r, s = 8192, 16, 2.0
SH = {"q/o": (2048, 2048), "k/v": (2048, 256), "gate/up": (2048, 5632), "down": (5632, 2048)}
bf = dict(device="cuda", dtype=torch.bfloat16)


def bench(fn, reps=40):
    return time_us(fn, reps, 5)


def shape(K: int, N: int, side: torch.cuda.Stream) -> tuple[dict, object]:
    """The row for one shape, and its overlapped backward (for the capture check)."""
    X = [torch.randn(M, K, **bf) for _ in range(4)]
    G = [torch.randn(M, N, **bf) for _ in range(4)]
    H = [torch.randn(M, r, **bf) for _ in range(4)]
    W = torch.randn(N, K, **bf) * 0.02
    A = torch.randn(r, K, **bf) * 0.02
    B = torch.randn(N, r, **bf) * 0.02
    gAb, gBb = torch.zeros(r, K, **bf), torch.zeros(N, r, **bf)

    def now(k):
        t = torch.mm(G[k], B)
        gAb.addmm_(t.t(), X[k], alpha=s)
        gBb.addmm_(G[k].t(), H[k], alpha=s)
        return torch.mm(t, A).addmm_(G[k], W, beta=s)

    def overlap(k, late=False):
        main = torch.cuda.current_stream()
        t = torch.mm(G[k], B)
        if late:
            gx_l = torch.mm(t, A)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            gAb.addmm_(t.t(), X[k], alpha=s)
            gBb.addmm_(G[k].t(), H[k], alpha=s)
        gx = (gx_l if late else torch.mm(t, A)).addmm_(G[k], W, beta=s)
        main.wait_stream(side)
        return gx

    def big(k):
        return torch.mm(G[k], W)

    row = dict(big=bench(big), now=bench(now), overlap=bench(overlap), overlap_late=bench(lambda k: overlap(k, True)))
    row["saving_us"] = row["now"] - min(row["overlap"], row["overlap_late"])
    return row, overlap


def captures(overlap) -> bool:
    """Whether the overlapped backward can be captured in a CUDA graph and replayed."""
    g = torch.cuda.CUDAGraph()
    s0 = torch.cuda.Stream()
    s0.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s0):
        overlap(0)
    torch.cuda.current_stream().wait_stream(s0)
    with torch.cuda.graph(g):
        out = overlap(0)
    g.replay()
    torch.cuda.synchronize()
    print("graph capture ok", out.shape)
    return True


def main():
    args = probe_args(__doc__)
    meta = collect_metadata()
    side = torch.cuda.Stream()
    res = {}
    for name, (K, N) in SH.items():
        res[name], overlap = shape(K, N, side)
        print(name, {k: round(v, 1) for k, v in res[name].items()}, flush=True)
    per_layer = sum(res[n]["saving_us"] * c for n, c in (("q/o", 2), ("k/v", 2), ("gate/up", 2), ("down", 1)))
    print(f"saving per layer {per_layer:.0f} us; 22 layers {per_layer * 22 / 1e3:.2f} ms")
    save(args.out, "side_stream", __doc__, rows_by("shape", res), meta, settings=dict(tokens=M, rank=r, shapes=SH),
         details=dict(saving_per_layer_us=per_layer, saving_22_layers_ms=per_layer * 22 / 1e3,
                      graph_capture_ok=captures(overlap)))


if __name__ == "__main__":
    main()
