"""Read run directories: one table of configs + metrics, and lazy access to ΔW and W0 per matrix.

    runs, table, skipped = collect_runs(["runs"])
    run = runs[0]
    run.delta("bert.encoder.layer.3.attention.self.query")   # Tensor (out, in), or LowRank(B, A, scaling)
    run.base_weight("bert.encoder.layer.3.attention.self.query")  # W0 (out, in), from the shared base file

A run directory holds `.hydra/config.yaml`, `metrics.json` (status 'complete' once final) and
`delta_w.safetensors`; W0 lives once per base model in `RUNS_ROOT/base_weights/`, named by the delta file's
`base_weights` metadata (a path relative to the run directory). Nothing here imports the training code.
"""
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

DELTA_FILE = "delta_w.safetensors"
CONFIG_FILE = Path(".hydra") / "config.yaml"
METRICS_FILE = "metrics.json"
NOT_RUNS = {"base_weights", "wandb", ".hydra"}  # never run directories, and never hold any


class LowRank(NamedTuple):
    """ΔW = scaling · B @ A, kept factored. B: (out, r), A: (r, in)."""
    B: torch.Tensor
    A: torch.Tensor
    scaling: float

    def dense(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)  # (out, r) @ (r, in): the full matrix, where W0 + ΔW is needed


class SkippedRun(Exception):
    """A run directory that cannot be analysed; the message is the reason shown in the report."""


@dataclass(frozen=True)
class Run:
    run_id: str
    path: Path
    config: dict          # resolved config, nested
    metrics: dict
    meta: dict            # delta file metadata, JSON values decoded
    names: tuple          # module paths that have a ΔW, sorted
    base_path: Path

    @property
    def method(self) -> str:
        return self.config["method"]["name"]

    @property
    def rank(self) -> int | None:
        return self.config["method"].get("rank") if self.method == "lora" else None

    @property
    def seed(self) -> int:
        return self.config["seed"]

    def delta(self, name: str) -> "torch.Tensor | LowRank":
        """ΔW of one matrix, read now: dense fp32 (out, in) for full fine-tuning, factors for LoRA."""
        with safe_open(self.path / DELTA_FILE, "pt") as f:
            if self.meta["method"] == "lora":
                return LowRank(f.get_tensor(f"{name}.lora_B").float(), f.get_tensor(f"{name}.lora_A").float(),
                               float(self.meta["scaling"]))
            return f.get_tensor(f"{name}.delta").float()

    def base_weight(self, name: str) -> torch.Tensor:
        """W0 (out, in) fp32 of one matrix, from the shared base file."""
        with safe_open(self.base_path, "pt") as f:
            return f.get_tensor(f"{name}.weight").float()

    def base_names(self) -> list[str]:
        """Every block linear layer of the base model (the keys of the W0 file, without `.weight`)."""
        with safe_open(self.base_path, "pt") as f:
            return [k.removesuffix(".weight") for k in f.keys()]


def find_run_dirs(roots) -> list[tuple[Path, Path]]:
    """(root, run_dir) for every directory below the roots holding `.hydra/config.yaml` or `metrics.json`,
    sorted. Run directories are not searched further (their `wandb/` holds no runs)."""
    found = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"runs root {root} is not a directory")
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if (here / CONFIG_FILE).is_file() or METRICS_FILE in filenames:
                found.append((root, here))
                dirnames.clear()
            else:
                dirnames[:] = [d for d in dirnames if d not in NOT_RUNS]
    return sorted(found, key=lambda rp: (str(rp[0]), str(rp[1])))


def check_safetensors(path: Path) -> list[str]:
    """Keys of a safetensors file; raises SkippedRun when it is missing, truncated or its header is corrupt.
    Opening reads the header and checks that the data it describes covers the file exactly."""
    if not path.is_file():
        raise SkippedRun(f"{path.name} missing")
    try:
        with safe_open(path, "pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types; all mean "unreadable"
        raise SkippedRun(f"{path.name} truncated or corrupt ({type(e).__name__}: {e})") from None


def _load_config(run_dir: Path) -> dict:
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation needing Hydra's resolvers (e.g. ${now:}); keys we read are plain
        return OmegaConf.to_container(cfg, resolve=False)


def load_run(run_dir: Path, run_id: str) -> Run:
    """Read and check one run directory; raises SkippedRun with the reason when it cannot be analysed."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise SkippedRun(f"{CONFIG_FILE} missing")
    if not (run_dir / METRICS_FILE).is_file():
        raise SkippedRun(f"{METRICS_FILE} missing (still running or crashed)")
    try:
        config = _load_config(run_dir)
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
        if not isinstance(config, dict) or not isinstance(metrics, dict):
            raise ValueError("not a mapping")
    except Exception as e:
        raise SkippedRun(f"unreadable config or metrics ({type(e).__name__}: {e})") from None
    needed = ["seed", "method.name"] + (["method.rank"] if config.get("method", {}).get("name") == "lora" else [])
    flat = _flatten(config)
    if any(k not in flat for k in needed):
        raise SkippedRun(f"config lacks {[k for k in needed if k not in flat]}")
    if metrics.get("status") != "complete":
        raise SkippedRun(f"metrics status is {metrics.get('status')!r}, not 'complete'")
    keys = check_safetensors(run_dir / DELTA_FILE)
    with safe_open(run_dir / DELTA_FILE, "pt") as f:
        meta = {k: _decode(v) for k, v in (f.metadata() or {}).items()}
    if meta.get("method") not in ("full", "lora") or "base_weights" not in meta:
        raise SkippedRun(f"{DELTA_FILE} metadata lacks method/base_weights")
    if meta["method"] != config["method"]["name"]:
        raise SkippedRun(f"{DELTA_FILE} says method {meta['method']!r}, the config {config['method']['name']!r}")
    suffixes = (".delta",) if meta["method"] == "full" else (".lora_A", ".lora_B")
    names = tuple(dict.fromkeys(k.rsplit(".", 1)[0] for k in keys))
    missing = [n + s for n in names for s in suffixes if n + s not in keys]
    if missing or not names:
        raise SkippedRun(f"{DELTA_FILE} lacks tensors: {missing[:3] or 'none stored'}")
    base_path = (run_dir / meta["base_weights"]).resolve()
    check_safetensors(base_path)
    return Run(run_id, run_dir, config, metrics, meta, names, base_path)


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


def run_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run: run_id, path, the flattened config (`method.rank`, `task.name`, ...) and every scalar
    metric (`eval_accuracy`, `wall_seconds`, ...), metrics that are dicts flattened too
    (`memory_estimate.weights_bytes`, ...); lists such as `eval_history` are left out."""
    rows = []
    for r in runs:
        scalars = {k: v for k, v in r.metrics.items() if not isinstance(v, (list, dict))}
        nested = _flatten({k: v for k, v in r.metrics.items() if isinstance(v, dict)})
        rows.append({"run_id": r.run_id, "path": str(r.path)} | _flatten(r.config) | scalars | nested)
    return pd.DataFrame(rows)


def collect_runs(roots) -> tuple[list[Run], pd.DataFrame, list[tuple[str, str]]]:
    """Every run directory below `roots`: (analysable runs, their table, [(run_id, reason) skipped]).
    run_id is the path below its root; with several roots the root's name goes first."""
    roots = [Path(r) for r in roots]
    runs, skipped = [], []
    for root, run_dir in find_run_dirs(roots):
        rel = run_dir.relative_to(root).as_posix()
        run_id = f"{root.resolve().name}/{rel}" if len(roots) > 1 else rel
        try:
            runs.append(load_run(run_dir, run_id))
        except SkippedRun as e:
            skipped.append((run_id, str(e)))
    return runs, run_table(runs), skipped


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
