"""The fused factor-gradient kernel (lowrank.adapters.fused) and the GEMM that starts from the LoRA product
(lowrank.adapters.lora_gemm) against the cuBLAS path, run by Triton's CPU interpreter in a process of its own
(TRITON_INTERPRET=1 must be set before triton is imported)."""
import pytest


# What both scripts share: a group of three LoRA layers (q, k, v-like widths 48, 24, 200; ranks 16, 8, 4) on one input
# of n rows, and their outputs and gradients (the input's and every factor's) computed as a group or one layer at
# a time, or by `forward(xi, ps)`; `same_with_and_without(switch)` compares both ways with a kernel's switch on and off.
_LAYERS = r"""
import torch
import lowrank.adapters.fused as lf
torch.manual_seed(0)
n, d_in = __ROWS__, 40
layers = [(torch.randn(d, d_in, dtype=torch.float64), None, torch.randn(r, d_in, dtype=torch.float64),
           torch.randn(d, r, dtype=torch.float64), s) for d, r, s in ((48, 16, 2.0), (24, 8, 0.5), (200, 4, 1.0))]
x = torch.randn(n, d_in, dtype=torch.float64)
def grads(group, forward=None):
    ps = [[t.float().clone().requires_grad_(True) if t is not None else None for t in l[:4]] for l in layers]
    xi = x.float().clone().requires_grad_(True)
    if forward is not None:
        ys = forward(xi, ps)
    elif group:
        ys = lf.lora_linear_group(xi, [(*p, l[4]) for p, l in zip(ps, layers)])
    else:
        ys = [lf.lora_linear(xi, *p, l[4]) for p, l in zip(ps, layers)]
    outs = [y.detach() for y in ys]
    sum((y * torch.linspace(-1, 1, y.shape[1])).sum() for y in ys).backward()
    return outs + [xi.grad] + [t.grad for p in ps for t in p if t is not None and t.grad is not None]
def same_with_and_without(switch):
    for group in (True, False):
        switch(True)
        on = grads(group)
        switch(False)
        for a, b in zip(on, grads(group)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
"""


def _run_in_interpreter(script: str) -> None:
    pytest.importorskip("triton")  # a test dependency on Linux (no wheels elsewhere)
    from tests.conftest import ROOT, run_cli
    result = run_cli(["-c", script], cwd=ROOT, env_extra={"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
                     timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# The fused factor-gradient kernel runs on CUDA only; on the CPU Triton's interpreter runs it (TRITON_INTERPRET is
# read when the kernel is defined, so in a fresh process). The group and single layers: the fused backward against
# the cuBLAS path, every output and gradient; the kernel alone in fp32 and fp16 against float64, for ranks that pad
# to 16, 32 and 64 (not powers of two among them).
_FUSED_SCRIPT = _LAYERS.replace("__ROWS__", "96") + r"""
assert lf.triton is not None
# direct: T and each B gradient against float64 references (fp32 accumulation inside the kernel)
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-2)):
    shapes = ((48, 16, 2.0), (24, 12, 0.5), (130, 40, 1.0), (7, 24, 1.5))  # ranks pad to 16, 16, 64, 32
    gs = [torch.randn(n + 5, d, dtype=dtype) for d, _, _ in shapes]
    Bs = [torch.randn(d, r, dtype=dtype) for d, r, _ in shapes]
    H = torch.randn(n + 5, sum(r for _, r, _ in shapes) + 3, dtype=dtype)[:, 3:]  # a strided view, like H's columns
    T, *gBs = lf.t_and_b_grads(gs, Bs, H, [s for *_, s in shapes])
    assert T.dtype == dtype and all(gB.dtype == dtype and gB.shape == B.shape for gB, B in zip(gBs, Bs))
    col = 0
    for g, B, gB, (_, r, s) in zip(gs, Bs, gBs, shapes):
        t_ref, gB_ref = s * g.double() @ B.double(), s * g.double().t() @ H[:, col:col + r].double()
        torch.testing.assert_close(T[:, col:col + r].double(), t_ref, rtol=tol, atol=tol * t_ref.abs().max().item())
        torch.testing.assert_close(gB.double(), gB_ref, rtol=tol, atol=tol * gB_ref.abs().max().item())
        col += r
torch.library.opcheck(lf._t_and_b_grads_op, (gs, Bs, H, [s for *_, s in shapes]))  # schema, fake, aot dispatch
# through autograd: the fused branch forced on (CPU), against the cuBLAS branch
same_with_and_without(lambda on: setattr(lf, "fused_factor_grads_apply", lambda gs, rows, max_rank: on))
print("ok")
"""

def test_fused_factor_grads_match_cublas_path_in_triton_interpreter():
    _run_in_interpreter(_FUSED_SCRIPT)


# The GEMM that starts from the rank-r product runs on CUDA only; forced on here, in the interpreter. The group (the
# input gradient's kernel takes the widest output's gradient and adds the others) and single layers against the
# cuBLAS pair, and the group traced by torch.compile; then the kernel alone
# against float64 for both operand layouts, with more rows and columns than one tile and a strided rank-r operand.
_LORA_GEMM_SCRIPT = _LAYERS.replace("__ROWS__", "300") + r"""
import lowrank.adapters.lora_gemm as lg
assert lg.triton is not None
calls = []
same_with_and_without(lambda on: setattr(lf, "lora_gemm_applies", (lambda *a: calls.append(1) or True) if on
                                         else (lambda *a: False)))
assert len(calls) == 3 + 1 + 3 + 3  # group: 3 forwards, one input gradient; single layers: 3 and 3
# traced whole by torch.compile (fullgraph: no graph break where the layer chooses its path), the same values
lf.lora_gemm_applies = lambda *a: True
run = torch.compile(lambda xi, ps: lf.lora_linear_group(xi, [(*p, l[4]) for p, l in zip(ps, layers)]),
                    backend="aot_eager", fullgraph=True)
for a, b in zip(grads(True, forward=run), grads(True)):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
M, K, N, r = 260, 72, 300, 20
a, e = torch.randn(M, K), torch.randn(M, r + 4)[:, 4:]
for w_rows_out, f_rows_out in ((True, True), (False, False)):
    b = torch.randn(N, K) if w_rows_out else torch.randn(K, N)
    f = torch.randn(N, r) if f_rows_out else torch.randn(r, N)
    out = lg.lora_gemm([a], [b], e, f, 0.5, w_rows_out, f_rows_out)
    ref = a.double() @ (b.double().t() if w_rows_out else b.double()) + 0.5 * e.double() @ (
        f.double().t() if f_rows_out else f.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
torch.library.opcheck(lg._lora_gemm_op, ([a], [b], e, f, 0.5, False, False))  # schema, fake, aot dispatch
# a group's input gradient: up to three pairs summed in one launch (K of 72, 40, 24: not multiples of the tile's
# 64), a fourth added by cuBLAS; a pair TMA cannot describe ends the launch's share there
gs, ws = [torch.randn(M, k) for k in (72, 40, 24, 8)], [torch.randn(k, N) for k in (72, 40, 24, 8)]
for pairs in (1, 2, 3, 4):
    ref = 0.5 * e.double() @ f.double() + sum(g.double() @ w.double() for g, w in zip(gs[:pairs], ws[:pairs]))
    out = lg.lora_gemm(gs[:pairs], ws[:pairs], e, f, 0.5, False, False)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
assert lg._in_kernel(gs, ws) == 3 and lg._in_kernel(gs[:2], ws[:2]) == 2
lg.MAX_PAIRS = 1  # one pair a launch, cuBLAS adding the others
assert lg._in_kernel(gs, ws) == 1
torch.testing.assert_close(lg.lora_gemm(gs, ws, e, f, 0.5, False, False).double(), ref, rtol=1e-5, atol=1e-4)
lg.MAX_PAIRS = lg._SLOTS
assert lg._in_kernel([gs[0], torch.randn(M, 41)[:, :40]], ws[:2]) == 1
torch.library.opcheck(lg._lora_gemm_op, (gs, ws, e, f, 0.5, False, False))
# operands the kernel cannot take (rows of 73 floats: not 16-byte aligned; no rows): the op falls back to cuBLAS
b, f = torch.randn(N, K), torch.randn(N, r)
odd = torch.randn(M, K + 1)[:, :K]
assert not lg._kernel_runs([odd], [b], torch.empty(M, N)) and lg._kernel_runs([a], [b], torch.empty(M, N))
ref = odd.double() @ b.double().t() + 0.5 * e.double() @ f.double().t()
torch.testing.assert_close(lg.lora_gemm([odd], [b], e, f, 0.5, True, True).double(), ref, rtol=1e-5, atol=1e-4)
assert lg.lora_gemm([a[:0]], [b], e[:0], f, 0.5, True, True).shape == (0, N)
print("ok")
"""


def test_lora_gemm_matches_cublas_path_in_triton_interpreter():
    _run_in_interpreter(_LORA_GEMM_SCRIPT)
