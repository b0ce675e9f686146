"""The trainer's GEMM from the LoRA product (lowrank.adapters.lora_gemm) as shipped, against the cuBLAS pair.

    python -m benchmarks.probes.lora_gemm_check          # on one GPU, from the repository root

Per Llama-1.1B shape at 8,192 tokens (a group's input gradient at rank 48 too), in µs (CUDA events, four input
sets): the forward (x Wᵀ + 2 · h Bᵀ) and the input gradient (g W + T A) through `lora_gemm` and through the pair
that runs without it, with the kernel's largest error relative to an fp32 reference. Then a group's input gradient
(T [A₁; …; Aₙ] + Σ gᵢ Wᵢ: q, k, v; gate, up) at 1.1B (8,192 tokens) and 7B (2,048): the cuBLAS pair, the kernel
summing the first pair with cuBLAS adding the others, and the kernel summing every pair in one launch (as shipped).
"""
import torch

from benchmarks.probes.common import probe_args, rows_by, save, time_us
from benchmarks.harness.record import collect_metadata
from benchmarks.fast_path import one_pair_a_launch
from lowrank.adapters import lora_gemm as lg

SHAPES = {"1.1b q/o": (8192, 2048, 2048, 16), "1.1b gate/up": (8192, 2048, 5632, 16),
          "1.1b down": (8192, 5632, 2048, 16), "1.1b q/o, rank 48": (8192, 2048, 2048, 48)}  # tokens, in, out, r
# tokens, in, each member's out; rank 16 a member
GROUPS = {"1.1b q,k,v input grad": (8192, 2048, (2048, 256, 256)),
          "1.1b gate,up input grad": (8192, 2048, (5632,) * 2),
          "7b q,k,v input grad": (2048, 4096, (4096,) * 3), "7b gate,up input grad": (2048, 4096, (11008,) * 2)}


def shape_row(M: int, i: int, o: int, r: int) -> dict:
    bf = dict(device="cuda", dtype=torch.bfloat16)
    X, G = [torch.randn(M, i, **bf) for _ in range(4)], [torch.randn(M, o, **bf) for _ in range(4)]
    H = [torch.randn(M, r, **bf) for _ in range(4)]
    W, A, B = torch.randn(o, i, **bf) * .02, torch.randn(r, i, **bf) * .02, torch.randn(o, r, **bf) * .02
    assert lg.applies(X[0], W, H[0], o) and lg._kernel_runs([X[0]], [W], torch.empty(M, o, **bf))
    y = lg.lora_gemm([X[0]], [W], H[0], B, 2.0, True, True)
    ref = X[0].float() @ W.float().t() + 2 * H[0].float() @ B.float().t()
    gx = lg.lora_gemm([G[0]], [W], H[0], A, 1.0, False, False)
    gref = G[0].float() @ W.float() + H[0].float() @ A.float()
    return dict(forward_rel_err=((y.float() - ref).abs().max() / ref.abs().max()).item(),
                input_grad_rel_err=((gx.float() - gref).abs().max() / gref.abs().max()).item(),
                forward_pair_us=time_us(lambda k: torch.mm(H[k], B.t()).addmm_(X[k], W.t(), beta=2.0)),
                forward_kernel_us=time_us(lambda k: lg.lora_gemm([X[k]], [W], H[k], B, 2.0, True, True)),
                input_grad_pair_us=time_us(lambda k: torch.mm(H[k], A).addmm_(G[k], W)),
                input_grad_kernel_us=time_us(lambda k: lg.lora_gemm([G[k]], [W], H[k], A, 1.0, False, False)))


def group_row(M: int, i: int, outs: tuple[int, ...]) -> dict:
    bf = dict(device="cuda", dtype=torch.bfloat16)
    G = [[torch.randn(M, o, **bf) for o in outs] for _ in range(4)]
    T = [torch.randn(M, 16 * len(outs), **bf) for _ in range(4)]
    Ws, A = [torch.randn(o, i, **bf) * .02 for o in outs], torch.randn(16 * len(outs), i, **bf) * .02

    def kernel(k: int):
        return lg.lora_gemm(G[k], Ws, T[k], A, 1.0, False, False)

    def one_pair(k: int):
        with one_pair_a_launch():
            return kernel(k)

    ref = T[0].float() @ A.float() + sum(g.float() @ W.float() for g, W in zip(G[0], Ws))
    err = ((kernel(0).float() - ref).abs().max() / ref.abs().max()).item()
    return dict(input_grad_rel_err=err,
                input_grad_pair_us=time_us(lambda k: lg.lowrank_plus_linear(G[k], Ws, T[k], A, 1.0)),
                input_grad_kernel_one_pair_us=time_us(one_pair), input_grad_kernel_all_pairs_us=time_us(kernel))


def main():
    args = probe_args(__doc__)
    meta = collect_metadata()
    res = {}
    for name, shape in SHAPES.items():
        res[name] = shape_row(*shape)
        print(name, {k: round(v, 4 if "err" in k else 1) for k, v in res[name].items()}, flush=True)
    for name, shape in GROUPS.items():
        res[name] = group_row(*shape)
        print(name, {k: round(v, 4 if "err" in k else 1) for k, v in res[name].items()}, flush=True)
    save(args.out, "lora_gemm_check", __doc__, rows_by("shape", res), meta, settings=dict(shapes=SHAPES, groups=GROUPS))


if __name__ == "__main__":
    main()
