"""The fused LoRA autograd function computes exactly the plain LoRA linear layer and its gradients."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from lowrank.adapters.fused import lora_linear, lora_linear_group


def reference(x, W, bias, A, B, scaling):
    """LoRALinear's plain forward with dropout 0: base(x) + F.linear(F.linear(x, A), B) * scaling."""
    return F.linear(x, W, bias) + F.linear(F.linear(x, A), B) * scaling


def tensors(shape_x, d_in, d_out, r, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape_x, d_in, generator=g, dtype=dtype)
    W = torch.randn(d_out, d_in, generator=g, dtype=dtype) / d_in ** 0.5
    b = torch.randn(d_out, generator=g, dtype=dtype) if bias else None
    A = torch.randn(r, d_in, generator=g, dtype=dtype) / d_in ** 0.5
    B = torch.randn(d_out, r, generator=g, dtype=dtype)  # nonzero, as if trained
    return x, W, b, A, B


@pytest.mark.parametrize("frozen", [True, False])
def test_gradcheck_float64(frozen):
    x, W, b, A, B = tensors((2, 3), 5, 4, 2, torch.float64, seed=0)
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    W.requires_grad_(not frozen)
    b.requires_grad_(not frozen)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t, 1.7), (x, W, b, A, B))


def test_gradcheck_without_bias():
    x, W, _, A, B = tensors((3,), 6, 5, 3, torch.float64, seed=1, bias=False)
    for t in (x, A, B):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, A, B: lora_linear(x, W, None, A, B, -0.5), (x, A, B))


@pytest.mark.parametrize("needs", [n for n in itertools.product([True, False], repeat=3) if any(n)])
def test_fp32_3d_matches_autograd_reference(needs):
    """Random 3-D input; every combination of x / W+bias / A+B requiring grad (frozen W is the LoRA case)."""
    need_x, need_w, need_ab = needs
    torch.manual_seed(2)
    x, W, b, A, B = tensors((4, 7), 48, 40, 8, torch.float32, seed=3)
    leaves = {"x": (x, need_x), "W": (W, need_w), "b": (b, need_w), "A": (A, need_ab), "B": (B, need_ab)}
    fast = {k: t.clone().requires_grad_(n) for k, (t, n) in leaves.items()}
    ref = {k: t.clone().requires_grad_(n) for k, (t, n) in leaves.items()}
    y = lora_linear(fast["x"], fast["W"], fast["b"], fast["A"], fast["B"], 2.0)
    y_ref = reference(ref["x"], ref["W"], ref["b"], ref["A"], ref["B"], 2.0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    for k in leaves:
        if leaves[k][1]:
            torch.testing.assert_close(fast[k].grad, ref[k].grad, rtol=1e-5, atol=1e-5, msg=k)
        else:
            assert fast[k].grad is None


def test_matches_lora_linear_module():
    from torch import nn

    from lowrank.adapters.lora import LoRALinear
    torch.manual_seed(6)
    layer = LoRALinear(nn.Linear(20, 12), rank=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 3, 20)
    b = layer.base_layer
    y = lora_linear(x, b.weight, b.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-6)


def test_fresh_adapter_is_the_base_layer():
    x, W, b, A, _ = tensors((2, 5), 16, 12, 4, torch.float32, seed=4)
    B = torch.zeros(12, 4)
    torch.testing.assert_close(lora_linear(x, W, b, A, B, 2.0), F.linear(x, W, b), rtol=1e-6, atol=1e-6)


def test_autocast_computes_in_bf16_and_grads_keep_param_dtype():
    """fp32 weights under bf16 autocast (CPU): output in bf16, parameter gradients in fp32, close to the
    fp32 reference at bf16 precision."""
    x, W, b, A, B = tensors((3, 9), 64, 32, 8, torch.float32, seed=5)
    A.requires_grad_(True)
    B.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, W, b, A, B, 0.5)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    A_ref, B_ref = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
    y_ref = reference(x, W, b, A_ref, B_ref, 0.5)
    y_ref.square().sum().backward()
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert rel(y, y_ref) < 1e-2
    assert rel(A.grad, A_ref.grad) < 3e-2 and rel(B.grad, B_ref.grad) < 3e-2


@pytest.mark.parametrize("in_place", [False, True])
def test_flat_master_adamw_matches_adamw(in_place):
    """fp32 parameters: the flat master update equals torch AdamW on the parameters themselves, gradients
    accumulated over two backward passes included, gathered at step() or added into preset views, and the
    parameters stay views into the flat buffer."""
    from torch import nn

    from lowrank.adapters.fused import FlatMasterAdamW
    torch.manual_seed(7)
    ref = [nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(5, 4))]
    ours = [nn.Parameter(p.detach().clone()) for p in ref]
    opt_ref = torch.optim.AdamW(ref, lr=1e-2)
    opt = FlatMasterAdamW(ours, lr=1e-2, accumulate_in_place=in_place)
    x = torch.randn(3, 6)
    for i in range(3):
        for params, o in ((ref, opt_ref), (ours, opt)):
            if i == 2:  # something else drops the gradients (e.g. model.zero_grad()): they are still gathered
                for p in params:
                    p.grad = None
            ((x @ params[0].t() @ params[1].t()) ** 2).sum().backward()
            ((x[:1] @ params[0].t() @ params[1].t()) ** 3).sum().backward()  # accumulates
            o.step()
            o.zero_grad()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours[1].data_ptr() == opt.flat[24:].data_ptr()
    if in_place:
        assert ours[1].grad.data_ptr() == opt.flat_grad[24:].data_ptr() and ours[1].grad.abs().sum() == 0
    else:
        assert ours[1].grad is None


def test_flat_master_keeps_fp32_master_for_bf16_params():
    from torch import nn

    from lowrank.adapters.fused import FlatMasterAdamW
    p = nn.Parameter(torch.full((8,), 1.0, dtype=torch.bfloat16))
    opt = FlatMasterAdamW([p], lr=1e-4, weight_decay=0.0)
    for _ in range(4):  # each step moves 1.0 by ~1e-4: below bf16's resolution at 1.0, kept by the master
        (p.float() * -1.0).sum().backward()
        opt.step()
        opt.zero_grad()
    assert opt.master.dtype == torch.float32 and opt.master[0].item() > 1.0 + 3e-4
    assert p.dtype == torch.bfloat16


def group_layers(d_in, outs, r, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(d_out, d_in, generator=g, dtype=dtype) / d_in ** 0.5,
             torch.randn(d_out, generator=g, dtype=dtype) if bias else None,
             torch.randn(r, d_in, generator=g, dtype=dtype) / d_in ** 0.5,
             torch.randn(d_out, r, generator=g, dtype=dtype), s) for d_out, s in zip(outs, (2.0, 0.5, -1.0))]


def test_group_gradcheck_float64():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    layers = group_layers(6, (5, 3), 2, torch.float64, seed=8)
    leaves = [t.requires_grad_(True) for W, b, A, B, _ in layers for t in (A, B)]

    def f(x, *ab):
        return lora_linear_group(x, [(W, b, ab[2 * i], ab[2 * i + 1], s) for i, (W, b, _, _, s) in enumerate(layers)])
    assert torch.autograd.gradcheck(f, (x, *leaves))


@pytest.mark.parametrize("need_x,drop_output", [(True, False), (False, False), (True, True)])
def test_group_matches_each_layer_alone(need_x, drop_output):
    """Three layers of different widths (q, k, v with GQA) on one input: the group's outputs and every
    gradient equal lora_linear per layer; a layer whose output the loss never uses gets no gradient."""
    x = torch.randn(4, 5, 16)
    layers = group_layers(16, (12, 4, 4), 3, torch.float32, seed=9)
    runs = {}
    for name in ("group", "alone"):
        xs = x.clone().requires_grad_(need_x)
        ls = [(W, b, A.clone().requires_grad_(True), B.clone().requires_grad_(True), s) for W, b, A, B, s in layers]
        ys = lora_linear_group(xs, ls) if name == "group" else [lora_linear(xs, *layer) for layer in ls]
        used = ys[:2] if drop_output else ys
        sum(((y * torch.linspace(-1, 1, y.shape[-1])) ** 2).sum() for y in used).backward()
        runs[name] = (ys, xs.grad, [(A.grad, B.grad) for _, _, A, B, _ in ls])
    (ys_g, gx_g, ab_g), (ys_a, gx_a, ab_a) = runs["group"], runs["alone"]
    for y_g, y_a in zip(ys_g, ys_a):
        torch.testing.assert_close(y_g, y_a, rtol=1e-5, atol=1e-5)
    if need_x:
        torch.testing.assert_close(gx_g, gx_a, rtol=1e-5, atol=1e-5)
    else:
        assert gx_g is None
    for (gA, gB), (rA, rB) in zip(ab_g, ab_a):
        if rA is None:  # the dropped output: no gradient, alone or in the group
            assert drop_output and gA is None and gB is None
        else:
            torch.testing.assert_close(gA, rA, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gB, rB, rtol=1e-5, atol=1e-5)


def test_fused_factor_grads_apply_only_where_the_kernel_is_right_and_fast(monkeypatch):
    import types
    import lowrank.adapters.fused as lf
    pytest.importorskip("triton")

    def g(numel=8192 * 2048, is_cuda=True, dtype=torch.bfloat16):
        return types.SimpleNamespace(is_cuda=is_cuda, dtype=dtype, numel=lambda: numel)
    assert lf.fused_factor_grads_apply([g(), g()], 8192, 16)
    assert lf.fused_factor_grads_apply([g(dtype=torch.float16)], 4096, 64)
    assert not lf.fused_factor_grads_apply([g(is_cuda=False)], 8192, 16)
    assert not lf.fused_factor_grads_apply([g(dtype=torch.float32)], 8192, 16)
    assert not lf.fused_factor_grads_apply([g()], 2048, 16)  # too few rows: cuBLAS
    assert not lf.fused_factor_grads_apply([g()], 8192, 128)  # rank above 64
    assert not lf.fused_factor_grads_apply([g(), g(numel=2**31)], 8192, 16)  # 32-bit offsets
    monkeypatch.setattr(lf, "FUSED_FACTOR_GRADS", False)
    assert not lf.fused_factor_grads_apply([g()], 8192, 16)
    monkeypatch.setattr(lf, "FUSED_FACTOR_GRADS", True)
    monkeypatch.setattr(lf, "triton", None)
    assert not lf.fused_factor_grads_apply([g()], 8192, 16)
    monkeypatch.undo()
    torch.use_deterministic_algorithms(True)
    try:
        assert not lf.fused_factor_grads_apply([g()], 8192, 16)
    finally:
        torch.use_deterministic_algorithms(False)

