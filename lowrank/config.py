"""Config checks, each with one line naming the key and what would be valid: the cheap ones before anything
is loaded (`validate`), the ones that need the model (`check_rank_fits`), and the settings resolved once for
everyone (`resolve_device`, `resolve_precision`).
"""
import math

import torch
from omegaconf import DictConfig

from lowrank.errors import ConfigError, check_choice
from lowrank.adapters.lora import INITS, SCALINGS
from lowrank.train.optim import OPTIMIZERS
from lowrank.adapters.targets import module_ranks, read_rank_pattern

METHODS = ("full", "lora", "subspace")
PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = ("auto", "fp32", "bf16")
SCHEDULES = ("linear", "cosine", "constant")
LOGGERS = ("none", "wandb")


def check_positive(key: str, value, integer: bool = False, allow_zero: bool = False) -> None:
    """A number (an integer with `integer`) > 0, or >= 0 with `allow_zero`; a bool is neither."""
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key}={value!r} is not valid; it must be {kind} {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: DictConfig) -> None:
    """Cheap checks before anything is loaded; model-dependent ones (rank vs width, targets) come later."""
    m, t = cfg.method, cfg.trainer
    check_choice("method.name", m.name, METHODS)
    if m.name == "lora":
        check_positive("method.rank", m.rank, integer=True)
        check_positive("method.alpha", m.alpha)
        if not (isinstance(m.dropout, (int, float)) and 0 <= m.dropout < 1):
            raise ConfigError(f"method.dropout={m.dropout!r} is not valid; it must be in [0, 1)")
        check_choice("method.scaling", m.scaling, SCALINGS)
        check_choice("method.init", m.init, INITS)
        if not isinstance(m.get("dora", False), bool):
            raise ConfigError(f"method.dora={m.dora!r} is not valid; it must be true or false")
        if m.get("loraplus_ratio") is not None:
            check_positive("method.loraplus_ratio", m.loraplus_ratio)
        if m.get("relora_every") is not None:
            check_positive("method.relora_every", m.relora_every, integer=True)
            check_positive("method.relora_warmup", m.get("relora_warmup", 0), integer=True, allow_zero=True)
            if m.get("dora") or m.init == "pissa":
                raise ConfigError(f"method.relora_every={m.relora_every} is not valid with "
                                  f"{'method.dora=true' if m.get('dora') else 'method.init=pissa'}; use one variant")
    if m.name == "subspace":
        check_positive("method.dim", m.dim, integer=True)
        if m.get("step_size") is not None:
            check_positive("method.step_size", m.step_size)
        if not isinstance(m.said, bool):
            raise ConfigError(f"method.said={m.said!r} is not valid; it must be true or false")
        read_rank_pattern(m.get("rank_pattern"))  # a mapping {module: rank >= 1} or a readable JSON file of one
    if not m.targets:
        raise ConfigError("method.targets is empty; give module-name suffixes such as [query,value] or all-linear")
    for key in ("max_steps", "batch_size", "max_length", "eval_interval", "eval_batch_size"):
        check_positive(f"trainer.{key}", t[key], integer=True)
    for key in ("micro_batch_size", "checkpoint_every"):
        if t[key] is not None:
            check_positive(f"trainer.{key}", t[key], integer=True, allow_zero=key == "checkpoint_every")
    check_positive("trainer.warmup_steps", t.warmup_steps, integer=True, allow_zero=True)
    check_positive("trainer.timing_warmup_steps", t.timing_warmup_steps, integer=True, allow_zero=True)
    check_positive("trainer.lr", t.lr)
    check_positive("trainer.weight_decay", t.weight_decay, allow_zero=True)
    if t.grad_clip is not None:
        check_positive("trainer.grad_clip", t.grad_clip)
    check_choice("trainer.precision", t.precision, PRECISIONS)
    check_choice("model.dtype", cfg.model.get("dtype", "auto"), DTYPES)
    if cfg.model.get("dtype") == "bf16" and t.precision == "fp32":
        raise ConfigError("model.dtype=bf16 is not valid with trainer.precision=fp32; bf16 weights compute in bf16")
    for key in ("compile", "mask_free_attention", "write_delta"):
        if not isinstance(t.get(key, False), bool):
            raise ConfigError(f"trainer.{key}={t[key]!r} is not valid; it must be true or false")
    for key in ("cuda_graph", "group_by_length"):
        if not (isinstance(t.get(key, "auto"), bool) or t.get(key, "auto") == "auto"):
            raise ConfigError(f"trainer.{key}={t[key]!r} is not valid; choose auto, true or false")
    check_choice("trainer.schedule", t.schedule, SCHEDULES)
    check_choice("trainer.optimizer", t.optimizer, OPTIMIZERS)
    if t.optimizer == "flat_master" and m.name != "lora":
        raise ConfigError(f"trainer.optimizer=flat_master is not valid with method={m.name}; it steps LoRA factors")
    if t.optimizer == "flat_master" and m.get("relora_every") is not None:
        raise ConfigError("trainer.optimizer=flat_master is not valid with method.relora_every set; ReLoRA resets "
                          "each factor's Adam state: use auto or adamw")
    if t.optimizer == "flat_master" and m.get("loraplus_ratio") is not None:
        raise ConfigError("trainer.optimizer=flat_master is not valid with method.loraplus_ratio set; LoRA+ needs two "
                          "learning rates: use auto or adamw")
    variant = ("method=subspace" if m.name == "subspace" else "method.dora=true" if m.get("dora") else
               "method.init=pissa" if m.get("init") == "pissa" else
               "method.relora_every" if m.get("relora_every") is not None else None)
    if variant and t.get("parallel", "auto") in ("ddp", "fsdp"):
        raise ConfigError(f"trainer.parallel={t.parallel} is not valid with {variant}; it runs in one process")
    check_choice("logger.name", cfg.logger.name, LOGGERS)
    for key in ("train_size", "eval_size", "test_size", "train_examples", "test_examples"):
        if cfg.task.get(key) is not None:
            check_positive(f"task.{key}", cfg.task[key], integer=True)
    check_choice("logger.mode", cfg.logger.get("mode"), (None, "online", "offline", "disabled"))
    budget_bytes(cfg.get("budget"))  # a ConfigError naming budget.gib when it is not a positive number
    check_device(t.device)
    if not isinstance(cfg.seed, int):
        raise ConfigError(f"seed={cfg.seed!r} is not valid; it must be an integer")


def check_rank_fits(rank: int, widths: dict[str, int], rank_pattern=None) -> None:
    """LoRA's rank (each module's, with `rank_pattern`) must not exceed min(in, out) of any target; `widths` maps each
    target to that minimum."""
    ranks = module_ranks(list(widths), rank, read_rank_pattern(rank_pattern))
    too_small = {name: width for name, width in widths.items() if ranks[name] > width}
    if too_small:
        name, width = next(iter(too_small.items()))
        key = "method.rank" if ranks[name] == rank else "method.rank_pattern"
        raise ConfigError(f"{key}={rank if key == 'method.rank' else rank_pattern!r} is not valid; it must be <= "
                          f"min(in, out)={width} of target {name}" + ("" if key == "method.rank" else
                                                                       f" (rank {ranks[name]} there)"))


def budget_bytes(cfg_budget) -> int | None:
    """`budget.gib` in bytes (GiB = 2**30); None when there is no budget (`budget=none` or no budget group)."""
    gib = None if cfg_budget is None else cfg_budget.get("gib")
    if gib is None:
        return None
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not gib > 0:
        raise ConfigError(f"budget.gib={gib!r} is not valid; it must be a number of GiB > 0, or null for no budget")
    return int(gib * 2**30)


def check_device(name) -> None:
    """`auto`, `cpu`, `cuda` or `cuda:N` of a GPU this machine has."""
    try:
        device = torch.device(name) if name != "auto" else None
    except (RuntimeError, TypeError):
        device = torch.device("meta")
    if device is not None and device.type not in ("cpu", "cuda"):
        raise ConfigError(f"trainer.device={name!r} is not valid; choose auto, cpu, cuda or cuda:N")
    if device is not None and device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"trainer.device={name!r} is not valid; this machine has {count} CUDA device(s): "
                              f"use auto or cpu")


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA where there is one, else the CPU; a CUDA device gets its index (caps and stats want one)."""
    device = torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_precision(precision: str, device_type: str) -> str:
    """`auto`: bf16 autocast on CUDA, fp32 on the CPU (where bf16 speed depends on the CPU's arithmetic)."""
    return precision if precision != "auto" else ("bf16" if device_type == "cuda" else "fp32")


def resolve_weight_dtype(dtype: str, method: str, precision: str) -> str:
    """The dtype of the frozen weights. `auto`: bf16 for LoRA computing in bf16 (a frozen base needs no fp32
    master, and bf16 autocast would make bf16 copies of it anyway), fp32 otherwise. LoRA's factors and the
    head train in fp32 whatever it is; with `bf16`, full fine-tuning trains bf16 weights. `precision` is
    the resolved one (`resolve_precision`)."""
    if dtype != "auto":
        return dtype
    return "bf16" if method == "lora" and precision == "bf16" else "fp32"
