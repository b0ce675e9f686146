"""Content hashes for the artifacts the harness writes (ΔW, W0, checkpoints), checked whenever one is read.

A safetensors file's header says which tensors it holds and where; a flipped byte in the data part leaves it
readable and every number wrong. So each file we write carries, in its metadata under `tensor_sha256`, the
SHA-256 of every tensor's bytes, and a reader gets either verified, finite tensors or `CorruptArtifact`
with the reason (missing, truncated, header damaged, hash mismatch, non-finite values).
"""
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

DIGEST_KEY = "tensor_sha256"  # safetensors metadata: JSON {tensor key: sha256 hex of its bytes}


class CorruptArtifact(Exception):
    """An artifact that cannot be trusted; the message names the file and what is wrong with it."""


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as stored (dtype and layout as on disk: contiguous, on the CPU)."""
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: tensor_sha256(v) for k, v in tensors.items()}


def combined_digest(digests: dict[str, str]) -> str:
    """One hash for a set of tensors: of their names, in order, and their own hashes."""
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def state_sha256(obj) -> str:
    """SHA-256 of a nested state (dicts, lists, tensors, numbers, strings): dict keys in sorted order, tensors
    by dtype, shape and bytes, other leaves by their repr. Used for checkpoints (`torch.save` does not check
    its own CRCs on load)."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(bytes.fromhex(tensor_sha256(x)))
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())
    walk(obj)
    return h.hexdigest()


_verified: dict[tuple, tuple[list[str], dict]] = {}  # (path, inode, size, mtime) -> what verify_safetensors found


def read_header(path) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(keys, metadata, {key: sha256}) of a safetensors file whose header is whole (its tensors cover the file
    exactly) and lists a content hash for exactly its tensors; raises CorruptArtifact. Reads no tensor data:
    a reader that checks each tensor as it reads it (`check_tensor`) needs only this up front."""
    path = Path(path)
    if not path.is_file():
        raise CorruptArtifact(f"{path.name} missing" if not path.exists() else f"{path.name} is not a file")
    try:
        with safe_open(path, "pt") as f:
            keys, metadata = list(f.keys()), dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types; all of them mean "unreadable"
        raise CorruptArtifact(f"{path.name} truncated or corrupt ({type(e).__name__}: {e})") from None
    try:
        expected = json.loads(metadata[DIGEST_KEY])
    except (KeyError, json.JSONDecodeError, TypeError):
        raise CorruptArtifact(f"{path.name} has no readable content hash ({DIGEST_KEY} metadata); "
                              f"it was not written by this version of lowrank, or its header is damaged") from None
    if not isinstance(expected, dict) or sorted(expected) != sorted(keys):
        raise CorruptArtifact(f"{path.name}: its content hash does not list exactly its tensors")
    return keys, metadata, expected


def check_tensor(file_name: str, key: str, t: torch.Tensor, digest: str | None, check_finite: bool = True) -> None:
    """Raise CorruptArtifact unless tensor `key` read from `file_name` matches its content hash (and, with
    `check_finite`, holds no NaN or inf)."""
    if tensor_sha256(t) != digest:
        raise CorruptArtifact(f"{file_name}: tensor {key} does not match its content hash (damaged data)")
    if check_finite and t.is_floating_point() and not torch.isfinite(t).all():
        raise CorruptArtifact(f"{file_name}: tensor {key} holds NaN or inf")


def verify_safetensors(path, check_finite: bool = True) -> tuple[list[str], dict[str, str]]:
    """Read every tensor of a safetensors file and check it against the hashes in its metadata (and, with
    `check_finite`, that it holds no NaN or inf). Returns (keys, metadata); raises CorruptArtifact.
    A file verified before in this process and unchanged since (same inode, size and mtime: our writers
    replace files, so a rewrite is a new inode) is not read again (a base-weights file shared by many runs)."""
    path = Path(path)
    if path.is_file():
        st = os.stat(path)
        cache_key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, check_finite)
        if cache_key in _verified:
            return _verified[cache_key]
    keys, metadata, expected = read_header(path)
    try:
        with safe_open(path, "pt") as f:
            for k in keys:
                check_tensor(path.name, k, f.get_tensor(k), expected[k], check_finite)
    except CorruptArtifact:
        raise
    except Exception as e:  # safetensors raises its own error types; all of them mean "unreadable"
        raise CorruptArtifact(f"{path.name} truncated or corrupt ({type(e).__name__}: {e})") from None
    _verified[cache_key] = (keys, metadata)
    return keys, metadata
