"""Checked reads of a run's safetensors files: the header checks `collect_runs` makes, and reads of single
tensors, each compared with the content hash its file's metadata lists (`lowrank.rundir.integrity`).

    keys, metadata, digests = check_file(path, check_data=False)   # header only; SkippedRun with the reason
    [t] = read_checked(path, [key], digests, unread=fingerprint(path))

A file whose data was not read when its run was collected (`unread`) has each tensor hashed and checked for NaN
or inf as it is read; a failure in a file unchanged since then (same inode, size, mtime, ctime) is damage from
before the analysis (DamagedFile: the run is skipped with the reason a full check gives), otherwise the file
changed while it was analysed (CorruptArtifact).
"""
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from lowrank.rundir.integrity import (DIGEST_KEY, CorruptArtifact, check_tensor, read_header, tensor_sha256,
                                      verify_safetensors)


class SkippedRun(Exception):
    """A run directory that cannot be analysed; the message is the reason shown in the report."""


class DamagedFile(SkippedRun):
    """A tensor that fails its check in a file unchanged since `collect_runs(check_data=False)` looked at it: the
    damage predates the analysis, and the reason is the one a full check would have given. `problem` is that
    reason without the `prefix` naming which of the run's files it is (W0's is shared by several runs)."""

    def __init__(self, prefix: str, problem: str):
        super().__init__(prefix + problem)
        self.prefix, self.problem = prefix, problem


def fingerprint(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns  # any write changes mtime and ctime


def read_checked(path: Path, keys: list[str], digests: dict[str, str], unread: tuple | None = None,
                 prefix: str = "") -> list[torch.Tensor]:
    """Tensors of a checked file, each compared with its hash. `unread` is None when collect_runs verified the
    data: a mismatch then means the file changed since (CorruptArtifact). Otherwise it is the file's fingerprint
    when its header was read: a failed check (hash or finite values) in a file whose fingerprint still matches
    is damage from before (DamagedFile, named with `prefix`), else the file changed since (CorruptArtifact)."""
    try:
        with safe_open(path, "pt") as f:  # opened per read: only these tensors' bytes are ever held
            tensors = [f.get_tensor(k) for k in keys]
    except Exception as e:  # missing, truncated, or a key that is gone: the file is not the one checked
        raise CorruptArtifact(f"{path.name} changed since it was checked ({type(e).__name__}: {e})") from None
    for k, t in zip(keys, tensors):
        if unread is None:
            if tensor_sha256(t) != digests.get(k):
                raise CorruptArtifact(f"{path.name}: tensor {k} changed since it was checked")
            continue
        try:
            check_tensor(path.name, k, t, digests.get(k))
        except CorruptArtifact as e:
            try:
                same = fingerprint(path) == unread
            except OSError:
                same = False
            if not same:
                raise CorruptArtifact(f"{path.name}: tensor {k} changed since it was checked") from None
            raise DamagedFile(prefix, str(e)) from None
    return tensors


def check_file(path: Path, what: str = "", check_data: bool = True) -> tuple[list[str], dict, dict[str, str]]:
    """(keys, metadata, {key: sha256}) of a safetensors file whose every tensor matches its content hash and
    is finite (with check_data; else whose header is whole and lists a hash for each tensor); SkippedRun with
    the reason otherwise."""
    try:
        if not check_data:
            return read_header(path)
        keys, metadata = verify_safetensors(path)
    except CorruptArtifact as e:
        raise SkippedRun(f"{what}{e}") from None
    return keys, metadata, json.loads(metadata[DIGEST_KEY])  # verify_safetensors has parsed it already


def tensor_info(path: Path, keys, what: str = "") -> dict[str, tuple[str, tuple]]:
    """(dtype, shape) per key, from the header of a checked file."""
    try:
        with safe_open(path, "pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in keys}
    except Exception as e:
        raise SkippedRun(f"{what}{path.name} changed since it was checked ({type(e).__name__}: {e})") from None
