"""Fast LoRA training: the LoRA linear layer as one autograd node, and fp32 master weights for bf16 factors.

    y = lora_linear(x, W, bias, A, B, scaling)   # x: (..., in), W: (out, in), A: (r, in), B: (out, r)
    opt = FlatMasterAdamW(lora_params, lr=1e-4)  # then: loss.backward(); opt.step(); opt.zero_grad()

`lora_linear` is LoRALinear's plain forward (`base(x) + F.linear(F.linear(x, A), B) * scaling`, dropout 0)
with fewer passes over the big tensors and fewer operator calls:
- it computes in one dtype: the autocast dtype under autocast (W, A, B cast once per call where they
  differ), else x's; an fp32 adapter under bf16 autocast never makes an fp32 copy of x (PEFT does);
- backward keeps only x (which the frozen matmul needs anyway, and which q/k/v share) and the rank-r
  h = x Aᵀ: no scaled or re-cast copy of x, y or the output gradient is ever stored;
- the rank-r product is computed first and the big matmul accumulates onto it in place, with `scaling`
  applied as the GEMM's beta: no separate scale or add pass over (tokens, out); the same for the input
  gradient, (s · g B) A then += g W, with `scaling` as the alpha of the rank-r GEMM t = g B (in bf16 that
  rounds s · t unless the scaling is a power of two, as the default alpha = 2r is);
- no weight/bias gradient for a frozen W, and no input gradient where x needs none (layer 0's q/k/v).

Where the step is bound by the CPU launching kernels (a 7B model at 2k tokens per step on an H200 is),
each operator per adapter counts. `FlatMasterAdamW` removes the per-layer casts altogether: the model holds
the factors in bf16 (views into one flat buffer), and one fused AdamW steps a flat fp32 master copy; a
gather, a step and a copy per step replace two casts per adapter in forward and two in backward. The
numerics are those of fp32 factors under bf16 autocast: compute in bf16, gradients rounded to bf16 then
widened, update in fp32.

`lora_linear_group` computes layers that share their input (q, k, v) together: one pass over x for all
their h = x Aᵀ and one for all their A gradients (lowrank.adapters.lora.SharedInputGroup uses it).

On CUDA with Triton's tensor descriptors, the big GEMMs of outputs at least 1,024 wide start from the rank-r
product in one kernel (lowrank.adapters.lora_gemm): the forward's s · h Bᵀ and the input gradient's
T [A₁; …; Aₙ] are never written as whole tensors; elsewhere the cuBLAS pair (`lowrank_plus_linear`, in that
module) runs.

On CUDA with Triton, for at least `FUSED_MIN_ROWS` tokens, backward reads each output gradient g once for both
of its rank-r products, t = s g B and the B gradient s gᵀ h (`t_and_b_grads`), instead of twice in two cuBLAS
GEMMs, the second split-K with a reduction kernel of its own (measured on an H200 for the 1.1B shapes:
20 vs 24 µs at width 2048, 44 vs 55 µs at 5632; `benchmarks/results/probes/fused_factor_grads_h200.json`).
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.adapters.lora_gemm import applies as lora_gemm_applies, lora_gemm, lowrank_plus_linear

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the cuBLAS path everywhere
    triton = None

_CUDA = "cuda"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # skip the operator call when nothing changes


# t = s g B and s gᵀ h from one read of g: each program owns BM rows of g, walks its columns in BK-wide
# slices, keeps its rows of t in registers and adds its share of gᵀ h into an fp32 buffer with atomics.
# STAGGER: program p starts at slice p mod (slices) and wraps around, so that programs running at once add
# into different slices of the buffer instead of all into the same one: 4-11 % faster per 1.1B shape on one H100
# (benchmarks/results/probes/fused_factor_grads_h100.md).
if triton is not None:
    @triton.jit
    def _t_and_b_grad_kernel(g_ptr, b_ptr, h_ptr, t_ptr, gb_ptr, n, d, r, s, sgn, sgd, sbd, sbr, shn, shr, stn,
                             st_r, RP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                             STAGGER: tl.constexpr = False):
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        rr = tl.arange(0, RP)  # the rank, padded to a power of two >= 16 for tl.dot
        rk = tl.arange(0, BK)
        row_ok, r_ok = rows[:, None] < n, rr[None, :] < r
        h = tl.load(h_ptr + rows[:, None] * shn + rr[None, :] * shr, mask=row_ok & r_ok, other=0.)
        acc_t = tl.zeros((BM, RP), dtype=tl.float32)
        slices = tl.cdiv(d, BK)
        first = pid % slices if STAGGER else 0
        for j in range(0, slices):
            cols = ((first + j) % slices) * BK + rk
            g = tl.load(g_ptr + rows[:, None] * sgn + cols[None, :] * sgd, mask=row_ok & (cols[None, :] < d),
                        other=0.)
            b = tl.load(b_ptr + cols[:, None] * sbd + rr[None, :] * sbr, mask=(cols[:, None] < d) & r_ok, other=0.)
            acc_t = tl.dot(g, b, acc_t)
            tl.atomic_add(gb_ptr + cols[:, None] * r + rr[None, :], tl.dot(tl.trans(g), h) * s,
                          mask=(cols[:, None] < d) & r_ok, sem="relaxed")
        tl.store(t_ptr + rows[:, None] * stn + rr[None, :] * st_r, (acc_t * s).to(t_ptr.dtype.element_ty),
                 mask=row_ok & r_ok)

# Fewer rows leave too few programs to stream g at speed: at 7B's 2,048 tokens cuBLAS's pair is faster than any
# launch tried, 16-row programs included (17.9 against 20.7 µs at q's width on one H100: fused_factor_grads_h100)
FUSED_MIN_ROWS = 4096
FUSED_FACTOR_GRADS = os.environ.get("LOWRANK_FUSED_FACTOR_GRADS", "1") != "0"  # 0: the cuBLAS path everywhere
_FUSED_DTYPES = (torch.bfloat16, torch.float16)


def _t_and_b_grads(gs: list[torch.Tensor], Bs: list[torch.Tensor], H: torch.Tensor, scalings: list[float]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, gB): T = [s₁ g₁ B₁ … sₙ gₙ Bₙ] (n, Σr) and gB the flat concatenation of every
    sᵢ gᵢᵀ hᵢ (outᵢ, rᵢ), hᵢ the columns of H. One Triton program per 64 rows of each gᵢ; one zero fill
    and one cast for all."""
    rows = H.shape[0]
    ranks, dims = [B.shape[1] for B in Bs], [B.shape[0] for B in Bs]
    T = H.new_empty(rows, sum(ranks))
    gb = torch.zeros(sum(d * r for d, r in zip(dims, ranks)), device=H.device, dtype=torch.float32)
    col = off = 0
    for g, B, r, d, s in zip(gs, Bs, ranks, dims, scalings):
        h, t = H[:, col:col + r], T[:, col:col + r]
        _t_and_b_grad_kernel[(triton.cdiv(rows, 64),)](
            g, B, h, t, gb[off:off + d * r], rows, d, r, s, g.stride(0), g.stride(1), B.stride(0), B.stride(1),
            h.stride(0), h.stride(1), t.stride(0), t.stride(1), RP=max(16, triton.next_power_of_2(r)), BM=64,
            BK=128, STAGGER=True, num_warps=4, num_stages=4)
        col, off = col + r, off + d * r
    return T, gb.to(H.dtype)


_t_and_b_grads_op = torch.library.custom_op("lowrank::t_and_b_grads", _t_and_b_grads, mutates_args=())


@_t_and_b_grads_op.register_fake
def _(gs, Bs, H, scalings):
    return H.new_empty(H.shape[0], sum(B.shape[1] for B in Bs)), H.new_empty(sum(B.numel() for B in Bs))


def t_and_b_grads(gs, Bs, H, scalings) -> list[torch.Tensor]:
    """[T, gB₁, …, gBₙ] (see `_t_and_b_grads`), the B gradients as views of one buffer."""
    fn = _t_and_b_grads_op if torch.compiler.is_compiling() else _t_and_b_grads
    T, gb = fn(list(gs), list(Bs), H, [float(s) for s in scalings])
    return [T] + [v.view_as(B) for v, B in zip(gb.split([B.numel() for B in Bs]), Bs)]


def fused_factor_grads_apply(gs: list[torch.Tensor], rows: int, max_rank: int) -> bool:
    """Whether backward takes t and the B gradients from `t_and_b_grads`: not for ranks above 64 (t's rows
    would not fit a program's registers), not for a gradient of 2³¹ elements or more (the kernel's offsets are
    32-bit), nor under torch.use_deterministic_algorithms (the atomics add in a varying order, so the fp32 B
    gradient can differ in its last bits from run to run)."""
    # the checks that every device reaches first, so that CPU tests of compiled blocks trace them too
    return (FUSED_FACTOR_GRADS and not torch.are_deterministic_algorithms_enabled()
            and all(g.numel() < 2**31 for g in gs) and max_rank <= 64 and triton is not None and gs[0].is_cuda
            and gs[0].dtype in _FUSED_DTYPES and rows >= FUSED_MIN_ROWS)


def _cat(ts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)  # one layer: no copy


class LoRALinearFunction(torch.autograd.Function):
    """One or more LoRA linear layers on one input x (several: q, k, v; gate, up), as one autograd node:
    one GEMM computes every h = x Aᵢᵀ (x [A₁; …; Aₙ]ᵀ), one every A gradient
    (Tᵀ x, T = [s₁ g₁ B₁ … sₙ gₙ Bₙ]), and the input gradient is one buffer that the rank-r products and
    each layer's big GEMM accumulate into in turn (T [A₁; …; Aₙ] + Σ gᵢ Wᵢ), instead of one per layer summed
    afterwards. An output that gets no gradient gives its layer no gradients, as separate layers would (eagerly;
    under torch.compile, AOTAutograd passes zeros instead, so the layer's gradients are zeros)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type=_CUDA)  # on CUDA, backward runs under the forward's autocast state
    def forward(ctx, x, scalings, *layers):  # layers: W, bias, A, B of each layer in turn
        dtype = _compute_dtype(x)
        x2 = _as(x.reshape(-1, x.shape[-1]), dtype)        # (n, in); a view when x is already in dtype
        Ws, biases, As, Bs = layers[0::4], layers[1::4], layers[2::4], layers[3::4]
        Wc, Bc = [_as(W, dtype) for W in Ws], [_as(B, dtype) for B in Bs]
        Ac = _cat([_as(A, dtype) for A in As], 0)          # (Σr, in)
        H = F.linear(x2, Ac)                                # (n, Σr)
        ranks = [A.shape[0] for A in As]
        ys = []
        for W, bias, B, h, s in zip(Wc, biases, Bc, H.split(ranks, dim=1), scalings):
            if lora_gemm_applies(x2, W, h, W.shape[0]):
                y = lora_gemm([x2], [W], h, B, s, w_rows_out=True, f_rows_out=True)  # s · h Bᵀ starts the tile
            else:
                y = lowrank_plus_linear([x2], [W.t()], h, B.t(), s)  # s · h Bᵀ + x Wᵀ, one GEMM epilogue
            if bias is not None:
                y.add_(bias)
            ys.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.scalings, ctx.ranks, ctx.dtype, ctx.x_meta = scalings, ranks, dtype, (x.shape, x.dtype)
        ctx.param_dtypes = [t.dtype if t is not None else None for t in layers]
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        need = ctx.needs_input_grad
        need_x = need[0]
        need_xW = any(need[4 + 4 * i] or need[2 + 4 * i] for i in range(len(Ws)))  # some A or W gradient
        need_B = any(need[5 + 4 * i] for i in range(len(Ws)))
        # saved: x (which the frozen matmuls need anyway) and the rank-r H; weight copies only for gx
        ctx.save_for_backward(x2 if need_xW else None, H if need_B else None, Ac,
                              *(Wc if need_x else [None] * len(Wc)), *Bc)
        return tuple(ys)

    @staticmethod
    @torch.amp.custom_bwd(device_type=_CUDA)
    def backward(ctx, *gys):
        x2, H, Ac, *rest = ctx.saved_tensors
        n = len(ctx.scalings)
        Wc, Bc, need = rest[:n], rest[n:], ctx.needs_input_grad
        hs = H.split(ctx.ranks, dim=1) if H is not None else [None] * n
        gs = [None if gy is None else _as(gy.reshape(-1, gy.shape[-1]), ctx.dtype) for gy in gys]
        used = [i for i, g in enumerate(gs) if g is not None]
        grads = [None] * (4 * n)
        if not used:
            return None, None, *grads
        need_x = need[0]
        need_A = any(need[4 + 4 * i] for i in used)
        gx = None
        rows = gs[used[0]].shape[0]
        gBs = [None] * n  # B gradients, where the fused kernel gives them with T
        if need_x or need_A:
            if (len(used) == n and all(need[5 + 4 * i] for i in range(n))
                    and fused_factor_grads_apply(gs, rows, max(ctx.ranks))):
                # every output has a gradient and every B wants one: each g read once for t and its B gradient
                T, *gBs = t_and_b_grads(gs, Bc, H, ctx.scalings)
            else:
                # T = [s₁ g₁ B₁ … sₙ gₙ Bₙ]: scaling as the GEMM's alpha (beta=0: the first argument only
                # gives shape and dtype); zeros for a layer whose output got no gradient, so every layer
                # keeps its columns
                T = _cat([Ac.new_zeros(rows, r) if g is None
                          else torch.addmm(Ac.new_empty(rows, r), g, B, beta=0, alpha=s)
                          for r, g, B, s in zip(ctx.ranks, gs, Bc, ctx.scalings)], 1)
            if need_A:
                for i, gA in enumerate(torch.mm(T.t(), x2).split(ctx.ranks)):  # (Σr, in), one GEMM for all A
                    if need[4 + 4 * i] and gs[i] is not None:
                        grads[4 * i + 2] = _as(gA, ctx.param_dtypes[4 * i + 2])
            if need_x:
                # (n, in) = T [A₁; …; Aₙ] + Σ gᵢ Wᵢ over the layers with a gradient
                g_in, w_in = [gs[i] for i in used], [Wc[i] for i in used]
                widths = [g.shape[1] for g in g_in]
                first = widths.index(max(widths))  # the widest gᵢ in the kernel (no key=: dynamo traces this)
                if lora_gemm_applies(g_in[first], w_in[first], T, Ac.shape[1]):
                    order = [first] + [j for j in range(len(used)) if j != first]
                    gx = lora_gemm([g_in[j] for j in order], [w_in[j] for j in order], T, Ac, 1.0,
                                   w_rows_out=False, f_rows_out=False)
                else:
                    gx = lowrank_plus_linear(g_in, w_in, T, Ac, 1.0)
                shape, x_dtype = ctx.x_meta
                gx = _as(gx.view(shape), x_dtype)
        for i in used:
            g, s = gs[i], ctx.scalings[i]
            W_dtype, b_dtype, _, B_dtype = ctx.param_dtypes[4 * i:4 * i + 4]
            if need[2 + 4 * i]:
                grads[4 * i] = _as(torch.mm(g.t(), x2), W_dtype)  # (out, in)
            if need[3 + 4 * i]:
                grads[4 * i + 1] = _as(g.sum(0), b_dtype)
            if need[5 + 4 * i]:  # (out, r) = s · gᵀ h
                gB = gBs[i] if gBs[i] is not None else torch.addmm(Bc[i], g.t(), hs[i], beta=0, alpha=s)
                grads[4 * i + 3] = _as(gB, B_dtype)
        return gx, None, *grads


def lora_linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float) -> torch.Tensor:
    """x Wᵀ + bias + scaling · x Aᵀ Bᵀ. x: (..., in), W: (out, in), bias: (out,) or None, A: (r, in),
    B: (out, r); returns (..., out) in the autocast dtype (under autocast) or x's dtype."""
    return LoRALinearFunction.apply(x, (float(scaling),), W, bias, A, B)[0]


def lora_linear_group(x: torch.Tensor, layers: list[tuple]) -> tuple[torch.Tensor, ...]:
    """lora_linear(x, *layer) for each layer = (W, bias, A, B, scaling) of `layers`, computed together."""
    flat = [t for W, bias, A, B, _ in layers for t in (W, bias, A, B)]
    return LoRALinearFunction.apply(x, tuple(float(layer[4]) for layer in layers), *flat)


class FlatMasterAdamW:
    """Fused AdamW on an fp32 master copy of low-precision parameters, all flattened into one buffer.

    The given parameters (e.g. every LoRA factor, in bf16) become views into one flat buffer. By default
    backward leaves each gradient where autograd puts it (no accumulation kernel per parameter into a preset
    `.grad`); `step()` gathers them with one concatenation (a parameter without a gradient counts as zero,
    where torch's AdamW would skip it), widens them to fp32, steps the flat fp32 master with one fused
    AdamW, and copies it back; `zero_grad()` sets the gradients to None. Same update as AdamW on fp32
    parameters. With `graph_blocks` (benchmarks/harness/graphs.py), whose graphs write gradients into static buffers,
    accumulating over several backward passes needs `accumulate_in_place=True`: the gradients are then preset views into
    one flat buffer that backward adds into (a kernel per parameter and pass), and `zero_grad()` zeroes it.
    """

    def __init__(self, params, lr: float, accumulate_in_place: bool = False, **adamw_kwargs):
        self.params = [p for p in params]
        dtype, device = self.params[0].dtype, self.params[0].device
        if any(p.dtype != dtype or p.device != device for p in self.params):
            raise ValueError("FlatMasterAdamW needs parameters of one dtype on one device")
        n = sum(p.numel() for p in self.params)
        self.accumulate_in_place = accumulate_in_place
        self.flat = torch.empty(n, dtype=dtype, device=device)
        self.flat_grad = torch.zeros(n, dtype=dtype, device=device)
        master = torch.empty(n, dtype=torch.float32, device=device)
        offset = 0
        for p in self.params:
            k = p.numel()
            master[offset:offset + k].copy_(p.detach().reshape(-1))
            self.flat[offset:offset + k].copy_(p.detach().reshape(-1))
            p.data = self.flat[offset:offset + k].view_as(p)
            offset += k
        self.grad_views = [v.view_as(p) for v, p in zip(self.flat_grad.split([p.numel() for p in self.params]),
                                                          self.params)]
        self.zero_grad()
        self.master = nn.Parameter(master)
        self.master.grad = torch.zeros_like(master)
        self.optimizer = torch.optim.AdamW([self.master], lr=lr, fused=device.type != "mps", **adamw_kwargs)

    @torch.no_grad()
    def step(self) -> None:
        if self.accumulate_in_place:
            for p, view in zip(self.params, self.grad_views):
                if p.grad is not view:  # something replaced the preset gradient (model.zero_grad(), ...): take it
                    view.copy_(p.grad) if p.grad is not None else view.zero_()
        else:
            # one batched concatenation (into an fp32 `out` it would be a copy per tensor), then widened
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            torch.cat([g.reshape(-1) for g in grads], out=self.flat_grad)
        self.master.grad.copy_(self.flat_grad)
        self.optimizer.step()
        self.flat.copy_(self.master)  # fp32 -> bf16, what the model computes with

    def zero_grad(self) -> None:
        if self.accumulate_in_place:
            self.flat_grad.zero_()
        for p, view in zip(self.params, self.grad_views):
            p.grad = view if self.accumulate_in_place else None
