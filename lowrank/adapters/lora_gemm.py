"""A frozen GEMM that starts from the LoRA product: one persistent Triton kernel instead of two cuBLAS calls.

    y = lora_gemm([x], [W], h, B, s, w_rows_out=True, f_rows_out=True)     # x Wᵀ + s · h Bᵀ    (forward)
    gx = lora_gemm([g1, g2], [W1, W2], T, A, 1.0, False, False)          # Σ gᵢ Wᵢ + T A      (input gradient)
    y = lowrank_plus_linear([x], [W.t()], h, B.t(), s)                   # the same by the cuBLAS pair

The cuBLAS pair (`lowrank_plus_linear`, what lowrank.adapters.fused runs without the kernel) writes the rank-r
product h Bᵀ as a whole (tokens, out) tensor and has cuBLAS read it back as the big GEMM's beta term: one
output-sized write and read per adapter and pass. Here each output tile's accumulator starts as s · h Bᵀ for its
rows and columns (a K = r product from a few KB of h and B), then the frozen GEMM accumulates onto it, and the tile
is stored once; a group's input gradient sums its members' gᵢ Wᵢ (up to `MAX_PAIRS`) onto the same tile, where
cuBLAS's beta would read and write the output once a member. Measured on an H100 for the Llama 1.1B shapes at 8,192
tokens (benchmarks/results/probes/lora_gemm_check_h100.md): q/o 98.6 against 118.3 µs for the cuBLAS pair, gate/up
264.7 against 301.7, the input gradient of down 284.4 against 303.5; a group's input gradient summed in one launch
against one pair a launch with cuBLAS adding the rest (lora_gemm_check_h100_groups.md): 1.1B q,k,v 135.7 against
169.4 µs, 7B q,k,v 305.5 against 321.6 and gate,up 495.5 against 529.3, but 1.1B gate,up 526.8 against 500.5 (one
launch for every group: net faster in the probe at both sizes; the trainer's step 1.00-1.01× at 1.1B, 1.01× at 7B).
It is persistent over the output tiles (one program per SM, tiles grouped along M for L2 reuse) and reads x and W
through TMA descriptors; h and B (views into the flat factor buffer, any alignment) by pointer.

Where it does not pay or cannot run, the cuBLAS pair computes the same: `applies` (what a traced tensor tells)
says no for outputs narrower than `MIN_WIDTH` (k/v at 256: too few tiles) or not 16-byte aligned, ranks above 64,
non-CUDA tensors, dtypes other than bf16/fp16, or a Triton without tensor descriptors; the op itself falls back
for operands TMA cannot describe (a last stride other than 1, rows not 16-byte aligned), no rows, or a GPU other
than a Hopper or Blackwell data-centre part (compute capability 9 or 10).
"""
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a CPU-only install, or a Triton without tensor descriptors: the cuBLAS pair everywhere
    triton = None

ENABLED = os.environ.get("LOWRANK_FUSED_LORA_GEMM", "1") != "0"  # 0: the cuBLAS pair everywhere
MIN_WIDTH = 1024   # output columns (the k/v projections of GQA models fall back: 2-3x slower in this kernel)
MAX_RANK = 64
_SLOTS = 3          # the kernel's (a, b) descriptor pairs: a group's input gradient has up to three (q, k, v)
MAX_PAIRS = _SLOTS  # how many of them one launch sums (1 to _SLOTS); any further pairs are added by cuBLAS
BM, BN, BK, STAGES, WARPS = 128, 256, 64, 3, 8  # best of the probe's configurations for every 1.1B and 7B shape
_DTYPES = (torch.bfloat16, torch.float16)

# The big GEMMs accumulate onto the rank-r product in place (GEMM beta): an output of the custom op written
# first by the small product, read once in each big GEMM's epilogue. torch.compile would rewrite an in-place
# addmm_ into addmm + a copy of the whole (n, out) output (306 extra copies, 6 ms of a 1.1B step on an H200),
# so under compile the chain runs as one opaque custom op; eagerly, as plain calls (no dispatch cost).
def _lowrank_plus_linear(big_ins: list[torch.Tensor], big_ws: list[torch.Tensor], small_in: torch.Tensor,
                         small_w: torch.Tensor, beta: float) -> torch.Tensor:
    """beta · small_in @ small_w + Σ big_in @ big_w, for 2-D operands (weights given as the matmul operand)."""
    out = torch.mm(small_in, small_w)
    for i, (a, w) in enumerate(zip(big_ins, big_ws)):
        out.addmm_(a, w, beta=beta if i == 0 else 1.0)
    return out


_lowrank_plus_linear_op = torch.library.custom_op("lowrank::lowrank_plus_linear", _lowrank_plus_linear,
                                                  mutates_args=())


@_lowrank_plus_linear_op.register_fake
def _(big_ins, big_ws, small_in, small_w, beta):
    return small_in.new_empty(small_in.shape[0], big_ws[0].shape[1])


def lowrank_plus_linear(big_ins, big_ws, small_in, small_w, beta: float) -> torch.Tensor:
    fn = _lowrank_plus_linear_op if torch.compiler.is_compiling() else _lowrank_plus_linear
    return fn(list(big_ins), list(big_ws), small_in, small_w, beta)


if triton is not None:
    @triton.jit
    def _accumulate(acc, a_desc, b_desc, K, om, on, B_ROWS_OUT: tl.constexpr, BK: tl.constexpr):
        """acc + a op(b) for one output tile: the K loop of one (a, b) pair."""
        for ki in range(tl.cdiv(K, BK)):
            a = a_desc.load([om, ki * BK])
            if B_ROWS_OUT:
                b = b_desc.load([on, ki * BK]).T
            else:
                b = b_desc.load([ki * BK, on])
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _lora_gemm_kernel(a_desc, b_desc, a2_desc, b2_desc, a3_desc, b3_desc, c_desc, e_ptr, f_ptr, M, N, K, K2, K3,
                          scale, rank, s_em, s_er, s_fr, s_fn, PAIRS: tl.constexpr, B_ROWS_OUT: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        """c = scale · e fᵀ + Σ a op(b) over the first PAIRS (1-3) of the pairs (a, b), (a2, b2), (a3, b3): each
        a (M, K·); its b (N, K·) if B_ROWS_OUT else (K·, N); e (M, rank) and fᵀ (rank, N) read through their
        strides, 16 ranks at a time (one such pair of tiles in shared memory beside the GEMM's stages, whatever
        the rank)."""
        num_pid_m, num_pid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        in_group = GROUP_M * num_pid_n
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)):
            first_m = (tile // in_group) * GROUP_M
            size_m = min(num_pid_m - first_m, GROUP_M)
            om = (first_m + tile % size_m) * BM
            on = ((tile % in_group) // size_m) * BN
            rm, rn = om + tl.arange(0, BM), on + tl.arange(0, BN)
            # the rank-r product starts the accumulator: no second fp32 tile, no pass over the output
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for r0 in tl.range(0, rank, 16, num_stages=1):
                rr = r0 + tl.arange(0, 16)
                e = tl.load(e_ptr + rm[:, None] * s_em + rr[None, :] * s_er,
                            mask=(rm[:, None] < M) & (rr[None, :] < rank), other=0.)
                ft = tl.load(f_ptr + rr[:, None] * s_fr + rn[None, :] * s_fn,
                             mask=(rr[:, None] < rank) & (rn[None, :] < N), other=0.)
                acc = tl.dot(e, ft, acc)
            acc = acc * scale
            acc = _accumulate(acc, a_desc, b_desc, K, om, on, B_ROWS_OUT, BK)
            # a group's other pairs (the input gradient's gₖ Wₖ, gᵥ Wᵥ) add onto the same tile: no pass over
            # the output for each, as cuBLAS's beta would make
            if PAIRS >= 2:
                acc = _accumulate(acc, a2_desc, b2_desc, K2, om, on, B_ROWS_OUT, BK)
            if PAIRS >= 3:
                acc = _accumulate(acc, a3_desc, b3_desc, K3, om, on, B_ROWS_OUT, BK)
            c_desc.store([om, on], acc.to(c_desc.dtype))


def _tma_ok(t: torch.Tensor) -> bool:
    """A TMA descriptor can describe t: 2-D, unit last stride, rows that do not overlap, rows and start 16-byte
    aligned."""
    size = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1] and (t.stride(0) * size) % 16 == 0
            and t.data_ptr() % 16 == 0)


def applies(a: torch.Tensor, b: torch.Tensor, e: torch.Tensor, out_width: int) -> bool:
    """Whether the layer takes `lora_gemm` (else the caller keeps the cuBLAS pair). Only what a traced tensor
    tells (device, dtypes, sizes): layouts and the GPU are checked when the op runs, which falls back to the
    pair where they do not suit the kernel."""
    return (ENABLED and triton is not None and a.is_cuda and a.dtype in _DTYPES and b.dtype == a.dtype
            and e.dtype == a.dtype and out_width >= MIN_WIDTH and (out_width * a.element_size()) % 16 == 0
            and e.shape[1] <= MAX_RANK)


def _kernel_runs(big_ins, big_ws, c) -> bool:
    """The operands TMA reads or writes can be described, there are rows, and the GPU is a Hopper or Blackwell
    data-centre part (the kernel's shared memory is sized for them; elsewhere it was never measured)."""
    a, b = big_ins[0], big_ws[0]
    return (a.shape[0] > 0 and _tma_ok(a) and _tma_ok(b) and _tma_ok(c)
            and (not a.is_cuda or torch.cuda.get_device_capability(a.device)[0] in (9, 10)))


def _in_kernel(big_ins, big_ws) -> int:
    """How many of the leading pairs one launch sums: up to MAX_PAIRS, as long as TMA can describe them."""
    n = 1
    while n < min(len(big_ins), MAX_PAIRS) and _tma_ok(big_ins[n]) and _tma_ok(big_ws[n]):
        n += 1
    return n


def _cublas_pair(big_ins, big_ws, e, f, scale, w_rows_out, f_rows_out) -> torch.Tensor:
    """What the kernel computes, as the cuBLAS pair above (the rank-r product, then the big GEMMs onto it)."""
    return _lowrank_plus_linear(big_ins, [b.t() if w_rows_out else b for b in big_ws], e,
                                f.t() if f_rows_out else f, scale)


def _lora_gemm(big_ins: list[torch.Tensor], big_ws: list[torch.Tensor], e: torch.Tensor, f: torch.Tensor,
               scale: float, w_rows_out: bool, f_rows_out: bool) -> torch.Tensor:
    """scale · e op(f) + Σ a op(b) over (a, b) of big_ins, big_ws, (M, N) in a's dtype: the first pairs (up to
    MAX_PAIRS) in the kernel, any others added by cuBLAS (beta 1). b: (N, K) if w_rows_out else (K, N); f: (N, r)
    if f_rows_out else (r, N)."""
    a, b = big_ins[0], big_ws[0]
    M = a.shape[0]
    N = b.shape[0] if w_rows_out else b.shape[1]
    c = a.new_empty(M, N)
    if not _kernel_runs(big_ins, big_ws, c):
        return _cublas_pair(big_ins, big_ws, e, f, scale, w_rows_out, f_rows_out)
    pairs = _in_kernel(big_ins, big_ws)
    descs, ks = [], []
    for i in range(_SLOTS):  # the unused slots repeat the first pair (the kernel never reads them)
        a_i, b_i = (big_ins[i], big_ws[i]) if i < pairs else (a, b)
        descs += [TensorDescriptor.from_tensor(a_i, [BM, BK]),
                  TensorDescriptor.from_tensor(b_i, [BN, BK] if w_rows_out else [BK, BN])]
        ks.append(a_i.shape[1])
    s_fr, s_fn = (f.stride(1), f.stride(0)) if f_rows_out else (f.stride(0), f.stride(1))
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 4  # 4: interpreter
    _lora_gemm_kernel[(min(sms, triton.cdiv(M, BM) * triton.cdiv(N, BN)),)](
        *descs, TensorDescriptor.from_tensor(c, [BM, BN]), e, f, M, N, *ks, scale, e.shape[1], e.stride(0),
        e.stride(1), s_fr, s_fn, PAIRS=pairs, B_ROWS_OUT=w_rows_out, BM=BM, BN=BN, BK=BK, GROUP_M=8,
        num_stages=STAGES, num_warps=WARPS)
    for a, b in zip(big_ins[pairs:], big_ws[pairs:]):
        c.addmm_(a, b.t() if w_rows_out else b)
    return c


# Opaque under torch.compile, as lowrank_plus_linear is: compile would turn the in-place adds into copies.
_lora_gemm_op = torch.library.custom_op("lowrank::lora_gemm", _lora_gemm, mutates_args=())


@_lora_gemm_op.register_fake
def _(big_ins, big_ws, e, f, scale, w_rows_out, f_rows_out):
    b = big_ws[0]
    return big_ins[0].new_empty(big_ins[0].shape[0], b.shape[0] if w_rows_out else b.shape[1])


def lora_gemm(big_ins, big_ws, e, f, scale: float, w_rows_out: bool, f_rows_out: bool) -> torch.Tensor:
    """scale · e op(f) + Σ a op(b) (see `_lora_gemm`); an opaque op under torch.compile."""
    fn = _lora_gemm_op if torch.compiler.is_compiling() else _lora_gemm
    return fn(list(big_ins), list(big_ws), e, f, float(scale), w_rows_out, f_rows_out)
