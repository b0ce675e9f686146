"""Faster transformer blocks for any training method: per-block CUDA graphs, and torch.compile.

    opt = ...                                        # build the optimizer first (it may move parameters)
    graph_blocks(model, batch_size=8, seq_len=1024)  # then: train as usual; eval and no_grad run eagerly
    compile_blocks(model)                            # or: each block through torch.compile (also on CPU)
    causal_attention_without_mask(model)             # batches without padding: no mask built, no sync

Why: at a few thousand tokens per step a 7B model's LoRA step is paced by the CPU launching kernels, not by
the GPU (an H200 ran 143 ms of kernels in a 184 ms eager step): eager Python runs every operator of every
block, and LoRA adds a call per adapted layer. A CUDA graph per block replays its forward and its backward
with one launch each (`torch.cuda.make_graphed_callables`, the per-layer scheme Megatron/TransformerEngine
use); embeddings, the head and the loss stay eager. It applies to full fine-tuning and LoRA alike, so
comparisons stay fair.

Requirements of graphs: one static (batch, seq) shape, blocks called as Llama-family decoder layers are in
transformers 5 (`block(hidden, attention_mask=None, position_embeddings=(cos, sin), ...)` returning a
tensor, causal attention without a padding mask), parameters that stay where they are (in-place optimizer
updates; FlatMasterAdamW and torch's AdamW do that) and no dropout.
"""
import inspect

import torch
from torch import nn


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's repeated blocks: the outermost nn.ModuleList whose children all share one class (so a
    mixture-of-experts list inside each block is not taken for the layers); the longest on a tie."""
    lists = [(name.count("."), -len(m), name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks to graph or compile")
    return min(lists, key=lambda t: t[:3])[3]


class _Block(nn.Module):
    """(hidden, cos, sin) -> hidden: the positional, tensor-only call make_graphed_callables needs."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden, cos, sin):  # through __call__: a compiled block runs compiled
        return self.block(hidden, attention_mask=None, position_embeddings=(cos, sin))


def graph_blocks(model: nn.Module, batch_size: int, seq_len: int, amp_dtype: torch.dtype | None = torch.bfloat16,
                 warmup: int = 3) -> None:
    """Capture each decoder block's forward and backward as CUDA graphs for (batch_size, seq_len) inputs, in
    place, under autocast to `amp_dtype` (None: no autocast), after `compile_blocks` if both are wanted.
    Afterwards a block replays its graphs when the model trains with grad enabled, with the captured shape,
    dtype and autocast state and no attention mask; otherwise it runs its eager code.

    Limits, as for any CUDA graph: outputs live in static buffers, so one forward must be followed by its
    backward before the next forward; arguments beyond the rotary tables (position_ids, a cache) are not
    graph inputs. Gradient accumulation over several backward passes needs `.grad` tensors that exist before
    the first one (`p.grad = torch.zeros_like(p)` for every trained parameter, kept with a torch
    optimizer's `zero_grad(set_to_none=False)`, or `FlatMasterAdamW(..., accumulate_in_place=True)`): a
    `.grad` that is None adopts the graph's static gradient buffer, which the next replay overwrites."""
    blocks = decoder_blocks(model)
    p = next(model.parameters())
    if p.device.type != "cuda":
        raise ValueError("graph_blocks needs the model on a CUDA device")
    # what the blocks get: the embedding output, in the embedding's dtype (grad only when it trains), and
    # the rotary tables
    embed = model.get_input_embeddings()
    dtype, embed_trains = embed.weight.dtype, embed.weight.requires_grad
    hidden = torch.randn(batch_size, seq_len, model.config.hidden_size, device=p.device, dtype=dtype)
    position_ids = torch.arange(seq_len, device=p.device).unsqueeze(0)
    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
    if rotary is None:
        raise ValueError(f"{type(model).__name__} has no rotary_emb: graph_blocks takes Llama-family decoders")
    with torch.no_grad():
        cos, sin = rotary(hidden, position_ids)
    wrapped = tuple(_Block(b) for b in blocks)
    samples = tuple((hidden.clone().requires_grad_(i > 0 or embed_trains), cos, sin) for i in range(len(blocks)))
    with torch.autocast("cuda", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None,
                        cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(wrapped, samples, num_warmup_iters=warmup)
    captured = (batch_size, seq_len, dtype, amp_dtype)
    for block, g in zip(blocks, graphed):
        block._compiled_call_impl = None  # captured already; __call__ must reach the forward set here
        block.forward = _graphed_forward(block, g, captured)


def _graphed_forward(block: nn.Module, graphed: nn.Module, captured: tuple):
    eager = type(block).forward.__get__(block)

    def forward(hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        if (not block.training or not torch.is_grad_enabled() or attention_mask is not None
                or (*hidden_states.shape[:2], hidden_states.dtype, amp) != captured):
            return eager(hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                         **kwargs)
        cos, sin = position_embeddings
        return graphed(hidden_states, cos, sin)
    return forward


def compile_blocks(model: nn.Module, **compile_kwargs) -> None:
    """torch.compile each repeated block in place (identical blocks share one compiled graph), and the
    model's loss where transformers lets us set it: fused, an upcast cross-entropy over a large vocabulary
    reads the logits once instead of materialising fp32 copies."""
    # With activation checkpointing the backward recomputes a block's forward; dynamo would refuse to replay
    # its Python side effects there (LoRA shared-input groups hand outputs between layers) and break the
    # graph. Skipping them is safe: the recomputed tensors come from the traced graph.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in decoder_blocks(model):
        block.compile(**compile_kwargs)
    if hasattr(type(model), "loss_function"):
        model.loss_function = torch.compile(model.loss_function, **compile_kwargs)


CAUSAL_SDPA = "sdpa_causal_no_mask"


def causal_attention_without_mask(model: nn.Module) -> None:
    """Attention through SDPA's causal flag with no mask built, for batches without padding or packed sequences.

    transformers builds the mask in every forward and, to detect packed sequences, reads a GPU value on the host
    (`find_packed_sequence_indices`): the host waits for the previous step to finish, and the GPU then idles while
    the host launches the next step's first kernels. transformers skips mask creation for an attention function
    registered without a mask builder, so this registers its own SDPA function (`sdpa_attention_forward`, the
    same call; with no mask it passes is_causal) under a name of its own. The model then refuses an attention
    mask (transformers would drop it), and packed sequences would attend across their boundaries."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    model.set_attn_implementation(CAUSAL_SDPA)
    model.register_forward_pre_hook(_refuse_attention_mask, with_kwargs=True)


def _refuse_attention_mask(module, args, kwargs):
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:  # given by position: (input_ids, attention_mask, ...)
        mask = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get("attention_mask")
    if mask is not None:
        raise ValueError(f"attention_mask given to {type(module).__name__}, whose attention builds no mask "
                         "(causal_attention_without_mask): pass batches without padding and no attention_mask")
