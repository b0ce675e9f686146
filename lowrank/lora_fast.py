"""The LoRA linear layer as one autograd node: y = x Wᵀ + b + scaling · (x Aᵀ) Bᵀ.

    y = lora_linear(x, W, bias, A, B, scaling)   # x: (..., in), W: (out, in), A: (r, in), B: (out, r)

Same function as LoRALinear's plain forward (`base(x) + F.linear(F.linear(x, A), B) * scaling`, dropout 0),
computed with fewer passes over the big tensors:
- everything runs in one compute dtype: the autocast dtype when autocast is on (W, A, B are cast once per
  call), else x's dtype; so an fp32 adapter under bf16 autocast never makes an fp32 copy of x (PEFT does);
- backward keeps only x (which the frozen matmul needs anyway, and which q/k/v share) and the rank-r
  intermediate h = x Aᵀ; no scaled or re-cast copy of x, y or the output gradient is ever stored;
- the rank-r product is written first and the big matmul accumulates onto it in place (GEMM with beta=1),
  whose epilogue reads it almost for free, instead of a separate add over (tokens, out) afterwards;
  the same for the input gradient: grad_x = (g·sB) A, then += g W;
- no weight/bias gradient for a frozen W (needs_input_grad), and no input gradient where x needs none
  (layer 0's q/k/v under LoRA); W and bias may still require grad, for correctness.
"""
import torch

_CUDA = "cuda"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type=_CUDA)  # backward then runs under the forward's autocast state
    def forward(ctx, x, W, bias, A, B, scaling: float):
        dtype = _compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)       # (n, in); a view when x is already in dtype
        Wc, Ac = W.to(dtype), A.to(dtype)               # no-ops for weights already in dtype
        sB = (B * scaling).to(dtype)                    # (out, r): scaling folded into the tiny factor
        h = torch.mm(x2, Ac.t())                        # (n, r)
        if bias is not None:
            y = torch.addmm(bias.to(dtype), h, sB.t())  # (n, out) = b + scaling · h Bᵀ
        else:
            y = torch.mm(h, sB.t())
        y.addmm_(x2, Wc.t())                            # += x Wᵀ, accumulated in the GEMM epilogue
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        ctx.scaling, ctx.dtype = scaling, dtype
        ctx.has_bias = bias is not None
        ctx.x_meta = (x.shape, x.dtype)
        ctx.W_dtype, ctx.A_dtype, ctx.B_dtype = W.dtype, A.dtype, B.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        keep_x = need_A or need_W
        ctx.save_for_backward(x2 if keep_x else None, h if need_B else None,
                              Wc if need_x else None, Ac if need_x else None,
                              sB if (need_x or need_A) else None)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.amp.custom_bwd(device_type=_CUDA)
    def backward(ctx, gy):
        x2, h, Wc, Ac, sB = ctx.saved_tensors
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        g = gy.reshape(-1, gy.shape[-1]).to(ctx.dtype)      # (n, out)
        gx = gW = gb = gA = gB = None
        if need_x or need_A:
            t = torch.mm(g, sB)                         # (n, r) = scaling · g B
            if need_A:
                gA = torch.mm(t.t(), x2).to(ctx.A_dtype)  # (r, in) = scaling · (g B)ᵀ x
            if need_x:
                gx = torch.mm(t, Ac)                    # (n, in): rank-r part first ...
                gx.addmm_(g, Wc)                        # ... then += g W in the GEMM epilogue
                shape, x_dtype = ctx.x_meta
                gx = gx.view(shape).to(x_dtype)
        if need_B:
            gB = torch.mm(g.t(), h).mul_(ctx.scaling).to(ctx.B_dtype)  # (out, r) = scaling · gᵀ h
        if need_W:
            gW = torch.mm(g.t(), x2).to(ctx.W_dtype)    # (out, in)
        if need_b and ctx.has_bias:
            gb = g.sum(0).to(ctx.bias_dtype)
        return gx, gW, gb, gA, gB, None


def lora_linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float) -> torch.Tensor:
    """x Wᵀ + bias + scaling · x Aᵀ Bᵀ. x: (..., in), W: (out, in), bias: (out,) or None, A: (r, in),
    B: (out, r); returns (..., out) in the autocast dtype (under autocast) or x's dtype."""
    return LoRALinearFunction.apply(x, W, bias, A, B, float(scaling))
