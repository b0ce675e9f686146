"""The tensors of a Hugging Face checkpoint, read one at a time, whatever its size: what experiments.import_delta reads.

    ckpt = open_checkpoint("meta-llama/Llama-2-7b-hf", "--base")   # a Hub id (downloaded), a folder or pkg://PKG/DIR
    ckpt.keys(); ckpt.shape(key); ckpt.get(key)                     # get: one tensor, read now

A folder holds `model.safetensors`, or shards named by `model.safetensors.index.json` (what `save_pretrained(...,
max_shard_size=...)` writes), or other `*.safetensors` files with distinct keys; `pytorch_model.bin` (sharded or not)
only with a warning: it is a pickle, read with torch.load(weights_only=True, mmap=True). Each safetensors read opens
its file anew (`safe_open`), so no mapping outlives the tensor and memory holds one tensor, not the file's pages.
`block_matrices` picks the matrices ΔW is about: every 2-D `.weight` inside a numbered block (`layer.3.`, `layers.3.`,
`h.3.`), as lowrank.adapters.lora.block_linear_names picks nn.Linear modules of a loaded model.
"""
import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from lowrank.errors import ConfigError
from lowrank.data.model_files import resolve_path

log = logging.getLogger(__name__)

SAFETENSORS_FILE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_FILE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
CONFIG_JSON = "config.json"
# model types whose block projections are Conv1D, stored (in, out): transposed to (out, in) as lowrank's models are
CONV1D_MODEL_TYPES = ("gpt2",)
_LAYER_INDEX = re.compile(r"\.\d+\.")
_HUB_PATTERNS = ["*.json", "*.safetensors"]


class Checkpoint:
    """Tensor keys → the file holding each; `get` reads one tensor."""

    def __init__(self, source: str, files: dict[str, Path], config: dict):
        self.source, self.files, self.config = source, files, config
        self._bin = (None, None)  # (path, mmap'd state dict) of the .bin shard read last

    def keys(self) -> list[str]:
        return sorted(self.files)

    def _is_bin(self, key: str) -> bool:
        return self.files[key].suffix == ".bin"

    def _bin_shard(self, path: Path) -> dict:
        if self._bin[0] != path:
            self._bin = (path, torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        return self._bin[1]

    def shape(self, key: str) -> tuple[int, ...]:
        if self._is_bin(key):
            return tuple(self._bin_shard(self.files[key])[key].shape)
        with safe_open(self.files[key], "pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def is_float(self, key: str) -> bool:
        if self._is_bin(key):
            return self._bin_shard(self.files[key])[key].is_floating_point()
        with safe_open(self.files[key], "pt") as f:
            dtype = f.get_slice(key).get_dtype()
        return dtype.startswith("F") or dtype == "BF16"

    def get(self, key: str) -> torch.Tensor:
        """The tensor as stored (its dtype), owned by the caller."""
        if self._is_bin(key):
            return self._bin_shard(self.files[key])[key].clone()
        with safe_open(self.files[key], "pt") as f:  # opened per read: its mapping ends with the read
            return f.get_tensor(key)

    @property
    def conv1d(self) -> bool:
        """Block projections stored (in, out) (GPT-2's Conv1D), by config.json's model_type."""
        return self.config.get("model_type") in CONV1D_MODEL_TYPES


def _keys_of(path: Path, what: str) -> list[str]:
    try:
        with safe_open(path, "pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types: all mean the file cannot be read
        raise ConfigError(f"{what}: {path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def _index_files(folder: Path, index: str, what: str) -> dict[str, Path]:
    try:
        weight_map = json.loads((folder / index).read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{what}: {folder / index} is not a shard index with a weight_map "
                          f"({type(e).__name__})") from None
    files = {k: folder / v for k, v in weight_map.items()}
    if missing := sorted({str(p) for p in files.values() if not p.is_file()}):
        raise ConfigError(f"{what}: {folder / index} names shards that are missing: {missing[:3]}")
    return files


def checkpoint_files(folder: Path, what: str) -> dict[str, Path]:
    """{key: file} of a checkpoint folder (the module docstring says which files count)."""
    if (folder / SAFETENSORS_FILE).is_file():
        return dict.fromkeys(_keys_of(folder / SAFETENSORS_FILE, what), folder / SAFETENSORS_FILE)
    if (folder / SAFETENSORS_INDEX).is_file():
        return _index_files(folder, SAFETENSORS_INDEX, what)
    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        for k in _keys_of(path, what):
            if k in files:
                raise ConfigError(f"{what}: tensor {k!r} is in both {files[k].name} and {path.name}; keep one "
                                  f"checkpoint per folder, or add {SAFETENSORS_INDEX}")
            files[k] = path
    if files:
        return files
    if (folder / BIN_FILE).is_file() or (folder / BIN_INDEX).is_file():
        log.warning("%s: %s holds a pickle checkpoint (.bin), read with torch.load(weights_only=True, mmap=True); "
                    "safetensors is safer and streams matrix by matrix (save_pretrained(..., safe_serialization=True))",
                    what, folder)
        if (folder / BIN_INDEX).is_file():
            return _index_files(folder, BIN_INDEX, what)
        state = torch.load(folder / BIN_FILE, map_location="cpu", weights_only=True, mmap=True)
        return dict.fromkeys(state, folder / BIN_FILE)
    raise ConfigError(f"{what}: {folder} holds no checkpoint; it must hold {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} "
                      f"with its shards, other *.safetensors files, or {BIN_FILE}")


def local_folder(source: str, what: str, patterns=_HUB_PATTERNS) -> Path:
    """A local folder (or pkg://PACKAGE/DIR), or a Hub repository downloaded (config and safetensors files only; the
    .bin files where it has no safetensors)."""
    resolved = Path(resolve_path(source))
    if resolved.is_dir():
        return resolved
    if resolved.exists() or source.startswith((".", "/", "~", "pkg://")) or source.count("/") > 1:
        raise ConfigError(f"{what} {source!r}: {'is a file, not a folder' if resolved.exists() else 'no such folder'}")
    from huggingface_hub import snapshot_download  # lazy: only for Hub ids
    try:
        folder = Path(snapshot_download(source, allow_patterns=patterns, ignore_patterns=["consolidated*"]))
        if patterns == _HUB_PATTERNS and not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.bin"]))
    except Exception as e:  # offline, unknown repository, gated, network: one line, the Hub's reason
        raise ConfigError(f"{what} {source!r} is not a local folder, and the Hugging Face Hub did not give it "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no reason given'}); "
                          f"give a local folder") from None
    return folder


def open_checkpoint(source: str, what: str) -> Checkpoint:
    """The checkpoint at `source` (a folder, pkg:// path or Hub id); `what` names it in errors (`--base`)."""
    folder = local_folder(source, what)
    config = {}
    if (folder / CONFIG_JSON).is_file():
        try:
            config = json.loads((folder / CONFIG_JSON).read_text())
        except ValueError:
            raise ConfigError(f"{what}: {folder / CONFIG_JSON} is not valid JSON") from None
    return Checkpoint(source, checkpoint_files(folder, what), config if isinstance(config, dict) else {})


def file_checkpoint(path: Path, source: str, what: str) -> Checkpoint:
    """The tensors of one file (safetensors, or a .bin with a warning), e.g. a PEFT adapter's weights."""
    path = Path(path)
    if path.suffix == ".bin":
        log.warning("%s: %s is a pickle (.bin), read with torch.load(weights_only=True, mmap=True)", what, path)
        keys = list(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    else:
        keys = _keys_of(path, what)
    return Checkpoint(source, dict.fromkeys(keys, path), {})


def block_matrices(ckpt: Checkpoint) -> list[str]:
    """Keys of every 2-D floating `.weight` inside a numbered block (the module docstring's rule), sorted."""
    return [k for k in ckpt.keys() if k.endswith(".weight") and _LAYER_INDEX.search(f".{k}")
            and len(ckpt.shape(k)) == 2 and ckpt.is_float(k)]
