"""CUDA graphs the benchmarks time, beside the trainer's own whole-step graph (lowrank/train/step_graph.py): per-block
graphs of a model's decoder blocks (`graph_blocks`, the per-layer scheme Megatron/TransformerEngine use), a bare
training step captured whole (`graph_step`), and `undo_training` so a curve captured after warm-up starts where
the others start.

    graph_blocks(model, batch_size=8, seq_len=1024)  # after building the optimizer; eval and no_grad run eagerly
    step = graph_step(step, example_batch, after_capture=undo_training(params, opt))
"""
import torch
from torch import nn

from lowrank.adapters.fused import FlatMasterAdamW
from lowrank.train.blocks import decoder_blocks


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


def graph_step(step, example: torch.Tensor, warmup: int = 3, after_capture=None):
    """`step(batch) -> loss` captured as one CUDA graph: the returned step copies its batch into the captured
    input and replays. Warm-up runs first on a side stream, as torch.cuda.graph needs: it compiles, and
    creates the optimizer's state (created inside the capture, the moments would restart from zero at every
    replay). The step should end by setting gradients to None, so backward in the capture allocates them in
    the graph's memory and each replay writes them afresh. `after_capture()` runs once captured (a capture
    runs no kernels: only the warm-up steps have trained)."""
    static = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step(static)
    if after_capture is not None:
        after_capture()

    def replay(batch):
        static.copy_(batch)
        graph.replay()
        return loss.clone()  # the next replay overwrites the captured loss
    return replay


def undo_training(params, opt):
    """For an optimizer that has not stepped yet: a function that puts the parameters back as they are now and
    the optimizer's state to that of a fresh one (zero moments at step 0), in the same tensors (a captured
    graph keeps using them). For a loss curve that must start where the others start."""
    inner = opt.optimizer if isinstance(opt, FlatMasterAdamW) else opt
    if inner.state:
        raise ValueError("undo_training needs an optimizer that has not stepped yet")
    tensors = list(params) + ([opt.master] if isinstance(opt, FlatMasterAdamW) else [])
    saved = [t.detach().clone() for t in tensors]

    @torch.no_grad()
    def undo():
        for t, v in zip(tensors, saved):
            t.copy_(v)
        for state in inner.state.values():  # created by the first step: back to zero moments at step 0
            for v in state.values():
                v.zero_()
    return undo
