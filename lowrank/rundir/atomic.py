"""Write-to-temp-then-rename, so a reader never sees a half-written file (pre-emption, full disks).

Temp files are named `.{name}~{pid}@{host}~{random}.tmp` beside their target, so `remove_stale_temps` can
tell a dead writer's leftovers (a kill mid-write) from a live writer's file. Files get the mode a plain
`open()` would give (0666 less the umask), so others on a shared cluster can read results.
"""
import errno
import json
import math
import os
import re
import socket
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowrank.rundir.integrity import DIGEST_KEY, tensor_digests, tensor_sha256

TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"~(?P<pid>\d+)@(?P<host>[^~]+)~[^~]*\.tmp$")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask can only be read by setting it


class DiskFull(OSError):
    """A write that ran out of disk or quota, naming the file; what was there before is intact."""


# what a full disk looks like from torch.save's zip writer, which reports it as a RuntimeError
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed")


def _disk_full(path: Path, e: BaseException) -> DiskFull | None:
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if not (full or isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILED)):
        return None
    why = os.strerror(e.errno) if full else f"the writer stopped: {str(e).splitlines()[0][:120]}"
    return DiskFull(errno.ENOSPC, f"writing {path} failed: the disk or quota is full ({why}); free space and run "
                                  f"again (the file's previous version, if any, is intact)")


def write_with(path, write) -> Path:
    """Call write(tmp_path) on a temp file beside `path`, then rename it over `path`. A full disk is a DiskFull
    naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}~{os.getpid()}@{socket.gethostname()}~",
                               suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600
        os.replace(tmp, path)  # atomic on POSIX within one file system
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        full = _disk_full(path, e)
        if full is not None:
            raise full from e
        raise
    return path


def write_text(path, text: str) -> Path:
    return write_with(path, lambda tmp: Path(tmp).write_text(text))


def finite(obj):
    """NaN/inf are not JSON: store them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(finite(obj), indent=2, allow_nan=False) + "\n")


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write tensors with the SHA-256 of each in the metadata (`integrity.DIGEST_KEY`), for readers to verify."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = dict(metadata or {}) | {DIGEST_KEY: json.dumps(tensor_digests(tensors), sort_keys=True)}
    return write_with(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# safetensors' names for the dtypes we store
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int32: "I32", torch.int64: "I64"}


def write_safetensors_streamed(path, specs: dict[str, tuple[torch.dtype, tuple]], make,
                               metadata: dict[str, str] | None = None) -> tuple[Path, dict[str, str]]:
    """write_safetensors for files larger than memory: `specs` gives each key's (dtype, shape), `make(key)` the
    tensor, called once per key in sorted order, so only one tensor is held at a time. The header comes first
    in the format but holds every tensor's hash: it is written with placeholders of the same length, then
    rewritten in place once the data is. Returns (path, {key: sha256}); the file reads as write_safetensors'."""
    keys = sorted(specs)
    header, offset = {}, 0
    for k in keys:
        dtype, shape = specs[k]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[k] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                     "data_offsets": [offset, offset + nbytes]}
        offset += nbytes

    def encoded(digests: dict[str, str]) -> bytes:
        meta = dict(metadata or {}) | {DIGEST_KEY: json.dumps(digests, sort_keys=True)}
        text = json.dumps({"__metadata__": meta} | header, separators=(",", ":")).encode()
        return text + b" " * (-len(text) % 8)  # padded as safetensors pads, so the data starts 8-aligned

    digests = dict.fromkeys(keys, "0" * 64)  # a SHA-256 hex digest is always 64 characters
    size = len(encoded(digests))

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(size.to_bytes(8, "little") + encoded(digests))
            for k in keys:
                t = make(k).detach().contiguous().cpu()
                if t.dtype != specs[k][0] or tuple(t.shape) != tuple(specs[k][1]):
                    raise ValueError(f"{k}: made {t.dtype} {tuple(t.shape)}, specs say {specs[k]}")
                digests[k] = tensor_sha256(t)
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                del t
            f.seek(8)
            f.write(encoded(digests))  # the same length: only the placeholders changed
    return write_with(path, write), digests


def _writer_is_gone(tmp: Path) -> bool:
    """True for a temp file whose writer (named in it: host, pid) is a dead process of this host."""
    m = _TEMP_NAME.search(tmp.name)
    if m is None or m["host"] != socket.gethostname():
        return False  # not named by write_with, or written from another machine: not ours to judge
    try:
        os.kill(int(m["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temps(folder, everything: bool = False) -> list[Path]:
    """Delete the temp files that killed writers left in `folder` (all of them with `everything`, for a
    folder whose lock this process holds). Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if everything or _writer_is_gone(tmp):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
