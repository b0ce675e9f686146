"""Faster transformer blocks for any training method: per-block CUDA graphs, and torch.compile.

    opt = ...                                        # build the optimizer first (it may move parameters)
    graph_blocks(model, batch_size=8, seq_len=1024)  # then: train as usual; eval and no_grad run eagerly
    compile_blocks(model)                            # or: each block through torch.compile (also on CPU)

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
import torch
from torch import nn


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's repeated blocks: the longest nn.ModuleList whose children all share one class."""
    best = None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1:
            if best is None or len(m) > len(best):
                best = m
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks to graph or compile")
    return best


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
    place. Afterwards a block runs its graphs when the model trains with grad enabled, else its eager code."""
    blocks = decoder_blocks(model)
    p = next(model.parameters())
    if p.device.type != "cuda":
        raise ValueError("graph_blocks needs the model on a CUDA device")
    hidden_size = model.config.hidden_size
    dtype = amp_dtype or p.dtype
    # what the blocks get: the embedding output (grad only when the embedding trains) and the rotary tables
    embed = model.get_input_embeddings()
    embed_trains = any(q.requires_grad for q in embed.parameters())
    hidden = torch.randn(batch_size, seq_len, hidden_size, device=p.device, dtype=dtype)
    position_ids = torch.arange(seq_len, device=p.device).unsqueeze(0)
    rotary = next(m for n, m in model.named_modules() if n.endswith("rotary_emb"))
    with torch.no_grad():
        cos, sin = rotary(hidden, position_ids)
    wrapped = tuple(_Block(b) for b in blocks)
    samples = tuple((hidden.clone().requires_grad_(i > 0 or embed_trains), cos, sin) for i in range(len(blocks)))
    with torch.autocast("cuda", dtype=dtype, enabled=amp_dtype is not None, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(wrapped, samples, num_warmup_iters=warmup)
    for block, g in zip(blocks, graphed):
        block._compiled_call_impl = None  # captured already; __call__ must reach the forward set here
        block.forward = _graphed_forward(block, g, (batch_size, seq_len))


def _graphed_forward(block: nn.Module, graphed: nn.Module, shape: tuple[int, int]):
    eager = type(block).forward.__get__(block)

    def forward(hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        if (not block.training or not torch.is_grad_enabled() or attention_mask is not None
                or tuple(hidden_states.shape[:2]) != shape):
            return eager(hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                         **kwargs)
        cos, sin = position_embeddings
        return graphed(hidden_states, cos, sin)
    return forward


def compile_blocks(model: nn.Module, **compile_kwargs) -> None:
    """torch.compile each repeated block in place (identical blocks share one compiled graph), and the
    model's loss where transformers lets us set it: fused, the upcast 32k-vocabulary cross-entropy reads the
    logits once instead of materialising fp32 copies."""
    for block in decoder_blocks(model):
        block.compile(**compile_kwargs)
    if hasattr(type(model), "loss_function"):
        model.loss_function = torch.compile(model.loss_function, **compile_kwargs)
