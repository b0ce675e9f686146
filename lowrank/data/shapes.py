"""Model configs without weights: a `model.shape` mapping (conf/model/*_shape.yaml) or a model's config.json,
and random-init models built straight on the device for memory and throughput benchmarks.

    config = load_hf_config(cfg.model, num_labels=2)          # shape models and real models alike
    model = build_random_model(cfg.model, 2, "cuda", torch.bfloat16)   # a 7B shape builds in seconds
    lm = build_random_causal_lm(cfg.model, "cuda", torch.bfloat16)     # the same body with its LM head

Nothing here downloads or reads weights: a shape model's config comes from `AutoConfig.for_model`, a real
model's from the config.json in its resolved folder.
"""
from collections.abc import Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

from lowrank.errors import ConfigError
from lowrank.data.model_files import conv1d_to_linear, gguf_cache_dir, load_from_folder, resolve_path


def _plain(mapping) -> dict:
    return OmegaConf.to_container(mapping, resolve=True) if isinstance(mapping, DictConfig) else dict(mapping)


def hf_config_from_shape(shape: Mapping, num_labels: int) -> PretrainedConfig:
    """`shape` holds `model_type` plus any config.json keys (hidden_size, num_hidden_layers, ...); the rest
    take transformers' defaults for that model type. A key the model type does not know is an error."""
    shape = _plain(shape)
    model_type = shape.pop("model_type", None)
    if model_type is None:
        raise ConfigError("model.shape needs a model_type key (e.g. llama, bert, gpt2)")
    try:
        known = set(AutoConfig.for_model(model_type).to_dict())
    except ValueError:
        raise ConfigError(f"model.shape.model_type={model_type!r} is not a transformers model type") from None
    unknown = sorted(set(shape) - known)
    if unknown:
        raise ConfigError(f"model.shape.{unknown[0]} is not a {model_type} config key")
    config = AutoConfig.for_model(model_type, num_labels=num_labels, **shape)
    if config.pad_token_id is None:  # sequence classification needs one to find the last real token
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
    return config


def set_dropout(config, p: float | None) -> None:
    """`model.dropout`: every dropout probability of the model's config (hidden_dropout_prob,
    attention_probs_dropout_prob, attention_dropout, resid_pdrop, ...) set to `p`; 0 turns the model's dropout off,
    as data-parallel runs need to equal a one-process run (each process draws its own masks). None: as trained."""
    if p is None:
        return
    for key, value in vars(config).items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(config, key, float(p))


def load_hf_config(cfg_model, num_labels: int) -> PretrainedConfig:
    """The model's config without its weights: from `model.shape`, or config.json under the resolved path."""
    if cfg_model.get("shape"):
        return hf_config_from_shape(cfg_model.shape, num_labels)
    if not cfg_model.get("path"):
        raise ConfigError(f"model={cfg_model.name}: set model.path (weights) or model.shape (random init)")
    resolved = resolve_path(cfg_model.path)
    if cfg_model.get("gguf_file"):
        cached = gguf_cache_dir(cfg_model)  # written by models._gguf_cache
        if (cached / "config.json").exists():
            resolved = str(cached)
        else:
            try:  # a local folder's unreadable GGUF is a ConfigError from load_from_folder
                return load_from_folder(cfg_model, resolved, "GGUF config", AutoConfig.from_pretrained,
                                        gguf_file=cfg_model.gguf_file, num_labels=num_labels)
            except (OSError, ImportError) as e:
                raise ConfigError(f"model.path={cfg_model.path!r}: cannot read the GGUF config ({e})") from None
    try:  # a local folder's unreadable or garbled config.json is a ConfigError from load_from_folder
        return load_from_folder(cfg_model, resolved, "config.json", AutoConfig.from_pretrained, num_labels=num_labels)
    except OSError:
        raise ConfigError(f"model.path={cfg_model.path!r}: no config.json there (and the Hub is not reachable "
                          f"offline); set model.path to a local folder or use a *_shape model") from None


def build_random_model(cfg_model, num_labels: int, device, dtype: torch.dtype = torch.float32,
                       auto_class=AutoModelForSequenceClassification):
    """A sequence-classification model (or another `auto_class`) with random weights, allocated directly on
    `device` (no CPU copy)."""
    config = load_hf_config(cfg_model, num_labels)
    set_dropout(config, cfg_model.get("dropout"))
    with torch.device(device):
        model = auto_class.from_config(config, dtype=dtype)
    conv1d_to_linear(model)  # as models.load_model does: one Linear convention for LoRA and ΔW
    return model


def build_random_causal_lm(cfg_model, device, dtype: torch.dtype = torch.float32):
    """A causal LM (body and LM head) with random weights on `device`, for generative tasks of shape models."""
    return build_random_model(cfg_model, 2, device, dtype, auto_class=AutoModelForCausalLM)  # num_labels: unused
