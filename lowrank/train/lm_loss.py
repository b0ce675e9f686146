"""The causal LM loss without the (batch, seq, vocab) logits: cross-entropy over chunks of positions
(`trainer.chunked_loss`).

    loss = chunked_lm_loss(model, input_ids=x, attention_mask=m, labels=y)   # == model(...).loss, HF's mean

transformers computes every position's logits, casts them to fp32 and keeps the log-softmax for the backward:
about 12 bytes per vocabulary entry per token (lowrank/train/memory.py), 3.1 GB for 2 × 4096 tokens of a
32,000-word vocabulary. Here only one chunk's logits exist at a time, so the loss costs a fixed
`chunk_tokens × vocab × ~16` bytes whatever the sequence length (eager; compiled, ~4), and the hidden states'
gradient.

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


def chunked_loss_on(setting, supported: bool, device_type: str) -> bool:
    """trainer.chunked_loss's rule (the trainer and the memory model both ask it) for a causal LM in one process:
    where its loss can be chunked (`supported`), `true` chunks it on any device, `auto` on CUDA."""
    return supported and (setting is True or (setting == "auto" and device_type == "cuda"))


def is_plain_linear(head) -> bool:
    """A head that is `F.linear(x, head.weight, head.bias)` and nothing else: no subclass (a LoRA layer), no hooks."""
    return (type(head) is torch.nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
            and not getattr(head, "parametrizations", None))


def _chunk_loss(logits: torch.Tensor, labels: torch.Tensor):
    """A chunk's summed cross-entropy, in fp32 at least (fp64 stays fp64), and the log-sum-exp it took."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target = labels.clamp(min=0).unsqueeze(1)
    lse = torch.logsumexp(logits, dim=-1)
    return ((lse - logits.gather(1, target).squeeze(1)) * (labels != IGNORE_INDEX)).sum(), lse


def _chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor):
    """A chunk's summed cross-entropy and `scale ×` its gradient with respect to the logits, in the logits' dtype:
    softmax − one-hot on rows with a label, zero on rows without. All pointwise after the row reductions (no
    in-place scatter), so compiled, no fp32 (n, vocab) buffer is written."""
    loss, lse = _chunk_loss(logits, labels)
    wide = logits.to(lse.dtype)
    one_hot = torch.arange(logits.shape[1], device=logits.device) == labels.unsqueeze(1)  # -100 matches no column
    grad = torch.exp(wide - lse.unsqueeze(1)) - one_hot.to(wide.dtype)
    return loss, (grad * ((labels != IGNORE_INDEX) * scale).unsqueeze(1)).to(logits.dtype)


@functools.cache
def _compiled_chunk():
    """The chunk's loss and gradient as one fused kernel (torch.compile): no passes over fp32 logits in memory."""
    return torch.compile(_chunk_loss_and_grad, dynamic=False)


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
        chunk_fn = _compiled_chunk() if compiled else _chunk_loss_and_grad
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens].to(dtype)
            logits, y = F.linear(h, w, b), labels[start:start + chunk_tokens]
            if not any(needs):  # evaluation: the loss alone
                total = total + _chunk_loss(logits, y)[0]
                continue
            loss, grad = chunk_fn(logits, y, scale)
            total = total + loss
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_tokens] = grad @ w
            if grad_weight is not None:
                grad_weight += grad.t() @ h  # widened into the fp32 sum in place: no fp32 (vocab, h) temporary
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
        if not torch.is_grad_enabled():  # evaluation: needs_input_grad would still say True; detached, no gradient
            hidden, weight, bias = hidden.detach(), weight.detach(), bias.detach() if bias is not None else None
        return LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_tokens, dtype, compiled)


def _chunk_loss_sum(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk: (n, h) hidden states, (n,) next-token labels."""
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(model, chunk_tokens: int = CHUNK_TOKENS, compiled: bool = False, **batch) -> torch.Tensor:
    """HF's causal LM loss (mean over positions whose shifted label is not -100) for `model(**batch).loss`; a batch
    with no label at all gives 0 (HF's gives NaN, which would stop a run as diverged).
    `compiled`: each chunk's softmax and gradient as one compiled kernel (trainer.compile)."""
    labels = batch.pop("labels")
    hidden = model.base_model(**batch).last_hidden_state             # (b, s, h)
    # position t predicts token t+1: the labels shifted left, the last position ignored (as HF pads them)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])                    # (b·s, h), a view
    head = model.get_output_embeddings()
    if is_plain_linear(head):
        return linear_cross_entropy(hidden, head.weight, head.bias, shifted, chunk_tokens, compiled)
    total = None
    draws = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in head.modules())
    for start in range(0, shifted.numel(), chunk_tokens):
        # the RNG state is saved only for a head that draws (a LoRA head's dropout): a CUDA graph cannot read it
        part = checkpoint(_chunk_loss_sum, head, hidden[start:start + chunk_tokens],
                          shifted[start:start + chunk_tokens], use_reentrant=False, preserve_rng_state=draws)
        total = part if total is None else total + part
    return total / (shifted != IGNORE_INDEX).sum().clamp(min=1)  # no label at all: 0, as in LinearCrossEntropy
