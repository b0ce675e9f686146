"""The causal LM loss without the (batch, seq, vocab) logits: cross-entropy over chunks of positions
(`trainer.chunked_loss`).

    loss = chunked_lm_loss(model, input_ids=x, attention_mask=m, labels=y)   # == model(...).loss, HF's mean

transformers computes every position's logits, casts them to fp32 and keeps the log-softmax for the backward:
about 12 bytes per vocabulary entry per token (lowrank/train/memory.py), 3.1 GB for 2 × 4096 tokens of a
32,000-word vocabulary. Here only one chunk's logits exist at a time, so the loss costs a fixed
`chunk_tokens × vocab × ~16` bytes whatever the sequence length (eager; compiled, ~4).

Two ways, by what the head is:
- a plain `nn.Linear` head (frozen, trained or tied to the embedding): each chunk's gradient is taken in the
  forward, while its logits are at hand (`LinearCrossEntropy`): the hidden states' gradient is kept, the head's
  weight gradient summed over chunks in fp32. The backward only scales them: no logits are recomputed, so the head
  costs the same two matmuls per token as the plain loss (three when it is trained).
- any other head (a LoRA layer on lm_head, say) is called as a module, each chunk in a checkpoint whose backward
  recomputes its logits, so the adapter's factors get their gradient exactly as in the plain forward. A fused loss
  that read `lm_head.weight` directly would skip them: the trap this avoids.
"""
import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024  # 1024 × 32,000 × 16 B = 0.5 GB at Llama-2's vocabulary
# configs whose causal LM head does more than `lm_head(hidden)` (Gemma-2's soft-capping, Cohere's logit scale)
HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def head_extra(config) -> str | None:
    """The config key by which the head does more than `lm_head(hidden)`, or None (the memory model asks too)."""
    return next((k for k in HEAD_EXTRAS if getattr(config, k, None) not in (None, 1, 1.0)), None)


def supports_chunked_loss(model) -> tuple[bool, str]:
    """Whether `model`'s loss is HF's plain shifted cross-entropy over `lm_head(decoder(x))`, and why not."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(model, "base_model", model) is model:
        return False, "it has no separate decoder and lm_head"
    extra = head_extra(config)
    if extra is not None:
        return False, f"its head applies config.{extra}"
    return True, ""


def is_plain_linear(head) -> bool:
    """A head that is `F.linear(x, head.weight, head.bias)` and nothing else: no subclass (a LoRA layer), no hooks."""
    return (type(head) is torch.nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
            and not getattr(head, "parametrizations", None))


def _chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor):
    """A chunk's summed cross-entropy and `scale ×` its gradient with respect to the logits, in the logits' dtype:
    softmax − one-hot on rows with a label, zero on rows without. Computed in fp32 at least (fp64 stays fp64);
    compiled, the fp32 values never reach memory."""
    dtype = logits.dtype
    logits = logits.to(torch.promote_types(dtype, torch.float32))
    valid = labels != IGNORE_INDEX
    target = labels.clamp(min=0).unsqueeze(1)
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, target).squeeze(1)) * valid).sum()
    grad = torch.exp(logits - lse.unsqueeze(1))
    grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
    return loss, (grad * (valid.unsqueeze(1) * scale)).to(dtype)


@functools.cache
def _compiled_chunk():
    return torch.compile(_chunk_loss_and_grad, dynamic=False)


def _chunk_fn(device: torch.device, compiled: bool):
    """The chunk's loss and gradient; on CUDA with `compiled`, as one fused kernel (torch.compile), which spares
    several passes over the chunk's fp32 logits."""
    return _compiled_chunk() if compiled and device.type == "cuda" else _chunk_loss_and_grad


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, -100 ignored, over `chunk_tokens` rows
    at a time; gradients taken in the forward. Matmuls in `dtype` (autocast's), softmax in fp32, as transformers'
    loss under autocast computes them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, dtype, compiled):
        needs = ctx.needs_input_grad[:3]
        n_valid = (labels != IGNORE_INDEX).sum()
        acc = torch.promote_types(hidden.dtype, torch.float32)
        scale = 1.0 / n_valid.clamp(min=1).to(acc)  # a tensor, not a host read: the step may be a CUDA graph
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if needs[2] else None
        chunk_fn = _chunk_fn(hidden.device, compiled)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens].to(dtype)
            loss, grad = chunk_fn(F.linear(h, w, b), labels[start:start + chunk_tokens], scale)
            total = total + loss
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_tokens] = grad @ w
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).to(acc)
            if grad_bias is not None:
                grad_bias += grad.sum(0, dtype=acc)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.acc, ctx.dtypes = acc, (weight.dtype, bias.dtype if bias is not None else None)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        g = grad_loss.to(ctx.acc)
        return (grad_hidden * g.to(grad_hidden.dtype) if grad_hidden is not None else None,
                (grad_weight * g).to(ctx.dtypes[0]) if grad_weight is not None else None,
                (grad_bias * g).to(ctx.dtypes[1]) if grad_bias is not None else None,
                None, None, None, None)


def linear_cross_entropy(hidden, weight, bias, labels, chunk_tokens: int = CHUNK_TOKENS, compiled: bool = False):
    """mean cross-entropy of `hidden @ weight.T + bias` ((n, h) rows, (n,) labels, -100 ignored) without the
    (n, vocab) logits; under autocast, its matmuls in autocast's dtype."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        if not torch.is_grad_enabled():  # evaluation: the loss alone, no gradient buffers
            hidden, weight, bias = hidden.detach(), weight.detach(), bias.detach() if bias is not None else None
        return LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_tokens, dtype, compiled)


def _chunk_loss_sum(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk: (n, h) hidden states, (n,) next-token labels."""
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(model, chunk_tokens: int = CHUNK_TOKENS, compiled: bool = False, **batch) -> torch.Tensor:
    """HF's causal LM loss (mean over positions whose shifted label is not -100) for `model(**batch).loss`; a batch
    with no label at all gives 0 (HF's gives NaN, which would stop a run as diverged).
    `compiled`: each chunk's softmax and gradient as one compiled kernel on CUDA (trainer.compile)."""
    labels = batch.pop("labels")
    hidden = model.base_model(**batch).last_hidden_state             # (b, s, h)
    # position t predicts token t+1: the labels shifted left, the last position ignored (as HF pads them)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])                    # (b·s, h), a view
    head = model.get_output_embeddings()
    if is_plain_linear(head):
        return linear_cross_entropy(hidden, head.weight, head.bias, shifted, chunk_tokens, compiled)
    total = None
    for start in range(0, shifted.numel(), chunk_tokens):
        # no RNG state saved: the head and the loss draw none, and a CUDA graph capture cannot read it
        part = checkpoint(_chunk_loss_sum, head, hidden[start:start + chunk_tokens],
                          shifted[start:start + chunk_tokens], use_reentrant=False, preserve_rng_state=False)
        total = part if total is None else total + part
    return total / (shifted != IGNORE_INDEX).sum().clamp(min=1)  # no label at all: 0, as in LinearCrossEntropy
