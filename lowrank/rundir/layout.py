"""The run-directory contract: where a configuration's directory is, its file names and statuses, and the
lock that lets one process at a time work in it. Writers (the trainer) and readers (analysis, the demo, the
benchmarks) import it, so both sides agree.

A run directory is a function of the resolved config: `RUNS_ROOT/NAME/{label}-{config_hash}`, where `label`
is a short reading of the command-line settings' resolved values (`rank=4,seed=1`; `defaults` when there are
none; run_label) and `config_hash` hashes the whole resolved config except the keys in NOT_IDENTITY.
Two configs never share a directory, and one config finds its directory again however it was reached
(`find_run_dir` looks the hash up first), so a re-launched sweep skips what is done and resumes the rest.

    RUNS_ROOT/NAME/RUN/.hydra/config.yaml   the resolved config (written once, when the run starts)
                      .hydra/overrides.yaml the command-line overrides that led here
                      metrics.json          `status` and, once complete, every metric
                      delta_w.safetensors   ΔW (full) or the LoRA factors, with content hashes
                      trained.safetensors   every other trained parameter (a head; full FT: embeddings, norms,
                                            biases, non-target layers), if any: W0 + ΔW + this = the fine-tuned model
                      head.safetensors      what LoRA runs kept before trained.safetensors existed (their head)
                      history.csv           one row per training step (HISTORY_COLUMNS, then eval_* where evaluated)
                      progress.json         where training is (step, steps/s, ETA), for whoever watches the run
                      checkpoint.pt         training state while the run is unfinished
                      train.log             the log (written only by the process holding .lock)
    RUNS_ROOT/base_weights/                 W0 once per base model
    RUNS_ROOT/.cache/                       weight files' SHA-256 by (path, size, mtime), for provenance
"""
import fcntl
import hashlib
import json
import os
import re
import socket
from pathlib import Path

from lowrank.rundir import atomic
from lowrank.errors import ConfigError
from lowrank.rundir.integrity import CorruptArtifact

CONFIG_FILE = Path(".hydra") / "config.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
METRICS_FILE = "metrics.json"
DELTA_FILE = "delta_w.safetensors"
HEAD_FILE = "head.safetensors"  # LoRA runs written before TRAINED_FILE: the same content (a head) under this name
TRAINED_FILE = "trained.safetensors"
TRAINED_FILE_KEY = "trained_file"  # in metrics.json: TRAINED_FILE, or null when nothing but the targets trained
DYNAMICS_FILE = "dynamics.csv"  # rank over training time (lowrank.train.dynamics), one row per snapshot × matrix
# delta file metadata of LoRA runs whose modules differ in rank or scaling (rank_pattern, alpha_pattern): JSON
# {module: rank} and {module: scaling} for the modules that differ from the file's `rank` and `scaling`
MODULE_RANK_KEY, MODULE_SCALING_KEY = "module_rank", "module_scaling"
# one row per optimizer step: these columns, then the evaluation metrics (eval_loss and eval_accuracy or
# eval_perplexity) filled on evaluation steps and empty elsewhere (lowrank.train.history)
HISTORY_FILE = "history.csv"
HISTORY_COLUMNS = ("step", "train_loss", "lr", "grad_norm", "tokens_per_second")
PROGRESS_FILE = "progress.json"  # lowrank.rundir.progress: written by the trainer, read by the demo's bar
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train.log"
LOCK_FILE = ".lock"
BASE_WEIGHTS_DIR = "base_weights"
CACHE_DIR = ".cache"  # RUNS_ROOT/.cache: what is cached across runs (weight files' SHA-256, lowrank.rundir.provenance)

# Statuses in metrics.json. Final ones are results: re-running the same config gives the same outcome, so a
# re-launched sweep skips them. `invalid` (bad input) and `failed` (an unexpected error) say why a job did
# not run to the end; they are retried when launched again (the input or the code may have been fixed).
COMPLETE, DIVERGED, DOES_NOT_FIT = "complete", "diverged", "does_not_fit"
INVALID, FAILED = "invalid", "failed"
FINAL_STATUSES = (COMPLETE, DIVERGED, DOES_NOT_FIT)
STATUSES = FINAL_STATUSES + (INVALID, FAILED)


METRICS_DIGEST_KEY = "content_sha256"  # in metrics.json: SHA-256 of the rest, as canonical JSON


def _metrics_digest(metrics: dict) -> str:
    text = json.dumps(metrics, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def config_sha256(config: dict) -> str:
    """SHA-256 of a whole resolved config, every key included: what ties metrics.json to .hydra/config.yaml."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def write_metrics(run_dir, metrics: dict, config: dict) -> dict:
    """Write metrics.json with the hashes of the resolved config it belongs to (`config_hash`: its identity,
    as in the directory name; `config_sha256`: all of it, which readers check .hydra/config.yaml against)
    and a content hash of the whole (a changed digit is caught, not read as a result). Returns the metrics
    as `load_metrics` will read them back."""
    body = metrics | {"config_hash": config_hash(config), "config_sha256": config_sha256(config)}
    body = json.loads(json.dumps(atomic.finite(body), allow_nan=False))
    atomic.write_json(Path(run_dir) / METRICS_FILE, body | {METRICS_DIGEST_KEY: _metrics_digest(body)})
    return body


def load_metrics(run_dir) -> dict:
    """metrics.json of a run directory, checked against its content hash; raises CorruptArtifact with the
    reason (missing, not a file, unreadable, not a JSON object, no hash, hash mismatch)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise CorruptArtifact(f"{METRICS_FILE} {'missing' if not path.exists() else 'is not a file'}")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptArtifact(f"{METRICS_FILE} unreadable ({type(e).__name__})") from None
    if not isinstance(metrics, dict):
        raise CorruptArtifact(f"{METRICS_FILE} holds a JSON {type(metrics).__name__}, not an object")
    digest = metrics.pop(METRICS_DIGEST_KEY, None)
    if digest is None:
        raise CorruptArtifact(f"{METRICS_FILE} has no content hash ({METRICS_DIGEST_KEY}); it was not written by "
                              f"this version of lowrank")
    try:
        intact = digest == _metrics_digest(metrics)
    except ValueError:  # NaN or inf, which our writer never stores
        intact = False
    if not intact:
        raise CorruptArtifact(f"{METRICS_FILE} does not match its content hash (damaged or edited)")
    return metrics


def read_metrics(run_dir) -> dict | None:
    """load_metrics, or None when the file is missing or cannot be trusted."""
    try:
        return load_metrics(run_dir)
    except CorruptArtifact:
        return None


def finished_metrics(run_dir) -> dict | None:
    """The metrics of a run that reached a final status, else None."""
    metrics = read_metrics(run_dir)
    return metrics if metrics is not None and metrics.get("status") in FINAL_STATUSES else None


def trained_file(run_dir, metrics: dict) -> tuple[Path | None, str | None]:
    """(the run's file of other trained tensors or None when nothing else trained, None) when what rebuilding its model
    needs besides W0 + ΔW is known; (None, why not) for a run written before runs recorded it (metrics.json without
    `trained_file`) that may have trained more: full fine-tuning (everything trains) or a classifier (its head)."""
    run_dir = Path(run_dir)
    if TRAINED_FILE_KEY in metrics:
        name = metrics[TRAINED_FILE_KEY]
        return (run_dir / name if name else None), None
    if (run_dir / HEAD_FILE).is_file():
        return run_dir / HEAD_FILE, None
    method = metrics.get("method")
    if method != "full" and metrics.get("objective") not in (None, "classification"):
        return None, None  # LoRA or a subspace on a causal LM: only the targets trained
    return None, (f"written before runs kept {TRAINED_FILE} (a {method} run of a "
                  f"{metrics.get('objective') or 'classification'} task trained more than its targets' ΔW)")


def check_run_location(name, runs_root) -> None:
    """`name` must be one plain directory name (runs stay inside runs_root); runs_root must be a folder."""
    name = str(name)
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("~"):
        raise ConfigError(f"name={name!r} is not valid; it must be one folder name below runs_root (no '/', "
                          f"'..' or '~'), e.g. name=my_study")
    root = Path(str(runs_root)).expanduser()
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the deepest existing part must be a folder we can create the rest in
    if not probe.is_dir():
        raise ConfigError(f"runs_root={runs_root} is not valid; {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"runs_root={runs_root} is not valid; {probe} is not writable")


# Where a run goes and how it is watched, not what it computes: not part of its identity.
NOT_IDENTITY = ("runs_root", "name", "logger", "trainer.progress_bar", "trainer.dynamics", "trainer.dynamics_targets")
# Keys added after runs existed, whose null default means what their absence meant: left out of the hash while null,
# so those runs' directories are found again.
NULL_AS_ABSENT = ("method.rank_pattern", "model.dropout")
# The same for keys whose default is `auto`: how many processes train a run does not change what it computes
# (the global batch stays the configured one), so one run directory serves 1 process or N.
DEFAULT_AS_ABSENT = {"trainer.parallel": "auto", "trainer.world_size": "auto", "trainer.chunked_loss": "auto"}
# Keys whose default changed to `auto`, hashed as their old default: runs made before find their directory again.
# trainer.compile: `auto` compiles on CUDA only, and a compiled block computes what the eager one does.
AS_HASHED = {"trainer.compile": {"auto": False}}
HASH_LENGTH = 10
MAX_LABEL = 64   # characters of the readable part of a run directory's name; past it, a hash of the rest
LIST_CHARS = 24  # characters of a list value in that part; past it, `+Nmore`
UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")  # characters a label never holds (a shell or a file system minds them)


def _drop(config: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


def _get(config: dict, dotted: str):
    node = config
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _set(config: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[leaf] = value


ABSENT = object()  # identity_value's answer for a setting that counts as not set


def identity_value(key: str, value):
    """How the hash reads one setting (a dotted key): ABSENT where it means what the key's absence meant (a null of
    NULL_AS_ABSENT, the `auto` default of DEFAULT_AS_ABSENT), an old default's new spelling as the old one (AS_HASHED),
    else the value itself. Analysis groups runs into setups by the same rule."""
    if (key in NULL_AS_ABSENT and value is None) or (key in DEFAULT_AS_ABSENT and value == DEFAULT_AS_ABSENT[key]):
        return ABSENT
    if isinstance(value, str) and value in AS_HASHED.get(key, {}):
        return AS_HASHED[key][value]
    return value


def config_hash(config: dict) -> str:
    """Hash of a resolved config (a plain nested dict) without the NOT_IDENTITY keys."""
    config = json.loads(json.dumps(config, default=str))  # a deep copy of plain values
    for key in NOT_IDENTITY:
        _drop(config, key)
    for key in dict.fromkeys([*NULL_AS_ABSENT, *DEFAULT_AS_ABSENT, *AS_HASHED]):
        value = _get(config, key)
        hashed = identity_value(key, value)
        if hashed is ABSENT:
            _drop(config, key)
        elif hashed is not value:
            _set(config, key, hashed)
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def format_value(value) -> str:
    """A config value as it appears in a directory name: one spelling per value (1e4 and 10000.0 alike), short: a
    path or Hub id by its last part, a list as `a+b+c` (`a+b+2more` past LIST_CHARS), a mapping as `k-v+k-v`."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, dict):
        return _short_list([f"{k}-{format_value(v)}" for k, v in sorted(value.items())])
    if isinstance(value, (list, tuple)):
        return _short_list([format_value(v) for v in value])
    return str(value).rstrip("/").rsplit("/", 1)[-1] or "_"


def _short_list(items: list[str]) -> str:
    if not items:
        return "none"
    shown = [items[0]]
    for item in items[1:]:
        rest = len(items) - len(shown) - 1
        if len("+".join(shown + [item])) + (len(f"+{rest}more") if rest else 0) > LIST_CHARS:
            return "+".join(shown) + f"+{len(items) - len(shown)}more"
        shown.append(item)
    return "+".join(shown)


def _short_keys(keys) -> dict[str, str]:
    """Each dotted key by its shortest dotted suffix that no other key ends with (`method.rank` -> `rank` unless
    another key also ends in `.rank`); distinct keys stay distinct."""
    parts = {key: key.split(".") for key in keys}

    def ends_with(key, suffix):
        return len(parts[key]) >= len(suffix) and parts[key][-len(suffix):] == suffix
    short = {}
    for key, p in parts.items():
        n = 1
        while n < len(p) and any(other != key and ends_with(other, p[-n:]) for other in parts):
            n += 1
        short[key] = ".".join(p[-n:])
    return short


def run_label(settings: dict[str, str]) -> str:
    """The readable part of a run directory's name from its command-line settings {dotted key: value as
    format_value writes it}: `key=value` in the order of the full keys, each key by its shortest unambiguous suffix,
    characters other than letters, digits and `._=+-` as `_`; `defaults` when there are none. Past MAX_LABEL the
    settings that fit are kept, then `~` and a hash of the whole label (the full settings are in .hydra/)."""
    short = _short_keys(settings)
    items = [UNSAFE.sub("_", f"{short[k]}={settings[k]}") for k in sorted(settings)]
    label = ",".join(items) or "defaults"
    if len(label) <= MAX_LABEL:
        return label
    tail = "~" + hashlib.sha1(label.encode()).hexdigest()[:8]
    kept = ""
    for item in items:
        if len(f"{kept},{item}" if kept else item) + len(tail) > MAX_LABEL:
            break
        kept = f"{kept},{item}" if kept else item
    return (kept or items[0][:MAX_LABEL - len(tail)]) + tail


def run_dirname(settings: dict[str, str], digest: str) -> str:
    """`{run_label(settings)}-{digest}`: no path separators, never empty, at most MAX_LABEL + 11 characters."""
    return f"{run_label(settings)}-{digest}"


def find_run_dir(study_dir, digest: str) -> Path | None:
    """The existing directory of the config with this hash below `study_dir`, if any."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        return None
    found = sorted(p for p in study_dir.glob(f"*-{digest}") if p.is_dir())
    return found[0] if found else None


class RunInProgress(Exception):
    """Another process holds the run directory's lock."""


class RunLock:
    """An exclusive lock on a run directory (`fcntl.flock` of `.lock`, dropped when the process ends, even
    by SIGKILL), so the same run launched twice trains once. The file names the holder for the message."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunInProgress(f"{self.path.parent} is being run by {holder}; not started a second time "
                                f"(wait for it to end, or stop it)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # drops the lock
        self.fd = None
        return False
