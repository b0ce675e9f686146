"""benchmarks.fast_path's bound on LoRA / full: the read floor of LoRA's factor products, counted by hand."""
from benchmarks.bench import SHAPES
from benchmarks.fast_path import bound_lines, factor_pass_bytes


def test_factor_pass_bytes_counts_inputs_twice_and_output_gradients_once():
    # 1.1B: inputs q/k/v, o, gate/up 2048 wide and down 5632; outputs q 2048, k/v 256 (4 of 32 heads), o 2048,
    # gate/up 5632, down 2048; 8 × 1024 bf16 tokens, 22 layers
    inputs, outputs = 3 * 2048 + 5632, 2048 + 2 * 256 + 2048 + 2 * 5632 + 2048
    assert factor_pass_bytes(SHAPES["llama-1.1b"]) == 2 * 8192 * (2 * inputs + outputs) * 22


def test_bound_lines_add_the_read_floor_at_the_given_bandwidth():
    rows = [dict(model="m", run="lora", gpu_busy_ms=80.0, step_ms_p50=84.0, matmul_ms=52.0, other_ms=4.0,
                 attention_ms=11.0, compiled_ms=10.0),
            dict(model="m", run="full", gpu_busy_ms=110.0, step_ms_p50=114.0, matmul_ms=69.0)]
    SHAPES["m"] = SHAPES["llama-1.1b"]
    try:
        plain = bound_lines(rows, "m", "lora", "full")
        floored = bound_lines(rows, "m", "lora", "full", bandwidth=3e12)
    finally:
        del SHAPES["m"]
    own = 52.0 - 2 / 3 * 69.0 + 4.0          # LoRA's matmuls over the frozen floor, plus its other kernels
    least = factor_pass_bytes(SHAPES["llama-1.1b"]) / 3e12 * 1e3
    assert len(plain) == 3 and floored[:3] == plain
    assert f"≤ {114.0 / (84.0 - own):.2f}×" in plain[2]
    assert f"≥ {least:.1f} ms" in floored[3] and f"≤ {114.0 / (84.0 - own + least):.2f}×" in floored[3]
