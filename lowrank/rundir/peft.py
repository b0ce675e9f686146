"""PEFT's LoRA adapter folder, read and written: `adapter_config.json` and `adapter_model.safetensors`, whose keys are
`base_model.model.{module}.lora_A.weight` (r, in) and `...lora_B.weight` (out, r), and PEFT's rules for each module's
rank and scaling. experiments.import_delta reads adapters with it, experiments.export_peft writes them.

    config = read_adapter_config(folder)               # checked; DoRA and other non-LoRA adapters refused
    factors, others = adapter_factors(keys)             # {module: (A key, B key)}, keys that are not LoRA factors
    r, alpha, scaling = module_lora(config, module)     # PEFT: rank_pattern, alpha_pattern, use_rslora

ΔW of a module is scaling · B @ A, (out, in) as nn.Linear stores weights; with `fan_in_fan_out` (GPT-2's Conv1D) PEFT
adds its transpose to a weight stored (in, out), so B @ A is still (out, in). DoRA (`use_dora`) is refused: its
update m·(W0 + sBA)/‖W0 + sBA‖_row − W0 is neither the product of the factors nor of low rank; merge it
(`merge_and_unload()`, `save_pretrained`) and import the merged model with --base/--finetuned, which is exact.
"""
import json
from pathlib import Path

from lowrank.errors import ConfigError
from lowrank.adapters.lora import lora_scaling
from lowrank.adapters.targets import pattern_key

ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN = \
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
# Beside an adapter lowrank exported: the base as adapter_config.json names it (a Hub id, or a folder relative to the
# adapter's) and `local_path`, the absolute folder the run's W0 came from (null for a Hub id). A side file, since
# PEFT warns of a newer PEFT at any key of adapter_config.json it does not know.
BASE_FILE = "base_model.json"
PREFIX = "base_model.model."  # PeftModel's path to the wrapped model
FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def scaling_rule(config: dict) -> str:
    """lowrank's name (method.scaling) of the adapter's scaling rule: PEFT's lora_alpha/r, or lora_alpha/√r
    (use_rslora)."""
    return "rslora" if config.get("use_rslora") else "standard"


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json of a PEFT LoRA adapter folder, checked: ConfigError naming the file and key otherwise."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"--adapter: {path} cannot be read ({e.strerror or e}); an adapter folder holds "
                          f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (PeftModel.save_pretrained)") from None
    except ValueError:
        raise ConfigError(f"--adapter: {path} is not valid JSON") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ConfigError(f"--adapter: {path} peft_type is "
                          f"{config.get('peft_type') if isinstance(config, dict) else None!r}; "
                          f"only LoRA adapters (peft_type LORA) have a ΔW = scaling · B A")
    if config.get("use_dora"):
        raise ConfigError(f"--adapter: {path} has use_dora=true; DoRA's ΔW = m·(W0+sBA)/‖W0+sBA‖_row − W0 is "
                          f"not the factors' product: merge it (merge_and_unload, save_pretrained) and import the "
                          f"merged model with --base BASE --finetuned MERGED")
    if config.get("lora_bias"):
        raise ConfigError(f"--adapter: {path} has lora_bias=true; its bias update is not part of a weight ΔW: merge "
                          f"the adapter and import the merged model with --base/--finetuned")
    for key in ("r", "lora_alpha"):
        v = config.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"--adapter: {path} {key}={v!r} is not valid; it must be a number > 0")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ConfigError(f"--adapter: {path} {key} is not a mapping {{module pattern: value}}")
    return config


def adapter_base(folder: Path, config: dict) -> str | None:
    """The base model an adapter folder names: the local folder its BASE_FILE records, where this machine has it (the
    exact W0 it was trained on), else adapter_config.json's base_model_name_or_path, a folder relative to the
    adapter's where there is one there (as export_peft writes it), else as written (a Hub id)."""
    try:
        local = json.loads((Path(folder) / BASE_FILE).read_text()).get("local_path")
    except (OSError, ValueError, AttributeError):
        local = None
    if isinstance(local, str) and Path(local).is_dir():
        return local
    named = config.get("base_model_name_or_path")
    if isinstance(named, str) and named and (Path(folder) / named).is_dir():
        return str((Path(folder) / named).resolve())
    return named or None


def module_lora(config: dict, module: str) -> tuple[int, float, float]:
    """(rank, alpha, scaling) PEFT gives `module` (its path in the model, without PREFIX): rank_pattern and
    alpha_pattern entries by PEFT's key rule (lowrank.adapters.targets.pattern_key), else r and lora_alpha."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, a_key = pattern_key(ranks, module), pattern_key(alphas, module)
    r = ranks[r_key] if r_key is not None else config["r"]
    alpha = alphas[a_key] if a_key is not None else config["lora_alpha"]
    return r, alpha, lora_scaling(alpha, r, scaling_rule(config))


def adapter_factors(keys) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """({module: (lora_A key, lora_B key)}, the other keys: a head in modules_to_save, trained biases) of an adapter's
    weights. ConfigError for LoRA tensors of another kind (embeddings, DoRA's magnitude) or a factor without its
    pair."""
    keys = list(keys)
    modules, others = {}, []
    for k in keys:
        name = k.removeprefix(PREFIX)
        if any(s in name for s in ("lora_embedding_", "lora_magnitude_vector")):
            raise ConfigError(f"--adapter: tensor {k!r} is a LoRA of an embedding or a DoRA magnitude; only nn.Linear "
                              f"LoRA factors ({', '.join(FACTOR_SUFFIXES)}) are imported: merge the adapter and import "
                              f"the merged model with --base/--finetuned")
        suffix = next((s for s in FACTOR_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            if ".lora_" in name:
                raise ConfigError(f"--adapter: tensor {k!r} is not a LoRA factor PEFT saves "
                                  f"({', '.join(FACTOR_SUFFIXES)})")
            others.append(k)
            continue
        modules.setdefault(name.removesuffix(suffix), {})[suffix] = k
    for module, pair in modules.items():
        if len(pair) != 2:
            raise ConfigError(f"--adapter: module {module!r} has {next(iter(pair))!r} but not its other factor")
    return {m: (p[FACTOR_SUFFIXES[0]], p[FACTOR_SUFFIXES[1]]) for m, p in sorted(modules.items())}, sorted(others)


def factor_keys(module: str) -> tuple[str, str]:
    """The adapter file's keys of a module's (A, B)."""
    return tuple(f"{PREFIX}{module}{s}" for s in FACTOR_SUFFIXES)
