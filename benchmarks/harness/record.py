"""One record format for every benchmark: `{name}.json` and `{name}.md`, each written whole (lowrank.rundir.atomic).

    meta = collect_metadata(device)                        # once, before measuring
    write_result(out, result_name("svd", device), rows, settings=dict(readers=4), meta=meta,
                 title="ΔW singular spectra", columns=[Column("seconds", "total_s", ".1f")])

The JSON holds `meta` (where the numbers came from), `settings` (what the run was asked to do), `rows` (the
table) and `details` (measurements that are not rows of it: parity curves, probe timings). The markdown shows
the same metadata, then the rows as one table, then any further sections the caller renders with
`markdown_table`. The metadata: the git commit and whether the tree had uncommitted changes, the exact
command line, the Python/torch/transformers/peft/triton versions, the device (GPU name, or the CPU model) and
the date. A result is keyed by its commit; benchmarks/LOG.md points at both.

A copy of the tree (synced to a GPU machine, say) may have no .git, or one at another commit: there, set
LOWRANK_GIT_COMMIT to the commit the copy was made from; it wins over git, and whether the tree was dirty is
then unknown (None).
"""
import json
import re
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import torch

from lowrank.rundir.atomic import write_json, write_text

ROOT = Path(__file__).resolve().parents[2]  # the checkout whose code is measured (benchmarks/harness/ is two down)
COMMIT_ENV = "LOWRANK_GIT_COMMIT"
PACKAGES = ("torch", "transformers", "peft", "triton")
NONE = "–"  # how a missing value is written in a table


def git_state(root: Path = ROOT) -> dict:
    """{"commit": full hash or None, "dirty": uncommitted changes (untracked files included) or None}.
    LOWRANK_GIT_COMMIT, where set, wins (and dirty is then unknown): it is set where a copy was made."""
    if os.environ.get(COMMIT_ENV):
        return dict(commit=os.environ[COMMIT_ENV], dirty=None)

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout
    try:
        return dict(commit=git("rev-parse", "HEAD").strip(), dirty=bool(git("status", "--porcelain").strip()))
    except (OSError, subprocess.SubprocessError):
        return dict(commit=None, dirty=None)


def package_versions() -> dict:
    """Python and each of PACKAGES (None where it is not installed), from the installed packages' metadata."""
    out = dict(python=platform.python_version())
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__  # with its build tag (+cu130, +cpu), which the package metadata may lack
    return out


def cpu_name() -> str:
    """The CPU model with its bf16 instruction sets (the CPU benchmarks depend on them), and the core count."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    model = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), [])
    bf16 = [f for f in flags if "bf16" in f]
    name = model or platform.processor() or platform.machine()
    return f"{name} ({', '.join(bf16) or 'no bf16 instructions'}), {os.cpu_count()} cores"


def device_name(device=None) -> str:
    """The GPU's name for a CUDA device (default: CUDA when there is one), else the CPU model."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def result_name(stem: str, device=None) -> str:
    """`{stem}_{device tag}`: the GPU's model in lower case ("NVIDIA H200" -> h200), or "cpu"."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return f"{stem}_cpu"
    name = torch.cuda.get_device_name(device)  # "NVIDIA H200", "NVIDIA H100 80GB HBM3": the model, not the memory
    model = re.search(r"\b[A-Z]\d{2,4}[A-Za-z]*\b", name)
    return f"{stem}_{(model.group(0) if model else name.split()[-1]).lower()}"


def command_line() -> str:
    """This process's command line as typed (the interpreter by its file name; `executable` has its path)."""
    argv = getattr(sys, "orig_argv", sys.argv)
    return shlex.join([Path(argv[0]).name, *argv[1:]])


def collect_metadata(device=None) -> dict:
    """Where a result comes from. Collect it once, before measuring: the run's own output files would
    otherwise count as uncommitted changes."""
    return dict(**git_state(), command=command_line(), executable=sys.executable,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                device=device_name(device), versions=package_versions())


@dataclass(frozen=True)
class Column:
    """One table column: `value` is a row key or a function of the row; a value that is present is written
    with format(value, spec), or as `plain_cell` writes it without a spec; a missing one (None) as "–";
    `unit` follows either ("1.30×", "–×")."""
    header: str
    value: str | Callable[[dict], Any]
    spec: str = ""
    unit: str = ""

    def cell(self, row: dict) -> str:
        v = self.value(row) if callable(self.value) else row.get(self.value)
        if v is None:
            return NONE + self.unit
        return (_escape(format(v, self.spec)) if self.spec else plain_cell(v)) + self.unit


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def plain_cell(v) -> str:
    """A value written with no column format: floats to 4 significant digits, lists and dicts as JSON."""
    if v is None:
        return NONE
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list, tuple)):
        return _escape(json.dumps(v, ensure_ascii=False, separators=(",", ":")))
    return _escape(str(v))


def markdown_table(rows: list[dict], columns: list[Column] | None = None) -> str:
    """A markdown table of `rows`; without `columns`, one column per key (in first-seen order), plain cells."""
    if columns is None:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        columns = [Column(k, k) for k in keys]
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.cell(r) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def metadata_markdown(meta: dict) -> str:
    """The metadata as three lines: commit and date, the command, the versions."""
    commit = meta.get("commit")
    dirty = {True: ", with uncommitted changes", False: ", clean tree", None: ""}[meta.get("dirty")]
    where = f"commit `{commit[:12]}`{dirty}" if commit else "no commit recorded"
    when = f", {meta['date']}" if meta.get("date") else ""
    versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items() if v)
    lines = [f"Measured at {where}{when}, on {meta.get('device') or 'an unrecorded device'}.  ",
             f"Command: `{meta.get('command')}`  "]
    if versions:
        lines.append(f"{versions}.")
    if meta.get("note"):
        lines.append(meta["note"])
    return "\n".join(lines) + "\n"


def settings_markdown(settings: dict) -> str:
    return "Settings: " + ", ".join(f"{k}={plain_cell(v)}" for k, v in settings.items()) + ".\n"


def write_result(out_dir, name: str, rows: list[dict], settings: dict | None = None, *, meta: dict | None = None,
                 title: str | None = None, description: str = "", columns: list[Column] | None = None,
                 sections: tuple[str, ...] | list[str] = (), details: dict | None = None) -> tuple[Path, Path]:
    """Write `{name}.json` ({meta, settings, rows, details}) and `{name}.md` (title, metadata, settings,
    `description`, the rows table, then each of `sections`: markdown text) under `out_dir`, each atomically,
    JSON first. `meta` defaults to `collect_metadata()` now; pass the one collected before measuring."""
    out_dir = Path(out_dir)
    meta = collect_metadata() if meta is None else meta
    j = write_json(out_dir / f"{name}.json", dict(meta=meta, settings=settings, rows=rows, details=details))
    parts = [f"# {title or name}\n", metadata_markdown(meta)]
    if settings:
        parts.append(settings_markdown(settings))
    if description:
        parts.append(description.strip() + "\n")
    parts.append(markdown_table(rows, columns))
    parts += [s.strip() + "\n" for s in sections if s]
    m = write_text(out_dir / f"{name}.md", "\n".join(parts))
    return j, m


def read_result(path) -> dict:
    """A result written by `write_result` (every key present)."""
    data = json.loads(Path(path).read_text())
    missing = {"meta", "settings", "rows", "details"} - set(data)
    if missing:
        raise ValueError(f"{path}: not a benchmark result (missing {sorted(missing)})")
    return data


def median_run(runs: list[dict], key: str = "tokens_per_second") -> dict:
    """Of repeated runs of one config, the one with the median `key` (the lower middle for an even count),
    with every run's value under `{key}_runs` when there is more than one: one run, not a blend."""
    row = dict(sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2])
    if len(runs) > 1:
        row[f"{key}_runs"] = [r[key] for r in runs]
    return row
