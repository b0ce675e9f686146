"""Where a run's numbers came from: the code (lowrank's version and git commit), the libraries, the device, the
model's revision and the data, as metrics.json's `provenance` object, so that runs made from different inputs are
never averaged as if they were one.

    provenance = record(device, model_revision(...), {"train_sha256": ..., "eval_sha256": ..., ...})

Each field that cannot be known is null with a `why` beside it (an installed wheel has no .git; a shape-only model
has no weight files); nothing here raises for that. Weight files are hashed once: their SHA-256 is cached by
(path, size, mtime) in a JSON file (RUNS_ROOT/.cache/file_sha256.json for the trainer and imports), so the next run of
the same model reads the cache instead of 90 MB to 13 GB of weights.
"""
import hashlib
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

import torch

from lowrank.rundir import atomic
from lowrank.rundir.layout import CACHE_DIR

PACKAGES = ("torch", "transformers", "peft", "hydra-core")
CHECKOUT = Path(__file__).resolve().parents[2]  # the folder holding lowrank/: a git checkout, or site-packages
DIGEST_CACHE_FILE = "file_sha256.json"
CHUNK = 1 << 20  # bytes read at a time while hashing a file (small: imports keep under one matrix of memory)


def record(device, model: dict, data: dict | None) -> dict:
    """metrics.json's `provenance`: code, libraries, device, model revision (model_revision) and data digests."""
    return {"lowrank": code_version(), "packages": package_versions(), "device": device_name(device),
            "model": model, "data": data}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions(packages=PACKAGES) -> dict:
    """{package: installed version, or None where it is not installed}."""
    return {p: _version(p) for p in packages}


def _git(checkout: Path, *args) -> str:
    return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def code_version(checkout: Path = CHECKOUT) -> dict:
    """lowrank's version, and the git commit of `checkout` with whether tracked files differ from it (`dirty`). Where
    `checkout` is not the top of a git work tree (an installed wheel; no git), commit and dirty are None and `why`
    says so. Untracked files do not make it dirty: run outputs and caches are untracked."""
    out = {"version": _version("lowrank"), "commit": None, "dirty": None, "why": None}
    try:
        top = Path(_git(checkout, "rev-parse", "--show-toplevel")).resolve()
        if top != Path(checkout).resolve():  # e.g. site-packages inside some other repository
            raise subprocess.CalledProcessError(1, "git")
        out["commit"] = _git(checkout, "rev-parse", "HEAD")
        out["dirty"] = _git(checkout, "status", "--porcelain", "--untracked-files=no") != ""
    except FileNotFoundError:
        out["why"] = "git is not installed"
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        out["why"] = f"{checkout} is not a git checkout (an installed package has no .git)"
    return out


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


# ---- model revision ----------------------------------------------------------------------------------------------

def file_sha256(path: Path, cache_file: Path | None = None) -> str:
    """SHA-256 of one file, read from `cache_file` where the file's (path, size, mtime) are those cached."""
    path = Path(path).resolve()
    stat = path.stat()
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
    cache = _read_cache(cache_file)
    if cache.get(key, {}).get("stamp") == stamp:
        return cache[key]["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    if cache_file is not None:  # re-read: another run may have added files meanwhile (a lost entry is hashed again)
        atomic.write_json(cache_file, _read_cache(cache_file) | {key: {"stamp": stamp, "sha256": h.hexdigest()}})
    return h.hexdigest()


def _read_cache(cache_file: Path | None) -> dict:
    try:
        cache = json.loads(Path(cache_file).read_text()) if cache_file is not None else {}
    except (OSError, ValueError):
        return {}  # none yet, or damaged: hash again
    return cache if isinstance(cache, dict) else {}


def files_sha256(files, cache_file: Path | None = None) -> str:
    """One digest of several files: SHA-256 over 'name sha256' lines, sorted by name (not by where they are)."""
    lines = sorted(f"{Path(f).name} {file_sha256(f, cache_file)}" for f in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def hub_commit(repo_id: str) -> str | None:
    """The commit of a Hub repository as its files were loaded: the snapshot folder of config.json in the local Hub
    cache (`.../snapshots/COMMIT/config.json`), None where it is not cached."""
    from huggingface_hub import try_to_load_from_cache  # lazy: only for models loaded from the Hub
    cached = try_to_load_from_cache(repo_id, "config.json")
    return Path(cached).parent.name if isinstance(cached, str) and Path(cached).parent.parent.name == "snapshots" \
        else None


def model_revision(source: str | None, weight_files: list[Path] | None, hub_id: str | None = None,
                   cache_file: Path | None = None, why: str | None = None) -> dict:
    """The model's revision: the Hub commit for a model loaded by Hub id, else the SHA-256 of its weight files
    (files_sha256). `why` says why there is neither (e.g. a shape-only model with random weights)."""
    out = {"source": source, "hub_commit": None, "files_sha256": None, "why": why}
    if hub_id is not None:
        out["hub_commit"] = hub_commit(hub_id)
        out["why"] = None if out["hub_commit"] else f"{hub_id} is not in the local Hub cache"
    elif weight_files:
        out["files_sha256"] = files_sha256(weight_files, cache_file)
    elif why is None:
        out["why"] = "no weight files found"
    return out


def cache_file_of(runs_root) -> Path:
    """Where weight files' digests are cached, once per runs root (not in base_weights/, which holds W0 files only)."""
    return Path(runs_root) / CACHE_DIR / DIGEST_CACHE_FILE

