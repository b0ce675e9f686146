"""Training throughput: full fine-tuning vs our LoRA vs PEFT's LoRA on Llama-shaped models, side by side.

    python -m benchmarks.bench --out benchmarks/results              # on one GPU: the whole measurement
    python -m benchmarks.bench --smoke --out /tmp/bench               # tiny shapes on CPU, in seconds
    python -m benchmarks.bench --merge /tmp/1.1b /tmp/7b --out benchmarks/results   # runs split by model

What is measured is `SETUP` below (it also heads the markdown). Every config runs in each block mode of
--modes, for every method alike; --repeats measures the whole config list again, interleaved, and keeps the
median run. Last, a loss-curve parity check from identical weights and identical A, 20 steps: ours eager,
ours compiled and graphed, ours in the step graph, PEFT. Writes `lora_vs_peft_{device}.{json,md}` under --out
(benchmarks.harness.record: commit, command, versions; rewritten after every config, so a cut-off run keeps what it
measured), with each LoRA config's ratios judged against the targets in benchmarks/targets.json.

The generic parts live in benchmarks/harness/ (graphs, kernel_profile, record, ratios); what stays here,
about 450 lines, is the benchmark's own definition: its configs, how each variant is built and stepped, the
timing loop and the parity check.
"""
import argparse
import copy
import functools
import shutil
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.adapters import fused as lora_fast
from benchmarks.harness.ratios import (COMPILE_MODEL, TARGETS_FILE, TRAINER, check_targets, ratio_rows, ratio_sections,
                                  read_targets)
from benchmarks.harness.record import (Column, collect_metadata, markdown_table, median_run, read_result, result_name,
                                  write_result)
from lowrank.train.blocks import causal_attention_without_mask, compile_blocks
from benchmarks.harness.graphs import graph_blocks, graph_step, undo_training
from lowrank.train.budget import free_cuda_memory
from benchmarks.harness.kernel_profile import kernel_time
from lowrank.adapters.lora import LoRALinear, freeze_for_lora, inject_lora, lora_layers
from lowrank.adapters.fused import FlatMasterAdamW
from lowrank.train.perf import flops_per_token, peak_flops, peak_memory_bytes, sync
from lowrank.adapters.targets import ALL_LINEAR

from benchmarks.bench_trainer import trainer_parity, trainer_row

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
# (method, impl, rank, targets): one row each per shape and mode; SETUP says what each impl is. The variants
# isolate one cause each: ours-plain asks whether the fused function still pays once compiled, ours-single
# what shared-input groups give, ours-cublas what the fused factor-gradient kernel gives.
CONFIGS = [("full", "torch", None, None),
           ("lora", "ours", 16, ALL_LINEAR), ("lora", "peft", 16, ALL_LINEAR), ("lora", "ours-fp32", 16, ALL_LINEAR),
           ("lora", "ours-unfused", 16, ALL_LINEAR), ("lora", "ours-plain", 16, ALL_LINEAR),
           ("lora", "ours-single", 16, ALL_LINEAR), ("lora", "ours-cublas", 16, ALL_LINEAR),
           ("lora", "ours", 8, QV), ("lora", "peft", 8, QV)]
FLAT_MASTER = ("ours", "ours-plain", "ours-single", "ours-cublas")  # bf16 factors stepped by FlatMasterAdamW
# How the decoder blocks run (lowrank.train.blocks), for every method alike: eager, one CUDA graph per block for
# forward and one for backward, torch.compile per block, compiled blocks captured in graphs, or compiled blocks
# in one CUDA graph of the whole step (lowrank.train.step_graph: no host work between kernels).
STEP_GRAPH = "compile+step-graph"
MODES = ("eager", "graphs", "compile", "compile+graphs", STEP_GRAPH, COMPILE_MODEL)
FASTEST = "compile+graphs"  # the fastest per-block mode
FUSED_DEFAULT = lora_fast.FUSED_FACTOR_GRADS  # LOWRANK_FUSED_FACTOR_GRADS=0 turns it off for every config
# which implementations each mode runs: the fp32 / unfused variants answer eager questions
MODE_IMPLS = {"eager": ("torch", "ours", "peft", "ours-fp32", "ours-unfused"), "graphs": ("torch", "ours", "peft"),
              "compile": ("torch", "ours", "peft", "ours-plain"),
              FASTEST: ("torch", "ours", "peft", "ours-plain", "ours-single"),
              STEP_GRAPH: ("torch", "ours", "peft", "ours-cublas"), COMPILE_MODEL: ("torch", "peft")}
SETUP = (
    "Random-init Llama shapes built on the GPU in bf16, SDPA attention {attention}, random tokens; fused AdamW. "
    "Full fine-tuning: bf16 weights and bf16 AdamW states. LoRA (alpha = 2r, dropout 0): frozen bf16 base; PEFT: "
    "fp32 factors under bf16 autocast (its default); ours: bf16 factors in the model, fp32 master weights "
    "stepped by one fused AdamW (`FlatMasterAdamW`), the fused autograd function (`lora_linear`): the same "
    "numerics (bf16 compute, fp32 update). `ours-fp32`: fp32 factors under autocast like PEFT + the fused "
    "function; `ours-unfused`: fp32 factors + LoRALinear's plain forward; `ours-plain`: bf16 factors + the plain "
    "forward; `ours-single`: no shared-input groups; `ours-cublas`: both factor products of the output gradient "
    "from cuBLAS. Timing: warm-up steps, then timed steps between two syncs. Peak memory: max allocated since "
    "the config's model was built, less what earlier configs left allocated. GPU busy: kernel time of one "
    "profiled step; a step time above it means the CPU, launching kernels, sets the pace. MFU: 6N trained + 4N "
    "frozen matmul FLOPs per token + attention (`lowrank.train.perf.flops_per_token`), over the dense bf16 peak. "
    "Blocks: eager, `graphs` (a CUDA graph per block, forward and backward), `compile` (torch.compile per block, "
    f"and the loss), `compile+graphs`, `{STEP_GRAPH}` (compiled blocks, the whole step with its optimizer step "
    f"in one CUDA graph); every method alike; `{COMPILE_MODEL}`: torch.compile(model), as a PEFT user would. "
    "`trainer` rows: `lowrank.train.recipe.train` itself (benchmarks/bench_trainer.py) on task=synthetic_lm with its "
    "GPU defaults, tokens/s as its metrics.json records it (steady steps after its warm-up window).")


def targets_label(targets) -> str | None:
    return targets if targets is None or isinstance(targets, str) else ",".join(targets)


def plain_forward(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear's forward without the fused function: base(x) + scaling · B A x as separate operators."""
    return self.base_layer(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def build(shape: dict, device: torch.device, dtype: torch.dtype, seed: int, hf_mask: bool = False):
    """hf_mask=False: causal attention without transformers' mask building (the batches have no padding), whose
    packed-sequence check syncs the host with the GPU every step
    (lowrank.train.blocks.causal_attention_without_mask)."""
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


def add_lora(model: nn.Module, impl: str, rank: int, targets) -> nn.Module:
    """LoRA with alpha = 2r, dropout 0, A kaiming-uniform and B = 0 on `targets` (module-name suffixes, or
    lowrank.adapters.targets.ALL_LINEAR: every linear layer of the blocks, which PEFT's "all-linear" also selects).
    PEFT keeps its factors in fp32 (its default); FLAT_MASTER impls keep them in the model's dtype for
    FlatMasterAdamW (fp32 masters), ours-fp32 and ours-unfused in fp32."""
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
    if impl in FLAT_MASTER:
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


def free(device):
    torch._dynamo.reset()  # each config compiles on its own: no cached graphs or dynamic-shape recompiles carried over
    free_cuda_memory(device if device.type == "cuda" else None)


def speed_up_blocks(model, mode, shape, device):
    """After the optimizer exists (FlatMasterAdamW moves parameters), before the first step. The step graph is
    captured by `speed_up_step`."""
    if mode == COMPILE_MODEL:
        model.compile()  # in place: what torch.compile(model) does to the module's call
        return
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
    busy, kinds, top = kernel_time(functools.partial(step, batches[0]), device)
    if profile_to is not None and top is not None:
        with open(profile_to, "a") as f:  # a diagnostic dump, appended config by config; not a result
            f.write(f"\n## {name} {method} {impl} r={rank} {mode}: one step, {1e3 * busy:.1f} ms of kernels; by "
                    "kind (ms): " + ", ".join(f"{k} {1e3 * v:.1f}"
                                              for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
                    + "\n" + top)
    tokens = shape["batch"] * shape["seq"]
    fpt = flops_per_token(model, shape["seq"], shape["num_hidden_layers"], shape["hidden_size"])
    peak = peak_flops(device, "bf16")
    row = dict(model=name, method=method, impl=impl, rank=rank, mode=mode, targets=targets_label(targets),
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


ROW_COLUMNS = [Column("model", "model"), Column("method", "method"), Column("impl", "impl"),
               Column("rank", "rank", "d"), Column("targets", "targets"),
               Column("blocks", lambda r: r.get("mode", "eager")), Column("tokens/s", "tokens_per_second", ",.0f"),
               Column("step ms", lambda r: 1e3 * r["step_time_s"], ".1f"),
               Column("GPU busy ms", lambda r: r["gpu_busy_s"] and 1e3 * r["gpu_busy_s"], ".1f"),
               Column("peak GiB", lambda r: r["peak_memory_bytes"] / 2**30, ".1f"), Column("MFU", "mfu", ".1%")]
REPEAT_COLUMNS = [Column("model", "model"), Column("method", "method"), Column("impl", "impl"),
                  Column("rank", "rank", "d"), Column("blocks", lambda r: r.get("mode", "eager")),
                  Column("runs", lambda r: ", ".join(f"{v:,.0f}" for v in r["tokens_per_second_runs"]))]


def report(rows, par, ratios, checks, trainer_par=None) -> list[str]:
    """The markdown sections after the rows: ratios, targets, parity, the trainer's parity, every repeat."""
    out = ratio_sections(ratios, checks)
    if trainer_par:
        tp = trainer_par
        out += [f"Trainer loss curves ({tp['model']}, LoRA r=16 all-linear, {tp['steps']} steps, one seed): its fast "
                f"path (blocks {'compiled' if tp.get('compiled') else 'eager'}, mask-free attention, step graph "
                f"{'on' if tp['cuda_graph'] else 'off'}) vs "
                f"its plain path (eager, transformers' mask): max |Δloss| = {tp['max_abs_diff']:.4f}, max relative "
                f"{tp['max_rel_diff']:.2e}.",
                markdown_table([dict(step=i + 1, fast=a, plain=b)
                                for i, (a, b) in enumerate(zip(tp["fast"], tp["plain"]))],
                               [Column("step", "step"), Column("fast", "fast", ".4f"),
                                Column("plain", "plain", ".4f")])]
    if par:
        text = (f"Loss-curve parity ({par['model']}, LoRA r={par['rank']} all-linear, lr {par['lr']}, "
                f"{par['steps']} steps, identical weights and A): max |Δloss| = {par['max_abs_diff']:.4f}, "
                f"max relative {par['max_rel_diff']:.2e}.")
        graphed = par.get(f"ours-{FASTEST}")
        if graphed:
            text += f" Ours with {FASTEST} blocks vs ours eager: max |Δloss| = {par['fastest_max_abs_diff']:.4f}."
        if par.get(f"ours-{STEP_GRAPH}"):
            text += f" Ours in the step graph vs ours eager: max |Δloss| = {par['step_graph_max_abs_diff']:.4f}."
        steps = [dict(step=i + 1, ours=a, peft=b, graphed=graphed[i] if graphed else None)
                 for i, (a, b) in enumerate(zip(par["ours"], par["peft"]))]
        columns = [Column("step", "step"), Column("ours", "ours", ".4f"), Column("PEFT", "peft", ".4f")]
        out += [text, markdown_table(steps, columns + ([Column(f"ours, {FASTEST} blocks", "graphed", ".4f")]
                                                       if graphed else []))]
    repeated = [r for r in rows if "tokens_per_second_runs" in r]
    if repeated:
        runs = max(len(r["tokens_per_second_runs"]) for r in repeated)
        out += [f"Each config was measured up to {runs} times, interleaved (the whole config list, then again; a "
                "failed run is left out); the tables give the median run. All runs, tokens/s:",
                markdown_table(repeated, REPEAT_COLUMNS)]
    return out


def write(out: Path, name: str, meta: dict, settings: dict, rows: list[dict], par: dict | None, targets,
          trainer_par: dict | None = None) -> list[str]:
    """`{name}.json` and `.md` through benchmarks.harness.record; returns the report's sections (for the console)."""
    ratios = ratio_rows(rows)
    checks = check_targets(ratios, targets)
    sections = report(rows, par, ratios, checks, trainer_par)
    attention = "(transformers' mask building)" if settings.get("hf_mask") else "(causal flag, no mask built)"
    write_result(out, name, rows, settings, meta=meta, title=f"LoRA vs PEFT vs full fine-tuning on {meta['device']}",
                 description=SETUP.format(attention=attention), columns=ROW_COLUMNS, sections=sections,
                 details=dict(parity=par, trainer_parity=trainer_par, ratios=ratios, targets=checks))
    return sections


def print_sections(sections) -> None:
    print("\n".join(s.strip() + "\n" for s in sections), flush=True)


def merge(dirs: list[str], out: Path, targets) -> None:
    """One table from several runs of one setup (commit, device, versions, attention): their rows in order,
    their commands, the parity check of the run that had one. Each config may come from one run only, so each
    ratio compares rows that one run measured side by side (the runs should split by model)."""
    if any(Path(d).resolve() == out.resolve() for d in dirs):
        raise SystemExit(f"--merge: --out {out} is one of the merged directories; write the table elsewhere")
    runs = []
    for d in dirs:
        files = sorted(Path(d).glob("lora_vs_peft_*.json"))
        if len(files) != 1:
            raise SystemExit(f"--merge {d}: expected one lora_vs_peft_*.json there, found {len(files)}")
        run = read_result(files[0])
        if not run["rows"]:
            raise SystemExit(f"--merge {d}: {files[0].name} has no rows (the run measured no config)")
        runs.append((d, files[0].stem, run))

    def setup(run):
        versions = run["meta"].get("versions") or {}
        return dict(commit=run["meta"].get("commit"), device=run["meta"].get("device"),
                    torch=versions.get("torch"), transformers=versions.get("transformers"), peft=versions.get("peft"),
                    hf_mask=(run["settings"] or {}).get("hf_mask"))
    first_dir, name, first = runs[0]
    for d, _, run in runs[1:]:
        differ = [k for k, v in setup(run).items() if v != setup(first)[k]]
        if differ:
            raise SystemExit(f"--merge {d}: its {', '.join(differ)} differ from {first_dir}'s; merge runs of one setup")
    rows = [r for *_, run in runs for r in run["rows"]]
    keys = [(r["model"], r["impl"], r["rank"], r["targets"], r.get("mode", "eager")) for r in rows]
    twice = sorted({k for k in keys if keys.count(k) > 1}, key=str)
    if twice:
        raise SystemExit(f"--merge: configs measured by more than one run: {twice}; merge runs that split by model")
    pars = [run["details"]["parity"] for *_, run in runs if (run["details"] or {}).get("parity")]
    tpars = [run["details"]["trainer_parity"] for *_, run in runs if (run["details"] or {}).get("trainer_parity")]
    if len(pars) > 1 or len(tpars) > 1:
        raise SystemExit("--merge: more than one run has a parity check; run it in one of them (--no-parity)")
    dirty = [run["meta"].get("dirty") for *_, run in runs]  # any run's uncommitted changes make the table's
    meta = dict(first["meta"], command=" ; ".join(run["meta"]["command"] for *_, run in runs),
                dirty=True if True in dirty else None if None in dirty else False,
                merged_from=[{k: run["meta"].get(k) for k in ("command", "date", "commit", "dirty")}
                             for *_, run in runs])
    settings = dict(first["settings"] or {}, models=list(dict.fromkeys(r["model"] for r in rows)))
    print_sections(write(out, name, meta, settings, rows, pars[0] if pars else None, targets,
                         tpars[0] if tpars else None))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script, not speed)")
    ap.add_argument("--models", nargs="+", default=None, help=f"subset of {list(SHAPES)}")
    ap.add_argument("--profile", action="store_true",
                    help="also append the top CUDA kernels of one step per full and r=16 config to "
                         "profile_{device}.txt under --out (a diagnostic dump; the rows keep the time by kind)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", default=["eager", "graphs", FASTEST, STEP_GRAPH], choices=MODES,
                    help="how the decoder blocks run (every method alike)")
    ap.add_argument("--only", nargs="+", default=None, help="configs whose method:impl:rank starts with one of these")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--no-trainer", action="store_true",
                    help="leave out the trainer's own rows (lowrank.train.recipe.train: LoRA r=16 all-linear and full) "
                         "and its loss-curve check")
    ap.add_argument("--trainer-optimizers", nargs="+", default=["adamw"], choices=["adamw", "flat_master"],
                    help="trainer.optimizer of the trainer's LoRA rows (one row each)")
    ap.add_argument("--no-trainer-parity", action="store_true", help="leave out the trainer's loss-curve check")
    ap.add_argument("--trainer-steps", type=int, default=None,
                    help="timed steps of each trainer row (default 60; 2 with --smoke), after 10 warm-up steps")
    ap.add_argument("--hf-mask", action="store_true",
                    help="attention through transformers' mask building (a host-GPU sync per step) instead of "
                         "SDPA's causal flag alone (lowrank.train.blocks.causal_attention_without_mask)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="measure nothing: write one table (into --out) from the results in earlier runs' --out "
                         "directories (e.g. one run per model, where one call has a time limit)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure every config this many times, interleaved (config order repeated), and report "
                         "the median: drift of the host or the GPU then hits every config alike")
    ap.add_argument("--targets", default=str(TARGETS_FILE), help="the targets the ratios are judged against")
    args = ap.parse_args()
    targets = read_targets(args.targets)
    if args.merge:
        return merge(args.merge, Path(args.out), targets)

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = args.models or (["tiny"] if args.smoke else ["llama-1.1b", "llama-7b"])
    if args.hf_mask and STEP_GRAPH in args.modes:
        # transformers builds a different mask while a CUDA graph captures (it counts capture as tracing)
        raise SystemExit(f"--hf-mask measures the per-block modes only: leave {STEP_GRAPH} out of --modes")
    warmup, steps = (1, 2) if args.smoke else (4, 15)
    meta = collect_metadata(device)  # before anything is written under --out
    name = result_name("lora_vs_peft", device)
    settings = dict(models=models, modes=args.modes, only=args.only, repeats=args.repeats, seed=args.seed,
                    warmup_steps=warmup, timed_steps=steps, parity=not args.no_parity, hf_mask=args.hf_mask,
                    trainer=not args.no_trainer,
                    fused_factor_grads=FUSED_DEFAULT)
    print(meta, settings, flush=True)
    out = Path(args.out)
    rows, par, t_start = [], None, time.perf_counter()
    write(out, name, meta, settings, rows, par, targets)
    samples: dict[tuple, list[dict]] = {}  # config -> its measurements, one per repeat
    prof_path = out / f"{result_name('profile', device)}.txt"
    prof_path.unlink(missing_ok=True)
    plan = [(model, mode, cfg) for model in models for mode in args.modes for cfg in CONFIGS
            if cfg[1] in MODE_IMPLS[mode]
            and not (args.only and not any(f"{cfg[0]}:{cfg[1]}:{cfg[2]}".startswith(o) for o in args.only))]
    trainer_plan = [] if args.no_trainer else [(model, method, opt) for model in models for method, opt in (
        ("full", "adamw"), *(("lora", o) for o in args.trainer_optimizers))]
    trainer_par, runs_root = None, tempfile.mkdtemp(prefix="bench-trainer-")
    # the smoke test keeps the CPU quick: eager blocks (on a GPU the rows run the trainer's defaults: compiled)
    trainer_extra = ["trainer.compile=false", "model.dtype=auto"] if args.smoke else []
    trainer_warmup, trainer_steps = (1, args.trainer_steps or 2) if args.smoke else (10, args.trainer_steps or 60)
    for repeat in range(args.repeats):
        for model, method, opt in trainer_plan:
            free(device)
            held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            label = f"{model} {method} trainer optimizer={opt}"
            try:
                row = trainer_row(model, SHAPES[model], method, 16 if method == "lora" else None, runs_root,
                                  trainer_warmup, trainer_steps, held, [*trainer_extra, f"trainer.optimizer={opt}"])
            except Exception as e:  # as for the bench's own configs: the rest of the run goes on
                print(f"{label}: FAILED {type(e).__name__}: {e}", flush=True)
                free(device)
                continue
            samples.setdefault((model, row["mode"], method, TRAINER, row["rank"], "all-linear"), []).append(row)
            rows = [median_run(v) for v in samples.values()]
            print(f"{label}: {row['tokens_per_second']:,.0f} tok/s, {1e3 * row['step_time_s']:.1f} ms, "
                  f"{row['peak_memory_bytes'] / 2**30:.1f} GiB, MFU {row['mfu'] or 0:.1%}, graph {row['cuda_graph']}, "
                  f"warm-up {row['setup_s']:.0f} s [{time.perf_counter() - t_start:.0f} s]", flush=True)
            write(out, name, meta, settings, rows, par, targets)
        for model, mode, (method, impl, rank, lora_targets) in plan:
            keep = args.profile and repeat == 0 and rank in (None, 16) and impl in ("torch", "ours", "peft")
            label = f"{model} {method} {impl} r={rank} {targets_label(lora_targets) or ''} {mode}"
            try:
                row = measure(model, SHAPES[model], method, impl, rank, lora_targets, mode, device, dtype, warmup,
                              steps, args.seed, prof_path if keep else None, args.hf_mask)
            except Exception as e:  # one failing variant must not cost the rest of the run
                print(f"{label}: FAILED {type(e).__name__}: {e}", flush=True)
                free(device)
                continue
            samples.setdefault((model, mode, method, impl, rank, str(lora_targets)), []).append(row)
            rows = [median_run(v) for v in samples.values()]
            kinds = sorted((row["gpu_busy_by_kind_s"] or {}).items(), key=lambda kv: -kv[1])
            print(f"{label}: {row['tokens_per_second']:,.0f} tok/s, {1e3 * row['step_time_s']:.1f} ms, "
                  f"{row['peak_memory_bytes'] / 2**30:.1f} GiB (held before "
                  f"{row['memory_held_before_bytes'] / 2**30:.1f}), MFU {row['mfu'] or 0:.1%}, kernels (ms): "
                  + (", ".join(f"{k} {1e3 * v:.1f}" for k, v in kinds) or "–")
                  + f"; setup {row['setup_s']:.0f} s [{time.perf_counter() - t_start:.0f} s]", flush=True)
            write(out, name, meta, settings, rows, par, targets)  # after every row: a cut-off run keeps them
    par_model = "tiny" if args.smoke else "llama-1.1b"
    if not args.no_parity:
        par = dict(model=par_model, **parity(SHAPES[par_model], device, dtype, args.seed, hf_mask=args.hf_mask))
        print({k: v for k, v in par.items() if not isinstance(v, list)}, flush=True)
    if trainer_plan and not args.no_trainer_parity:
        free(device)
        trainer_par = trainer_parity(par_model, SHAPES[par_model], runs_root, 4 if args.smoke else 20, trainer_extra)
        print({k: v for k, v in trainer_par.items() if not isinstance(v, list)}, flush=True)
    shutil.rmtree(runs_root, ignore_errors=True)
    print_sections(write(out, name, meta, settings, rows, par, targets, trainer_par))
    print(f"done in {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
