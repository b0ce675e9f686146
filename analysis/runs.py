"""Read run directories: one table of configs + metrics, and lazy access to ΔW and W0 per matrix.

    runs, table, skipped = collect_runs(["runs"])
    run = runs[0]
    run.delta("bert.encoder.layer.3.attention.self.query")   # Tensor (out, in), or LowRank(B, A, scaling)
    run.base_weight("bert.encoder.layer.3.attention.self.query")  # W0 (out, in), from the shared base file

A run directory holds `.hydra/config.yaml`, `metrics.json` (status 'complete' once final) and
`delta_w.safetensors`; W0 lives once per base model in `RUNS_ROOT/base_weights/`, named by the delta file's
`base_weights` metadata (a path relative to the run directory). File names, statuses and the metrics reader
come from the run-directory contract `lowrank.rundir.layout`; every safetensors file is checked by
`lowrank.rundir.integrity` (content hashes, finite values) before a number is computed from it: all of it by
`collect_runs`, or, with `check_data=False`, its header only, each tensor then being hashed and checked as it is read
(analysis/checked_reads.py; so a 26 GB ΔW is read and hashed once, not twice). Those two small modules are all this
imports from `lowrank`: never the model or training code. A run that fails any check is skipped with the reason.
`outcome_table` and `outcome_runs` read the configs and metrics alone. Its 440 lines keep every check of a run directory
in one place.
"""
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from omegaconf import OmegaConf

from lowrank.rundir.integrity import DIGEST_KEY, CorruptArtifact
from lowrank.rundir.layout import (BASE_WEIGHTS_DIR, CACHE_DIR, COMPLETE, CONFIG_FILE, DELTA_FILE, METRICS_FILE,
                                   MODULE_RANK_KEY, MODULE_SCALING_KEY, config_sha256, load_metrics)

from analysis.checked_reads import SkippedRun, check_file, fingerprint, read_checked, tensor_info
from analysis.provenance import add_setups
from analysis.variants import variant_of

NOT_RUNS = {BASE_WEIGHTS_DIR, CACHE_DIR, "wandb", ".hydra"}  # never run directories, and never hold any
METHODS = ("full", "lora", "subspace")
SUFFIXES = {"full": (".delta",), "lora": (".lora_A", ".lora_B"), "subspace": (".delta",)}
DENSE = "dense"  # a delta file's `delta_form`: a LoRA variant whose ΔW is not one product (DoRA, ReLoRA)
MAX_REASON = 400  # characters of a metrics `reason` shown in the skip reason (one line)


class LowRank(NamedTuple):
    """ΔW = scaling · B @ A, kept factored. B: (out, r), A: (r, in)."""
    B: torch.Tensor
    A: torch.Tensor
    scaling: float

    def dense(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)  # (out, r) @ (r, in): the full matrix, where W0 + ΔW is needed


@dataclass(frozen=True)
class Run:
    run_id: str
    path: Path
    config: dict          # resolved config, nested
    metrics: dict
    meta: dict            # delta file metadata, JSON values decoded (without the content hashes)
    names: tuple          # module paths that have a ΔW, sorted
    base_path: Path
    delta_digests: dict = field(repr=False, compare=False)  # SHA-256 per tensor key, from the file's metadata
    base_digests: dict = field(repr=False, compare=False)
    base_prefix: str = ""  # what starts the skip reason of a damaged W0 ("base weights 'REL' (named by ...): ")
    unread: dict = field(default_factory=dict, repr=False, compare=False)  # {path: fingerprint} of files whose
    # data collect_runs did not read (check_data=False): each tensor is checked as it is read

    @property
    def method(self) -> str:
        return self.config["method"]["name"]

    @property
    def rank(self) -> int | None:
        return self.config["method"].get("rank") if self.method == "lora" else None

    @property
    def factored(self) -> bool:
        """ΔW stored as LoRA factors (else dense `.delta`: full, subspace, DoRA and ReLoRA runs)."""
        return self.meta["method"] == "lora" and self.meta.get("delta_form") != DENSE

    @property
    def seed(self) -> int:
        return self.config["seed"]

    def module_rank(self, name: str) -> int | None:
        """LoRA: this module's rank (its `module_rank` entry, from a rank_pattern, else the run's rank)."""
        return self.meta.get(MODULE_RANK_KEY, {}).get(name, self.rank) if self.method == "lora" else None

    @property
    def max_rank(self) -> int:
        """LoRA: the largest rank of any module; 0 for full fine-tuning."""
        return max([self.module_rank(n) for n in self.names], default=0) if self.method == "lora" else 0

    def scaling(self, name: str) -> float:
        """LoRA: this module's scaling (its `module_scaling` entry, else the file's `scaling`): ΔW = scaling · B A."""
        return float(self.meta.get(MODULE_SCALING_KEY, {}).get(name, self.meta["scaling"]))

    def delta(self, name: str) -> "torch.Tensor | LowRank":
        """ΔW of one matrix, read now: dense fp32 (out, in) for full fine-tuning, factors for LoRA. Raises
        CorruptArtifact when the file no longer holds what was verified."""
        path = self.path / DELTA_FILE
        if self.factored:
            B, A = read_checked(path, [f"{name}.lora_B", f"{name}.lora_A"], self.delta_digests, self.unread.get(path))
            return LowRank(B.float(), A.float(), self.scaling(name))
        return read_checked(path, [f"{name}.delta"], self.delta_digests, self.unread.get(path))[0].float()

    def base_weight(self, name: str) -> torch.Tensor:
        """W0 (out, in) fp32 of one matrix, from the shared base file (checked like `delta`)."""
        return read_checked(self.base_path, [f"{name}.weight"], self.base_digests, self.unread.get(self.base_path),
                             self.base_prefix)[0].float()

    def base_names(self) -> list[str]:
        """Every block linear layer of the base model (the keys of the W0 file, without `.weight`)."""
        return [k.removesuffix(".weight") for k in sorted(self.base_digests)]


def find_run_dirs(roots) -> list[tuple[Path, Path]]:
    """(root, run_dir) for every directory below the roots holding `.hydra/config.yaml` or `metrics.json`
    (as a file or, damaged, as anything else), sorted. Run directories are not searched further (their
    `wandb/` holds no runs)."""
    found = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"runs root {root} is not a directory")
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if os.path.lexists(here / CONFIG_FILE) or METRICS_FILE in filenames or METRICS_FILE in dirnames:
                found.append((root, here))
                dirnames.clear()
            else:
                dirnames[:] = [d for d in dirnames if d not in NOT_RUNS]
    return sorted(found, key=lambda rp: (str(rp[0]), str(rp[1])))


def roots_problem(roots) -> str | None:
    """Why these runs roots cannot be analysed together (one missing or not a directory, or two of them with
    the same name: with several roots, a run id starts with its root's name), else None."""
    if any(str(r) == "" for r in roots):  # Path("") is the current directory: never what was meant
        return "an empty path is not a runs root; pass directories that hold run directories"
    roots = [Path(r) for r in roots]
    if not roots:
        return "no runs root given; pass one or more directories that hold run directories"
    seen = {}
    for root in roots:
        if not root.exists():
            return f"runs root {str(root)!r} does not exist; pass directories that hold run directories"
        if not root.is_dir():
            return f"runs root {str(root)!r} is not a directory; pass directories that hold run directories"
        if not os.access(root, os.R_OK | os.X_OK):
            return f"runs root {str(root)!r} is not readable"
        name = root.resolve().name
        if len(roots) > 1 and name in seen:
            other = seen[name]
            if other.resolve() == root.resolve():
                return f"runs root {str(root)!r} is given twice"
            return (f"runs roots {str(other)!r} and {str(root)!r} are both named {name!r}, which starts the run "
                    f"ids of each; pass roots with distinct names (or their common parent)")
        seen[name] = root
    return None


def _file_problem(path: Path) -> str | None:
    if path.is_file():
        return None
    return "missing" if not os.path.lexists(path) else "is not a file"


def _one_line(text, limit: int = MAX_REASON) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _load_config(path: Path):
    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation needing Hydra's resolvers (e.g. ${now:}); keys we read are plain
        return OmegaConf.to_container(cfg, resolve=False)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_config(config) -> None:
    if not isinstance(config, dict):
        raise SkippedRun(f"{CONFIG_FILE} holds a {type(config).__name__}, not a mapping")
    method = config.get("method")
    name = method.get("name") if isinstance(method, dict) else None
    needed = ["seed", "method.name"] + {"lora": ["method.rank"], "subspace": ["method.dim"]}.get(name, [])
    flat = _flatten(config)
    if any(k not in flat for k in needed):
        raise SkippedRun(f"config lacks {[k for k in needed if k not in flat]}")
    if name not in METHODS:
        raise SkippedRun(f"config method.name is {name!r}; analysis knows {list(METHODS)}")
    if not _is_int(config["seed"]):
        raise SkippedRun(f"config seed is {config['seed']!r}, not an integer")
    if name == "lora" and not (_is_int(method["rank"]) and method["rank"] >= 1):
        raise SkippedRun(f"config method.rank is {method['rank']!r}, not an integer ≥ 1")


def _is_float(dtype: str) -> bool:
    return dtype.startswith("F") or dtype == "BF16"  # F64 F32 F16 BF16 F8_*: the others are ints and bools


def _base_path(run_dir: Path, rel) -> Path:
    """W0's file from the delta file's `base_weights` metadata: RUNS_ROOT/base_weights/FILE, RUNS_ROOT
    being a folder above the run. Taken lexically (as os.path.relpath wrote it), so a RUNS_ROOT reached
    through a symbolic link still matches."""
    if not isinstance(rel, str) or not rel.strip():
        raise SkippedRun(f"{DELTA_FILE} metadata base_weights is {rel!r}, not a path")
    run_abs = Path(os.path.abspath(run_dir))
    path = Path(os.path.normpath(run_abs / rel))
    if path.parent.name != BASE_WEIGHTS_DIR or path.parent.parent not in run_abs.parents:
        raise SkippedRun(f"{DELTA_FILE} metadata base_weights {rel!r} points outside RUNS_ROOT/{BASE_WEIGHTS_DIR}/ "
                         f"of a folder above the run")
    return path


def load_outcome(run_dir: Path) -> tuple[dict, dict]:
    """(config, metrics) of a run directory that ended complete, its config the one its metrics were computed
    with; raises SkippedRun with the reason otherwise. What a run's quality and cost are read from, ΔW or not."""
    run_dir = Path(run_dir)
    if why := _file_problem(run_dir / CONFIG_FILE):
        raise SkippedRun(f"{CONFIG_FILE} {why}")
    if why := _file_problem(run_dir / METRICS_FILE):
        raise SkippedRun(f"{METRICS_FILE} {why}" + (" (still running or crashed)" if why == "missing" else ""))
    try:
        metrics = load_metrics(run_dir)
    except CorruptArtifact as e:
        raise SkippedRun(str(e)) from None
    status = metrics.get("status")
    if status != COMPLETE:
        reason = metrics.get("reason")
        raise SkippedRun(f"metrics status is {status!r}" + (f": {_one_line(reason)}" if reason not in (None, "")
                                                             else f", not {COMPLETE!r}"))
    try:
        config = _load_config(run_dir / CONFIG_FILE)
    except Exception as e:  # YAML errors, bad bytes, OmegaConf's own: all mean "unreadable"
        raise SkippedRun(f"{CONFIG_FILE} unreadable ({type(e).__name__}: {_one_line(e)})") from None
    _check_config(config)
    if metrics.get("config_sha256") != config_sha256(config):
        raise SkippedRun(f"{CONFIG_FILE} is not the config {METRICS_FILE} was computed with (its hash differs "
                         f"from the one recorded there)")
    return config, metrics


def load_run(run_dir: Path, run_id: str, check_data: bool = True) -> Run:
    """Read and check one run directory; raises SkippedRun with the reason when it cannot be analysed.
    check_data=False reads the safetensors headers only (Run.unread: each tensor is checked when read)."""
    run_dir = Path(run_dir)
    config, metrics = load_outcome(run_dir)
    delta_path = run_dir / DELTA_FILE
    fingerprints = {}
    if not check_data and delta_path.is_file():
        fingerprints[delta_path] = fingerprint(delta_path)  # before reading: a write after it is caught
    keys, raw_meta, delta_digests = check_file(delta_path, check_data=check_data)
    meta = {k: _decode(v) for k, v in raw_meta.items() if k != DIGEST_KEY}
    if "method" not in meta or "base_weights" not in meta:
        raise SkippedRun(f"{DELTA_FILE} metadata lacks method/base_weights")
    if meta["method"] not in METHODS:
        raise SkippedRun(f"{DELTA_FILE} says method {meta['method']!r}; analysis knows {list(METHODS)}")
    if meta["method"] != config["method"]["name"]:
        raise SkippedRun(f"{DELTA_FILE} says method {meta['method']!r}, the config {config['method']['name']!r}")
    suffixes = SUFFIXES["full"] if meta.get("delta_form") == DENSE else SUFFIXES[meta["method"]]
    names = tuple(sorted(dict.fromkeys(k.rsplit(".", 1)[0] for k in keys)))
    missing = [n + s for n in names for s in suffixes if n + s not in keys]
    if missing or not names:
        raise SkippedRun(f"{DELTA_FILE} lacks tensors: {missing[:3] or 'none stored'}")
    extra = sorted(set(keys) - {n + s for n in names for s in suffixes})
    if extra:
        raise SkippedRun(f"{DELTA_FILE} holds tensors a {meta['method']} ΔW has not: {extra[:3]}")
    if meta["method"] == "lora":
        _check_lora_meta(meta, names)

    base_rel = raw_meta["base_weights"]
    base_path = _base_path(run_dir, base_rel)
    what = f"base weights {base_rel!r} (named by {DELTA_FILE}): "
    if not check_data and base_path.is_file():
        fingerprints[base_path] = fingerprint(base_path)
    base_keys, _, base_digests = check_file(base_path, what, check_data)
    info, base_info = tensor_info(delta_path, keys), tensor_info(base_path, base_keys, what)
    for n in names:
        if f"{n}.weight" not in base_info:
            raise SkippedRun(f"{what}no tensor {n}.weight for the ΔW of {n}")
        w_dtype, w_shape = base_info[f"{n}.weight"]
        if suffixes == SUFFIXES["full"]:
            d_dtype, d_shape = info[f"{n}.delta"]
            dtypes, ok = [d_dtype], d_shape == w_shape
        else:
            (a_dtype, a_shape), (b_dtype, b_shape) = info[f"{n}.lora_A"], info[f"{n}.lora_B"]
            dtypes = [a_dtype, b_dtype]
            ok = (len(a_shape) == len(b_shape) == 2 and len(w_shape) == 2 and a_shape[0] == b_shape[1]
                  and (b_shape[0], a_shape[1]) == w_shape)
            expected = meta.get(MODULE_RANK_KEY, {}).get(n, config["method"]["rank"])
            if ok and a_shape[0] != expected:
                raise SkippedRun(f"{DELTA_FILE}: {n} has rank-{a_shape[0]} factors, the config rank "
                                 f"{config['method']['rank']}" + (f" (module_rank {expected})" if
                                                                  expected != config["method"]["rank"] else ""))
        if not all(map(_is_float, dtypes + [w_dtype])):
            raise SkippedRun(f"{DELTA_FILE} or its base weights store {n} as {dtypes + [w_dtype]}, not floats")
        if not ok or len(w_shape) != 2:
            raise SkippedRun(f"{DELTA_FILE}: the shapes stored for {n} do not fit W0 {list(w_shape)}")
    try:
        layer_and_matrix(dict.fromkeys([k.removesuffix(".weight") for k in base_keys] + list(names)))
    except ValueError as e:
        raise SkippedRun(f"{DELTA_FILE} or its base weights: {e}") from None
    return Run(run_id, run_dir, config, metrics, meta, names, base_path, delta_digests, base_digests, what,
               fingerprints)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_lora_meta(meta: dict, names: tuple) -> None:
    """A LoRA delta file's scaling: a finite number, and per-module ranks and scalings (if any) for its modules."""
    if not _is_number(meta.get("scaling")):
        raise SkippedRun(f"{DELTA_FILE} metadata scaling is {meta.get('scaling')!r}, not a finite number")
    for key, valid in ((MODULE_RANK_KEY, lambda v: _is_int(v) and v >= 1), (MODULE_SCALING_KEY, _is_number)):
        per_module = meta.get(key, {})
        if not isinstance(per_module, dict) or not all(valid(v) for v in per_module.values()):
            raise SkippedRun(f"{DELTA_FILE} metadata {key} is not a mapping of module to number")
        if unknown := sorted(set(per_module) - set(names)):
            raise SkippedRun(f"{DELTA_FILE} metadata {key} names modules it holds no factors of: {unknown[:3]}")


def _decode(value: str):
    """Metadata values are strings; numbers, lists and null were JSON-encoded by the writer."""
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v  # lists as one JSON cell
    return out


def config_keys(run: Run) -> list[str]:
    """The run's config keys as run_table's columns name them (`method.rank`, `task.eval_size`, ...)."""
    return list(_flatten(run.config))


def run_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run: run_id, path, variant (analysis.variants: 'lora', 'dora', 'full', ...), the flattened config
    (`method.rank`, `task.name`, ...) and every scalar metric (`eval_accuracy`, `wall_seconds`, ...), metrics that
    are dicts flattened too (`memory_estimate.weights_bytes`, ...); lists such as `eval_history` are left out. A
    metric named like a config column (or run_id, path, variant) never replaces it: the config says what the run
    was."""
    return pd.DataFrame([_row(r.run_id, r.path, r.config, r.metrics) for r in runs])


def _row(run_id: str, path: Path, config: dict, metrics: dict) -> dict:
    flat = _flatten(config)
    ident = {"run_id": run_id, "path": str(path), "variant": variant_of(flat).name} | flat
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    nested = _flatten({k: v for k, v in metrics.items() if isinstance(v, dict)})
    return ident | {k: v for k, v in (scalars | nested).items() if k not in ident}


def outcome_table(roots) -> tuple[pd.DataFrame, set[str], list[tuple[str, str]]]:
    """run_table's rows for every complete run below `roots` from its config and metrics alone (no ΔW read or
    needed: its spectra may have been analysed on another machine), their config keys, and [(run_id, reason)]
    for the others."""
    rows, keys, skipped = [], set(), []
    for run_id, run_dir in run_ids(roots):
        try:
            config, metrics = load_outcome(run_dir)
        except SkippedRun as e:
            skipped.append((run_id, str(e)))
            continue
        rows.append(_row(run_id, run_dir, config, metrics))
        keys |= set(_flatten(config))
    return pd.DataFrame(rows), keys, skipped


def outcome_runs(roots) -> tuple[pd.DataFrame, pd.DataFrame, list[tuple[str, str]], list[str]]:
    """outcome_table's runs with their setups (analysis.provenance.add_setups: split where digests differ), a config
    trained twice below the roots counted once: (runs, setups, [(run_id, reason)] for the others, one line per
    setup split by its runs' model or data digests)."""
    table, keys, skipped = outcome_table(roots)
    twice = table.duplicated("config_hash") if "config_hash" in table else pd.Series(False, index=table.index)
    skipped += [(r, "the same config as another run below the roots (trained twice): counted once")
                for r in table.run_id[twice]]
    runs, setups, not_pooled = add_setups(table[~twice].reset_index(drop=True), keys)
    return runs, setups, skipped, not_pooled


def collect_runs(roots, check_data: bool = True) -> tuple[list[Run], pd.DataFrame, list[tuple[str, str]]]:
    """Every run directory below `roots`: (analysable runs, their table, [(run_id, reason) skipped]).
    run_id is the path below its root; with several roots the root's name goes first. A run directory below
    two of the roots (one inside the other) is taken once. Raises ValueError for roots that cannot be read
    together (`roots_problem`). check_data=False checks everything but the tensors' bytes, which are then
    checked as they are read (Run.delta, Run.base_weight: DamagedFile for damage from before)."""
    runs, skipped = [], []
    for run_id, run_dir in run_ids(roots):
        try:
            runs.append(load_run(run_dir, run_id, check_data))
        except SkippedRun as e:
            skipped.append((run_id, str(e)))
    return runs, run_table(runs), skipped


def run_ids(roots):
    """(run_id, run directory) below `roots`, each directory once (ValueError: roots_problem)."""
    roots = [Path(r) for r in roots]
    if why := roots_problem(roots):
        raise ValueError(why)
    seen = set()
    for root, run_dir in find_run_dirs(roots):
        if run_dir.resolve() not in seen:
            seen.add(run_dir.resolve())
            rel = run_dir.relative_to(root).as_posix()
            yield (f"{root.resolve().name}/{rel}" if len(roots) > 1 else rel), run_dir


_INDEX = re.compile(r"^\d+$")


def layer_and_matrix(names) -> dict[str, tuple[int, str]]:
    """(layer, matrix_type) per module path. The layer is the first integer component of the path. The
    matrix type is the shortest '.'-suffix of what follows it that ends no other matrix's remainder, else
    the whole remainder: for BERT `query`, `value`, `intermediate.dense`, `attention.output.dense` and
    `output.dense`; for LLaMA `q_proj`, ...; for GPT-2 `c_attn`, `attn.c_proj`, `mlp.c_proj`.
    Pass every block matrix of the model (the W0 file's keys) so types do not depend on a run's targets."""
    parts = {}
    for n in names:
        comps = n.split(".")
        i = next((k for k, c in enumerate(comps) if _INDEX.match(c)), None)
        if i is None or i == len(comps) - 1:
            raise ValueError(f"module path {n!r} has no layer index followed by a name")
        parts[n] = (int(comps[i]), comps[i + 1:])
    remainders = {tuple(rest) for _, rest in parts.values()}
    out = {}
    for n, (layer, rest) in parts.items():
        kind = ".".join(rest)
        for k in range(1, len(rest) + 1):
            suffix = tuple(rest[-k:])
            if all(o == tuple(rest) or o[-k:] != suffix for o in remainders):
                kind = ".".join(suffix)
                break
        out[n] = (layer, kind)
    return out
