"""Faster transformer blocks for any training method: torch.compile, and attention without a mask.

    compile_blocks(model)                            # each block through torch.compile (also on CPU)
    compile_on(cfg.trainer.compile, "cuda", True)    # whether trainer.compile compiles them
    causal_attention_without_mask(model)             # batches without padding: no mask built, no sync
    decoder_blocks(model)                            # the repeated blocks (per-block CUDA graphs in the
                                                     # benchmarks, benchmarks/harness/graphs.py, use them too)

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


def compile_on(setting, device_type: str, one_process: bool) -> bool:
    """trainer.compile's rule (the trainer and the memory model both ask it): compiled blocks run in one process
    only; `true` compiles on any device, `auto` on CUDA (on the CPU, compiling costs more than it saves on the
    demo's small models)."""
    return one_process and (setting is True or (setting == "auto" and device_type == "cuda"))


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
    # on the decoder, which the chunked loss calls directly (lowrank/train/lm_loss.py) as the whole model does
    getattr(model, "base_model", model).register_forward_pre_hook(_refuse_attention_mask, with_kwargs=True)


def _refuse_attention_mask(module, args, kwargs):
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:  # given by position: (input_ids, attention_mask, ...)
        mask = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get("attention_mask")
    if mask is not None:
        raise ValueError(f"attention_mask given to {type(module).__name__}, whose attention builds no mask "
                         "(causal_attention_without_mask): pass batches without padding and no attention_mask")
