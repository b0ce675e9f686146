"""The chunked causal LM loss (lowrank/train/lm_loss.py): the same loss and gradients as a double-precision
reference and as transformers' own, for a plain head, a tied one, a head with a bias, a LoRA layer on lm_head (the
head must be called as a module), under bf16 autocast, scaled as gradient accumulation scales it, and in evaluation."""
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lowrank.adapters.lora import LoRALinear, inject_lora
from lowrank.train import lm_loss
from lowrank.train.lm_loss import chunked_lm_loss, is_plain_linear, linear_cross_entropy, supports_chunked_loss
from lowrank.train.setup import resolve_chunked_loss, resolve_compile


def _model(tied: bool = False, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).to(dtype)


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, 21), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100   # a prompt without loss
    labels[2, -3:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference(model, labels, **batch):
    """The shifted mean cross-entropy on logits in the model's own precision (transformers casts them to fp32)."""
    logits = model(**batch).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def _loss_and_grads(model, loss_fn, scale: float = 1.0):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, **_batch())
    (loss * scale).backward()  # the trainer weights each micro-batch's loss by its share of the batch
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [7, 16, 1000])  # chunks that split rows, and one chunk for all
def test_same_loss_and_gradients_as_a_double_reference(tied, chunk):
    """A plain head (trained, as in full fine-tuning; tied to the embedding or not): the gradient-in-forward path."""
    model = _model(tied)
    assert is_plain_linear(model.lm_head)
    ref_loss, ref = _loss_and_grads(model, _reference, scale=0.37)
    loss, grads = _loss_and_grads(model, lambda m, **b: chunked_lm_loss(m, chunk_tokens=chunk, **b), scale=0.37)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref.keys() and any(n.startswith("lm_head") or "embed" in n for n in grads)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_same_loss_as_transformers_own():
    model = _model()
    loss, _ = _loss_and_grads(model, lambda m, **b: chunked_lm_loss(m, chunk_tokens=16, **b))
    hf_loss, _ = _loss_and_grads(model, lambda m, **b: m(**b).loss)  # fp32 logits: equal to fp32's precision
    torch.testing.assert_close(loss.float(), hf_loss, rtol=1e-6, atol=1e-6)


def test_a_head_with_a_bias_and_a_frozen_head():
    torch.manual_seed(0)
    hidden = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (23,))
    labels[3] = -100
    for frozen in (False, True):
        head.requires_grad_(not frozen)
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        F.cross_entropy(head(hidden), labels, ignore_index=-100).backward()
        ref = [hidden.grad.clone()] + ([] if frozen else [head.weight.grad.clone(), head.bias.grad.clone()])
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        linear_cross_entropy(hidden, head.weight, head.bias, labels, chunk_tokens=5).backward()
        got = [hidden.grad] + ([] if frozen else [head.weight.grad, head.bias.grad])
        assert frozen == (head.weight.grad is None)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_under_bf16_autocast_as_transformers_computes_it():
    """bf16 matmuls, fp32 softmax: the plain loss's numerics, up to the order of bf16 sums."""
    model = _model(dtype=torch.float32)
    for p in model.model.parameters():
        p.requires_grad_(False)  # LoRA-like: the head's input gradient and the head's own
    model.model.norm.weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hf_loss, hf = _loss_and_grads(model, lambda m, **b: m(**b).loss)
        loss, grads = _loss_and_grads(model, lambda m, **b: chunked_lm_loss(m, chunk_tokens=16, **b))
    assert loss.dtype == hf_loss.dtype == torch.float32
    torch.testing.assert_close(loss, hf_loss, rtol=2e-3, atol=2e-3)
    assert grads.keys() == hf.keys() == {"model.norm.weight", "lm_head.weight"}
    for name in hf:
        cos = F.cosine_similarity(grads[name].flatten(), hf[name].flatten(), dim=0)
        assert cos > 0.999, (name, float(cos))
        assert abs(float(grads[name].norm() / hf[name].norm()) - 1) < 1e-2, name


def test_evaluation_keeps_no_gradient_buffers(monkeypatch):
    model = _model()
    seen = []
    forward = lm_loss.LinearCrossEntropy.forward
    monkeypatch.setattr(lm_loss.LinearCrossEntropy, "forward",
                        staticmethod(lambda ctx, *a: (seen.append(ctx.needs_input_grad[:3]), forward(ctx, *a))[1]))
    with torch.no_grad():
        loss = chunked_lm_loss(model, chunk_tokens=16, **_batch())
    torch.testing.assert_close(loss, _reference(model, **_batch()).detach())
    assert seen == [(False, False, False)]


def test_a_batch_without_labels_gives_zero():
    model = _model()
    batch = _batch()
    batch["labels"][:] = -100
    assert float(chunked_lm_loss(model, chunk_tokens=16, **batch).detach()) == 0.0


def test_a_lora_on_lm_head_gets_its_gradient():
    """A loss that read lm_head.weight directly would leave the adapter's factors without a gradient."""
    model = _model()
    inject_lora(model, ["q_proj"], rank=4, alpha=8)
    model.lm_head = LoRALinear(model.lm_head, rank=4, alpha=8).double()  # targets exclude lm_head, as PEFT's do
    assert not is_plain_linear(model.lm_head)  # so the checkpointed path, which calls the head as a module
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
