"""benchmarks.fast_path's bounds: on LoRA / full, the read floor of LoRA's factor products, counted by hand; on
LoRA / plain PEFT, the frozen matmuls a step needs, counted by hand and timed through a stub."""
import pytest
import torch

from benchmarks.bench import SHAPES
from benchmarks.fast_path import bound_lines, factor_pass_bytes, frozen_gemm_ms, frozen_gemm_shapes, peft_bound_line


def test_factor_pass_bytes_counts_inputs_twice_and_output_gradients_once():
    # 1.1B: inputs q/k/v, o, gate/up 2048 wide and down 5632; outputs q 2048, k/v 256 (4 of 32 heads), o 2048,
    # gate/up 5632, down 2048; 8 × 1024 bf16 tokens, 22 layers
    inputs, outputs = 3 * 2048 + 5632, 2048 + 2 * 256 + 2048 + 2 * 5632 + 2048
    assert factor_pass_bytes(SHAPES["llama-1.1b"]) == 2 * 8192 * (2 * inputs + outputs) * 22


def test_bound_lines_add_the_read_floor_at_the_given_bandwidth():
    key = "llama-1.1b"
    rows = [dict(model=key, run="lora", gpu_busy_ms=80.0, step_ms_p50=84.0, matmul_ms=52.0, other_ms=4.0,
                 attention_ms=11.0, compiled_ms=10.0),
            dict(model=key, run="full", gpu_busy_ms=110.0, step_ms_p50=114.0, matmul_ms=69.0)]
    plain = bound_lines(rows, key, "lora", "full")
    floored = bound_lines(rows, key, "lora", "full", bandwidth=3e12)
    own = 52.0 - 2 / 3 * 69.0 + 4.0          # LoRA's matmuls over the frozen floor, plus its other kernels
    least = factor_pass_bytes(SHAPES[key]) / 3e12 * 1e3
    assert len(plain) == 3 and floored[:3] == plain
    assert f"≤ {114.0 / (84.0 - own):.2f}×" in plain[2]
    assert f"≥ {least:.1f} ms" in floored[3] and f"≤ {114.0 / (84.0 - own + least):.2f}×" in floored[3]


def test_repeats_run_every_configuration_in_turn_and_report_each_ones_median_run(monkeypatch):
    import benchmarks.fast_path as fp
    lora, full = "trainer, LoRA r16 all-linear", "trainer, full fine-tuning"
    speeds = iter([(100.0, 70.0), (90.0, 75.0), (110.0, 60.0)])  # (LoRA, full) tokens/s of each pass
    calls = []

    def one_pass(key, *args):
        lo, fu = next(speeds)
        calls.append(key)
        return [dict(model=key, run=lora, tokens_per_second=lo), dict(model=key, run=full, tokens_per_second=fu),
                dict(run=f"{key} plain peft", error="RuntimeError: out of memory")]

    monkeypatch.setattr(fp, "speed_pass", one_pass)
    monkeypatch.setattr(fp, "read_bandwidth", lambda device: None)
    monkeypatch.setattr(fp, "frozen_gemm_ms", lambda shape, device: None)
    rows, lines = fp.speed(["llama-1.1b"], 2, 3, "/unused", None, repeats=3)
    assert calls == ["llama-1.1b"] * 3 and len(rows) == 3
    assert rows[0]["tokens_per_second"] == 100.0 and rows[0]["tokens_per_second_runs"] == [100.0, 90.0, 110.0]
    assert rows[1]["tokens_per_second"] == 70.0                  # the median run, not a mean (68.3)
    assert rows[2]["error"].startswith("RuntimeError")           # failed every time: its error stays
    assert "- llama-1.1b: trainer LoRA / full fine-tuning: 1.43×" in lines     # 100 / 70, the medians


def test_a_configuration_that_failed_once_reports_its_runs_that_did_not():
    from benchmarks.fast_path import median_row
    same = [dict(run="x", error="RuntimeError"), dict(run="r", tokens_per_second=5.0),
            dict(run="r", tokens_per_second=3.0)]
    assert median_row(same) == dict(run="r", tokens_per_second=3.0, tokens_per_second_runs=[5.0, 3.0])


def test_frozen_gemm_shapes_count_every_projection_of_every_layer_and_lm_head():
    # 7B: 32 layers, k and v as wide as q (32 of 32 heads); 1.1B: k and v 256 wide (4 of 32 heads)
    assert frozen_gemm_shapes(SHAPES["llama-7b"]) == {(4096, 4096): 4 * 32, (4096, 11008): 2 * 32,
                                                      (11008, 4096): 32, (4096, 32000): 1}
    assert frozen_gemm_shapes(SHAPES["llama-1.1b"]) == {(2048, 2048): 2 * 22, (2048, 256): 2 * 22,
                                                        (2048, 5632): 2 * 22, (5632, 2048): 22, (2048, 32000): 1}


def test_frozen_gemm_ms_times_the_forward_and_the_input_gradient_of_each_shape(monkeypatch):
    """On CPU tensors through a stub timer: each call's product has the shape of x Wᵀ or g W; time = output size."""
    import benchmarks.fast_path as fp
    monkeypatch.setattr(fp, "free", lambda device: None)
    shape = dict(SHAPES["tiny"])
    seen = []

    def timer(fn, reps, warmup):
        out = fn(1)
        seen.append(tuple(out.shape))
        return float(out.numel())               # µs
    fake = type("D", (), {"type": "cuda"})()    # the CUDA branch, with tensors made on the CPU
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *size, device=None, dtype=None: randn(*size, dtype=dtype))
    got = frozen_gemm_ms(shape, fake, timer=timer)
    tokens = shape["batch"] * shape["seq"]
    want = sum(n * tokens * (n_out + n_in) for (n_in, n_out), n in frozen_gemm_shapes(shape).items()) / 1e3
    assert got == pytest.approx(want)
    assert sorted(seen) == sorted(s for (n_in, n_out) in frozen_gemm_shapes(shape)
                                  for s in ((tokens, n_out), (tokens, n_in)))
    assert frozen_gemm_ms(shape, torch.device("cpu")) is None


def test_peft_bound_takes_lora_s_own_kernels_out_of_its_step():
    key = "llama-7b"
    tokens = SHAPES[key]["batch"] * SHAPES[key]["seq"]
    rows = [dict(model=key, run="lora", gpu_busy_ms=104.0, step_ms_p50=108.0, matmul_ms=87.0, other_ms=0.3),
            dict(model=key, run="peft", tokens_per_second=tokens / 0.130)]   # a 130 ms step
    (line,) = peft_bound_line(rows, key, "lora", "peft", frozen_ms=78.0)
    own = 87.0 - 78.0 + 0.3
    assert f"≈ {own:.1f} ms" in line and f"take {108.0 - own:.1f} ms against PEFT's 130.0 ms" in line
    assert f"≤ {130.0 / (108.0 - own):.2f}×" in line
    assert peft_bound_line(rows, key, "lora", "peft", frozen_ms=None) == []
    assert peft_bound_line(rows[:1], key, "lora", "peft", frozen_ms=78.0) == []
