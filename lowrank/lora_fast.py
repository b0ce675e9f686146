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
their h = x Aᵀ and one for all their A gradients (lowrank.lora.SharedInputGroup uses it).
"""
import torch
import torch.nn.functional as F
from torch import nn

_CUDA = "cuda"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # skip the operator call when nothing changes


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


def _cat(ts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)  # one layer: no copy


class LoRALinearFunction(torch.autograd.Function):
    """One or more LoRA linear layers on one input x (several: q, k, v; gate, up), as one autograd node:
    one GEMM computes every h = x Aᵢᵀ (x [A₁; …; Aₙ]ᵀ), one every A gradient (Tᵀ x, T = [s₁ g₁ B₁ … sₙ gₙ Bₙ]),
    and the input gradient is one buffer that the rank-r products and each layer's big GEMM accumulate into
    in turn (T [A₁; …; Aₙ] + Σ gᵢ Wᵢ), instead of one per layer summed afterwards. An output that gets no
    gradient gives its layer no gradients, as separate layers would (eagerly; under torch.compile,
    AOTAutograd passes zeros instead, so the layer's gradients are zeros)."""

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
        if need_x or need_A:
            # T = [s₁ g₁ B₁ … sₙ gₙ Bₙ]: scaling as the GEMM's alpha (beta=0: the first argument only gives
            # shape and dtype); zeros for a layer whose output got no gradient, so every layer keeps its columns
            rows = x2.shape[0] if x2 is not None else gs[used[0]].shape[0]
            T = _cat([Ac.new_zeros(rows, r) if g is None else torch.addmm(Ac.new_empty(rows, r), g, B, beta=0, alpha=s)
                      for r, g, B, s in zip(ctx.ranks, gs, Bc, ctx.scalings)], 1)
            if need_A:
                for i, gA in enumerate(torch.mm(T.t(), x2).split(ctx.ranks)):  # (Σr, in), one GEMM for all A
                    if need[4 + 4 * i] and gs[i] is not None:
                        grads[4 * i + 2] = _as(gA, ctx.param_dtypes[4 * i + 2])
            if need_x:
                # (n, in) = T [A₁; …; Aₙ] + Σ gᵢ Wᵢ over the layers with a gradient
                gx = lowrank_plus_linear([gs[i] for i in used], [Wc[i] for i in used], T, Ac, 1.0)
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
                grads[4 * i + 3] = _as(torch.addmm(Bc[i], g.t(), hs[i], beta=0, alpha=s), B_dtype)
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
    parameters. With `graph_blocks`, whose graphs write gradients into static buffers, accumulating over
    several backward passes needs `accumulate_in_place=True`: the gradients are then preset views into one
    flat buffer that backward adds into (a kernel per parameter and pass), and `zero_grad()` zeroes it.
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
