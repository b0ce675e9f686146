"""Write-to-temp-then-rename, so a reader never sees a half-written file (pre-emption, full disks)."""
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_with(path, write) -> Path:
    """Call write(tmp_path) on a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX within one file system
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str) -> Path:
    return write_with(path, lambda tmp: Path(tmp).write_text(text))


def _finite(obj):
    """NaN/inf are not JSON: store them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_with(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
