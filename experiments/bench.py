"""Training throughput: full fine-tuning vs our LoRA vs PEFT's LoRA on Llama-shaped models, side by side.

    python -m experiments.bench --out benchmarks/results              # on one GPU: the whole measurement
    python -m experiments.bench --smoke --out /tmp/bench               # tiny shapes on CPU, in seconds

For each model shape (random init, built from its config directly on the GPU in bf16, SDPA attention with
its causal flag and no mask built (`lowrank.blocks.causal_attention_without_mask`; --hf-mask: transformers'
mask building, which syncs the host with the GPU every step), random tokens): full fine-tuning (all weights
bf16, fused AdamW with bf16 states), and LoRA r=16 on all linear layers and r=8 on q,v, with PEFT (fp32
factors under bf16 autocast, its default) and with ours (`lowrank.lora`: bf16 factors, the fused
`lowrank.lora_fast` function, FlatMasterAdamW's fp32 masters: the same numerics). Variants that isolate where the speed comes from: ours-fp32, ours-unfused, ours-plain,
ours-single, ours-cublas.
Every config runs in each block mode of --modes (`lowrank.blocks`: eager, CUDA graphs, compiled, compiled
and graphed; and compiled blocks in one CUDA graph of the whole step), for every method alike. Each config:
warm-up steps, then timed steps between CUDA syncs; peak memory is max_memory_allocated since the config's
model was built, less what earlier configs left allocated (`memory_held_before_bytes`); GPU busy is the
kernel time of one profiled step (by kind of kernel; --profile also writes the top kernels to
profile_{device}.txt). MFU counts
6N FLOPs per token for trained matmul weights, 4N for frozen ones, plus attention
(`lowrank.perf.flops_per_token`). Last, a loss-curve parity check from identical weights and identical A, 20
steps: ours eager, ours compiled and graphed, ours in the step graph, PEFT. Writes `lora_vs_peft_{device}.json`
(one row per config), `.md` and `_run.json` (the run's settings and parity) under --out; --merge joins such
directories into one table.
"""
import argparse
import copy
import json
import platform
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.blocks import causal_attention_without_mask, compile_blocks, graph_blocks
from lowrank.lora import LoRALinear, freeze_for_lora, inject_lora, lora_layers
from lowrank import lora_fast
from lowrank.atomic import write_text
from lowrank.budget import free_cuda_memory
from lowrank.lora_fast import FlatMasterAdamW
from lowrank.perf import flops_per_token, peak_flops, peak_memory_bytes, sync

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QV = ["q_proj", "v_proj"]
# Llama shapes: TinyLlama-1.1B and Llama-2-7B; "tiny" is the CPU smoke test.
SHAPES = {
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, batch=8, seq=1024),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, batch=2, seq=1024),
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, batch=2, seq=32),
}
# (method, impl, rank, targets): one row each per shape
# ours: bf16 factors + fp32 flat master AdamW + fused function; ours-fp32: fp32 factors under autocast +
# fused function (PEFT's parameter handling); ours-unfused: fp32 factors + LoRALinear's plain forward;
# ours-single: ours without shared-input groups (each of q, k, v, gate, up on its own); ours-cublas: ours with
# both factor products of the output gradient from cuBLAS (lowrank.lora_fast.FUSED_FACTOR_GRADS off).
CONFIGS = [("full", "torch", None, None),
           ("lora", "ours", 16, ALL_LINEAR), ("lora", "peft", 16, ALL_LINEAR), ("lora", "ours-fp32", 16, ALL_LINEAR),
           ("lora", "ours-unfused", 16, ALL_LINEAR), ("lora", "ours-plain", 16, ALL_LINEAR),
           ("lora", "ours-single", 16, ALL_LINEAR), ("lora", "ours-cublas", 16, ALL_LINEAR),
           ("lora", "ours", 8, QV), ("lora", "peft", 8, QV)]
# How the decoder blocks run (lowrank.blocks), for every method alike: eager, one CUDA graph per block for
# forward and one for backward, torch.compile per block, compiled blocks captured in graphs, or compiled blocks
# in one CUDA graph of the whole step (forward, backward and optimizer step: no host work between kernels).
STEP_GRAPH = "compile+step-graph"
MODES = ("eager", "graphs", "compile", "compile+graphs", STEP_GRAPH)
FASTEST = "compile+graphs"  # the fastest per-block mode
FUSED_DEFAULT = lora_fast.FUSED_FACTOR_GRADS  # LOWRANK_FUSED_FACTOR_GRADS=0 turns it off for every config
# which implementations each mode runs: the fp32 / unfused variants answer eager questions; ours-plain
# (bf16 factors, LoRALinear's plain unfused forward) asks whether the fused function still pays once compiled
MODE_IMPLS = {"eager": ("torch", "ours", "peft", "ours-fp32", "ours-unfused"), "graphs": ("torch", "ours", "peft"),
              "compile": ("torch", "ours", "peft", "ours-plain"),
              FASTEST: ("torch", "ours", "peft", "ours-plain", "ours-single"),
              STEP_GRAPH: ("torch", "ours", "peft", "ours-cublas")}


def plain_forward(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear's forward without the fused function: base(x) + scaling · B A x as separate operators."""
    return self.base_layer(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def build(shape: dict, device: torch.device, dtype: torch.dtype, seed: int, hf_mask: bool = False):
    """hf_mask=False: causal attention without transformers' mask building (the batches have no padding), whose
    packed-sequence check syncs the host with the GPU every step (lowrank.blocks.causal_attention_without_mask)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**{k: v for k, v in shape.items() if k not in ("batch", "seq")},
                      max_position_embeddings=max(2048, shape["seq"]), use_cache=False,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    if not hf_mask:
        causal_attention_without_mask(model)
    return model.train()


def add_lora(model: nn.Module, impl: str, rank: int, targets: list[str]) -> nn.Module:
    """LoRA with alpha = 2r, dropout 0, A kaiming-uniform and B = 0. PEFT keeps its factors in fp32 (its
    default); ours, ours-plain, ours-single and ours-cublas keep them in the model's dtype for FlatMasterAdamW (fp32
    masters), ours-fp32 and ours-unfused in fp32."""
    if impl == "peft":
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                target_modules=targets, bias="none"))
    inject_lora(model, targets, rank=rank, alpha=2 * rank)
    for layer in lora_layers(model).values():
        if impl in ("ours-fp32", "ours-unfused"):
            layer.lora_A = nn.Parameter(layer.lora_A.detach().float())
            layer.lora_B = nn.Parameter(layer.lora_B.detach().float())
        if impl in ("ours-unfused", "ours-plain"):
            layer.forward = types.MethodType(plain_forward, layer)
        if impl == "ours-single":
            layer.group = None
    freeze_for_lora(model, head=None)
    return model


def make_step(model, params, device, lr, impl, capturable=False):
    """capturable: the optimizer keeps its step count on the GPU, so that a CUDA graph can capture its step."""
    if impl in ("ours", "ours-plain", "ours-single", "ours-cublas"):
        opt = FlatMasterAdamW(params, lr=lr, capturable=capturable)
        zero = opt.zero_grad
    else:
        opt = torch.optim.AdamW(params, lr=lr, fused=True, capturable=capturable)
        zero = lambda: opt.zero_grad(set_to_none=True)  # noqa: E731
    amp = device.type == "cuda"  # bf16 autocast on GPU; plain fp32 in the CPU smoke test

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        zero()
        return loss.detach()
    return step, opt


def graph_step(step, example: torch.Tensor, warmup: int = 3, after_capture=None):
    """The whole training step (forward, backward, optimizer step) captured as one CUDA graph: the returned
    step copies its batch into the captured input and replays. Warm-up runs first on a side stream, as
    torch.cuda.graph needs: it compiles, and creates the optimizer's state (created inside the capture, the
    moments would restart from zero at every replay). The step ends by setting gradients to None, so backward
    in the capture allocates them in the graph's memory, and each replay writes them afresh. `after_capture()`
    runs once captured (a capture runs no kernels: only the warm-up steps have trained)."""
    static = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step(static)
    if after_capture is not None:
        after_capture()

    def replay(batch):
        static.copy_(batch)
        graph.replay()
        return loss.clone()  # the next replay overwrites the captured loss
    return replay


def free(device):
    torch._dynamo.reset()  # each config compiles on its own: no cached graphs or dynamic-shape recompiles carried over
    free_cuda_memory(device if device.type == "cuda" else None)


def speed_up_blocks(model, mode, shape, device):
    """After the optimizer exists (FlatMasterAdamW moves parameters), before the first step. The step graph is
    captured by `speed_up_step`."""
    if "compile" in mode:
        torch._dynamo.config.recompile_limit = 64  # PEFT's layers recompile per block at the default 8
        compile_blocks(model)
    if mode.endswith("+graphs") or mode == "graphs":
        if device.type != "cuda":
            return  # the CPU smoke test runs the graphed configs eagerly
        graph_blocks(model, shape["batch"], shape["seq"])


def speed_up_step(step, mode, example, device, after_capture=None):
    """The step itself: captured as one CUDA graph in the step-graph mode (on CUDA), else as it is."""
    if mode == STEP_GRAPH and device.type == "cuda":
        return graph_step(step, example, after_capture=after_capture)
    return step


def undo_training(params, opt):
    """For an optimizer that has not stepped yet: a function that puts the parameters back as they are now and
    the optimizer's state to that of a fresh one (zero moments at step 0), in the same tensors (a captured
    graph keeps using them). For a loss curve that must start where the others start."""
    inner = opt.optimizer if isinstance(opt, FlatMasterAdamW) else opt
    if inner.state:
        raise ValueError("undo_training needs an optimizer that has not stepped yet")
    tensors = list(params) + ([opt.master] if isinstance(opt, FlatMasterAdamW) else [])
    saved = [t.detach().clone() for t in tensors]

    @torch.no_grad()
    def undo():
        for t, v in zip(tensors, saved):
            t.copy_(v)
        for state in inner.state.values():  # created by the first step: back to zero moments at step 0
            for v in state.values():
                v.zero_()
    return undo


def measure(name, shape, method, impl, rank, targets, mode, device, dtype, warmup, steps, seed, profile_to=None,
            hf_mask=False):
    free(device)
    lora_fast.FUSED_FACTOR_GRADS = FUSED_DEFAULT and impl != "ours-cublas"
    # what earlier configs left allocated (compile caches, graph pools): not this config's, so not in its peak
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t_build = time.perf_counter()
    model = build(shape, device, dtype, seed, hf_mask)
    if method == "lora":
        model = add_lora(model, impl, rank, targets)
    params = [p for p in model.parameters() if p.requires_grad]
    step, opt = make_step(model, params, device, lr=1e-5 if method == "full" else 1e-4, impl=impl,
                          capturable=mode == STEP_GRAPH)
    speed_up_blocks(model, mode, shape, device)
    g = torch.Generator(device=device).manual_seed(seed)
    batches = [torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), device=device, generator=g)
               for _ in range(4)]
    step = speed_up_step(step, mode, batches[0], device)
    for i in range(warmup):
        step(batches[i % 4])
    sync(device)
    setup_s = time.perf_counter() - t_build  # build, capture or compile, warm-up
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(batches[i % 4])
    sync(device)  # the steps are asynchronous: wait for the GPU before reading the clock
    dt = (time.perf_counter() - t0) / steps
    busy, kinds = gpu_busy(step, batches[0], device, f"{name} {method} {impl} r={rank} {mode}", profile_to)
    tokens = shape["batch"] * shape["seq"]
    fpt = flops_per_token(model, shape["seq"], shape["num_hidden_layers"], shape["hidden_size"])
    peak = peak_flops(device, "bf16")
    row = dict(model=name, method=method, impl=impl, rank=rank, mode=mode,
               targets=None if targets is None else ("all-linear" if targets == ALL_LINEAR else ",".join(targets)),
               tokens_per_second=tokens / dt, peak_memory_bytes=peak_memory_bytes(device) - held,
               memory_held_before_bytes=held,
               mfu=(fpt * tokens / dt / peak) if peak else None, step_time_s=dt,
               batch=shape["batch"], seq_len=shape["seq"], trainable_params=sum(p.numel() for p in params),
               trainable_dtype=str(params[0].dtype).removeprefix("torch."), flops_per_token=fpt,
               final_loss=float(loss), warmup_steps=warmup, timed_steps=steps, gpu_busy_s=busy,
               gpu_busy_by_kind_s=kinds, setup_s=setup_s)
    del model, params, step, opt, batches, loss
    free(device)
    return row


KERNEL_KINDS = [("attention", ("flash", "fmha", "attention", "cudnn")), ("optimizer", ("adam",)),
                ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "splitk")), ("compiled", ("triton",)),
                ("loss", ("softmax", "nll", "cross_entropy")), ("copy", ("copy", "cat", "fill")),
                ("reduction", ("reduce",)), ("elementwise", ("elementwise", "vectorized", "unrolled"))]


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def gpu_busy(step, batch, device, title, profile_to: Path | None):
    """Seconds of kernel time in one step (profiler), in total and by kind of kernel: against the step's wall
    time it says whether the GPU or the CPU launching kernels sets the pace. Optionally appends the top
    kernels to `profile_to`."""
    if device.type != "cuda":
        return None, None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(batch)
        sync(device)
    events = prof.key_averages()
    kinds: dict[str, float] = {}
    for e in events:
        t = getattr(e, "self_device_time_total", 0) * 1e-6
        if t > 0:
            kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + t
    busy = sum(kinds.values())
    if profile_to is not None:
        with open(profile_to, "a") as f:
            f.write(f"\n## {title}: one step, {1e3 * busy:.1f} ms of kernels; by kind (ms): "
                    + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
                    + "\n")
            f.write(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70))
    return busy, kinds


def parity(shape, device, dtype, seed, n_steps=20, rank=16, lr=1e-3, hf_mask=False):
    """Loss curves from identical base weights, identical A (copied into PEFT), B = 0: ours with eager blocks,
    ours with compiled and graphed blocks and in the step graph (on CUDA: the fast paths), and PEFT."""
    free(device)
    lora_fast.FUSED_FACTOR_GRADS = FUSED_DEFAULT
    base = build(shape, device, dtype, seed, hf_mask)
    variants = [("ours", "eager", add_lora(copy.deepcopy(base), "ours", rank, ALL_LINEAR))]  # bf16 factors
    if device.type == "cuda":
        variants += [("ours", mode, add_lora(copy.deepcopy(base), "ours", rank, ALL_LINEAR))
                     for mode in (FASTEST, STEP_GRAPH) if not (hf_mask and mode == STEP_GRAPH)]
    theirs = add_lora(base, "peft", rank, ALL_LINEAR)
    variants.append(("peft", "eager", theirs))
    with torch.no_grad():
        for _, _, ours in variants[:-1]:
            for n, layer in lora_layers(ours).items():
                layer.lora_A.copy_(lora_layers(variants[0][2])[n].lora_A)
        for n, layer in lora_layers(variants[0][2]).items():
            theirs.get_submodule(f"base_model.model.{n}").lora_A["default"].weight.copy_(layer.lora_A.float())
    # learnable data, so the curve moves: tokens from a 1/8 slice of the vocabulary
    g = torch.Generator(device=device).manual_seed(seed + 1)
    batches = [torch.randint(0, shape["vocab_size"] // 8, (shape["batch"], shape["seq"]), device=device, generator=g)
               for _ in range(n_steps)]
    curves = {}
    for impl, mode, model in variants:
        params = [p for p in model.parameters() if p.requires_grad]
        step, opt = make_step(model, params, device, lr, impl, capturable=mode == STEP_GRAPH)
        speed_up_blocks(model, mode, shape, device)
        # the step graph's warm-up steps train: undone once captured, so every curve starts from the same weights
        step = speed_up_step(step, mode, batches[0], device, after_capture=undo_training(params, opt))
        curves[impl if mode == "eager" else f"{impl}-{mode}"] = [float(step(b)) for b in batches]
        del step, opt, params
    del variants, theirs, base, ours
    free(device)

    def max_diff(a, b):
        diff = [abs(x - y) for x, y in zip(curves[a], curves[b])]
        return max(diff), max(d / abs(y) for d, y in zip(diff, curves[b]))
    out = dict(steps=n_steps, rank=rank, lr=lr, **curves)
    out["max_abs_diff"], out["max_rel_diff"] = max_diff("ours", "peft")
    if f"ours-{FASTEST}" in curves:
        out["fastest_max_abs_diff"], _ = max_diff(f"ours-{FASTEST}", "ours")
    if f"ours-{STEP_GRAPH}" in curves:
        out["step_graph_max_abs_diff"], _ = max_diff(f"ours-{STEP_GRAPH}", "ours")
    return out


def ratio_rows(rows):
    """Per model, LoRA config and block mode: ours/PEFT (PEFT as shipped, eager; and PEFT in the same mode),
    ours/full (full fine-tuning in the same mode; and its fastest mode), ours/PEFT peak memory (eager PEFT)."""
    out = []
    by = {(r["model"], r["impl"], r["rank"], r["targets"], r.get("mode", "eager")): r for r in rows}

    def tps(key):
        return by[key]["tokens_per_second"] if key in by else None

    def ratio(a, b):
        return a / b if a is not None and b is not None else None

    for (model, impl, rank, targets, mode), r in by.items():
        if impl != "ours":
            continue
        ours = r["tokens_per_second"]
        fulls = [q["tokens_per_second"] for k, q in by.items() if k[0] == model and k[1] == "torch"]
        peft_eager = by.get((model, "peft", rank, targets, "eager"))
        out.append(dict(model=model, rank=rank, targets=targets, mode=mode, ours_tokens_per_second=ours,
                        ours_over_peft=ratio(ours, tps((model, "peft", rank, targets, "eager"))),
                        ours_over_peft_same_mode=ratio(ours, tps((model, "peft", rank, targets, mode))),
                        ours_over_full=ratio(ours, tps((model, "torch", None, None, mode))),
                        ours_over_fastest_full=ratio(ours, max(fulls) if fulls else None),
                        ours_over_unfused=ratio(ours, tps((model, "ours-unfused", rank, targets, mode))),
                        ours_over_plain=ratio(ours, tps((model, "ours-plain", rank, targets, mode))),
                        ours_over_single=ratio(ours, tps((model, "ours-single", rank, targets, mode))),
                        ours_over_cublas=ratio(ours, tps((model, "ours-cublas", rank, targets, mode))),
                        memory_ours_over_peft=ratio(r["peak_memory_bytes"],
                                                    peft_eager and peft_eager["peak_memory_bytes"]),
                        memory_ours_over_peft_same_mode=ratio(r["peak_memory_bytes"], by.get(
                            (model, "peft", rank, targets, mode), {}).get("peak_memory_bytes"))))
    return out


# issue 6's targets: (model, rank, ratio key, bound, direction); judged on ours in its fastest block mode,
# against PEFT as shipped (eager) and against full fine-tuning in its fastest mode
TARGETS = [("llama-7b", 16, "ours_over_peft", 1.30, ">="), ("llama-7b", 16, "ours_over_fastest_full", 1.35, ">="),
           ("llama-7b", 16, "memory_ours_over_peft", 1.0, "<="), ("llama-1.1b", 16, "ours_over_fastest_full", 1.25, ">="),
           ("llama-1.1b", 8, "ours_over_peft", 1.0, ">="), ("llama-7b", 8, "ours_over_peft", 1.0, ">=")]


def check_targets(ratios):
    out = []
    for model, rank, key, bound, op in TARGETS:
        cands = [q for q in ratios if q["model"] == model and q["rank"] == rank and q[key] is not None]
        if not cands:
            continue
        q = max(cands, key=lambda q: q["ours_tokens_per_second"])  # ours' fastest mode
        ok = q[key] >= bound if op == ">=" else q[key] <= bound
        same = {"ours_over_peft": "ours_over_peft_same_mode",
                "memory_ours_over_peft": "memory_ours_over_peft_same_mode"}.get(key)
        out.append(dict(model=model, rank=rank, mode=q["mode"], what=key, value=q[key], target=f"{op} {bound}",
                        met=ok, same_mode_peft=q[same] if same else None))
    return out


def median_row(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle for an even count), with every run's tokens/s."""
    row = dict(sorted(runs, key=lambda r: r["tokens_per_second"])[(len(runs) - 1) // 2])
    if len(runs) > 1:
        row["tokens_per_second_runs"] = [r["tokens_per_second"] for r in runs]
    return row


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def markdown(rows, ratios, par, meta) -> str:
    lines = [f"# LoRA vs PEFT vs full fine-tuning on {meta['device']}", "",
             f"Command: `{meta['command']}`  ", f"torch {meta['torch']}, transformers {meta['transformers']}, "
             f"peft {meta['peft']}, Python {meta['python']}.", "",
             "Random-init Llama shapes built on the GPU in bf16, SDPA attention "
             + ("(transformers' mask building)" if meta.get("hf_mask") else "(causal flag, no mask built)")
             + ", random tokens; fused AdamW. "
             "Full fine-tuning: bf16 weights and bf16 AdamW states. LoRA (alpha = 2r, dropout 0): frozen bf16 "
             "base; PEFT: fp32 factors under bf16 autocast (its default); ours: bf16 factors in the model, "
             "fp32 master weights stepped by one fused AdamW (`FlatMasterAdamW`), the fused autograd function "
             "(`lora_linear`): the same numerics (bf16 compute, fp32 update). `ours-fp32`: fp32 factors under "
             "autocast like PEFT + the fused function; `ours-unfused`: fp32 factors + LoRALinear's plain "
             "forward. GPU busy: kernel time of one profiled step; a step time above it means the CPU, "
             "launching kernels, sets the pace. MFU: 6N trained + 4N frozen matmul FLOPs per token + "
             "attention, over the dense bf16 peak. Blocks: eager, `graphs` (a CUDA graph per block, forward "
             "and backward), `compile` (torch.compile per block, and the loss), `compile+graphs`, "
             f"`{STEP_GRAPH}` (compiled blocks, the whole step with its optimizer step in one CUDA graph); "
             "every method alike.", "",
             "| model | method | impl | rank | targets | blocks | tokens/s | step ms | GPU busy ms | peak GiB | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['impl']} | {fmt(r['rank'], 'd')} | {r['targets'] or '–'} "
                     f"| {r.get('mode', 'eager')} "
                     f"| {r['tokens_per_second']:,.0f} | {1e3 * r['step_time_s']:.1f} "
                     f"| {fmt(r['gpu_busy_s'] and 1e3 * r['gpu_busy_s'], '.1f')} "
                     f"| {r['peak_memory_bytes'] / 2**30:.1f} | {fmt(r['mfu'], '.1%')} |")
    lines += ["", "| model | LoRA | blocks (ours) | ours/PEFT (eager PEFT) | ours/PEFT (same blocks) "
              "| ours/full (same blocks) | ours/fastest full | fused/unfused | fused/plain | grouped/single "
              "| Triton/cuBLAS factor products | ours/PEFT peak memory |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for q in ratios:
        lines.append(f"| {q['model']} | r={q['rank']} {q['targets']} | {q['mode']} | {fmt(q['ours_over_peft'], '.2f')}× "
                     f"| {fmt(q['ours_over_peft_same_mode'], '.2f')}× | {fmt(q['ours_over_full'], '.2f')}× "
                     f"| {fmt(q['ours_over_fastest_full'], '.2f')}× | {fmt(q['ours_over_unfused'], '.2f')}× "
                     f"| {fmt(q['ours_over_plain'], '.2f')}× | {fmt(q['ours_over_single'], '.2f')}× "
                     f"| {fmt(q['ours_over_cublas'], '.2f')}× "
                     f"| {fmt(q['memory_ours_over_peft'], '.2f')} |")
    checks = check_targets(ratios)
    if checks:
        lines += ["", "| target | model | LoRA rank | ours' blocks | measured | against PEFT in the same blocks | met |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {c['what']} {c['target']} | {c['model']} | {c['rank']} | {c['mode']} | {c['value']:.3f} "
                  f"| {fmt(c['same_mode_peft'], '.2f')} "
                  f"| {'yes' if c['met'] else 'no'} |" for c in checks]
    if par:
        lines += ["", f"Loss-curve parity ({par['model']}, LoRA r={par['rank']} all-linear, lr {par['lr']}, "
                  f"{par['steps']} steps, identical weights and A): max |Δloss| = {par['max_abs_diff']:.4f}, "
                  f"max relative {par['max_rel_diff']:.2e}."]
        graphed = par.get(f"ours-{FASTEST}")
        if graphed:
            lines[-1] += (f" Ours with {FASTEST} blocks vs ours eager: max |Δloss| = "
                          f"{par['fastest_max_abs_diff']:.4f}.")
        if par.get(f"ours-{STEP_GRAPH}"):
            lines[-1] += f" Ours in the step graph vs ours eager: max |Δloss| = {par['step_graph_max_abs_diff']:.4f}."
        lines += ["", "| step | ours | PEFT |" + (f" ours, {FASTEST} blocks |" if graphed else ""),
                  "|---|---|---|" + ("---|" if graphed else "")]
        lines += [f"| {i + 1} | {a:.4f} | {b:.4f} |" + (f" {graphed[i]:.4f} |" if graphed else "")
                  for i, (a, b) in enumerate(zip(par["ours"], par["peft"]))]
    repeated = [r for r in rows if "tokens_per_second_runs" in r]
    if repeated:
        runs = max(len(r["tokens_per_second_runs"]) for r in repeated)
        lines += ["", f"Each config was measured up to {runs} times, interleaved (the whole config list, then "
                  "again; a failed run is left out); the tables give the median run. All runs, tokens/s:", "",
                  "| model | method | impl | rank | blocks | runs |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['method']} | {r['impl']} | {fmt(r['rank'], 'd')} | {r.get('mode', 'eager')} "
                  f"| {', '.join(f'{v:,.0f}' for v in r['tokens_per_second_runs'])} |" for r in repeated]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script, not speed)")
    ap.add_argument("--models", nargs="+", default=None, help=f"subset of {list(SHAPES)}")
    ap.add_argument("--profile", action="store_true", help="also write the top CUDA kernels of one step per full and r=16 config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", default=["eager", "graphs", FASTEST, STEP_GRAPH], choices=MODES,
                    help="how the decoder blocks run (every method alike)")
    ap.add_argument("--only", nargs="+", default=None, help="configs whose method:impl:rank starts with one of these")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--hf-mask", action="store_true",
                    help="attention through transformers' mask building (a host-GPU sync per step) instead of "
                         "SDPA's causal flag alone (lowrank.blocks.causal_attention_without_mask)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="measure nothing: write one table (into --out) from the rows and parity of earlier runs' "
                         "--out directories (e.g. one run per model, where one call has a time limit)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure every config this many times, interleaved (config order repeated), and report "
                         "the median: drift of the host or the GPU then hits every config alike")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, Path(args.out))

    import peft
    import transformers
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = args.models or (["tiny"] if args.smoke else ["llama-1.1b", "llama-7b"])
    if args.hf_mask and STEP_GRAPH in args.modes:
        # transformers builds a different mask while a CUDA graph captures (it counts capture as tracing)
        raise SystemExit(f"--hf-mask measures the per-block modes only: leave {STEP_GRAPH} out of --modes")
    warmup, steps = (1, 2) if args.smoke else (4, 15)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    tag = "h200" if "H200" in dev_name else ("cpu" if device.type == "cpu" else dev_name.split()[-1].lower())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=dev_name, torch=torch.__version__, transformers=transformers.__version__,
                peft=peft.__version__, python=platform.python_version(),
                command="python -m experiments.bench " + " ".join(sys.argv[1:]), hf_mask=args.hf_mask)
    print(meta, flush=True)

    rows, par, t_start = [], None, time.perf_counter()
    write_run(out, tag, meta, par)
    samples: dict[tuple, list[dict]] = {}  # config -> its measurements, one per repeat
    prof_path = out / f"profile_{tag}.txt"
    prof_path.unlink(missing_ok=True)
    plan = [(name, mode, cfg) for name in models for mode in args.modes for cfg in CONFIGS
            if cfg[1] in MODE_IMPLS[mode]
            and not (args.only and not any(f"{cfg[0]}:{cfg[1]}:{cfg[2]}".startswith(o) for o in args.only))]
    for repeat in range(args.repeats):
        for name, mode, (method, impl, rank, targets) in plan:
            keep = args.profile and repeat == 0 and rank in (None, 16) and impl in ("torch", "ours", "peft")
            try:
                row = measure(name, SHAPES[name], method, impl, rank, targets, mode, device, dtype, warmup,
                              steps, args.seed, prof_path if keep else None, args.hf_mask)
            except Exception as e:  # one failing variant must not cost the rest of the run
                print(f"{name} {method} {impl} r={rank} {mode}: FAILED {type(e).__name__}: {e}", flush=True)
                free(device)
                continue
            samples.setdefault((name, mode, method, impl, rank, str(targets)), []).append(row)
            rows = [median_row(v) for v in samples.values()]
            print(f"{name:11s} {method:4s} {impl:12s} r={fmt(rank, 'd'):2s} {row['targets'] or '':14s} "
                  f"{mode:14s} {row['tokens_per_second']:9,.0f} tok/s  {1e3 * row['step_time_s']:7.1f} ms  "
                  f"{row['peak_memory_bytes'] / 2**30:6.1f} GiB (held before {row['memory_held_before_bytes'] / 2**30:.1f})  "
                  f"MFU {fmt(row['mfu'], '.1%')}  "
                  f"GPU busy {fmt(row['gpu_busy_s'] and 1e3 * row['gpu_busy_s'], '.1f')} ms  "
                  f"setup {row['setup_s']:.0f} s  [{time.perf_counter() - t_start:.0f} s]", flush=True)
            if row["gpu_busy_by_kind_s"]:
                print("    kernels (ms): " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in sorted(
                    row["gpu_busy_by_kind_s"].items(), key=lambda kv: -kv[1])), flush=True)
            write_run(out, tag, meta, par, rows)  # after every row: a cut-off run keeps them
    if not args.no_parity:
        par_name = "tiny" if args.smoke else "llama-1.1b"
        par = dict(model=par_name, **parity(SHAPES[par_name], device, dtype, args.seed, hf_mask=args.hf_mask))
        print(f"parity {par_name}: max |Δloss| {par['max_abs_diff']:.4g} (max rel {par['max_rel_diff']:.2e}); "
              f"ours {par['ours'][0]:.3f} -> {par['ours'][-1]:.3f}, peft {par['peft'][0]:.3f} -> {par['peft'][-1]:.3f}; "
              f"{FASTEST} vs eager ours: {par.get('fastest_max_abs_diff')}; {STEP_GRAPH} vs eager ours: "
              f"{par.get('step_graph_max_abs_diff')}",
              flush=True)
    write_run(out, tag, meta, par, rows)
    print_ratios(rows)
    print(f"done in {time.perf_counter() - t_start:.0f} s", flush=True)


def write_run(out: Path, tag: str, meta: dict, par: dict | None, rows=None) -> None:
    """The run's settings and parity (`lora_vs_peft_{tag}_run.json`) and, given rows, the rows (`.json`) and
    the markdown table (`.md`); each file written whole (atomic.write_text), so a cut-off run keeps the last."""
    write_text(out / f"lora_vs_peft_{tag}_run.json", json.dumps(dict(meta=meta, parity=par), indent=1) + "\n")
    if rows is not None:
        write_text(out / f"lora_vs_peft_{tag}.json", json.dumps(rows, indent=1) + "\n")
        write_text(out / f"lora_vs_peft_{tag}.md", markdown(rows, ratio_rows(rows), par, meta))


def merge(dirs: list[str], out: Path) -> None:
    """One table from several runs of one setup (device, versions, attention): their rows in order, their
    commands, the parity check of the run that had one. Each config may come from one run only, so each ratio
    compares rows that one run measured side by side (the runs should split by model)."""
    rows, runs = [], []
    if any(Path(d).resolve() == out.resolve() for d in dirs):
        raise SystemExit(f"--merge: --out {out} is one of the merged directories; write the table elsewhere")
    for d in dirs:
        run_files = sorted(Path(d).glob("lora_vs_peft_*_run.json"))
        if len(run_files) != 1:
            raise SystemExit(f"--merge {d}: expected one lora_vs_peft_*_run.json there, found {len(run_files)}")
        tag = run_files[0].name.removeprefix("lora_vs_peft_").removesuffix("_run.json")
        rows_file = Path(d) / f"lora_vs_peft_{tag}.json"
        if not rows_file.exists():
            raise SystemExit(f"--merge {d}: no {rows_file.name} (the run measured no config)")
        runs.append((d, tag, json.loads(run_files[0].read_text())))
        rows += json.loads(rows_file.read_text())
    setup = ("device", "torch", "transformers", "peft", "hf_mask")
    for d, _, run in runs[1:]:
        differ = [k for k in setup if run["meta"].get(k) != runs[0][2]["meta"].get(k)]
        if differ:
            raise SystemExit(f"--merge {d}: its {', '.join(differ)} differ from {runs[0][0]}'s; merge runs of one setup")
    keys = [(r["model"], r["impl"], r["rank"], r["targets"], r.get("mode", "eager")) for r in rows]
    twice = sorted({k for k in keys if keys.count(k) > 1}, key=str)
    if twice:
        raise SystemExit(f"--merge: configs measured by more than one run: {twice}; merge runs that split by model")
    pars = [r["parity"] for *_, r in runs if r["parity"]]
    if len(pars) > 1:
        raise SystemExit("--merge: more than one run has a parity check; run it in one of them (--no-parity)")
    _, tag, first = runs[0]
    meta = dict(first["meta"], command=" ; ".join(r["meta"]["command"] for *_, r in runs))
    write_run(out, tag, meta, pars[0] if pars else None, rows)
    print_ratios(rows)


def print_ratios(rows) -> None:
    ratios = ratio_rows(rows)
    print("\nmodel       LoRA              blocks          ours/PEFT  same-mode PEFT  ours/full  /fastest full  "
          "mem ours/PEFT")
    for q in ratios:
        print(f"{q['model']:11s} r={q['rank']:<2d} {q['targets']:14s} {q['mode']:14s} {fmt(q['ours_over_peft'], '9.2f')}× "
              f"{fmt(q['ours_over_peft_same_mode'], '14.2f')}× {fmt(q['ours_over_full'], '9.2f')}× "
              f"{fmt(q['ours_over_fastest_full'], '13.2f')}× {fmt(q['memory_ours_over_peft'], '12.2f')}")
    for c in check_targets(ratios):
        print(f"target {c['model']} r={c['rank']} {c['what']} {c['target']}: {c['value']:.3f} "
              f"{'MET' if c['met'] else 'NOT MET'} (ours: {c['mode']}; same-blocks PEFT: {fmt(c['same_mode_peft'], '.2f')})")

if __name__ == "__main__":
    main()
