"""Fastfood projections and method=subspace (intrinsic dimension): closed forms, norm, memory, the parametrization."""
import math

import torch
from torch import nn

from lowrank.adapters.fastfood import Fastfood, walsh_hadamard
from lowrank.adapters.subspace import freeze_for_subspace, inject_subspace, projection_bytes


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:  # Sylvester's construction
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_walsh_hadamard_is_the_sylvester_matrix_product():
    x = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(walsh_hadamard(x), x @ hadamard(16).T, rtol=0, atol=1e-12)


def test_fastfood_is_the_dense_product_of_its_factors():
    """P = scale · S_D H G Π H B S_d with S the padding and the truncation: the same numbers as the fast path."""
    d, D = 5, 12
    ff = Fastfood(d, D, torch.Generator().manual_seed(1))
    L, H = ff.L, hadamard(ff.L)
    assert L == 16
    pad = torch.eye(L, d, dtype=torch.float64)
    perm = torch.eye(L, dtype=torch.float64)[ff.perm]
    dense = ff.scale * (H @ torch.diag(ff.gauss.double()) @ perm @ H @ torch.diag(ff.signs.double()) @ pad)[:D]
    theta = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ff(theta), dense @ theta, rtol=1e-12, atol=1e-12)


def test_fastfood_preserves_the_norm_in_expectation():
    """E‖Pθ‖² = ‖θ‖² over the draw of P, for d < D and for d > D (a small matrix fed by a large θ)."""
    for d, D in ((64, 1000), (300, 40)):
        theta = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        ratios = [float(Fastfood(d, D, torch.Generator().manual_seed(s))(theta).square().sum() / theta.square().sum())
                  for s in range(400)]
        mean = sum(ratios) / len(ratios)
        assert abs(mean - 1) < 0.05, (d, D, mean)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_subspace_starts_at_the_base_model_and_moves_only_through_theta():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(10, 6)
    y0 = model(x).detach()
    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in ("a", "b")}
    inject_subspace(model, ["a", "b"], dim=7, said=False, seed=0)
    freeze_for_subspace(model, model.head)
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"intrinsic_subspace.theta", "head.weight", "head.bias"}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    theta = model.intrinsic_subspace.theta.detach()
    assert theta.abs().sum() > 0
    for i, n in enumerate(("a", "b")):
        layer = model.get_submodule(n)
        delta = layer.weight.detach() - w0[n]
        torch.testing.assert_close(layer.parametrizations.weight.original, w0[n], rtol=0, atol=0)  # W0 frozen
        expect = layer.parametrizations.weight[0].projection(theta).view_as(delta)
        torch.testing.assert_close(delta, expect, rtol=1e-6, atol=1e-7)  # ΔW = reshape(P_i θ_d)
    assert projection_bytes(model) == (64 + 32) * 13  # L = 2^⌈log2 D⌉ of 48 and 32 weights, 13 bytes each


def test_said_counts_its_scales_in_d_and_trains_them():
    model = Tiny()
    inject_subspace(model, ["a", "b"], dim=7, said=True, seed=0)
    freeze_for_subspace(model, None)
    space = model.intrinsic_subspace
    assert space.theta.numel() + space.scales.numel() == 7
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 7
    x = torch.randn(4, 6)
    model(x).sum().backward()
    assert space.scales.grad is not None and space.theta.grad.abs().sum() > 0
    assert math.isclose(float(space.scales.detach().sum()), 2.0)


def test_the_learning_rate_is_the_step_size_over_root_d_unless_set():
    import pytest
    from lowrank.errors import ConfigError
    from lowrank.config import validate
    from tests.conftest import compose_cfg
    assert compose_cfg(["method=subspace", "method.dim=100"]).trainer.lr == pytest.approx(1.7 / 10)
    assert compose_cfg(["method=subspace", "method.dim=10000", "method.step_size=3.4"]).trainer.lr == \
        pytest.approx(3.4 / 100)
    assert compose_cfg(["method=subspace", "method.dim=100", "trainer.lr=1e-3"]).trainer.lr == 1e-3
    for bad in ("-1", "0", "abc"):
        with pytest.raises(ConfigError, match=r"^method\.step_size=.* is not valid; it must be a number > 0$"):
            validate(compose_cfg(["method=subspace", f"method.step_size={bad}"]))

