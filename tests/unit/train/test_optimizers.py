"""The trainer's optimizers: bf16 LoRA factors through fp32 masters resume exactly, and the schedule is shared."""
import torch
from torch import nn

from lowrank.adapters.lora import inject_lora
from lowrank.train.optim import FactorsAndHead, lr_lambda, make_optimizer, make_scheduler


class Tiny(nn.Module):
    """One block with a projection `layers.0.proj` (LoRA's target) and a head."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(8, 8)})])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.layers[0]["proj"](x)))

    def __getitem__(self, i):  # model[0]: the adapted projection, model[2]: the head
        return {0: self.layers[0]["proj"], 2: self.head}[i]


def tiny(seed: int):
    torch.manual_seed(seed)
    model = Tiny()
    inject_lora(model, ["proj"], rank=2, alpha=4)
    for p in model.parameters():
        p.requires_grad_(False)
    model[0].lora_A.requires_grad_(True)
    model[0].lora_B.requires_grad_(True)
    model[2].weight.requires_grad_(True)  # the "head"
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, trainable, "flat_master", lr=0.05, weight_decay=0.01, fused=False)
    return model, trainable, opt, make_scheduler(opt, lr_lambda("linear", 1, 10))


def train_steps(model, trainable, opt, sched, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        model(torch.randn(4, 8, generator=g)).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()


def test_flat_masters_hold_the_factors_in_bf16_and_step_the_head_apart():
    model, trainable, opt, sched = tiny(0)
    assert isinstance(opt, FactorsAndHead) and model[0].lora_A.dtype == torch.bfloat16
    assert model[2].weight.dtype == torch.float32
    head_before = model[2].weight.detach().clone()
    train_steps(model, trainable, opt, sched, 2, seed=1)
    assert not torch.equal(model[2].weight, head_before) and model[0].lora_B.abs().max() > 0
    assert torch.equal(model[0].lora_A.float(), opt.flat.master[:16].view(2, 8).to(torch.bfloat16).float())
    assert sched.get_last_lr()[0] == 0.05 * lr_lambda("linear", 1, 10)(2)
    assert [g["lr"] for g in opt.param_groups] == [sched.get_last_lr()[0]] * 2  # both optimizers, one schedule


def test_a_resumed_flat_master_run_continues_exactly():
    ref = tiny(0)
    train_steps(*ref, 5, seed=1)
    cut = tiny(0)
    train_steps(*cut, 3, seed=1)
    saved = ({n: p.detach().clone() for n, p in cut[0].named_parameters()}, cut[2].state_dict(), cut[3].state_dict())
    resumed = tiny(7)  # other initial values: everything must come from the saved state
    with torch.no_grad():
        for n, p in resumed[0].named_parameters():
            p.copy_(saved[0][n])
    resumed[2].load_state_dict(saved[1])
    resumed[3].load_state_dict(saved[2])
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        torch.randn(4, 8, generator=g)  # the batches the first 3 steps used
    for _ in range(2):
        resumed[0](torch.randn(4, 8, generator=g)).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(resumed[1], 1.0)
        resumed[2].step()
        resumed[3].step()
        resumed[2].zero_grad()
    for (n, a), b in zip(ref[0].named_parameters(), resumed[0].parameters()):
        assert torch.equal(a, b), n
    assert torch.equal(ref[2].flat.master, resumed[2].flat.master)
