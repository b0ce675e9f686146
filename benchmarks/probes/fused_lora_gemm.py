"""The LoRA product inside the frozen GEMM: one persistent Triton (TMA) kernel against the cuBLAS pair.

    python -m benchmarks.probes.fused_lora_gemm          # on one GPU, from the repository root

Per Llama shape (1.1B at 8 × 1024 tokens, 7B at 2 × 1024), r = 16, in µs (CUDA events, four input sets): the
frozen GEMM alone in cuBLAS (`big`) and in the Triton kernel (`tri_big`), the trainer's pair today (the rank-r
product written first, the big GEMM accumulating onto it as beta: `pair`), and the fused kernel, whose epilogue adds
s · h Bᵀ (forward) or T A (input gradient) to the tile before its only store (`fused`, best of the launch
configurations, checked against fp32). What the fused kernel would save a step is `pair − fused` summed over a
step's adapters (details).
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from benchmarks.probes.common import probe_args, rows_by, save, time_us
from benchmarks.harness.record import collect_metadata
from lowrank.adapters.lora_gemm import _accumulate

r, s = 16, 2.0
SHAPES = {  # name: (tokens, in, out, adapters of this shape per step)
    "1.1b q/o": (8192, 2048, 2048, 44), "1.1b k/v": (8192, 2048, 256, 44), "1.1b gate/up": (8192, 2048, 5632, 44),
    "1.1b down": (8192, 5632, 2048, 22),
    "7b q/k/v/o": (2048, 4096, 4096, 128), "7b gate/up": (2048, 4096, 11008, 64), "7b down": (2048, 11008, 4096, 32),
}
CFGS = [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (128, 128, 64, 5, 8)]  # BM, BN, BK, stages, warps
# (name, epilogue, flattened loops, persistent grid); tri_*: the frozen GEMM alone in Triton
VARIANTS = [("tri_flat", 0, True, True), ("tri_tile", 0, False, False), ("fused_flat_after", 1, True, True),
            ("fused_persist_ptr", 2, False, True), ("fused_flat_init", 4, True, True),
            ("fused_persist_init", 4, False, True), ("fused_tile_init", 4, False, False)]


@triton.jit
def factor_tiles_tma(e_desc, f_desc, om, on, F_NR: tl.constexpr):
    """The rank-r tiles by TMA: e's rows from om, fᵀ's columns from on."""
    e = e_desc.load([om, 0])
    ft = f_desc.load([on, 0]).T if F_NR else f_desc.load([0, on])
    return e, ft


@triton.jit
def lora_mm_kernel(a_desc, b_desc, e_desc, f_desc, c_desc, e_ptr, f_ptr, M, N, K, scale, rank, s_em, s_er, s_fr,
                   s_fn, B_NK: tl.constexpr, F_NR: tl.constexpr, EPI: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, R: tl.constexpr, GROUP_M: tl.constexpr,
                   NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr):
    """c = a @ op(b) + scale · e @ fᵗ: a (M, K); b (N, K) if B_NK else (K, N); e (M, rank); fᵗ (rank, N) read
    through strides (s_fr, s_fn). Persistent over output tiles, grouped along M for L2 reuse. EPI: 0 none;
    1 e, f by TMA after the K loop; 2 by pointer loads issued before it (in flight during the loop); 3 by TMA
    before it; 4 by pointer loads before it, their product the accumulator's start. FLATTEN: the tile and K loops
    pipelined as one (a persistent grid); else each tile's K loop alone."""
    num_pid_m, num_pid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    in_group = GROUP_M * num_pid_n
    rr = tl.arange(0, R)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=FLATTEN):
        first_m = (tile // in_group) * GROUP_M
        size_m = min(num_pid_m - first_m, GROUP_M)
        om = (first_m + tile % size_m) * BM
        on = ((tile % in_group) // size_m) * BN
        if EPI == 2 or EPI == 4:
            rm, rn = om + tl.arange(0, BM), on + tl.arange(0, BN)
            e = tl.load(e_ptr + rm[:, None] * s_em + rr[None, :] * s_er, mask=(rm[:, None] < M) & (rr[None, :] < rank),
                        other=0.)
            ft = tl.load(f_ptr + rr[:, None] * s_fr + rn[None, :] * s_fn, mask=(rr[:, None] < rank) & (rn[None, :] < N),
                         other=0.)
        if EPI == 3:
            e, ft = factor_tiles_tma(e_desc, f_desc, om, on, F_NR)
        if EPI == 4:  # the rank-r product starts the accumulator: no second (BM, BN) fp32 tile in registers
            acc = tl.dot(e, ft) * scale
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc = _accumulate(acc, a_desc, b_desc, K, om, on, B_NK, BK)  # the shipped kernel's K loop
        if EPI == 1:
            e, ft = factor_tiles_tma(e_desc, f_desc, om, on, F_NR)
        if EPI != 0 and EPI != 4:
            acc += scale * tl.dot(e, ft)
        c_desc.store([om, on], acc.to(c_desc.dtype))


def lora_mm(a, b, e, f, scale, b_nk: bool, f_nr: bool, cfg, epi=2, flatten=False, persistent=True):
    BM, BN, BK, stages, warps = cfg
    M, K = a.shape
    N = b.shape[0] if b_nk else b.shape[1]
    R = max(16, triton.next_power_of_2(e.shape[1]))
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    descs = (TensorDescriptor.from_tensor(a, [BM, BK]),
             TensorDescriptor.from_tensor(b, [BN, BK] if b_nk else [BK, BN]),
             TensorDescriptor.from_tensor(e, [BM, R]),
             TensorDescriptor.from_tensor(f, [BN, R] if f_nr else [R, BN]),
             TensorDescriptor.from_tensor(c, [BM, BN]))
    s_fr, s_fn = (f.stride(1), f.stride(0)) if f_nr else (f.stride(0), f.stride(1))
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 1
    programs = min(sms, tiles) if persistent else tiles  # not persistent: one tile per program
    lora_mm_kernel[(programs,)](*descs, e, f, M, N, K, scale, e.shape[1], e.stride(0), e.stride(1), s_fr, s_fn,
                                B_NK=b_nk, F_NR=f_nr, EPI=epi, BM=BM, BN=BN, BK=BK, R=R, GROUP_M=8, NUM_SMS=programs,
                                FLATTEN=flatten, num_stages=stages, num_warps=warps)
    return c


def best(fn, cfgs, check):
    """{cfg: µs} over the configurations that compile, fit and pass `check`, and the best one."""
    times = {}
    for c in cfgs:
        try:
            check(fn(0, c))
            times[str(c)] = time_us(lambda k, c=c: fn(k, c))
        except Exception as err:  # out of shared memory, say: that configuration is left out
            times[str(c)] = f"{type(err).__name__}: {str(err)[:80]}"
    ok = {c: t for c, t in times.items() if isinstance(t, float)}
    return times, (min(ok, key=ok.get) if ok else None)


def shape_row(M: int, i: int, o: int) -> tuple[dict, dict]:
    bf = dict(device="cuda", dtype=torch.bfloat16)
    X, G = [torch.randn(M, i, **bf) for _ in range(4)], [torch.randn(M, o, **bf) for _ in range(4)]
    H, T = [torch.randn(M, r, **bf) for _ in range(4)], [torch.randn(M, r, **bf) for _ in range(4)]
    W, A, B = torch.randn(o, i, **bf) * 0.02, torch.randn(r, i, **bf) * 0.02, torch.randn(o, r, **bf) * 0.02
    y_ref = X[0].float() @ W.float().t() + s * H[0].float() @ B.float().t()
    gx_ref = G[0].float() @ W.float() + T[0].float() @ A.float()

    def close(ref):
        return lambda out: torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())

    row, sweeps = {}, {}
    row["big"] = time_us(lambda k: torch.mm(X[k], W.t()))
    row["pair"] = time_us(lambda k: torch.mm(H[k], B.t()).addmm_(X[k], W.t(), beta=s))
    for name, epi, flat, pers in VARIANTS:
        ref = X[0].float() @ W.float().t() if epi == 0 else y_ref
        sweeps[name], c = best(lambda k, c: lora_mm(X[k], W, H[k], B, s, True, True, c, epi, flat, pers), CFGS,
                               close(ref))
        row[name], row[f"{name}_cfg"] = (sweeps[name][c], c) if c else (None, None)
    row["fused"] = min((row[n] for n, epi, *_ in VARIANTS if epi and row[n] is not None), default=None)
    row["gx_big"] = time_us(lambda k: torch.mm(G[k], W))
    row["gx_pair"] = time_us(lambda k: torch.mm(T[k], A).addmm_(G[k], W))
    for name, epi, flat, pers in VARIANTS:
        ref = G[0].float() @ W.float() if epi == 0 else gx_ref
        sweeps["gx_" + name], c = best(lambda k, c: lora_mm(G[k], W, T[k], A, 1.0, False, False, c, epi, flat, pers),
                                       CFGS, close(ref))
        row["gx_" + name], row[f"gx_{name}_cfg"] = (sweeps["gx_" + name][c], c) if c else (None, None)
    row["gx_fused"] = min((row["gx_" + n] for n, epi, *_ in VARIANTS if epi and row["gx_" + n] is not None),
                          default=None)
    return row, sweeps


def main():
    args = probe_args(__doc__)
    meta = collect_metadata()
    res, sweeps, saved = {}, {}, {}
    for name, (M, i, o, per_step) in SHAPES.items():
        res[name], sweeps[name] = shape_row(M, i, o)
        row = res[name]
        saved[name] = {k: per_step * (row[p] - row[f]) / 1e3 if row[f] is not None else None
                       for k, p, f in (("forward_ms", "pair", "fused"), ("input_grad_ms", "gx_pair", "gx_fused"))}
        print(name, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}, saved[name], flush=True)
    save(args.out, "fused_lora_gemm", __doc__, rows_by("shape", res), meta,
         settings=dict(rank=r, scale=s, shapes=SHAPES, configs=CFGS),
         details=dict(saving_per_step=saved, sweeps=sweeps))


if __name__ == "__main__":
    main()
