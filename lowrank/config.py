"""Every config rule in one place, all checked before any model loads, each failure one line naming the key and
what would be valid:

    validate(cfg)                  # RULES (one per key), then CROSS_KEY_RULES, then check_model_rules
    option(cfg, "method.dora")     # the config's value, else the table's default: no caller restates a default
    check_model_fits(cfg, model)   # targets and LoRA ranks against a model: a meta-device copy, or the loaded one

`check_model_rules` builds the model's architecture from its config alone on the meta device (no weights, no
network), so a target that matches nothing or a rank wider than a matrix stops the run before W0 is read. Also
here: the settings resolved once for everyone (`resolve_device`, `resolve_precision`, `resolve_weight_dtype`).
Its ~550 lines are the whole contract of a config file (a table of ~85 keys, ~15 named cross-key rules, the model's
rules) kept in one module on purpose, so that a reader finds every rule, and every default, in one place.
"""
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from lowrank.adapters.lora import INITS, SCALINGS, match_targets
from lowrank.adapters.targets import module_ranks, pattern_key, read_rank_pattern
from lowrank.data.classification import LOADERS
from lowrank.data.lm import OBJECTIVES as LM_OBJECTIVES
from lowrank.data.model_files import UNREADABLE, conv1d_to_linear, gguf_cache_dir, resolve_path
from lowrank.data.shapes import hf_config_from_shape
from lowrank.errors import ConfigError, check_choice
from lowrank.train.distributed import PARALLEL
from lowrank.train.dynamics import tracked
from lowrank.train.optim import OPTIMIZERS
from lowrank.train.step import use_cuda_graph

METHODS = ("full", "lora", "subspace")
PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = ("auto", "fp32", "bf16")
SCHEDULES = ("linear", "cosine", "constant")
LOGGERS = ("none", "wandb")
OBJECTIVES = ("classification", *LM_OBJECTIVES)
REQUIRED = object()  # a Key without a default: the config must hold it wherever it applies


class Check:
    """A value rule: `ok(value)`, else the one line `KEY=VALUE is not valid; ADVICE`. `nullable`: null is valid too."""

    def __init__(self, ok: Callable[[object], bool], advice: str, nullable: bool = False):
        self.ok, self.advice, self.nullable = ok, advice, nullable

    def __call__(self, key: str, value) -> None:
        if not (value is None and self.nullable) and not self.ok(value):
            raise ConfigError(f"{key}={value!r} is not valid; {self.advice}")


class Reads(Check):
    """A rule whose reader raises its own one line (a file that cannot be read, a GPU this machine lacks)."""

    def __init__(self, read: Callable[[str, object], None], advice: str):
        super().__init__(lambda v: True, advice)
        self.read = read

    def __call__(self, key: str, value) -> None:
        self.read(key, value)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(v) -> bool:
    return isinstance(v, str) and v != ""


def _texts(v) -> bool:
    return (OmegaConf.is_list(v) or isinstance(v, (list, tuple))) and len(v) > 0 and all(map(_text, v))


def positive_int(nullable=False):
    return Check(lambda v: _int(v) and v > 0, "it must be an integer > 0", nullable)


def count(nullable=False):
    return Check(lambda v: _int(v) and v >= 0, "it must be an integer >= 0", nullable)


def positive(nullable=False):
    return Check(lambda v: _number(v) and v > 0, "it must be a number > 0", nullable)


def text(nullable=False):
    return Check(_text, "it must be a non-empty string", nullable)


def choice(*values):
    return Check(lambda v: v in values, f"choose one of {list(values)}")


NON_NEGATIVE = Check(lambda v: _number(v) and v >= 0, "it must be a number >= 0")
FRACTION = Check(lambda v: _number(v) and 0 <= v < 1, "it must be in [0, 1)")
BOOL = Check(lambda v: isinstance(v, bool), "it must be true or false")
AUTO_BOOL = Check(lambda v: isinstance(v, bool) or v == "auto", "choose auto, true or false")
TEXTS = Check(_texts, "it must be a list of strings such as [sentence]")
SUFFIXES = Check(lambda v: _text(v) or _texts(v), "give module-name suffixes such as [query,value] or all-linear")
GIB = Check(lambda v: _number(v) and v > 0, "it must be a number of GiB > 0, or null for no budget", nullable=True)
TARGETS = Reads(lambda key, v: check_targets(key, v), SUFFIXES.advice)
RANK_PATTERN = Reads(lambda key, v: read_rank_pattern(v, key), "give {module-name pattern: rank} or a JSON file of one")
DEVICE = Reads(lambda key, v: check_device(v), "choose auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class Key:
    check: Check
    default: object = REQUIRED
    methods: tuple[str, ...] | None = None  # the method.name values the key belongs to (None: every method)


LORA, SUBSPACE = ("lora",), ("subspace",)

# Every key a config may hold, in the order validate checks them (method first: subspace's trainer.lr is computed
# from method.step_size and method.dim). A default is what the code uses when the key is absent; keys that only
# some config files have (method.dora, task.train_tokens, model.shape, ...) are checked when present.
RULES: dict[str, Key] = {
    # numpy's seed is 0 .. 2**32 - 1; a negative one failed deep in the run
    "seed": Key(Check(lambda v: _int(v) and 0 <= v < 2**32, "it must be an integer in [0, 2**32)")),
    "name": Key(Check(lambda v: _text(v) or _int(v), "it must be one folder name below runs_root, e.g. name=my_study")),
    "runs_root": Key(Check(lambda v: _text(v) or _int(v), "it must be a folder path")),
    "method.name": Key(choice(*METHODS)),
    "method.targets": Key(TARGETS),
    "method.rank": Key(positive_int(), methods=LORA),
    "method.alpha": Key(positive(), methods=LORA),
    "method.dropout": Key(FRACTION, methods=LORA),
    "method.scaling": Key(choice(*SCALINGS), methods=LORA),
    "method.init": Key(choice(*INITS), methods=LORA),
    "method.rank_pattern": Key(RANK_PATTERN, None, LORA),
    "method.dora": Key(BOOL, False, LORA),
    "method.loraplus_ratio": Key(positive(nullable=True), None, LORA),
    "method.relora_every": Key(positive_int(nullable=True), None, LORA),
    "method.relora_warmup": Key(count(), 0, LORA),
    "method.dim": Key(positive_int(), methods=SUBSPACE),
    "method.said": Key(BOOL, False, SUBSPACE),
    "method.step_size": Key(positive(nullable=True), None, SUBSPACE),
    "trainer.max_steps": Key(positive_int()),
    "trainer.batch_size": Key(positive_int()),
    # a tokenizer cannot honour 1 (a classifier's sequence needs [CLS] and [SEP], an LM's a next token): it
    # silently kept whole texts
    "trainer.max_length": Key(Check(lambda v: _int(v) and v >= 2, "it must be an integer >= 2")),
    "trainer.eval_interval": Key(positive_int()),
    "trainer.eval_batch_size": Key(positive_int()),
    "trainer.micro_batch_size": Key(positive_int(nullable=True), None),
    "trainer.checkpoint_every": Key(count(nullable=True)),
    "trainer.warmup_steps": Key(count()),
    "trainer.timing_warmup_steps": Key(count()),
    "trainer.lr": Key(positive()),
    "trainer.weight_decay": Key(NON_NEGATIVE),
    "trainer.grad_clip": Key(positive(nullable=True)),
    "trainer.precision": Key(choice(*PRECISIONS)),
    "trainer.device": Key(DEVICE),
    "trainer.schedule": Key(choice(*SCHEDULES)),
    "trainer.optimizer": Key(choice(*OPTIMIZERS)),
    "trainer.progress_bar": Key(BOOL, True),
    "trainer.activation_checkpointing": Key(BOOL, False),
    "trainer.mask_free_attention": Key(BOOL, False),
    "trainer.compile": Key(AUTO_BOOL, "auto"),
    "trainer.chunked_loss": Key(AUTO_BOOL, "auto"),
    "trainer.write_delta": Key(BOOL, True),
    "trainer.dynamics": Key(BOOL, True),
    "trainer.dynamics_targets": Key(Check(lambda v: _text(v) or _texts(v), "it must be all or module-name suffixes "
                                          "such as [query,value]"), "all"),
    "trainer.cuda_graph": Key(AUTO_BOOL, "auto"),
    "trainer.group_by_length": Key(AUTO_BOOL, "auto"),
    "trainer.parallel": Key(choice(*PARALLEL), "auto"),
    "trainer.world_size": Key(Check(lambda v: v == "auto" or _int(v) and v >= 1, "it must be auto or an integer >= 1"),
                              "auto"),
    "model.name": Key(text()),
    "model.path": Key(text(nullable=True)),
    "model.shape": Key(Check(lambda v: OmegaConf.is_dict(v) or isinstance(v, Mapping),
                             "it must be a mapping of config.json keys with a model_type", nullable=True), None),
    "model.dtype": Key(choice(*DTYPES), "auto"),
    # every dropout probability in the model's config (lowrank.data.models.set_dropout); null: the model's own
    "model.dropout": Key(Check(lambda v: _number(v) and 0 <= v < 1, "it must be in [0, 1), or null for the "
                                                                       "model's own", nullable=True), None),
    "model.gguf_file": Key(text(nullable=True), None),
    "model.cache_dir": Key(text(nullable=True), None),
    "task.name": Key(text()),
    "task.loader": Key(choice(*sorted(LOADERS), "python_stdlib")),
    "task.objective": Key(choice(*OBJECTIVES), "classification"),
    "task.num_labels": Key(positive_int(), 2),
    "task.path": Key(text(nullable=True), None),
    "task.train_size": Key(positive_int(nullable=True), None),
    "task.eval_size": Key(positive_int(nullable=True), None),
    "task.test_size": Key(positive_int(nullable=True), None),
    "task.train_examples": Key(positive_int(nullable=True), None),
    "task.test_examples": Key(positive_int(nullable=True), None),
    "task.exact_match_examples": Key(count(nullable=True), None),
    "task.train_tokens": Key(positive_int(nullable=True), None),
    "task.test_tokens": Key(positive_int(nullable=True), None),
    "task.ood_tokens": Key(positive_int(), None),
    "task.seq_len": Key(positive_int(), None),
    "task.vocab": Key(Check(lambda v: _int(v) and v >= 2, "it must be an integer >= 2"), None),
    "task.hub_id": Key(text(), None),
    "task.hub_config": Key(text(nullable=True), None),
    "task.text_fields": Key(TEXTS, None),
    "task.eval_split": Key(text(), None),
    "task.hf_dataset": Key(text(nullable=True), None),
    "task.hf_config": Key(text(nullable=True), None),
    "task.text_field": Key(text(), None),
    "task.prompt_field": Key(text(), None),
    "task.answer_field": Key(text(), None),
    "logger.name": Key(choice(*LOGGERS)),
    "logger.project": Key(text(), None),
    "logger.entity": Key(text(nullable=True), None),
    "logger.mode": Key(choice(None, "online", "offline", "disabled"), None),
    "logger.group": Key(text(nullable=True), None),
    "budget.gib": Key(GIB, None),
}

# Keys no code reads: conf files interpolate them into keys that are read (and ruled).
INTERPOLATED = {
    "model.attention_targets": "method.targets of LoRA and subspace (conf/method/*.yaml: ${model.attention_targets})",
    "demo_lr": "trainer.lr of the demo studies, per method (conf/experiment/demo.yaml)",
    "lm_lr": "trainer.lr of the generative studies, per method (conf/experiment/lm.yaml)",
}
_ABSENT = object()


def option(cfg, key: str):
    """`cfg`'s value at the dotted `key`, else the table's default; None for a required key of another method
    (method.rank of method=full), a ConfigError for one of this method. A KeyError for a key not in RULES."""
    rule = RULES[key]
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if value is not _ABSENT:
        return value
    if rule.default is not REQUIRED:
        return rule.default
    if applies(cfg, key):
        raise missing(key)
    return None


def missing(key: str) -> ConfigError:
    return ConfigError(f"{key} is missing; {RULES[key].check.advice}")


def applies(cfg, key: str) -> bool:
    """Whether `key` belongs to this config's method (method.rank: LoRA's); a key of another method is not read."""
    methods = RULES[key].methods
    return methods is None or OmegaConf.select(cfg, "method.name") in methods


# --- cross-key rules: each a plain function of the whole config ----------------------------------------------------

def bf16_weights_compute_in_bf16(cfg) -> None:
    if option(cfg, "model.dtype") == "bf16" and cfg.trainer.precision == "fp32":
        raise ConfigError("model.dtype=bf16 is not valid with trainer.precision=fp32; bf16 weights compute in bf16")


def flat_master_steps_lora_factors(cfg) -> None:
    if cfg.trainer.optimizer == "flat_master" and cfg.method.name != "lora":
        raise ConfigError(f"trainer.optimizer=flat_master is not valid with method={cfg.method.name}; it steps LoRA "
                          f"factors")


def flat_master_not_with_relora(cfg) -> None:
    if cfg.trainer.optimizer == "flat_master" and applies(cfg, "method.relora_every") \
            and option(cfg, "method.relora_every") is not None:
        raise ConfigError("trainer.optimizer=flat_master is not valid with method.relora_every set; ReLoRA resets "
                          "each factor's Adam state: use auto or adamw")


def flat_master_not_with_loraplus(cfg) -> None:
    if cfg.trainer.optimizer == "flat_master" and applies(cfg, "method.loraplus_ratio") \
            and option(cfg, "method.loraplus_ratio") is not None:
        raise ConfigError("trainer.optimizer=flat_master is not valid with method.loraplus_ratio set; LoRA+ needs two "
                          "learning rates: use auto or adamw")


def flat_master_in_one_process(cfg) -> None:
    """Its flat master copy is one process's (under torchrun with parallel=auto the trainer falls back to adamw)."""
    parallel = option(cfg, "trainer.parallel")
    if cfg.trainer.optimizer == "flat_master" and parallel in ("ddp", "fsdp"):
        raise ConfigError(f"trainer.optimizer=flat_master is not valid with trainer.parallel={parallel}; "
                          f"use auto or adamw")


def variant(cfg) -> str | None:
    """The setting that makes this run a variant of plain LoRA or full fine-tuning, as messages name it."""
    if cfg.method.name == "subspace":
        return "method=subspace"
    if cfg.method.name != "lora":
        return None
    return ("method.dora=true" if option(cfg, "method.dora") else "method.init=pissa" if cfg.method.init == "pissa"
            else "method.relora_every" if option(cfg, "method.relora_every") is not None else None)


def variants_run_in_one_process(cfg) -> None:
    name, parallel = variant(cfg), option(cfg, "trainer.parallel")
    if name and parallel in ("ddp", "fsdp"):
        raise ConfigError(f"trainer.parallel={parallel} is not valid with {name}; it runs in one process")


def relora_is_one_variant(cfg) -> None:
    if not applies(cfg, "method.relora_every") or option(cfg, "method.relora_every") is None:
        return
    other = "method.dora=true" if option(cfg, "method.dora") else "method.init=pissa" \
        if cfg.method.init == "pissa" else None
    if other:
        raise ConfigError(f"method.relora_every={cfg.method.relora_every} is not valid with {other}; use one variant")


def micro_batch_divides_batch(cfg) -> None:
    micro, batch = option(cfg, "trainer.micro_batch_size"), cfg.trainer.batch_size
    if micro is not None and batch % micro:
        raise ConfigError(f"trainer.micro_batch_size={micro} is not valid; it must divide trainer.batch_size={batch}")


def batch_splits_over_world_size(cfg) -> None:
    """With a number of processes given (trainer.world_size=N, as experiments.estimate takes it), each gets an equal
    share of the batch, which the micro-batch divides; under torchrun `auto` is checked where the processes start."""
    world, batch = option(cfg, "trainer.world_size"), cfg.trainer.batch_size
    if world == "auto":
        return
    if batch % world:
        raise ConfigError(f"trainer.batch_size={batch} is not valid with trainer.world_size={world}; it must be a "
                          f"multiple of it")
    micro = option(cfg, "trainer.micro_batch_size")
    if micro is not None and (batch // world) % micro:
        raise ConfigError(f"trainer.micro_batch_size={micro} is not valid with trainer.world_size={world}; it must "
                          f"divide the per-process batch trainer.batch_size / world_size = {batch // world}")


def batch_fits_training_set(cfg) -> None:
    """Where the config says how many training examples there are (synthetic data's train_examples, a classification
    task's train_size); otherwise the trainer checks it once the data are loaded (check_batch_fits)."""
    classification = option(cfg, "task.objective") == "classification"
    # LM data: packed sequences, counted once tokenized
    size = option(cfg, "task.train_size") if classification else None
    if size is None and cfg.task.loader == "synthetic":
        size = option(cfg, "task.train_examples")
    if size is not None:
        check_batch_fits(cfg, size)


def check_batch_fits(cfg, train_examples: int) -> None:
    """The batch must not exceed the training set (`train_examples`: its size, as loaded)."""
    if cfg.trainer.batch_size > train_examples:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is not valid; it must be <= the training set "
                          f"size ({train_examples})")


def cuda_graph_true_is_possible(cfg) -> None:
    """`true` where the config already rules a graph out (the CPU, several processes, activation checkpointing,
    masks in every batch); where the data decide (padded batches), the trainer says so when it builds the step."""
    t = cfg.trainer
    if option(cfg, "trainer.cuda_graph") is not True:
        return
    parallel = option(cfg, "trainer.parallel")
    _, why_not = use_cuda_graph(True, resolve_device(t.device), option(cfg, "trainer.mask_free_attention"),
                                option(cfg, "trainer.activation_checkpointing"))
    if not why_not and parallel in ("ddp", "fsdp"):
        why_not = f"it runs on several processes (trainer.parallel={parallel})"
    if why_not:
        raise ConfigError(f"trainer.cuda_graph=true is not valid here: {why_not}; use auto or false")


def loader_fits_objective(cfg) -> None:
    """Classification reads lowrank.data.classification's loaders; an LM task reads its own source (unless it names a
    Hub dataset), or random tokens (synthetic)."""
    objective, loader = option(cfg, "task.objective"), cfg.task.loader
    if objective == "classification":
        check_choice("task.loader", loader, sorted(LOADERS))
    elif not option(cfg, "task.hf_dataset"):
        check_choice("task.loader", loader, ("python_stdlib" if objective == "cpt" else "wordnet", "synthetic"))


def token_caps_hold_a_sequence(cfg) -> None:
    """An LM task's token caps are whole sequences of trainer.max_length tokens (lowrank.data.lm packs them so)."""
    if option(cfg, "task.objective") not in LM_OBJECTIVES or cfg.task.loader == "synthetic":
        return
    length = cfg.trainer.max_length
    for key in ("ood_tokens", "train_tokens", "test_tokens"):
        value = OmegaConf.select(cfg.task, key)
        nullable = key != "ood_tokens"
        if (value is not None or not nullable) and not (_int(value) and value >= length):
            raise ConfigError(f"task.{key}={value!r} is not valid; it must be an integer >= {length} "
                              f"(trainer.max_length: one full sequence)" + (" or null for all" if nullable else ""))


def model_has_weights_or_shape(cfg) -> None:
    if not option(cfg, "model.shape") and not cfg.model.path:
        raise ConfigError(f"model={cfg.model.name}: set model.path (weights) or model.shape (random init)")


def gguf_file_has_a_cache(cfg) -> None:
    if option(cfg, "model.gguf_file") and not option(cfg, "model.cache_dir"):
        raise ConfigError(f"model.cache_dir={option(cfg, 'model.cache_dir')!r} is not valid with model.gguf_file; "
                          f"give a folder for its dequantised copy, e.g. ~/.cache/lowrank/models")


CROSS_KEY_RULES = (bf16_weights_compute_in_bf16, flat_master_steps_lora_factors, flat_master_not_with_relora,
                   flat_master_not_with_loraplus, flat_master_in_one_process, relora_is_one_variant,
                   variants_run_in_one_process, micro_batch_divides_batch, batch_splits_over_world_size,
                   batch_fits_training_set, cuda_graph_true_is_possible, loader_fits_objective,
                   token_caps_hold_a_sequence, model_has_weights_or_shape, gguf_file_has_a_cache)


def validate(cfg) -> None:
    """Every rule, before anything is loaded: each key's (RULES), the cross-key ones, then the model's shapes."""
    for key, rule in RULES.items():
        if applies(cfg, key):
            value = OmegaConf.select(cfg, key, default=_ABSENT)
            if value is not _ABSENT:
                rule.check(key, value)
            elif rule.default is REQUIRED:
                raise missing(key)
    for rule in CROSS_KEY_RULES:
        rule(cfg)
    check_model_rules(cfg)


# --- model-dependent rules, from the model's config alone --------------------------------------------------------

def check_model_rules(cfg) -> None:
    """Targets, LoRA ranks and rank_pattern against the model's architecture, built on the meta device from its config
    (no weights read, no network). Skipped where that config is not at hand: a Hub id not in the local cache, a GGUF
    file not dequantised yet, a folder transformers cannot read; the load then names the problem, and the trainer
    checks the loaded model with check_model_fits."""
    config = model_config(cfg)
    if config is not None:
        check_model_fits(cfg, meta_model(config, causal_lm=option(cfg, "task.objective") in LM_OBJECTIVES))


def model_config(cfg):
    """The model's transformers config as this machine has it, or None where only a load (or the Hub) would give it.
    A bad model.shape is its ConfigError, as the load would raise it."""
    m, num_labels = cfg.model, option(cfg, "task.num_labels")
    if option(cfg, "model.shape"):
        return hf_config_from_shape(m.shape, num_labels)
    try:
        source = resolve_path(m.path)
        if option(cfg, "model.gguf_file"):  # the GGUF header takes seconds to parse; its dequantised copy does not
            source = str(gguf_cache_dir(m))
        return AutoConfig.from_pretrained(source, num_labels=num_labels, local_files_only=True)
    except UNREADABLE:
        return None


_META_MODELS: dict[tuple[bool, str], nn.Module] = {}  # a sweep validates many jobs of one model: built once


def meta_model(config, causal_lm: bool) -> nn.Module:
    """The model the trainer would load (a sequence classifier, or a causal LM with its own head), with meta tensors:
    every module name and weight shape, no memory. GPT-2's Conv1D become nn.Linear, as models.load_model makes them."""
    key = (causal_lm, config.to_json_string())
    if key not in _META_MODELS:
        auto_class = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
        with torch.device("meta"):
            model = auto_class.from_config(config)
        conv1d_to_linear(model)
        if len(_META_MODELS) >= 8:
            _META_MODELS.clear()
        _META_MODELS[key] = model
    return _META_MODELS[key]


def check_model_fits(cfg, model: nn.Module) -> list[str]:
    """The target names `method.targets` selects in `model` (a ConfigError listing the valid suffixes where an entry
    selects none); for LoRA every rank_pattern key selects a target and every rank fits its matrix; for SAID the
    dimension exceeds the number of targets."""
    m = cfg.method
    names = match_targets(model, m.targets)
    if m.name == "lora":
        pattern = option(cfg, "method.rank_pattern")
        check_pattern_selects(pattern, names)
        check_rank_fits(m.rank, {n: min(model.get_submodule(n).weight.shape) for n in names}, pattern)
    tracked(names, option(cfg, "trainer.dynamics_targets"))  # rank dynamics' matrices, among the targets
    if m.name == "subspace" and option(cfg, "method.said") and m.dim <= len(names):
        raise ConfigError(f"method.dim={m.dim} is not valid with method.said=true; it must exceed the number of target "
                          f"matrices ({len(names)}), which each take one scale")
    return names


def check_pattern_selects(rank_pattern, names: list[str]) -> None:
    """Each rank_pattern key must select a target (PEFT would ignore it silently: a typo would train at the rank)."""
    pattern = read_rank_pattern(rank_pattern) or {}
    where = f"method.rank_pattern={rank_pattern!r}" if isinstance(rank_pattern, str) else "method.rank_pattern"
    for key in pattern:
        if not any(pattern_key([key], n) for n in names):
            raise ConfigError(f"{where} key {key!r} selects none of the {len(names)} targets (such as {names[0]!r}); "
                              f"give module-name suffixes or full names of targeted modules")


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


# --- single settings, also used outside validate -----------------------------------------------------------------

def check_targets(key: str, value) -> None:
    if not value:
        raise ConfigError(f"{key} is empty; {SUFFIXES.advice}")
    SUFFIXES(key, value)


def check_positive(key: str, value, integer: bool = False, allow_zero: bool = False) -> None:
    """A number (an integer with `integer`) > 0, or >= 0 with `allow_zero`; a bool is neither."""
    (count() if integer and allow_zero else positive_int() if integer else NON_NEGATIVE if allow_zero
     else positive())(key, value)


def budget_bytes(cfg_budget) -> int | None:
    """`budget.gib` in bytes (GiB = 2**30); None when there is no budget (`budget=none` or no budget group)."""
    gib = None if cfg_budget is None else cfg_budget.get("gib")
    GIB("budget.gib", gib)
    return None if gib is None else int(gib * 2**30)


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
