"""lowrank.train.blocks: finding the repeated blocks, the custom op, attention without a mask (compiled blocks against
eager ones: tests/integration/train/test_compiled_blocks.py)."""
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from lowrank.train.blocks import causal_attention_without_mask, decoder_blocks
from lowrank.train.lm_loss import chunked_lm_loss
from benchmarks.harness.graphs import graph_blocks


def tiny_llama(seed=0):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, use_cache=False,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).train()


def test_decoder_blocks_are_the_repeated_layers():
    llama = tiny_llama()
    assert decoder_blocks(llama) is llama.model.layers
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64))
    assert decoder_blocks(bert) is bert.encoder.layer
    with pytest.raises(ValueError, match="Linear has no list of repeated blocks"):
        decoder_blocks(nn.Linear(2, 2))


def test_decoder_blocks_are_the_outer_list_not_experts_inside_a_block():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(2, 2) for _ in range(8))  # longer than the layer list

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(2))

    model = Model()
    assert decoder_blocks(model) is model.layers


def test_lowrank_plus_linear_custom_op_passes_torch_opcheck():
    """The op torch.compile sees in place of the in-place GEMM epilogues: its fake (shape) function and its
    schema agree with what it computes, for each call site (forward, input gradient, a group's input
    gradient over two layers)."""
    from lowrank.adapters.lora_gemm import _lowrank_plus_linear, _lowrank_plus_linear_op
    g = torch.Generator().manual_seed(0)
    x, gy, W, A, B, h, t, gy2, W2, t2 = (torch.randn(*shape, generator=g) for shape in
                                         [(10, 6), (10, 5), (5, 6), (3, 6), (5, 3), (10, 3), (10, 3), (10, 4),
                                          (4, 6), (10, 6)])
    A2 = torch.cat([A, A.flip(0)])
    for big_ins, big_ws, small_in, small_w, beta in [([x], [W.t()], h, B.t(), 0.5),         # y = 0.5·h Bᵀ + x Wᵀ
                                                     ([gy], [W], t, A, 2.0),                 # gx = 2·t A + g W
                                                     ([gy, gy2], [W, W2], t2, A2, 1.0)]:     # gx = T A + Σ gᵢ Wᵢ
        args = (big_ins, big_ws, small_in, small_w, beta)
        torch.library.opcheck(_lowrank_plus_linear_op, args)
        expected = beta * small_in @ small_w + sum(a @ w for a, w in zip(big_ins, big_ws))
        torch.testing.assert_close(_lowrank_plus_linear_op(*args), expected)
        torch.testing.assert_close(_lowrank_plus_linear(*args), expected)


def test_graph_blocks_names_its_device_requirement():
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        graph_blocks(tiny_llama(), batch_size=2, seq_len=8)


def test_causal_attention_without_mask_matches_sdpa_and_builds_no_mask(monkeypatch):
    import transformers.masking_utils as masking
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    calls = []
    real = masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda *a, **k: calls.append(1) or real(*a, **k))
    model(input_ids=x)
    assert calls, "transformers' sdpa path no longer checks for packed sequences: the helper may be moot"
    calls.clear()
    causal_attention_without_mask(model)
    with torch.no_grad():
        out = model(input_ids=x).logits
    assert not calls  # no mask built, so no packed-sequence check (the host-GPU sync)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # causal: a change at the last position changes no earlier logit
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 64
    with torch.no_grad():
        out2 = model(input_ids=y).logits
    torch.testing.assert_close(out2[:, :-1], out[:, :-1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=x, attention_mask=torch.ones_like(x))
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, torch.ones_like(x))  # by position
    with pytest.raises(ValueError, match="attention_mask"):  # the chunked loss calls the decoder itself
        chunked_lm_loss(model, input_ids=x, attention_mask=torch.ones_like(x), labels=x)

