"""The trainer's step (lowrank.train.step) and its batching: when the whole step is graphed, learning rates as
tensors a graph can read, and length-grouped batches. CUDA graphs themselves are checked on a GPU
(benchmarks.bench's trainer rows: loss curves graphed and not)."""
from contextlib import nullcontext

import pytest
import torch

from lowrank.data.batches import MEGA_BATCHES, Batches
from lowrank.data.classification import Split
from lowrank.errors import ConfigError
from lowrank.train.optim import lr_lambda, make_scheduler
from lowrank.train.step import TrainStep, place_lr, use_cuda_graph
from lowrank.config import validate
from tests.conftest import TINY, compose_cfg

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("device, static, checkpointing, graphed, says", [
    (CUDA, True, False, True, ""),
    (torch.device("cpu"), True, False, False, "CPU"),
    (CUDA, False, False, False, "padded"),
    (CUDA, True, True, False, "checkpointing")])
def test_the_step_is_graphed_only_where_it_can_be(device, static, checkpointing, graphed, says):
    assert use_cuda_graph("auto", device, static, checkpointing) == (graphed, use_cuda_graph(
        True, device, static, checkpointing)[1])
    assert says in use_cuda_graph("auto", device, static, checkpointing)[1]
    assert use_cuda_graph(False, device, static, checkpointing)[0] is False


def test_cuda_graph_true_on_the_cpu_is_one_line_naming_the_key(tiny_run):
    with pytest.raises(ConfigError, match=r"^trainer.cuda_graph=true is not valid here: it runs on the CPU"):
        tiny_run("trainer.cuda_graph=true")


@pytest.mark.parametrize("key", ["cuda_graph", "group_by_length"])
def test_bad_switch_values_name_the_key(key):
    cfg = compose_cfg(TINY + [f"trainer.{key}=sometimes"])
    with pytest.raises(ConfigError, match=rf"^trainer.{key}='sometimes' is not valid; choose auto, true or false"):
        validate(cfg)


def test_tensor_learning_rates_follow_the_schedule_in_place():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    place_lr(opt, torch.device("cpu"))
    lr = opt.param_groups[0]["lr"]
    sched = make_scheduler(opt, lr_lambda("linear", 2, 10))
    seen = []
    for _ in range(4):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] is lr  # the same tensor: a captured step reads the new value
    assert all(isinstance(v, float) for v in seen)
    assert seen == pytest.approx([0.05, 0.1, 0.1, 0.1 * 7 / 8])
    place_lr(opt, None)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 6 / 8) and isinstance(opt.param_groups[0]["lr"], float)


def test_eager_step_accumulates_micro_batches_like_one_batch_and_skips_a_non_finite_one():
    torch.manual_seed(0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, input_ids, labels):
            return type("Out", (), {"loss": ((self.lin(input_ids).squeeze(-1) - labels) ** 2).mean()})

    x, y = torch.randn(8, 4), torch.randn(8)
    grads = []
    for parts in (1, 2, 4):
        model = Model()
        torch.nn.init.ones_(model.lin.weight)
        torch.nn.init.zeros_(model.lin.bias)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        step = TrainStep(model, opt, list(model.parameters()), nullcontext, grad_clip=None, graphed=False)
        n = 8 // parts
        loss, norm, stepped = step([{"input_ids": x[s:s + n], "labels": y[s:s + n]} for s in range(0, 8, n)])
        grads.append((loss, norm))
        assert stepped
    assert grads[1] == pytest.approx(grads[0]) and grads[2] == pytest.approx(grads[0])
    model.lin.weight.data[0, 0] = float("nan")
    before = model.lin.bias.detach().clone()
    loss, _, stepped = step([{"input_ids": x, "labels": y}])
    assert not stepped and loss != loss and torch.equal(model.lin.bias, before)


def _lengths_batches(group: bool, n=640, batch=8):
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 100, (n,), generator=g).tolist()
    split = Split([[1] * k for k in lengths], [0] * n)
    return Batches(None, split, 128, 0, group_by_length=group), lengths


def test_group_by_length_keeps_every_example_once_per_epoch_and_pads_less():
    batch = 8
    grouped, lengths = _lengths_batches(True)
    plain, _ = _lengths_batches(False)
    per_epoch = len(lengths) // batch
    epoch = [grouped.indices_at(s, batch, seed=3) for s in range(per_epoch)]
    assert sorted(i for b in epoch for i in b) == list(range(len(lengths)))
    assert epoch == [_lengths_batches(True)[0].indices_at(s, batch, seed=3) for s in range(per_epoch)]  # pure
    assert grouped.indices_at(per_epoch, batch, seed=3) != epoch[0]  # the next epoch is another order

    def padded(b):
        return sum(max(lengths[i] for i in idx) * len(idx) for idx in
                   (b.indices_at(s, batch, seed=3) for s in range(per_epoch)))
    assert padded(grouped) < 0.7 * padded(plain)
    # batch order stays random: the longest batches are not all first
    firsts = [max(lengths[i] for i in b) for b in epoch[:MEGA_BATCHES]]
    assert firsts != sorted(firsts, reverse=True)


def test_auto_optimizer_is_the_flat_master_only_for_a_graphable_lora_step():
    from lowrank.train.optim import resolve_optimizer
    assert resolve_optimizer("auto", "lora", "cuda", "bf16", static_batches=True) == "flat_master"
    for args in (("full", "cuda", "bf16", True), ("lora", "cpu", "fp32", True), ("lora", "cuda", "fp32", True),
                 ("lora", "cuda", "bf16", False)):
        assert resolve_optimizer("auto", *args[:3], static_batches=args[3]) == "adamw"
    assert resolve_optimizer("adamw", "lora", "cuda", "bf16", static_batches=True) == "adamw"

