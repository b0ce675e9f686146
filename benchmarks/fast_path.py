"""The trainer's GPU default against what a user writes instead, side by side in one process; the chunked loss's
memory; the memory model at long sequences.

    python -m benchmarks.fast_path --out benchmarks/results/fast_path            # one GPU: speed, memory, estimate
    python -m benchmarks.fast_path --parts step_memory --out benchmarks/results/fast_path   # or any of the four
    python -m benchmarks.fast_path --smoke --out /tmp/fp                         # tiny shapes on CPU (the script)

On a copy without the repository's history, set LOWRANK_GIT_COMMIT to the commit the copy was made from.

Parts (each writes `fast_path_{part}_{device}.{json,md}` through benchmarks.harness.record: commit, command,
versions):
- speed: per shape (1.1B b8 × 1024, 7B b2 × 1024), the trainer as users run it with no `trainer.compile` given
  (`python -m experiments.train model=... method=lora method.rank=16 method.targets=all-linear`; again with the
  cuBLAS pair instead of lowrank.adapters.lora_gemm; with one (g, W) pair a launch in a group's input gradient,
  cuBLAS adding the others; at 1.1B also with `trainer.chunked_loss=false`, transformers' loss), the trainer's full
  fine-tuning (bf16 weights and moments; 1.1B only: 7B full fine-tuning does not fit one card), and plain PEFT +
  `torch.compile` (`plain_peft_row`: what a user writes, no part of lowrank in it). Ratios per shape; with
  `--repeats N` every configuration runs N times, interleaved, and each row is its median run. Each trainer run has
  one warm-up step after the step graph's capture profiled (GPU time by kind of kernel,
  `benchmarks.harness.kernel_profile`); from LoRA's and full fine-tuning's, the bound on LoRA / full; from LoRA's
  and the frozen matmuls timed alone with cuBLAS, the bound on LoRA / plain PEFT (at 7B, where no full row runs).
- memory: 7B LoRA r16 at 2 × 4096 tokens, the trainer with `trainer.chunked_loss=false` and with its default,
  20 steps each from the same seed: the peaks and the largest difference of the per-step losses.
- estimate: 7B LoRA r16 at 2 × 8192 tokens with activation checkpointing: `experiments.estimate`'s peak (the
  memory model, `estimate_from_cfg`) against the trainer's measured peak.
- step_memory: one 7B LoRA step outside the trainer, transformers' loss against the chunked one: the step's own
  peak, and the memory held when the forward ends (what the loss adds to the activations).
"""
import argparse
import contextlib
from collections import Counter
import os
import time
from pathlib import Path

import torch

from benchmarks.bench import SHAPES, free  # the bench's Llama shapes (and its CPU smoke shape), one table
from benchmarks.bench_trainer import compose, overrides, run
from benchmarks.harness.kernel_profile import kernel_time
from benchmarks.harness.record import collect_metadata, device_name, median_run, result_name, write_result
from benchmarks.probes.common import time_us
from lowrank.adapters import lora_gemm
from lowrank.train.memory import estimate_from_cfg
from lowrank.train.perf import sync
from lowrank.train.step import TrainStep, model_loss


def default_args(key: str, shape: dict, method: str, warmup: int, steps: int, runs_root, extra=()) -> list[str]:
    """The bench's run with the trainer's defaults for the fast path: no trainer.compile given."""
    args = overrides(key, shape, method, 16 if method == "lora" else None, warmup, steps, runs_root, extra)
    if any(e.startswith("trainer.compile=") for e in extra):
        return args
    return [a for a in args if not a.startswith("trainer.compile=")]


PROFILED_STEP = 6  # a warm-up step after the step graph's capture (its 4th call): the timed steps stay unprofiled
KINDS = ("matmul", "attention", "compiled", "other", "loss", "optimizer", "copy", "elementwise", "reduction")


def trainer_row(key, shape, method, warmup, steps, runs_root, device, extra=(), label="") -> dict:
    """One trainer run's row; on CUDA, with the kernel time by kind of one warm-up step (warmup > PROFILED_STEP)."""
    prof = {}
    with profiled_launches(PROFILED_STEP if warmup > PROFILED_STEP else None, device, prof):
        metrics, losses = run(default_args(key, shape, method, warmup, steps, runs_root, extra))
    kinds = {k: 1e3 * v for k, v in (prof.get("kinds") or {}).items()}
    return dict(model=key, run=f"trainer, {'LoRA r16 all-linear' if method == 'lora' else 'full fine-tuning'}{label}",
                tokens_per_second=metrics["tokens_per_second"], peak_gib=metrics["peak_memory_bytes"] / 2**30,
                mfu=metrics["mfu"], compile=metrics.get("compile"), chunked_loss=metrics.get("chunked_loss"),
                cuda_graph=metrics["cuda_graph"], final_loss=losses[-1] if losses else None,
                step_ms_p50=1e3 * metrics["step_seconds_p50"],
                gpu_busy_ms=1e3 * prof["busy_s"] if prof.get("busy_s") else None,
                **{f"{k}_ms": kinds.get(k, 0.0) for k in KINDS}, top_kernels=prof.get("top"))


def plain_peft_row(key: str, shape: dict, warmup: int, steps: int, device: torch.device) -> dict:
    """What a user writes: the HF model in bf16, PEFT LoRA r16 alpha 32 on every linear projection,
    torch.compile(model), autocast bf16, fused AdamW, the loss from model(input_ids=x, labels=x)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**{k: v for k, v in shape.items() if k not in ("batch", "seq")},
                         max_position_embeddings=max(2048, shape["seq"]), use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    model = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    data = torch.randint(0, min(1000, shape["vocab_size"]), (warmup + steps, shape["batch"], shape["seq"]),
                         device=device)
    reset_peak(device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=data[i], labels=data[i]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    seconds = time.perf_counter() - t0
    row = dict(model=key, run="plain PEFT + torch.compile", tokens_per_second=steps * data[0].numel() / seconds,
               peak_gib=peak_bytes(device) / 2**30, mfu=None, compile=True, chunked_loss=False, cuda_graph=False,
               final_loss=float(loss.detach()))
    del model, optimizer, params, data, loss
    free(device)
    return row


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def guarded(rows: list, make, label: str) -> None:
    """A row, or the row's error: one failing configuration does not cost the others."""
    try:
        rows.append(make())
    except Exception as e:  # noqa: BLE001 — recorded in the result and printed
        rows.append(dict(run=label, error=f"{type(e).__name__}: {str(e)[:300]}"))
        print(f"FAILED {label}: {type(e).__name__}: {e}", flush=True)


def row_of(rows, model: str, run: str) -> dict | None:
    return next((r for r in rows if r.get("model") == model and r.get("run") == run), None)


def ratio(rows, model, num, den, key="tokens_per_second"):
    a, b = row_of(rows, model, num), row_of(rows, model, den)
    return a[key] / b[key] if a and b and key in a and b.get(key) else None


def speed_pass(key: str, warmup: int, steps: int, runs_root, device) -> list[dict]:
    """One row per configuration of model `key`, always in the same order (a row or its error)."""
    shape, rows = SHAPES[key], []
    guarded(rows, lambda: trainer_row(key, shape, "lora", warmup, steps, runs_root, device), f"{key} trainer lora")
    free(device)
    with cublas_pair():  # the same run with the rank-r products written whole and added by cuBLAS
        guarded(rows, lambda: trainer_row(key, shape, "lora", warmup, steps, runs_root, device, (),
                                          ", cuBLAS pair"), f"{key} trainer lora, cuBLAS pair")
    free(device)
    with one_pair_a_launch():  # a group's input gradient: the kernel for one member, cuBLAS adding the others
        guarded(rows, lambda: trainer_row(key, shape, "lora", warmup, steps, runs_root, device, (),
                                          ", one pair a launch"), f"{key} trainer lora, one pair a launch")
    free(device)
    if key != "llama-7b":
        # the same LoRA run with transformers' loss: what the chunked loss costs or saves in speed
        guarded(rows, lambda: trainer_row(key, shape, "lora", warmup, steps, runs_root, device,
                                          ["trainer.chunked_loss=false"], ", chunked_loss=false"),
                f"{key} trainer lora, plain loss")
        free(device)
        cpu = ["trainer.precision=bf16"] if device.type == "cpu" else []  # the CPU smoke run: bf16 weights need it
        guarded(rows, lambda: trainer_row(key, shape, "full", warmup, steps, runs_root, device, cpu),
                f"{key} trainer full")
        free(device)
    guarded(rows, lambda: plain_peft_row(key, shape, warmup, steps, device), f"{key} plain peft")
    return rows


def median_row(same: list[dict]) -> dict:
    """Of one configuration's repeats, the run with the median tokens/s (every run's under tokens_per_second_runs);
    its error where every repeat failed."""
    ok = [r for r in same if "error" not in r]
    return median_run(ok) if ok else same[0]


def speed(models, warmup, steps, runs_root, device, repeats: int = 1) -> tuple[list[dict], list[str]]:
    rows, lines = [], []
    bandwidth = read_bandwidth(device)
    for key in models:
        # repeats interleaved (every configuration once, then again): drift of the GPU or host hits all alike
        passes = [speed_pass(key, warmup, steps, runs_root, device) for _ in range(repeats)]
        rows += [median_row(list(same)) for same in zip(*passes)]
        lora, full, peft = "trainer, LoRA r16 all-linear", "trainer, full fine-tuning", "plain PEFT + torch.compile"
        for name, value in (("LoRA / full fine-tuning", ratio(rows, key, lora, full)),
                            ("LoRA / plain PEFT + compile", ratio(rows, key, lora, peft)),
                            ("LoRA, chunked loss / transformers' loss",
                             ratio(rows, key, lora, lora + ", chunked_loss=false")),
                            ("LoRA, GEMM from the LoRA product / cuBLAS pair",
                             ratio(rows, key, lora, lora + ", cuBLAS pair")),
                            ("LoRA, a group's input gradient in one launch / one pair a launch",
                             ratio(rows, key, lora, lora + ", one pair a launch"))):
            if value is not None:
                lines.append(f"- {key}: trainer {name}: {value:.2f}×")
        lines += bound_lines(rows, key, lora, full, bandwidth)
        lines += peft_bound_line(rows, key, lora, peft, frozen_gemm_ms(SHAPES[key], device))
    tops = [f"Top kernels, {r['model']}, {r['run']} (one step):\n\n```\n{r.pop('top_kernels')}\n```"
            for r in rows if r.get("top_kernels")]
    for r in rows:
        r.pop("top_kernels", None)
    return rows, lines + tops


@contextlib.contextmanager
def cublas_pair():
    """Within it, LoRA layers write their rank-r products whole and cuBLAS adds them (lora_gemm off)."""
    saved, lora_gemm.ENABLED = lora_gemm.ENABLED, False
    try:
        yield
    finally:
        lora_gemm.ENABLED = saved


@contextlib.contextmanager
def one_pair_a_launch():
    """Within it, a group's input gradient runs the kernel for its widest member and cuBLAS adds the others."""
    saved, lora_gemm.MAX_PAIRS = lora_gemm.MAX_PAIRS, 1
    try:
        yield
    finally:
        lora_gemm.MAX_PAIRS = saved


def layer_projections(shape: dict) -> list[tuple[str, int, int]]:
    """A Llama layer's linear projections: (the input they read, in features, out features) for q, k, v, o, gate,
    up, down. q/k/v read one input, gate/up another."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [("attention in", h, h), ("attention in", h, kv), ("attention in", h, kv), ("attention out", h, h),
            ("mlp in", h, i), ("mlp in", h, i), ("mlp hidden", i, h)]


def factor_pass_bytes(shape: dict) -> int:
    """Bytes that LoRA r16 on every linear projection of a Llama reads a step in its factor products, when each
    product is a pass of its own (not folded into a frozen GEMM): every adapted input twice (h = x Aᵀ forward, A's
    gradient Tᵀ x backward; q/k/v and gate/up share theirs) and every output gradient once (t = s g B and B's
    gradient in one kernel). The factors, h and t are a few MB and left out."""
    projections = layer_projections(shape)
    inputs = sum(dict((name, n_in) for name, n_in, _ in projections).values())   # each shared input once
    outputs = sum(n_out for _, _, n_out in projections)
    return 2 * shape["batch"] * shape["seq"] * (2 * inputs + outputs) * shape["num_hidden_layers"]  # bf16


def read_bandwidth(device) -> float | None:
    """Bytes a second this GPU reads in one streaming pass: a bf16 sum over 2 GiB, the mean of 10 (CUDA events)."""
    if device.type != "cuda":
        return None
    x = torch.randn(2**30, device=device, dtype=torch.bfloat16)
    seconds = time_us(lambda _: x.sum(dtype=torch.float32), reps=10, warmup=1) / 1e6
    x = None  # the 2 GiB go back before the runs
    free(device)
    return 2 * 2**30 / seconds


def frozen_gemm_shapes(shape: dict) -> dict[tuple[int, int], int]:
    """{(in, out) features: how many} of a Llama's frozen projections: every layer's (`layer_projections`) and
    lm_head once."""
    counts = Counter()
    for _, n_in, n_out in layer_projections(shape):
        counts[(n_in, n_out)] += shape["num_hidden_layers"]
    counts[(shape["hidden_size"], shape["vocab_size"])] += 1
    return dict(counts)


def frozen_gemm_ms(shape: dict, device, timer=time_us) -> float | None:
    """Milliseconds of a step's frozen matmuls, each timed alone with cuBLAS in bf16: the forward x Wᵀ and the input
    gradient g W of every projection (`frozen_gemm_shapes`). LoRA needs these and no fewer; full fine-tuning adds
    each weight's gradient. Without a full fine-tuning row (7B does not fit one card), this is LoRA's frozen floor.
    None off CUDA."""
    if device.type != "cuda":
        return None
    tokens = shape["batch"] * shape["seq"]

    def pair_us(n_in: int, n_out: int) -> float:
        w = torch.randn(n_out, n_in, device=device, dtype=torch.bfloat16)
        xs = [torch.randn(tokens, n_in, device=device, dtype=torch.bfloat16) for _ in range(4)]  # time_us rotates
        gs = [torch.randn(tokens, n_out, device=device, dtype=torch.bfloat16) for _ in range(4)]
        return timer(lambda j: xs[j] @ w.T, reps=20, warmup=3) + timer(lambda j: gs[j] @ w, reps=20, warmup=3)
    total_us = sum(count * pair_us(*features) for features, count in frozen_gemm_shapes(shape).items())
    free(device)
    return total_us / 1e3


def lora_floor_ms(lora: dict, frozen_ms: float) -> tuple[float, float]:
    """(LoRA's own kernels, its step without them) in ms, from its profiled row and the frozen matmuls' time: its
    matmuls beyond the frozen ones plus the kernels no kind claims ('other'), and its p50 step less those."""
    own = lora["matmul_ms"] - frozen_ms + lora["other_ms"]
    return own, lora["step_ms_p50"] - own


def peft_bound_line(rows, key, lora_run, peft_run, frozen_ms: float | None) -> list[str]:
    """What bounds LoRA / plain PEFT: the ratio LoRA would reach with its own kernels free, its frozen matmuls at
    `frozen_ms` (cuBLAS alone) and the rest of its step (attention, compiled elementwise work, optimizer) as
    profiled."""
    lora, peft = row_of(rows, key, lora_run), row_of(rows, key, peft_run)
    if not (frozen_ms and lora and peft and lora.get("gpu_busy_ms") and peft.get("tokens_per_second")):
        return []
    shape = SHAPES[key]
    peft_ms = 1e3 * shape["batch"] * shape["seq"] / peft["tokens_per_second"]
    own, floor = lora_floor_ms(lora, frozen_ms)
    return [f"- {key}: the frozen matmuls alone (cuBLAS, one by one) take {frozen_ms:.1f} ms against LoRA's matmuls "
            f"{lora['matmul_ms']:.1f} ms: LoRA's own kernels (factor matmuls, 'other') ≈ {own:.1f} ms; with those at "
            f"zero, LoRA's step would take {floor:.1f} ms against PEFT's {peft_ms:.1f} ms: LoRA / plain PEFT + "
            f"compile ≤ {peft_ms / floor:.2f}×"]


def bound_lines(rows, key, lora_run, full_run, bandwidth: float | None = None) -> list[str]:
    """What bounds LoRA / full: the ratio LoRA would reach if every kernel of its own (its factor products and
    factor-gradient kernels) cost nothing. LoRA's floor is then the frozen matmuls (two thirds of full fine-tuning's:
    forward and input gradient, no weight gradient) plus its attention, compiled elementwise work, loss and optimizer
    as profiled. With `bandwidth` (bytes/s), also the bound with the factor products as passes of their own, which
    cannot take less than their reads (`factor_pass_bytes`) at that bandwidth."""
    lora, full = row_of(rows, key, lora_run), row_of(rows, key, full_run)
    if not (lora and full and lora.get("gpu_busy_ms") and full.get("gpu_busy_ms")):
        return []
    floor_matmul = 2 / 3 * full["matmul_ms"]
    own, floor = lora_floor_ms(lora, floor_matmul)
    lines = [f"- {key}: step time (p50) LoRA {lora['step_ms_p50']:.1f} ms, full {full['step_ms_p50']:.1f} ms; GPU "
             f"busy (one profiled step) LoRA {lora['gpu_busy_ms']:.1f} ms, full {full['gpu_busy_ms']:.1f} ms",
             f"- {key}: LoRA's matmuls {lora['matmul_ms']:.1f} ms against the frozen floor {floor_matmul:.1f} ms "
             f"(2/3 of full's {full['matmul_ms']:.1f}); LoRA's own kernels (factor matmuls, 'other') ≈ {own:.1f} ms",
             f"- {key}: with those at zero, LoRA's step would take {floor:.1f} ms: LoRA / full ≤ "
             f"{full['step_ms_p50'] / floor:.2f}× (attention {lora['attention_ms']:.1f} ms and compiled elementwise "
             f"work {lora['compiled_ms']:.1f} ms are full fine-tuning's too)"]
    if bandwidth:
        read = factor_pass_bytes(SHAPES[key])
        least = read / bandwidth * 1e3
        lines.append(f"- {key}: as passes of their own, LoRA's factor products read {read / 1e9:.1f} GB a step (each "
                     f"adapted input twice, each output gradient once); at the {bandwidth / 1e12:.2f} TB/s this GPU "
                     f"reads (a bf16 sum over 2 GiB) that is ≥ {least:.1f} ms: LoRA / full ≤ "
                     f"{full['step_ms_p50'] / (floor + least):.2f}× (now {own:.1f} ms)")
    return lines


def memory(runs_root, device, steps: int = 20, seq: int = 4096, checkpointing: bool = False,
           repeat: bool = False, lr: float = 1e-3) -> tuple[list[dict], list[str]]:
    shape = dict(SHAPES["llama-7b"] if device.type == "cuda" else SHAPES["tiny"], seq=seq if device.type == "cuda"
                 else 64)
    key = "llama-7b" if device.type == "cuda" else "tiny"
    rows, curves = [], {}
    settings = ["false", "auto" if device.type == "cuda" else "true"] + (["false"] if repeat else [])  # auto: CPU off
    for i, setting in enumerate(settings):
        metrics, losses = run(default_args(key, shape, "lora", 0, steps, runs_root,
                                           [f"trainer.chunked_loss={setting}", f"trainer.lr={lr}",
                                            "trainer.timing_warmup_steps=0",
                                            f"trainer.activation_checkpointing={str(checkpointing).lower()}"]))
        curves[setting if i < 2 else "false, again"] = losses
        rows.append(dict(model=key, run=f"trainer, LoRA r16, chunked_loss={setting}", batch=shape["batch"],
                         seq_len=shape["seq"], chunked_loss=metrics.get("chunked_loss"),
                         peak_gib=metrics["peak_memory_bytes"] / 2**30,
                         estimate_gib=metrics["memory_estimate"]["total_bytes"] / 2**30
                         if metrics.get("memory_estimate") else None,
                         tokens_per_second=metrics["tokens_per_second"], final_loss=losses[-1]))
        free(device)
    chunked = curves[next(k for k in curves if k != "false")]
    diff = max(abs(a - b) for a, b in zip(curves["false"], chunked))
    fall = 1 - rows[1]["peak_gib"] / rows[0]["peak_gib"]
    lines = [f"- activation checkpointing {'on' if checkpointing else 'off'}, lr {lr:g}: peak memory falls by "
             f"{100 * fall:.1f} % with the chunked loss; max |Δloss| over {steps} steps {diff:.2e}",
             f"- losses (plain): {curves['false']}", f"- losses (chunked): {chunked}"]
    if repeat:  # run-to-run spread of the plain path itself: what a loss difference is measured against
        again = max(abs(a - b) for a, b in zip(curves["false"], curves["false, again"]))
        lines.insert(1, f"- the plain path run twice: max |Δloss| {again:.2e}")
    return rows, lines


def estimate(runs_root, device, seq: int = 8192) -> tuple[list[dict], list[str]]:
    key = "llama-7b" if device.type == "cuda" else "tiny"
    shape = dict(SHAPES[key], seq=seq if device.type == "cuda" else 64)
    args = default_args(key, shape, "lora", 2, 3, runs_root, ["trainer.activation_checkpointing=true"])
    est = estimate_from_cfg(compose(args), device_type=device.type, padded=False)
    metrics, _ = run(args)
    measured = metrics["peak_memory_bytes"]
    row = dict(model=key, run="trainer, LoRA r16, activation checkpointing", batch=shape["batch"],
               seq_len=shape["seq"], chunked_loss=metrics.get("chunked_loss"), estimate_gib=est.total_bytes / 2**30,
               peak_gib=measured / 2**30, estimate_over_measured=est.total_bytes / measured if measured else None)
    free(device)
    return [row], [f"- estimate / measured: {row['estimate_over_measured']:.3f}" if measured else "- (no GPU peak)"]


@contextlib.contextmanager
def profiled_launches(at: int | None, device, out: dict):
    """Within it, the trainer's `at`-th step (TrainStep.launch) runs under the profiler, its kernel time by kind going
    to `out`; the other steps, and every step off CUDA or with `at` None, run as they are. The loop is the trainer's."""
    original, calls = TrainStep.launch, [0]

    def launch(self, micro_batches):
        calls[0] += 1
        if calls[0] != at or device.type != "cuda":
            return original(self, micro_batches)
        sync(device)  # the step before is finished: its kernels stay out of this profile
        handle = []
        out["busy_s"], out["kinds"], out["top"] = kernel_time(lambda: handle.append(original(self, micro_batches)),
                                                              device, top=20)
        return handle[0]

    TrainStep.launch = launch
    try:
        yield
    finally:
        TrainStep.launch = original


STEP_MEMORY_CASES = ((4096, False), (4096, True), (8192, True))  # (tokens a sequence, activation checkpointing)


def step_memory(device, cases=STEP_MEMORY_CASES) -> tuple[list[dict], list[str]]:
    """One LoRA step of the 7B shape in isolation (eager blocks, bf16 base, no trainer): the peak above what was held
    before the step, with transformers' loss and with the chunked one, for each (sequence length, checkpointing) of
    `cases`. What the trainer's whole-run peak cannot show when something else sets it."""
    from benchmarks.bench import add_lora, build
    from lowrank.adapters.targets import ALL_LINEAR
    from lowrank.train.lm_loss import chunked_lm_loss
    key = "llama-7b" if device.type == "cuda" else "tiny"
    rows = []
    model = add_lora(build(dict(SHAPES[key], seq=max(s for s, _ in cases)), device, torch.bfloat16, 0), "ours", 16,
                     ALL_LINEAR)
    for seq, checkpointing in cases:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        x = torch.randint(0, min(1000, SHAPES[key]["vocab_size"]),
                          (SHAPES[key]["batch"], seq if device.type == "cuda" else 32), device=device)
        for name, loss_fn in (("transformers", model_loss), ("chunked", chunked_lm_loss)):
            for _ in range(2):  # the second step is measured
                sync(device)
                held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                reset_peak(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = loss_fn(model, input_ids=x, labels=x)
                sync(device)
                forward_peak = peak_bytes(device) - held
                after_forward = (torch.cuda.memory_allocated(device) if device.type == "cuda" else 0) - held
                loss.backward()
                model.zero_grad(set_to_none=True)
                sync(device)
                peak, value = peak_bytes(device) - held, float(loss.detach())
            rows.append(dict(model=key, run=f"one step, {name} loss", seq_len=x.shape[1], batch=x.shape[0],
                             activation_checkpointing=checkpointing, step_peak_gib=peak / 2**30,
                             forward_peak_gib=forward_peak / 2**30, after_forward_gib=after_forward / 2**30,
                             loss=value))
        if checkpointing:
            model.gradient_checkpointing_disable()
    lines = []
    for a, b in zip(rows[::2], rows[1::2]):
        ckpt = "on" if a["activation_checkpointing"] else "off"
        lines.append(f"- {a['seq_len']} tokens a sequence, checkpointing {ckpt}:"
                     f" step peak {a['step_peak_gib']:.2f} → {b['step_peak_gib']:.2f} GiB above the held memory "
                     f"(at the forward's end {a['after_forward_gib']:.2f} → {b['after_forward_gib']:.2f}) "
                     f"({100 * (1 - b['step_peak_gib'] / max(a['step_peak_gib'], 1e-9)):.1f} % less), |Δloss| "
                     f"{abs(a['loss'] - b['loss']):.1e}")
    del model
    free(device)
    return rows, lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--parts", nargs="+", default=["speed", "memory", "estimate"],
                    choices=["speed", "memory", "estimate", "step_memory"])
    ap.add_argument("--models", nargs="+", default=["llama-1.1b", "llama-7b"], choices=list(SHAPES))
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs-root", default="/tmp/fast_path_runs")
    ap.add_argument("--tag", default="", help="appended to the result files' names")
    ap.add_argument("--repeats", type=int, default=1,
                    help="speed part: every configuration this many times, interleaved; each row is its median run")
    ap.add_argument("--memory-seq", type=int, default=4096, help="memory part: tokens a sequence (batch 2)")
    ap.add_argument("--memory-checkpointing", action="store_true", help="memory part: activation checkpointing on")
    ap.add_argument("--memory-lr", type=float, default=1e-3, help="memory part: the learning rate (LoRA's default)")
    ap.add_argument("--memory-repeat", action="store_true", help="memory part: the plain loss twice (its own spread)")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms for every run (loss curves then differ by the loss alone)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, not speed")
    opts = ap.parse_args(argv)
    if opts.deterministic:  # before cuBLAS starts: its deterministic mode needs a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    device = torch.device("cuda" if torch.cuda.is_available() and not opts.smoke else "cpu")
    models = ["tiny"] if opts.smoke else opts.models
    meta = collect_metadata(device)
    Path(opts.runs_root).mkdir(parents=True, exist_ok=True)
    for part in opts.parts:
        t0 = time.perf_counter()
        if part == "speed":
            rows, lines = speed(models, 2 if opts.smoke else opts.warmup, 3 if opts.smoke else opts.steps,
                                opts.runs_root, device, opts.repeats)
        elif part == "memory":
            rows, lines = memory(opts.runs_root, device, steps=3 if opts.smoke else 20, seq=opts.memory_seq,
                                 checkpointing=opts.memory_checkpointing, repeat=opts.memory_repeat,
                                 lr=opts.memory_lr)
        elif part == "step_memory":
            rows, lines = step_memory(device)
        else:
            rows, lines = estimate(opts.runs_root, device)
        name = result_name(f"fast_path_{part}", device) + (f"_{opts.tag}" if opts.tag else "")
        write_result(opts.out, name, rows, dict(device=device_name(device), part=part,
                                                deterministic=opts.deterministic), meta=meta,
                     title=f"fast path: {part}", description=__doc__.split("\n\n")[0],
                     sections=["\n".join(lines)])
        print(f"== {part} ({time.perf_counter() - t0:.0f} s) -> {opts.out}/{name}.md", flush=True)
        for r in rows:
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                                   if k not in ("model",)), flush=True)
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
