"""The causal LM loss without the (batch, seq, vocab) logits: cross-entropy over chunks of positions, each chunk's
logits recomputed in the backward (`trainer.chunked_loss`).

    loss = chunked_lm_loss(model, input_ids=x, attention_mask=m, labels=y)   # == model(...).loss, HF's mean

transformers computes every position's logits, casts them to fp32 and keeps the log-softmax for the backward:
about 12 bytes per vocabulary entry per token at the start of the backward (lowrank/train/memory.py), 3.1 GB for
2 × 4096 tokens of a 32,000-word vocabulary. Here only one chunk's logits exist at a time, so the loss costs a
fixed `chunk_tokens × vocab × ~16` bytes whatever the sequence length, for one more lm_head forward per chunk
(under 1 % of a 7B step's FLOPs).

The head is called as a module, never through `lm_head.weight`: a LoRA layer on lm_head, a tied embedding or a
trained head gets its gradient exactly as in the plain forward (fused kernels that read the weight directly
skip an adapter's factors: the trap this avoids).
"""
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


def _chunk_loss_sum(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk: (n, h) hidden states, (n,) next-token labels."""
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(model, chunk_tokens: int = CHUNK_TOKENS, **batch) -> torch.Tensor:
    """HF's causal LM loss (mean over positions whose shifted label is not -100) for `model(**batch).loss`."""
    labels = batch.pop("labels")
    hidden = model.base_model(**batch).last_hidden_state             # (b, s, h)
    # position t predicts token t+1: the labels shifted left, the last position ignored (as HF pads them)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])                    # (b·s, h), a view
    head = model.get_output_embeddings()
    total = None
    for start in range(0, shifted.numel(), chunk_tokens):
        # no RNG state saved: the head and the loss draw none, and a CUDA graph capture cannot read it
        part = checkpoint(_chunk_loss_sum, head, hidden[start:start + chunk_tokens],
                          shifted[start:start + chunk_tokens], use_reentrant=False, preserve_rng_state=False)
        total = part if total is None else total + part
    return total / (shifted != IGNORE_INDEX).sum()
