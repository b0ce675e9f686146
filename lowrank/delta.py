"""ΔW on disk: one file per run, one shared copy of W0 per base model.

`delta_w.safetensors` keys, by module path `name` of an adapted/analysed nn.Linear:
  full fine-tuning: `{name}.delta` (out, in) fp32, exactly W_ft − W_0
  LoRA:             `{name}.lora_A` (r, in) and `{name}.lora_B` (out, r); ΔW = scaling · B @ A
Metadata (strings): method, scaling, rank, alpha, targets, base_model (path), base_model_name, base_weights
(path relative to the run dir).
`RUNS_ROOT/base_weights/{model}-{fingerprint}.safetensors` holds W0 of every block linear layer once.
"""
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .atomic import write_safetensors
from .lora import block_linear_names, lora_layers

DELTA_FILE = "delta_w.safetensors"


def linear_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the weight of each named nn.Linear (or of the frozen base of a LoRA layer)."""
    out = {}
    for n in names:
        m = model.get_submodule(n)
        w = m.base_layer.weight if hasattr(m, "base_layer") else m.weight
        out[n] = w.detach().float().cpu().clone()
    return out


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    names = sorted(weights)
    for n in names:
        h.update(f"{n}{tuple(weights[n].shape)}".encode())
    for n in (names[0], names[-1]):  # two whole matrices tell models apart; hashing all of a 7B is slow
        h.update(weights[n].numpy().tobytes())
    return h.hexdigest()[:10]


def ensure_base_weights(runs_root: Path, model_name: str, model: nn.Module) -> Path:
    """Write W0 of every block linear layer once per base model; later runs reuse the file."""
    weights = linear_weights(model, block_linear_names(model))
    path = Path(runs_root) / "base_weights" / f"{model_name}-{fingerprint(weights)}.safetensors"
    if not path.exists():
        write_safetensors(path, {f"{n}.weight": w for n, w in weights.items()}, {"base_model": model_name})
    return path


def write_delta(run_dir: Path, model: nn.Module, method: str, names: list[str], w0: dict | None,
                base_weights: Path, meta: dict) -> Path:
    """Write ΔW of `names` (full: `w0` holds their W0) or of every LoRA layer (LoRA)."""
    tensors = {}
    if method == "full":
        for n, w_ft in linear_weights(model, names).items():
            tensors[f"{n}.delta"] = w_ft - w0[n]
    else:
        for n, layer in lora_layers(model).items():
            tensors[f"{n}.lora_A"] = layer.lora_A.detach().float()
            tensors[f"{n}.lora_B"] = layer.lora_B.detach().float()
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    metadata |= {"method": method, "base_weights": os.path.relpath(base_weights, run_dir)}
    return write_safetensors(Path(run_dir) / DELTA_FILE, tensors, metadata)
