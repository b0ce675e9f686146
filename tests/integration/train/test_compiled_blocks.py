"""Compiled LoRA blocks (torch.compile: inductor runs a C++ compiler) compute what eager blocks compute."""
import copy

import pytest
import torch

from lowrank.adapters.lora import freeze_for_lora, inject_lora, lora_layers
from lowrank.train.blocks import compile_blocks
from tests.unit.train.test_blocks import tiny_llama


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_lora_blocks_match_eager_loss_and_gradients(checkpointing):
    """The fused LoRA functions (their GEMM-epilogue chains as a custom op under compile; q/k/v and
    gate/up as shared-input groups), the compiled blocks and the compiled loss give the eager loss and
    LoRA gradients, also with activation checkpointing (the backward recomputes each block)."""
    eager = tiny_llama()
    inject_lora(eager, "all-linear", rank=4, alpha=8)
    freeze_for_lora(eager, head=None)
    assert sum(m.group is not None for m in lora_layers(eager).values()) == 10  # q,k,v and gate,up: traced too
    with torch.no_grad():  # B != 0, so the adapters take part in the forward pass
        for layer in lora_layers(eager).values():
            layer.lora_B.normal_(std=0.1)
    compiled = copy.deepcopy(eager)
    if checkpointing:
        compiled.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compile_blocks(compiled, fullgraph=True)  # no graph break: the LoRA functions and the custom op are traced
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        losses[name] = model(input_ids=ids, labels=ids).loss
        losses[name].backward()
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-5, atol=1e-5)
    grads_c = {n: (m.lora_A.grad, m.lora_B.grad) for n, m in lora_layers(compiled).items()}
    for n, m in lora_layers(eager).items():
        assert m.lora_B.grad.abs().sum() > 0
        torch.testing.assert_close(grads_c[n][0], m.lora_A.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grads_c[n][1], m.lora_B.grad, rtol=1e-4, atol=1e-6)
