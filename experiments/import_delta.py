"""An existing fine-tune as a lowrank run directory, so that analysis.report reads it like a run it trained.

    python -m experiments.import_delta --base BASE --finetuned FT \
        --out RUNS/NAME/RUN    # a model and its fine-tuned sibling
    python -m experiments.import_delta --adapter ADAPTER [--base BASE] \
        --out RUNS/NAME/RUN    # a PEFT LoRA adapter folder
    python -m analysis.report RUNS --out REPORT

BASE and FT are Hub ids, local folders or pkg://PACKAGE/DIR paths of Hugging Face checkpoints
(lowrank.data.hf_checkpoint: safetensors, sharded or not; .bin with a warning); ADAPTER is a folder written by
PeftModel.save_pretrained (or a Hub id), whose base model is BASE or, without --base, the one the adapter names
(lowrank.rundir.peft.adapter_base: the local folder an adapter of experiments.export_peft records, where it exists here,
else `base_model_name_or_path`).

The run directory is the trainer's format (lowrank.rundir.layout, lowrank.rundir.delta): `delta_w.safetensors` with
`{module}.delta` = W_ft − W_0 in fp32 (bitwise the difference of the fp32 values) for every 2-D weight of the numbered
blocks, or an adapter's `{module}.lora_A` / `.lora_B` (fp32, as PEFT stored them) with per-module `module_rank` /
`module_scaling` where rank_pattern, alpha_pattern or use_rslora make them differ; W0 in `RUNS/base_weights/`;
`.hydra/config.yaml`, a minimal config saying what is known (model.name and path, method.* as the adapter's config gives
it, `imported`: the sources; seed 0 and task.name `imported`, since an import has neither); `metrics.json` with status
complete and no accuracy (`imported: true`). Modules are named as BASE names them (e.g.
`encoder.layer.0.attention.self.query`); the other checkpoint's names are mapped to those by dropping leading components
(`bert.`, `model.`, PEFT's `base_model.model.`), and a module of another shape stops the import with one line naming it
and both shapes.
W0 is stored once per base model, as runs store it: where RUNS/base_weights/ already holds these weights (a trained
run's, or an earlier import's), the import uses that file and names its modules as the file does (a classifier run's
`bert.encoder.layer.0...`), so it is analysed beside those runs and W0 is not stored twice.
Everything streams: each file is written one tensor at a time (lowrank.rundir.atomic.write_safetensors_streamed) from
tensors read one at a time, so memory holds a few matrices whatever the model's size.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lowrank.rundir import atomic
from lowrank.rundir.atomic import remove_stale_temps, write_safetensors_streamed
from lowrank.data.hf_checkpoint import Checkpoint, block_matrices, file_checkpoint, local_folder, open_checkpoint
from lowrank.rundir.delta import base_weights_path, delta_metadata, module_overrides, shared_base_weights
from lowrank.errors import ConfigError, fail
from lowrank.adapters.lora import lora_scaling
from lowrank.rundir.peft import (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, BASE_FILE, adapter_base, adapter_factors,
                                  module_lora, read_adapter_config, scaling_rule)
from lowrank.rundir import provenance
from lowrank.rundir.layout import (BASE_WEIGHTS_DIR, CONFIG_FILE, DELTA_FILE, LOG_FILE, METRICS_FILE, OVERRIDES_FILE,
                                   RunLock, write_metrics)

MAX_STRIP = 3  # leading name components dropped when mapping one checkpoint's names onto the other's
FP32 = torch.float32


def _strip(name: str, n: int) -> str:
    return ".".join(name.split(".")[n:])


def match_names(base: list[str], other: list[str]) -> dict[str, str]:
    """{other name: base name}: the pairing that drops the fewest leading components (`bert.`, `model.`, ...) of
    either side among those pairing the most names, where no two names of one side collide."""
    best = {}
    for total in range(2 * MAX_STRIP + 1):
        for i in range(max(0, total - MAX_STRIP), min(total, MAX_STRIP) + 1):
            b = {_strip(n, i): n for n in base}
            o = {_strip(n, total - i): n for n in other}
            if len(b) == len(base) and len(o) == len(other) and len(b.keys() & o.keys()) > len(best):
                best = {o[k]: b[k] for k in b.keys() & o.keys()}
    return best


def oriented_shape(ckpt: Checkpoint, key: str, transpose: bool) -> tuple[int, int]:
    shape = ckpt.shape(key)
    return (shape[1], shape[0]) if transpose else tuple(shape)


def read_matrix(ckpt: Checkpoint, key: str, transpose: bool) -> torch.Tensor:
    """One matrix (out, in) in fp32; a Conv1D weight (in, out) transposed."""
    w = ckpt.get(key).float()
    return w.T.contiguous() if transpose else w


def model_name(source: str, given: str | None) -> str:
    """--model-name, else the Hub id's or folder's last component: names the base weights file."""
    name = given or Path(source.rstrip("/")).name or "model"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_base_weights(runs_root: Path, name: str, base: Checkpoint, keys: list[str], transpose: bool,
                       log=print) -> tuple[Path, str]:
    """W0 of every block matrix of `base` in the runs' shared store, RUNS_ROOT/base_weights/ (fp32 (out, in), keys
    `{module}.weight`), streamed; returns (its file, the prefix that file's names add to `keys`). A file there that
    already holds these weights is used instead of a second copy, as the trainer's runs reuse theirs: a run's
    (`bert.encoder...` for a classifier) or an earlier import's; else they are written as {name}-{fingerprint}."""
    folder = runs_root / BASE_WEIGHTS_DIR
    specs = {k: (FP32, oriented_shape(base, k, transpose)) for k in keys}
    pending, digests = write_safetensors_streamed(folder / f".{name}-import-{os.getpid()}.safetensors", specs,
                                                  lambda k: read_matrix(base, k, transpose), {"base_model": name})
    shared = shared_base_weights(runs_root, digests)
    if shared is not None:
        pending.unlink()
        path, prefix = shared
        log(f"W0: {len(keys)} matrices already in {path}" + (f" (named {prefix}...)" if prefix else ""))
        return path, prefix
    path = base_weights_path(runs_root, name, digests)
    pending.replace(path)  # named by its content, as lowrank.rundir.delta.ensure_base_weights names it
    log(f"W0: {len(keys)} matrices -> {path}")
    return path, ""


def clear_interrupted(out: Path, log=print) -> None:
    """What a killed import left, removed once this process holds the run's lock: temp files of dead writers (in the
    run directory, and in base_weights/ beside it, with W0 files a killed import had not named yet)."""
    removed = remove_stale_temps(out, everything=True) if out.is_dir() else []
    folder = out.parent.parent / BASE_WEIGHTS_DIR
    if folder.is_dir():
        removed += remove_stale_temps(folder)
        for pending in folder.glob(".*-import-*.safetensors"):  # write_base_weights' unnamed W0, by its pid
            if not _pid_alive(int(pending.stem.rsplit("-", 1)[1])):
                pending.unlink(missing_ok=True)
                removed.append(pending)
    if (out / DELTA_FILE).exists() or removed:
        log(f"{out}: an interrupted import ({len(removed)} leftover files removed); importing again")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_out(out: Path) -> Path:
    out = out.expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a run directory RUNS/NAME/RUN")
    if (out / METRICS_FILE).exists():  # ΔW without metrics.json: an import killed before it ended, done again
        raise ConfigError(f"--out {str(out)!r} already holds a run; remove it or give another directory")
    if len(out.parents) < 3:
        raise ConfigError(f"--out {str(out)!r} is not valid; give RUNS/NAME/RUN (W0 goes to RUNS/base_weights/)")
    return out


def full_pair(base: Checkpoint, ft: Checkpoint) -> dict[str, tuple[str, str]]:
    """{module: (base key, fine-tuned key)} for every block matrix; ConfigError for one missing or of another shape."""
    base_keys, ft_keys = block_matrices(base), block_matrices(ft)
    if not base_keys:
        raise ConfigError(f"--base {base.source!r} holds no 2-D weights inside numbered blocks (layer.N.)")
    ft_to_base = match_names(base_keys, ft_keys)
    base_to_ft = {b: f for f, b in ft_to_base.items()}
    for keys, other, what, where in ((base_keys, base_to_ft, "--base", "--finetuned"),
                                     (ft_keys, ft_to_base, "--finetuned", "--base")):
        if missing := [k for k in keys if k not in other]:
            raise ConfigError(f"{what} matrix {missing[0]!r} has no counterpart in {where} ({len(missing)} such); "
                              f"the two checkpoints must be one architecture")
    pairs = {}
    for b in base_keys:
        f = base_to_ft[b]
        sb, sf = oriented_shape(base, b, base.conv1d), oriented_shape(ft, f, ft.conv1d)
        if sb != sf:
            raise ConfigError(f"module {b.removesuffix('.weight')}: --base has shape {list(sb)}, --finetuned "
                              f"{f!r} has {list(sf)}")
        pairs[b.removesuffix(".weight")] = (b, f)
    return pairs


def import_pair(base_src: str, ft_src: str, out: Path, name: str | None = None, log=print) -> Path:
    """Write the run directory of the full fine-tune FT of BASE; returns it."""
    t0 = time.perf_counter()
    out = check_out(out)
    base, ft = open_checkpoint(base_src, "--base"), open_checkpoint(ft_src, "--finetuned")
    pairs = full_pair(base, ft)
    name = model_name(base_src, name)
    with RunLock(out):
        clear_interrupted(out, log)
        base_path, prefix = write_base_weights(out.parent.parent, name, base, [b for b, _ in pairs.values()],
                                               base.conv1d, log)
        pairs = {prefix + m: files for m, files in pairs.items()}  # modules as the shared W0 file names them

        def delta_of(key: str) -> torch.Tensor:
            b, f = pairs[key.removesuffix(".delta")]
            w_ft = read_matrix(ft, f, ft.conv1d)
            return w_ft.sub_(read_matrix(base, b, base.conv1d))  # in place: W_ft's buffer becomes ΔW

        specs = {f"{m}.delta": (FP32, oriented_shape(base, b, base.conv1d)) for m, (b, _) in pairs.items()}
        meta = {"base_model": base_src, "base_model_name": name, "scaling": 1.0, "rank": None, "alpha": None,
                "targets": list(pairs), "imported_from": ft_src}
        write_safetensors_streamed(out / DELTA_FILE, specs, delta_of, delta_metadata(out, "full", base_path, meta))
        config = {"model": {"name": name, "path": base_src}, "task": {"name": "imported"},
                  "method": {"name": "full", "targets": "all-linear"},
                  "imported": {"base": base_src, "finetuned": ft_src}, "seed": 0}
        _finish(out, config, {"method": "full", "provenance": _provenance(out, base)}, t0,
                f"ΔW = W_ft − W_0 of {ft_src} over {base_src}")
    log(f"ΔW: {len(pairs)} matrices -> {out} ({time.perf_counter() - t0:.1f} s)")
    return out


def adapter_checkpoint(source: str) -> tuple[Checkpoint, dict, str | None]:
    """(the adapter's weights, its checked adapter_config.json, the base it names: lowrank.rundir.peft.adapter_base)."""
    folder = local_folder(source, "--adapter", ["adapter_config.json", "adapter_model.*", BASE_FILE])
    config = read_adapter_config(folder)
    file = next((folder / f for f in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN) if (folder / f).is_file()), None)
    if file is None:
        raise ConfigError(f"--adapter: {folder} holds no {ADAPTER_WEIGHTS} (nor {ADAPTER_WEIGHTS_BIN})")
    return file_checkpoint(file, source, "--adapter"), config, adapter_base(folder, config)


def import_adapter(adapter_src: str, out: Path, base_src: str | None = None, name: str | None = None,
                   log=print) -> Path:
    """Write the run directory of a PEFT LoRA adapter over its base model; returns it."""
    t0 = time.perf_counter()
    out = check_out(out)
    adapter, acfg, named_base = adapter_checkpoint(adapter_src)
    base_src = base_src or named_base
    if not base_src:
        raise ConfigError(f"--adapter {adapter_src!r} names no base model (base_model_name_or_path); give --base")
    base = open_checkpoint(base_src, "--base")
    transpose = base.conv1d or bool(acfg.get("fan_in_fan_out"))  # W0 stored (in, out): Conv1D
    factors, others = adapter_factors(adapter.keys())
    if not factors:
        raise ConfigError(f"--adapter {adapter_src!r} holds no LoRA factors (keys ...lora_A.weight / lora_B.weight)")
    base_keys = block_matrices(base)
    to_base = match_names(base_keys, [f"{m}.weight" for m in factors])
    per_module, keys = {}, {}
    for m, (a_key, b_key) in factors.items():
        b = to_base.get(f"{m}.weight")
        if b is None:
            raise ConfigError(f"adapter module {m!r} matches no 2-D block weight of --base {base_src!r} (such as "
                              f"{base_keys[0]!r})")
        r, _, scaling = module_lora(acfg, m)
        (ra, n_in), (n_out, rb) = adapter.shape(a_key), adapter.shape(b_key)
        if not ra == rb == r:
            raise ConfigError(f"adapter module {m!r}: factors of rank {ra} and {rb}, its adapter_config.json gives "
                              f"r={r}")
        w_shape = oriented_shape(base, b, transpose)
        if (n_out, n_in) != w_shape:
            raise ConfigError(f"module {b.removesuffix('.weight')}: --base has shape {list(w_shape)}, the adapter's "
                              f"B @ A {[n_out, n_in]}")
        module = b.removesuffix(".weight")
        per_module[module] = (r, scaling)
        keys[f"{module}.lora_A"], keys[f"{module}.lora_B"] = (a_key, (r, n_in)), (b_key, (n_out, r))
    name = model_name(base_src, name)
    rank, alpha, rule = acfg["r"], acfg["lora_alpha"], scaling_rule(acfg)
    with RunLock(out):
        clear_interrupted(out, log)
        base_path, prefix = write_base_weights(out.parent.parent, name, base, base_keys, transpose, log)
        per_module = {prefix + m: v for m, v in per_module.items()}  # modules as the shared W0 file names them
        keys = {prefix + k: v for k, v in keys.items()}
        meta = {"base_model": base_src, "base_model_name": name, "scaling": lora_scaling(alpha, rank, rule),
                "rank": rank, "alpha": alpha, "targets": list(per_module), "imported_from": adapter_src,
                "not_in_delta": others}  # a head in modules_to_save, trained biases: not part of ΔW
        meta |= module_overrides(per_module, rank, meta["scaling"])
        write_safetensors_streamed(out / DELTA_FILE, {k: (FP32, s) for k, (_, s) in keys.items()},
                                   lambda k: adapter.get(keys[k][0]).float(),
                                   delta_metadata(out, "lora", base_path, meta))
        config = {"model": {"name": name, "path": base_src}, "task": {"name": "imported"},
                  "method": {"name": "lora", "rank": rank, "alpha": alpha, "scaling": rule,
                             "targets": _sorted(acfg.get("target_modules")),
                             "rank_pattern": acfg.get("rank_pattern") or None,
                             "alpha_pattern": acfg.get("alpha_pattern") or None,
                             "fan_in_fan_out": bool(acfg.get("fan_in_fan_out")), "dropout": acfg.get("lora_dropout")},
                  "imported": {"base": base_src, "adapter": adapter_src}, "seed": 0}
        adapted = sum(s[0] * s[1] for _, s in keys.values())  # the factors' parameters
        _finish(out, config, {"method": "lora", "adapted_params": adapted, "provenance": _provenance(out, base)}, t0,
                f"LoRA factors of {adapter_src} over {base_src}" + (f"; not in ΔW: {others}" if others else ""))
    log(f"LoRA factors: {len(per_module)} modules -> {out} ({time.perf_counter() - t0:.1f} s)")
    return out


def _sorted(targets):
    """PEFT saves target_modules from a set, in no fixed order: sorted, so the config is the same at every import."""
    return sorted(targets) if isinstance(targets, list) else targets


def _provenance(out: Path, base: Checkpoint) -> dict:
    """The code, libraries and base model's weight files (their SHA-256) of an import; no data: nothing trained here."""
    model = provenance.model_revision(base.source, sorted(set(base.files.values())),
                                      cache_file=provenance.cache_file_of(out.parent.parent))
    return provenance.record("cpu", model, None)


def _finish(out: Path, config: dict, metrics: dict, t0: float, what: str) -> None:
    """config.yaml, metrics.json (complete, with the config's hashes) and the log line of an imported run."""
    config = config | {"runs_root": str(out.parent.parent), "name": out.parent.name}
    atomic.write_text(out / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(config)))
    atomic.write_text(out / OVERRIDES_FILE, OmegaConf.to_yaml(OmegaConf.create(sys.argv[1:])))
    atomic.write_text(out / LOG_FILE, f"written by experiments.import_delta: {what}; nothing was trained here\n")
    write_metrics(out, {"status": "complete", "imported": True, "steps": None, "delta_file": DELTA_FILE,
                        "wall_seconds": time.perf_counter() - t0} | metrics, config)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="the base model: Hub id, folder or pkg://PACKAGE/DIR (an adapter's own by default)")
    p.add_argument("--finetuned", help="the fully fine-tuned model, same architecture as --base")
    p.add_argument("--adapter", help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", type=Path, required=True, help="the run directory to write, RUNS/NAME/RUN")
    p.add_argument("--model-name", help="names the base weights file RUNS/base_weights/NAME-*.safetensors "
                                        "(default: the base's folder or Hub name)")
    opts = p.parse_args(argv)
    if (opts.finetuned is None) == (opts.adapter is None):
        fail("give either --finetuned FT (with --base) or --adapter ADAPTER, not both or neither")
    if opts.finetuned is not None and opts.base is None:
        fail("argument --finetuned needs --base BASE, the model it was fine-tuned from")
    try:
        if opts.adapter is not None:
            import_adapter(opts.adapter, opts.out, opts.base, opts.model_name)
        else:
            import_pair(opts.base, opts.finetuned, opts.out, opts.model_name)
    except ConfigError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
