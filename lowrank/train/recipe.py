"""Fine-tune a pretrained model (a classifier or a causal LM), fully, with LoRA or a variant, or in a random subspace,
and write its run directory.

`train(cfg) -> metrics` is a plain function (tests call it directly); `experiments/train.py` wraps it in
`@hydra.main`. The run directory (its contract: `lowrank/rundir/layout.py`) ends up with `.hydra/config.yaml`,
`metrics.json`, `delta_w.safetensors` and the log; `RUNS_ROOT/base_weights/` holds W0 once per base model.
Whatever happens, the run directory says so: bad input ends as `status: invalid` and an unexpected error as
`status: failed`, each with its one-line `reason`, and what the run set process-wide is undone (`job_scope`).
Its 434 lines are one run's story in the order it happens; what each step calls lives in its own module.
"""
import logging
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from lowrank.rundir import atomic
from lowrank.train import distributed
from lowrank.rundir import layout as rundir
from lowrank.train.blocks import causal_attention_without_mask, compile_blocks
from lowrank.train.budget import fit_to_budget, free_cuda_memory
from lowrank.train.checkpoint import load_checkpoint, save_checkpoint
from lowrank.rundir.delta import ensure_base_weights, linear_weights, write_delta
from lowrank.errors import ConfigError
from lowrank.train.job_scope import job_scope
from lowrank.logger import make_logger
from lowrank.train.dynamics import Dynamics, summary as dynamics_summary, tracked, write_dynamics
from lowrank.train.memory import estimate_from_cfg
from lowrank.adapters.subspace import freeze_for_subspace, inject_subspace
from lowrank.adapters.lora import freeze_for_lora, inject_lora, lora_layers, lora_scaling, match_targets
from lowrank.adapters.variants import DoRALinear, pissa_init
from lowrank.adapters.relora import ReLoRA, jagged
from lowrank.data.objectives import objective_for
from lowrank.train.optim import lr_lambda, make_optimizer, make_scheduler, resolve_optimizer
from lowrank.train.perf import flops_per_token, peak_flops, peak_memory_bytes, state_bytes
from lowrank.train.preemption import Preempted, sigterm_flag
from lowrank.rundir.record import (RunLog, check_same_config, does_not_fit, record_end, run_dir_and_group, write_config_once,
                         write_run_metrics)
from lowrank.rundir.layout import CHECKPOINT_FILE, CONFIG_FILE, DELTA_FILE
from lowrank.train.throughput import StepClock, compile_seconds
from lowrank.train.step import TrainStep, place_lr, use_cuda_graph
from lowrank.config import budget_bytes, check_rank_fits, resolve_device, resolve_precision, resolve_weight_dtype, validate

log = logging.getLogger(__name__)
CAUSAL_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")  # decoders: attention is causal, SDPA's flag suffices

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: DictConfig, run_dir=None) -> dict:
    """Fine-tune, evaluate, and write the run directory. Returns the metrics written to metrics.json.

    A finished run directory is returned as it is; one with a checkpoint resumes from it. Raises ConfigError
    for bad input (recorded as `status: invalid`) and RunInProgress when another process holds the run."""
    run_dir, group = run_dir_and_group(run_dir)
    try:
        distributed.start(cfg.trainer)  # under torchrun: join the process group
    except ConfigError:
        if os.environ.get("RANK", "0") != "0":
            raise
        # rank 0 records it as invalid: validation starts it again below
    if not distributed.is_main():
        return _follow(cfg, group)
    with distributed.followers_told() as tell:
        return _lead(cfg, run_dir, group, tell)


def _follow(cfg: DictConfig, group: str | None) -> dict:
    """Ranks other than 0: do what rank 0 decided (train in its run directory, skip a finished run, or stop with
    its error), writing nothing."""
    verdict = distributed.share()
    if verdict[0] == "stop":
        _, kind, message = verdict
        raise {"ConfigError": ConfigError, "RunInProgress": rundir.RunInProgress}.get(kind, RuntimeError)(message)
    if verdict[0] == "done":
        return verdict[1]
    logging.getLogger("lowrank").setLevel(logging.WARNING)  # rank 0 logs the run
    with job_scope():
        validate(cfg)
        return _train(cfg, Path(verdict[1]), group, Path(cfg.runs_root).resolve())


def _lead(cfg: DictConfig, run_dir: Path, group: str | None, tell) -> dict:
    rundir.check_run_location(cfg.name, cfg.runs_root)
    runs_root = Path(cfg.runs_root).resolve()
    if not run_dir.resolve().is_relative_to(runs_root):
        raise ConfigError(f"run directory {run_dir} is outside runs_root={cfg.runs_root}; runs stay inside it")
    with rundir.RunLock(run_dir):
        check_same_config(run_dir, cfg)
        done = rundir.finished_metrics(run_dir)
        if done is not None:
            # A kill between metrics.json and the checkpoint's removal leaves it behind; it is never needed.
            (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
            log.info("%s is finished (%s); skipping it (delete it, or set another `name`, to run again)",
                     run_dir, done["status"])
            tell(("done", done))
            return done
        for folder in (run_dir, run_dir / CONFIG_FILE.parent):  # we hold the lock: every temp file is stale
            if folder.is_dir():
                atomic.remove_stale_temps(folder, everything=True)
        with RunLog(run_dir) as run_log, job_scope():
            try:
                write_config_once(run_dir, cfg)  # first: an invalid run's record says what was asked
                validate(cfg)
                distributed.start(cfg.trainer)  # a bad trainer.parallel or trainer.world_size ends here as invalid
                tell(("train", str(run_dir)))
                return _train(cfg, run_dir, group, runs_root)
            except ConfigError as e:
                run_log.file_only.error("invalid: %s", e)
                record_end(run_dir, cfg, rundir.INVALID, str(e))
                raise
            except Exception as e:
                run_log.file_only.exception("failed")
                record_end(run_dir, cfg, rundir.FAILED, f"{type(e).__name__}: {e}")
                raise


def _train(cfg: DictConfig, run_dir: Path, group: str | None, runs_root: Path) -> dict:
    t_start = time.perf_counter()
    tc, mc = cfg.trainer, cfg.method
    parallel, main = distributed.start(tc), distributed.is_main()  # none, ddp or fsdp; whether this rank writes
    device = resolve_device(tc.device)
    precision = resolve_precision(tc.precision, device.type)
    weight_dtype = resolve_weight_dtype(cfg.model.get("dtype", "auto"), mc.name, precision)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    seed_everything(cfg.seed)
    objective = objective_for(cfg.task)
    model, tokenizer, head = objective.load_model(cfg, device)
    model.config.use_cache = False  # a k/v cache is for generation; in training it only costs memory
    names = match_targets(model, mc.targets)  # a target matching nothing: ConfigError with the valid suffixes
    if weight_dtype == "bf16":
        with torch.no_grad():  # bf16 values from the start, so W0 on disk is the W0 the run uses
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16))
    keep_delta = tc.get("write_delta", True)  # false: speed runs that keep no ΔW (nor W0: a 7B W0 is 13 GB)
    base_path = ensure_base_weights(runs_root, cfg.model.name, model) if keep_delta and main else None
    if mc.name == "lora":
        check_rank_fits(mc.rank, {n: min(model.get_submodule(n).weight.shape) for n in names}, mc.get("rank_pattern"))
        w0 = None
        if mc.get("dora") or mc.get("relora_every"):  # ΔW is not B·A alone: it is written dense, against W0
            w0 = linear_weights(model, names) if keep_delta and main else None
        inject_lora(model, names, mc.rank, mc.alpha, mc.dropout, mc.scaling, mc.init, mc.get("rank_pattern"),
                    layer_type=DoRALinear if mc.get("dora") else None)
        if mc.init == "pissa":  # the adapter starts as W's top-r part; the base keeps the residual
            for layer in lora_layers(model).values():
                pissa_init(layer)
        freeze_for_lora(model, head)
    elif mc.name == "subspace":
        w0 = linear_weights(model, names) if keep_delta and main else None
        inject_subspace(model, names, mc.dim, mc.said, seed=cfg.seed)
        freeze_for_subspace(model, head)
    else:
        w0 = linear_weights(model, names) if keep_delta and main else None  # on CPU: ΔW is exactly W_ft − W_0
    if weight_dtype == "bf16":
        for p in model.parameters():  # what does not train (everything, with method=full) is held in bf16
            if not p.requires_grad or mc.name == "full":
                p.data = p.data.to(torch.bfloat16)
    grad_sync = distributed.GradSync()
    # FSDP shards the model onto the device block by block: no rank ever holds all of it there
    forward_model, grad_sync_context = distributed.wrap_model(
        (model if parallel == "fsdp" else model.to(device)).train(), parallel, device, precision, grad_sync)
    if device.type == "cuda":  # training's peak: not that of building a shape model in fp32 before the cast
        torch.cuda.reset_peak_memory_stats(device)

    trainable = [p for p in model.parameters() if p.requires_grad]
    head_params = sum(p.numel() for p in head.parameters()) if head is not None else 0
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

    by_length = tc.get("group_by_length", "auto")
    by_length = device.type == "cuda" if by_length == "auto" else by_length  # off on CPU: runs as they were
    train_batches, test_batches = objective.batches(cfg, tokenizer, model, by_length, cfg.seed)
    # Under FSDP every rank must run the same forwards: no rank reads the base model's cached scores alone
    cached_base = base_path if parallel != "fsdp" else None
    objective.before_training(model, cached_base, {"model": cfg.model.name, "max_length": tc.max_length,
                                                   "precision": precision, "weight_dtype": weight_dtype}, device,
                              autocast,
                              test_batches)
    # Attention without a mask for causal models whose batches are never padded: transformers would build a
    # mask every step, and its packed-sequence check makes the host wait for the GPU (lowrank/train/blocks.py).
    mask_free = (tc.mask_free_attention and train_batches.unpadded and test_batches.unpadded
                 and model.config.model_type in CAUSAL_MODEL_TYPES)
    loraplus = mc.get("loraplus_ratio")  # LoRA+: B's learning rate is this many times A's
    relora_every = mc.get("relora_every") if mc.name == "lora" else None  # ReLoRA: merge and restart every N steps
    optimizer_kind = resolve_optimizer(tc.optimizer, mc.name, device.type, precision, static_batches=mask_free,
                                       loraplus=loraplus is not None or bool(relora_every))
    if parallel != "none" and optimizer_kind == "flat_master":
        if tc.optimizer == "flat_master":
            raise ConfigError(f"trainer.optimizer=flat_master is not valid with trainer.parallel={parallel}; "
                              f"use auto or adamw")
        optimizer_kind = "adamw"  # its flat master copy is one process's; DDP/FSDP step torch's AdamW
    optimizer = make_optimizer(model, trainable, optimizer_kind, tc.lr, tc.weight_decay, fused=device.type == "cuda",
                               loraplus_ratio=loraplus)
    schedule = lr_lambda(tc.schedule, tc.warmup_steps, tc.max_steps)
    scheduler = make_scheduler(optimizer, jagged(schedule, relora_every, mc.get("relora_warmup", 0))
                               if relora_every else schedule)
    relora = ReLoRA(model, optimizer, relora_every) if relora_every else None
    if tc.batch_size > len(train_batches):
        raise ConfigError(f"trainer.batch_size={tc.batch_size} is not valid; it must be <= the training set "
                          f"size ({len(train_batches)})")
    local_batch = tc.batch_size // distributed.world_size()  # each rank's share of every step's batch
    micro = tc.micro_batch_size or local_batch
    if tc.batch_size % micro:
        raise ConfigError(f"trainer.micro_batch_size={micro} is not valid; it must divide trainer.batch_size="
                          f"{tc.batch_size}")
    distributed.check_batch(tc.batch_size, micro)
    if parallel != "none" and budget_bytes(cfg.get("budget")):
        log.info("budget: the memory model picks the micro-batch (probing steps is for one process)")
    fit = fit_to_budget(budget_bytes(cfg.get("budget")), model, optimizer, device, autocast, local_batch,
                        tc.max_length, micro, bool(tc.activation_checkpointing),
                        lambda **kw: estimate_from_cfg(cfg, model.config, device_type=device.type,
                                                       world_size=distributed.world_size(), **kw),
                        causal_lm=head is None, measure=parallel == "none")
    seed_everything(cfg.seed)  # the budget probes drew random numbers (dropout): start from the seed again
    if not fit.fits:
        return does_not_fit(run_dir, cfg, fit, t_start)
    micro, checkpointing = fit.micro_batch, fit.activation_checkpointing
    if fit.budget_bytes:
        log.info("budget.gib=%g: micro-batch %d × %d accumulated, activation checkpointing %s (estimate %.2f GiB)",
                 fit.budget_bytes / 2**30, micro, local_batch // micro, checkpointing,
                 fit.memory_estimate["total_bytes"] / 2**30)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mask_free:  # after the budget probes, whose worst-case batches carry a mask
        causal_attention_without_mask(model)
    if tc.get("compile") and parallel != "none":
        log.info("trainer.compile: off under trainer.parallel=%s (compiled blocks are for one process)", parallel)
    elif tc.get("compile"):
        compile_blocks(model)  # after the budget probes: they measure the eager step, which needs more memory
    eval_batch_size = min(tc.eval_batch_size, micro) if fit.budget_bytes else tc.eval_batch_size

    loop = load_checkpoint(run_dir, model, optimizer, scheduler) or {
        "step": 0, "history": [], "recent_losses": [], "timing": None}
    if relora is not None:
        relora.load_state_dict(loop.pop("relora", None))  # the base weights its restarts merged into
    graphed, why_not = use_cuda_graph(tc.get("cuda_graph", "auto"), device, mask_free, checkpointing)
    if parallel != "none":  # collectives and each rank's step are not captured in one process's graph
        graphed, why_not = False, f"it runs on {distributed.world_size()} processes (trainer.parallel={parallel})"
    if tc.get("cuda_graph") is True and not graphed:
        raise ConfigError(f"trainer.cuda_graph=true is not valid here: {why_not}; use auto or false")
    place_lr(optimizer, device if graphed else None, capturable=graphed)
    train_step = TrainStep(forward_model, optimizer, trainable, autocast, tc.grad_clip, graphed,
                           sync=grad_sync_context, reduce_loss=distributed.mean_over_ranks)
    if loop["step"]:
        log.info("resuming %s from step %d", run_dir, loop["step"])
    clock = StepClock(tc.timing_warmup_steps, tc.max_steps - loop["step"])
    clock.load_state_dict(loop.get("timing"))
    run_name = f"{mc.name}" + (f"-r{mc.rank}" if mc.name == "lora" else "") + f"-s{cfg.seed}"
    logger = make_logger(cfg.logger if main else OmegaConf.create({"name": "none"}), run_dir,
                         OmegaConf.to_container(cfg, resolve=True),
                         cfg.logger.get("group") or group, run_name)

    dynamics = None  # rank over training time (lowrank/train/dynamics.py): rank 0, one process's weights
    if tc.get("dynamics", True) and main and parallel != "fsdp" and (mc.name == "lora" or w0 is not None):
        tracked_names = list(lora_layers(model)) if mc.name == "lora" else names
        dynamics = Dynamics(model, tracked(tracked_names, tc.get("dynamics_targets", "all")), w0,
                            merged_base=relora is not None)
    sigterm, previous_handler = sigterm_flag()
    diverged_at = None
    bar = tqdm(range(loop["step"], tc.max_steps), desc=run_name, disable=not (tc.progress_bar and main),
               dynamic_ncols=True, initial=loop["step"], total=tc.max_steps)
    state = {"done_at": None}  # when the last step's result arrived: where an overlapped step's time begins

    def finish(p) -> bool:
        """A launched step's bookkeeping once its result is in; True when the run diverged there."""
        nonlocal diverged_at
        loss_value, grad_norm, stepped = p["handle"].result()
        step = p["step"]
        if not (stepped and math.isfinite(loss_value) and math.isfinite(grad_norm)):
            diverged_at = step + 1
            return True
        t_begin = max(p["t0"], state["done_at"]) if p["overlapped"] else p["t0"]
        step_rate = clock.record(t_begin, p["tokens"], p["padded_tokens"])
        state["done_at"] = clock.now() if train_step.overlaps else None  # only an overlapped step starts there
        loop["step"], loop["timing"] = step + 1, clock.state_dict()
        grad_sync.step_done()
        loop["recent_losses"] = (loop["recent_losses"] + [loss_value])[-tc.eval_interval:]
        logger.log({"train/loss": loss_value, "train/lr": p["lr"], "train/tokens_per_second": step_rate},
                   step=step + 1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if (step + 1) % tc.eval_interval == 0 or step + 1 == tc.max_steps:
            ev = objective.evaluate(model, test_batches, eval_batch_size, device, autocast, mask_free)
            ev = {k: v for k, v in ev.items() if k != "tokens"}  # loss, and accuracy or perplexity
            loop["history"].append({"step": step + 1, **{f"eval_{k}": v for k, v in ev.items()},
                                    "train_loss": float(np.mean(loop["recent_losses"]))})
            logger.log({f"eval/{k}": v for k, v in ev.items()}, step=step + 1)
            log.info("step %d: train_loss %.4f %s", step + 1, loop["history"][-1]["train_loss"],
                     " ".join(f"eval_{k} {v:.4f}" for k, v in ev.items()))
            if dynamics is not None:  # ΔW's spectrum now, and how far its top directions moved since the last
                rows = dynamics.snapshot(step + 1)
                loop["dynamics"] = loop.get("dynamics", []) + rows
                logger.log(dynamics_summary(rows), step=step + 1)
        if relora is not None:
            relora.after_step(step + 1, tc.max_steps)
        preempted = distributed.any_rank(sigterm["set"])  # SIGTERM on any rank: every rank checkpoints here
        if preempted or (tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0
                         and step + 1 < tc.max_steps):
            save_checkpoint(run_dir, model, optimizer, scheduler,
                            loop | ({"relora": relora.state_dict()} if relora is not None else {}))
        if preempted:
            log.warning("SIGTERM at step %d: checkpoint written; re-run the same command to resume", step + 1)
            logger.finish()
            raise Preempted(143)
        return False

    def ends_in_place(step: int) -> bool:
        """Steps whose bookkeeping reads the weights (evaluation, a checkpoint) or ends the loop: finished
        before the next step launches."""
        n = step + 1
        return (not train_step.overlaps or n % tc.eval_interval == 0 or n == tc.max_steps or sigterm["set"]
                or bool(tc.checkpoint_every and n % tc.checkpoint_every == 0)
                or (relora is not None and relora.due(n, tc.max_steps)))

    pending = None  # a graphed step in flight whose bookkeeping waits until the next one is launched
    try:
        for step in bar:
            idx = distributed.batch_slice(train_batches.indices_at(step, tc.batch_size, cfg.seed))
            t0 = clock.now()
            cpu_batches = [train_batches.collate(idx[s:s + micro]) for s in range(0, len(idx), micro)]
            tokens, padded_tokens = distributed.sum_over_ranks([  # real tokens (padding apart), of all ranks
                sum(int(b["attention_mask"].sum()) for b in cpu_batches),
                sum(b["input_ids"].numel() for b in cpu_batches)])
            handle = train_step.launch([
                {k: v.to(device, non_blocking=True) for k, v in b.items() if not (mask_free and k == "attention_mask")}
                for b in cpu_batches])
            if handle.skipped_update():  # eager: a non-finite loss or gradient, found before the update
                diverged_at = step + 1
                break
            scheduler.step()
            launched = {"step": step, "handle": handle, "tokens": tokens, "padded_tokens": padded_tokens, "t0": t0,
                        "lr": scheduler.get_last_lr()[0], "overlapped": pending is not None}
            # The host prepares and launches step k+1 while the GPU runs step k: it reads step k's loss
            # after (where the step is one CUDA graph: nothing else then waits on the host).
            if pending is not None and finish(pending):
                break
            pending = launched
            if ends_in_place(step):
                pending = None
                if finish(launched):
                    break
    except torch.OutOfMemoryError:
        if not fit.budget_bytes:
            raise
        free_cuda_memory(device)  # the probes fit, yet a later step did not: still a result of the sweep
        logger.finish()
        return does_not_fit(run_dir, cfg, fit.out_of_memory_at(loop["step"] + 1), t_start)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    bar.close()

    if diverged_at is not None:
        metrics = {"status": "diverged", "diverged_at_step": diverged_at, "method": mc.name,
                   "eval_history": loop["history"], "wall_seconds": time.perf_counter() - t_start}
        log.error("non-finite loss or gradient at step %d: run marked diverged", diverged_at)
        metrics = write_run_metrics(run_dir, cfg, metrics)
        if main:
            (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        logger.summary(metrics)
        logger.finish()
        return metrics

    final_scores = objective.final(model, test_batches, eval_batch_size, device, autocast, mask_free)
    if dynamics is not None and main:
        write_dynamics(run_dir, loop.get("dynamics", []))
    if keep_delta:
        write_delta(run_dir, model, mc.name, names, w0, base_path,
                    {"base_model": cfg.model.path, "base_model_name": cfg.model.name,
                     "scaling": lora_scaling(mc.alpha, mc.rank, mc.scaling) if mc.name == "lora" else 1.0,
                     "rank": mc.get("rank"), "alpha": mc.get("alpha"), "targets": names}, dense=relora is not None)

    timing = clock.summary()
    tokens_per_second = timing["tokens_per_second"]
    seq = timing["timed_tokens"] / max(1, timing["timed_steps"]) / tc.batch_size  # real tokens per sequence
    fpt = flops_per_token(model, max(1, int(seq)), model.config.num_hidden_layers, model.config.hidden_size)
    peak = peak_flops(device, precision)
    last = loop["history"][-1]
    metrics = {
        "status": "complete",
        "method": mc.name,
        "objective": objective.name if objective.name == "classification" else cfg.task.objective,
        **{k: v for k, v in last.items() if k != "step"},  # eval_loss, eval_accuracy or eval_perplexity, train_loss
        **final_scores,  # train accuracy (classification); forgetting, exact match (causal LM)
        "trainable_params": sum(p.numel() for p in trainable),
        **({"relora_restarts": relora.restarts} if relora is not None else {}),
        "head_params": head_params,
        "adapted_params": sum(p.numel() for p in trainable) - head_params,
        "total_params": sum(p.numel() for p in model.parameters()),
        **timing,  # tokens_per_second (real tokens, steady steps), padded_tokens_per_second, warm-up, ...
        "compile_seconds": compile_seconds() if tc.compile else None,
        "flops_per_token": fpt,
        "mfu": fpt * tokens_per_second / peak if peak and tokens_per_second else None,
        "peak_memory_bytes": peak_memory_bytes(device),
        "checkpoint_bytes": state_bytes(trainable),  # adapter + head for LoRA, every weight for full
        "train_examples": len(train_batches),
        "eval_examples": len(test_batches),
        "steps": tc.max_steps,
        "micro_batch": micro,
        "grad_accum": local_batch // micro,
        "world_size": distributed.world_size(),
        "parallel": parallel,
        **grad_sync.summary(),  # bytes (and seconds) of gradient all-reduce / reduce-scatter per optimizer step
        "activation_checkpointing": checkpointing,
        "budget_bytes": fit.budget_bytes,
        "fits": True,
        "memory_estimate": fit.memory_estimate,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision,
        "weight_dtype": weight_dtype,
        "optimizer": optimizer_kind,
        "mask_free_attention": mask_free,
        "cuda_graph": graphed,
        "group_by_length": by_length,
        "wall_seconds": time.perf_counter() - t_start,
        "eval_history": loop["history"],
        "delta_file": DELTA_FILE if keep_delta else None,
    }
    metrics = write_run_metrics(run_dir, cfg, metrics)
    if main:
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)  # the run is final; ΔW and metrics are what remain
    logger.summary(metrics)
    logger.finish()
    log.info("done: eval_loss %.4f in %.1f s -> %s", metrics["eval_loss"], metrics["wall_seconds"], run_dir)
    return metrics
