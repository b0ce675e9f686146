"""The recipe's first phase: everything a run needs before its first step, built in the order it happens and
held in one `Run`.

    run = setup(cfg, run_dir, group, runs_root, parallel)   # run.fit.fits False: it does not fit its budget

Order matters where random numbers are drawn (the model's head, LoRA's A, dropout in the budget probes): the
seed is set before the model is built and again after the probes, so a run is a pure function of its config.
"""
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lowrank.adapters.methods import Full, method_for
from lowrank.config import (budget_bytes, check_batch_fits, check_model_fits, option, resolve_device,
                            resolve_precision, resolve_weight_dtype)
from lowrank.data.objectives import objective_for
from lowrank.errors import ConfigError
from lowrank.logger import make_logger
from lowrank.rundir.delta import ensure_base_weights, linear_weights
from lowrank.train import distributed
from lowrank.train.blocks import causal_attention_without_mask, compile_blocks, compile_on
from lowrank.train.lm_loss import chunked_loss_on, chunked_lm_loss, supports_chunked_loss
from lowrank.train.budget import BudgetFit, fit_to_budget
from lowrank.train.checkpoint import load_checkpoint
from lowrank.train.dynamics import Dynamics, tracked
from lowrank.train.loop_state import LoopState
from lowrank.train.memory import estimate_from_cfg
from lowrank.train.optim import lr_lambda, make_optimizer, make_scheduler, resolve_optimizer
from lowrank.train.step import TrainStep, place_lr, use_cuda_graph

log = logging.getLogger("lowrank.train.recipe")
CAUSAL_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")  # decoders: attention is causal, SDPA's flag suffices


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """One run's parts, as setup builds them (each phase below fills its share)."""
    cfg: DictConfig
    run_dir: Path
    runs_root: Path
    parallel: str
    t_start: float = field(default_factory=time.perf_counter)
    main: bool = True
    device: torch.device | None = None
    precision: str = "fp32"
    weight_dtype: str = "fp32"
    objective: Any = None
    model: Any = None
    tokenizer: Any = None
    head: Any = None
    names: list = field(default_factory=list)    # the target matrices (ΔW is written for these)
    method: Full | None = None
    w0: dict | None = None                       # CPU fp32 copies of the targets' W0 where the method needs them
    base_path: Path | None = None                # RUNS_ROOT/base_weights/...: W0 on disk
    forward_model: Any = None                    # the model as the step calls it (DDP/FSDP-wrapped)
    grad_sync: Any = None
    grad_sync_context: Any = None
    trainable: list = field(default_factory=list)
    head_params: int = 0
    autocast: Any = nullcontext
    by_length: bool = False
    train_batches: Any = None
    test_batches: Any = None
    mask_free: bool = False
    optimizer_kind: str = "adamw"
    optimizer: Any = None
    scheduler: Any = None
    local_batch: int = 0
    micro: int = 0
    fit: BudgetFit | None = None
    checkpointing: bool = False
    eval_batch_size: int = 0
    graphed: bool = False
    compiled: bool = False                       # trainer.compile as resolved
    chunked_loss: bool = False                   # trainer.chunked_loss as resolved
    train_step: TrainStep | None = None
    state: LoopState | None = None
    run_name: str = ""
    logger: Any = None
    dynamics: Dynamics | None = None

    @property
    def keep_delta(self) -> bool:
        return self.cfg.trainer.write_delta  # false: speed runs keep no ΔW (nor W0: 13 GB at 7B)


def setup(cfg: DictConfig, run_dir: Path, group: str | None, runs_root: Path, parallel: str) -> Run:
    run = Run(cfg, run_dir, runs_root, parallel, main=distributed.is_main())
    _place(run)
    _build_model(run)
    _data(run)
    _optimizer(run)
    _fit_budget(run)
    seed_everything(cfg.seed)  # the budget probes drew random numbers (dropout): start from the seed again
    if not run.fit.fits:
        return run
    _speedups(run)
    _resume_and_step(run)
    _observers(run, group)
    return run


def _place(run: Run) -> None:
    tc = run.cfg.trainer
    run.device = resolve_device(tc.device)
    run.precision = resolve_precision(tc.precision, run.device.type)
    run.weight_dtype = resolve_weight_dtype(option(run.cfg, "model.dtype"), run.cfg.method.name, run.precision)
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if run.precision == "bf16":
        run.autocast = lambda: torch.autocast(run.device.type, dtype=torch.bfloat16)


def _build_model(run: Run) -> None:
    """Load the model, pick the targets, keep W0 (on disk, and in memory where the method reads ΔW against it),
    and apply the method."""
    cfg = run.cfg
    seed_everything(cfg.seed)
    run.objective = objective_for(cfg.task)
    model, run.tokenizer, run.head = run.objective.load_model(cfg, run.device)
    model.config.use_cache = False  # a k/v cache is for generation; in training it only costs memory
    run.names = check_model_fits(cfg, model)  # validate checked them on the model's config: now on the model
    if run.weight_dtype == "bf16":
        with torch.no_grad():  # bf16 values from the start, so W0 on disk is the W0 the run uses
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16))
    writes = run.keep_delta and run.main
    run.base_path = ensure_base_weights(run.runs_root, cfg.model.name, model) if writes else None
    run.method = method_for(cfg)
    run.w0 = linear_weights(model, run.names) if writes and run.method.needs_w0 else None
    run.method.apply(model, run.names, run.head)
    if run.weight_dtype == "bf16":
        for p in model.parameters():  # what does not train (everything, with method=full) is held in bf16
            if not p.requires_grad or run.method.trains_everything:
                p.data = p.data.to(torch.bfloat16)
    run.grad_sync = distributed.GradSync()
    # FSDP shards the model onto the device block by block: no rank ever holds all of it there
    run.forward_model, run.grad_sync_context = distributed.wrap_model(
        (model if run.parallel == "fsdp" else model.to(run.device)).train(), run.parallel, run.device, run.precision,
        run.grad_sync)
    if run.device.type == "cuda":  # training's peak: not that of building a shape model in fp32 before the cast
        torch.cuda.reset_peak_memory_stats(run.device)
    run.model = model
    run.trainable = [p for p in model.parameters() if p.requires_grad]
    run.head_params = sum(p.numel() for p in run.head.parameters()) if run.head is not None else 0


def _data(run: Run) -> None:
    cfg, tc = run.cfg, run.cfg.trainer
    by_length = tc.group_by_length
    run.by_length = run.device.type == "cuda" if by_length == "auto" else by_length  # off on CPU: as they were
    run.train_batches, run.test_batches = run.objective.batches(cfg, run.tokenizer, run.model, run.by_length, cfg.seed)
    # Under FSDP every rank must run the same forwards: no rank reads the base model's cached scores alone
    cached_base = run.base_path if run.parallel != "fsdp" else None
    run.objective.before_training(run.model, cached_base, {"model": cfg.model.name, "max_length": tc.max_length,
                                                           "precision": run.precision,
                                                           "weight_dtype": run.weight_dtype},
                                  run.device, run.autocast, run.test_batches)
    # Attention without a mask for causal models whose batches are never padded: transformers would build a
    # mask every step, and its packed-sequence check makes the host wait for the GPU (lowrank/train/blocks.py).
    run.mask_free = bool(tc.mask_free_attention and run.train_batches.unpadded and run.test_batches.unpadded
                         and run.model.config.model_type in CAUSAL_MODEL_TYPES)


def _optimizer(run: Run) -> None:
    tc, mc = run.cfg.trainer, run.cfg.method
    loraplus = option(run.cfg, "method.loraplus_ratio")  # LoRA+: B's learning rate is this many times A's
    kind = resolve_optimizer(tc.optimizer, mc.name, run.device.type, run.precision, static_batches=run.mask_free,
                             loraplus=loraplus is not None or run.method.base_moves)  # ReLoRA: its resets
    if run.parallel != "none" and kind == "flat_master":
        if tc.optimizer == "flat_master":
            raise ConfigError(f"trainer.optimizer=flat_master is not valid with trainer.parallel={run.parallel}; "
                              f"use auto or adamw")
        kind = "adamw"  # its flat master copy is one process's; DDP/FSDP step torch's AdamW
    run.optimizer_kind = kind
    run.optimizer = make_optimizer(run.model, run.trainable, kind, tc.lr, tc.weight_decay,
                                   fused=run.device.type == "cuda", loraplus_ratio=loraplus)
    run.scheduler = make_scheduler(run.optimizer,
                                   run.method.schedule(lr_lambda(tc.schedule, tc.warmup_steps, tc.max_steps)))
    run.method.attach(run.optimizer)


def _fit_budget(run: Run) -> None:
    """The batch rules that need the data or the processes, the loss (trainer.chunked_loss), then the micro-batch
    and activation checkpointing that fit `budget` (probing real steps in one process; the memory model under
    several)."""
    cfg, tc = run.cfg, run.cfg.trainer
    check_batch_fits(cfg, len(run.train_batches))  # the training set's size is known once it is loaded
    run.local_batch = tc.batch_size // distributed.world_size()  # each rank's share of every step's batch
    micro = tc.micro_batch_size or run.local_batch  # validate checked that it divides the batch
    distributed.check_batch(tc.batch_size, micro)  # under torchrun: the world size is known only now
    budget = budget_bytes(cfg.budget)
    if run.parallel != "none" and budget:
        log.info("budget: the memory model picks the micro-batch (probing steps is for one process)")
    # the loss is chosen first, so that the probes measure the one training will use
    run.chunked_loss = resolve_chunked_loss(option(run.cfg, "trainer.chunked_loss"), run.model, run.head,
                                            run.device, run.parallel)
    run.fit = fit_to_budget(budget, run.model, run.optimizer, run.device, run.autocast, run.local_batch,
                            tc.max_length, micro, bool(tc.activation_checkpointing),
                            lambda **kw: estimate_from_cfg(cfg, run.model.config, device_type=run.device.type,
                                                           world_size=distributed.world_size(), **kw),
                            causal_lm=run.head is None, measure=run.parallel == "none",
                            loss_fn=chunked_lm_loss if run.chunked_loss else None)


def _speedups(run: Run) -> None:
    """What the budget chose, then mask-free attention and compiled blocks (after the probes: they measure the
    eager step with masks, which needs more memory)."""
    tc, fit = run.cfg.trainer, run.fit
    run.micro, run.checkpointing = fit.micro_batch, fit.activation_checkpointing
    if fit.budget_bytes:
        log.info("budget.gib=%g: micro-batch %d × %d accumulated, activation checkpointing %s (estimate %.2f GiB)",
                 fit.budget_bytes / 2**30, run.micro, run.local_batch // run.micro, run.checkpointing,
                 fit.memory_estimate["total_bytes"] / 2**30)
    if run.checkpointing:
        run.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if run.mask_free:
        causal_attention_without_mask(run.model)
    run.compiled = resolve_compile(tc.compile, run.device, run.parallel)
    if run.compiled:
        compile_blocks(run.model)
    run.eval_batch_size = min(tc.eval_batch_size, run.micro) if fit.budget_bytes else tc.eval_batch_size


def _resume_and_step(run: Run) -> None:
    """The loop's state (from the checkpoint when there is one) and the step: one CUDA graph where it can be."""
    tc = run.cfg.trainer
    loaded = load_checkpoint(run.run_dir, run.model, run.optimizer, run.scheduler)
    run.method.load_state_dict((loaded or {}).pop("relora", None))  # ReLoRA: the base weights its restarts merged
    run.state = LoopState.from_dict(loaded)
    graphed, why_not = use_cuda_graph(tc.cuda_graph, run.device, run.mask_free, run.checkpointing)
    if run.parallel != "none":  # collectives and each rank's step are not captured in one process's graph
        graphed, why_not = False, f"it runs on {distributed.world_size()} processes (trainer.parallel={run.parallel})"
    if tc.cuda_graph is True and not graphed:
        raise ConfigError(f"trainer.cuda_graph=true is not valid here: {why_not}; use auto or false")
    run.graphed = graphed
    place_lr(run.optimizer, run.device if graphed else None, capturable=graphed)
    run.train_step = TrainStep(run.forward_model, run.optimizer, run.trainable, run.autocast, tc.grad_clip, graphed,
                               sync=run.grad_sync_context, reduce_loss=distributed.mean_over_ranks,
                               loss_fn=partial(chunked_lm_loss, compiled=run.compiled) if run.chunked_loss else None)
    if run.state.step:
        log.info("resuming %s from step %d", run.run_dir, run.state.step)


def _observers(run: Run, group: str | None) -> None:
    """The logger (W&B or none; rank 0 only) and rank dynamics (rank 0, one process's weights)."""
    cfg, tc, mc = run.cfg, run.cfg.trainer, run.cfg.method
    run.run_name = f"{mc.name}" + (f"-r{mc.rank}" if mc.name == "lora" else "") + f"-s{cfg.seed}"
    run.logger = make_logger(cfg.logger if run.main else OmegaConf.create({"name": "none"}), run.run_dir,
                             OmegaConf.to_container(cfg, resolve=True), option(cfg, "logger.group") or group,
                             run.run_name)
    if (tc.dynamics and run.main and run.parallel != "fsdp"
            and (not run.method.needs_w0 or run.w0 is not None)):
        run.dynamics = Dynamics(run.model, tracked(run.names, tc.dynamics_targets), run.w0, run.method)


def resolve_compile(setting, device: torch.device, parallel: str) -> bool:
    """trainer.compile: `auto` compiles the blocks on CUDA in one process; the CPU keeps the eager path (compiling
    there costs more than it saves on the demo's small models). One log line says what was chosen."""
    if setting is True and parallel != "none":
        log.info("trainer.compile: off under trainer.parallel=%s (compiled blocks are for one process)", parallel)
        return False
    on = compile_on(setting, device.type, parallel == "none")
    if setting == "auto":
        log.info("trainer.compile=auto: %s", "on (CUDA, one process)" if on else
                 f"off ({'the CPU' if device.type != 'cuda' else f'trainer.parallel={parallel}'})")
    return on


def resolve_chunked_loss(setting, model, head, device: torch.device, parallel: str) -> bool:
    """trainer.chunked_loss: causal LMs only (`head` None), one process (DDP and FSDP hook the wrapped model's own
    forward). `auto` turns it on for CUDA where the model's loss is the plain one; `true` where it cannot run is an
    error naming the key."""
    if head is not None or setting is False:
        return False
    ok, why_not = supports_chunked_loss(model)
    if parallel != "none":
        ok, why_not = False, f"it runs under trainer.parallel={parallel}"
    if setting is True and not ok:
        raise ConfigError(f"trainer.chunked_loss=true is not valid here: {why_not}; use auto or false")
    on = chunked_loss_on(setting, ok, device.type)
    if setting == "auto":
        log.info("trainer.chunked_loss=auto: %s", "on (CUDA)" if on else f"off ({why_not or 'the CPU'})")
    return on
