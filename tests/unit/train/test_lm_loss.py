"""The chunked causal LM loss (lowrank/train/lm_loss.py) against transformers' own: the same loss and the same
gradients, for a plain head, a tied one and a LoRA layer on lm_head (the head must be called as a module)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowrank.adapters.lora import LoRALinear, inject_lora
from lowrank.train.lm_loss import chunked_lm_loss, supports_chunked_loss
from lowrank.train.setup import resolve_chunked_loss, resolve_compile


def _model(tied: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).double()


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, 21), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100   # a prompt without loss
    labels[2, -3:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, **_batch())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [7, 16, 1000])  # chunks that split rows, and one chunk for all
def test_same_loss_and_gradients_as_transformers(tied, chunk):
    model = _model(tied)
    plain_loss, plain = _loss_and_grads(model, lambda m, **b: m(**b).loss)
    loss, grads = _loss_and_grads(model, lambda m, **b: chunked_lm_loss(m, chunk_tokens=chunk, **b))
    torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)


def test_a_lora_on_lm_head_gets_its_gradient():
    """A loss that read lm_head.weight directly would leave the adapter's factors without a gradient."""
    model = _model()
    inject_lora(model, ["q_proj"], rank=4, alpha=8)
    model.lm_head = LoRALinear(model.lm_head, rank=4, alpha=8).double()  # targets exclude lm_head, as PEFT's do
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # B = 0 would hide a missing term in A's gradient
    _, plain = _loss_and_grads(model, lambda m, **b: m(**b).loss)
    _, grads = _loss_and_grads(model, lambda m, **b: chunked_lm_loss(m, chunk_tokens=16, **b))
    head = [n for n in plain if n.startswith("lm_head")]
    assert len(head) == 2 and grads.keys() == plain.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0
        torch.testing.assert_close(grads[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)


def test_which_models_and_settings_take_the_chunked_loss():
    model = _model()
    assert supports_chunked_loss(model) == (True, "")
    model.config.final_logit_softcapping = 30.0
    assert supports_chunked_loss(model) == (False, "its head applies config.final_logit_softcapping")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plain = _model()
    assert resolve_chunked_loss("auto", plain, None, cuda, "none") is True
    assert resolve_chunked_loss("auto", plain, None, cpu, "none") is False      # the CPU keeps the plain loss
    assert resolve_chunked_loss("auto", plain, None, cuda, "ddp") is False
    assert resolve_chunked_loss("auto", plain, object(), cuda, "none") is False  # a classifier: no LM loss
    assert resolve_chunked_loss(True, plain, None, cpu, "none") is True
    with pytest.raises(Exception, match=r"^trainer.chunked_loss=true is not valid here: its head applies"):
        resolve_chunked_loss(True, model, None, cuda, "none")


def test_compile_auto_is_on_for_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cuda, "none") is True
    assert resolve_compile("auto", cpu, "none") is False
    assert resolve_compile("auto", cuda, "ddp") is False
    assert resolve_compile(True, cpu, "none") is True
    assert resolve_compile(True, cuda, "fsdp") is False
    assert resolve_compile(False, cuda, "none") is False
