"""A LoRA run of lowrank's trainer as a PEFT adapter folder, for use with transformers and PEFT.

    python -m experiments.export_peft RUN_DIR --out DIR     # DIR new or empty (--force: write into it anyway)

    # then, in Python (N = the run's task.num_labels; a causal LM: AutoModelForCausalLM)
    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=N)
    model = PeftModel.from_pretrained(base, DIR)        # BASE: the adapter config's base_model_name_or_path

DIR gets `adapter_config.json` (peft.LoraConfig: target_modules = the run's adapted modules by full name, r and
lora_alpha = method.rank and method.alpha, use_rslora for method.scaling=rslora, rank_pattern for modules of
another rank (method.rank_pattern), alpha_pattern only where a module's scaling would otherwise differ, lora_dropout,
task_type SEQ_CLS or CAUSAL_LM) and `adapter_model.safetensors` (`base_model.model.{module}.lora_A.weight` and
`.lora_B.weight`, the run's fp32 factors, lowrank.rundir.peft's format). lowrank's rule is PEFT's: h = W0 x +
(alpha/r) · B A x, or alpha/√r, so the outputs agree to float rounding. A classifier's head trains with the adapter:
it is in the run's trained.safetensors (head.safetensors in older runs) and goes into `modules_to_save`. Runs written
before either existed lack it: they are exported with a warning, and PEFT then leaves the base model's freshly
initialised head.
Only the trainer's runs: an imported run (experiments.import_delta) names modules as its checkpoint did, and was an
adapter or a full fine-tune to begin with.
"""
import argparse
import math
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from analysis.checked_reads import SkippedRun
from analysis.runs import load_run
from lowrank.rundir import atomic
from lowrank.errors import fail
from lowrank.rundir.integrity import CorruptArtifact, verify_safetensors
from lowrank.adapters.lora import lora_scaling
from lowrank.data.model_files import gguf_cache_dir, hub_id, resolve_path
from lowrank.rundir.peft import ADAPTER_WEIGHTS, BASE_FILE, PREFIX, factor_keys
from lowrank.rundir.layout import TRAINED_FILE, trained_file

try:
    from peft import LoraConfig
except ImportError:  # an optional dependency: only this entry point needs it
    LoraConfig = None


def base_model_path(cfg_model) -> str:
    """The folder the run's W0 came from: model.path, pkg:// resolved to its folder, a GGUF model's cached
    dequantised folder; a Hub id as it is."""
    if cfg_model.get("gguf_file"):
        return str(gguf_cache_dir(cfg_model))
    resolved = resolve_path(cfg_model.path)
    return str(Path(resolved).absolute()) if Path(resolved).is_dir() else cfg_model.path


def base_model_names(cfg_model, out: Path) -> tuple[str, str | None]:
    """(base_model_name_or_path, the local folder or None): the Hub id where the model has one (a packaged asset's
    original, lowrank.data.model_files.hub_id), else the folder relative to the adapter folder OUT, so that neither
    names a path inside this machine's venv; the folder itself, absolute, where there is one."""
    local = base_model_path(cfg_model)
    local = local if Path(local).is_dir() else None
    portable = hub_id(cfg_model)
    if portable is None:
        portable = os.path.relpath(local, Path(out).absolute()) if local else str(cfg_model.path)
    return portable, local


def head_tensors(run_dir: Path, metrics: dict) -> dict:
    """The run's trained head (trained.safetensors, or head.safetensors of older runs; checked against its hashes), {}
    where it has none."""
    path, _ = trained_file(run_dir, metrics)
    if path is None or not path.exists():
        return {}
    try:
        keys, _ = verify_safetensors(path)
    except CorruptArtifact as e:
        raise SkippedRun(str(e)) from None
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in keys}


def export(run_dir: Path, out: Path) -> Path:
    """Write the adapter folder of a lowrank LoRA run; returns it. SkippedRun for a run that cannot be exported."""
    run = load_run(Path(run_dir), Path(run_dir).name)
    if run.method != "lora":
        raise SkippedRun(f"it is a {run.method} fine-tuning run; only LoRA runs have an adapter to export")
    if run.config.get("imported"):
        raise SkippedRun("it was imported (experiments.import_delta), not trained here; export the original instead")
    if not run.factored:  # DoRA, ReLoRA: ΔW is not one product B·A of the run's factors
        raise SkippedRun("its ΔW is stored dense (method.dora or method.relora_every), and a PEFT LoRA adapter holds "
                         "factors B, A; runs of LoRA, PiSSA, LoRA+ or rsLoRA export")
    cfg = OmegaConf.create(run.config)
    m = cfg.method
    rank, alpha, rule = m.rank, m.alpha, m.get("scaling", "standard")
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name in run.names:
        d = run.delta(name)
        r, s = d.A.shape[0], run.scaling(name)
        a_key, b_key = factor_keys(name)
        tensors[a_key], tensors[b_key] = d.A.contiguous(), d.B.contiguous()
        key = name.replace(".", r"\.")  # PEFT reads pattern keys as regular expressions: this one is exact
        if r != rank:
            rank_pattern[key] = r
        if not math.isclose(lora_scaling(alpha, r, rule), s, rel_tol=1e-12):  # alpha_pattern only where needed
            alpha_pattern[key] = s * (math.sqrt(r) if rule == "rslora" else r)
    head = head_tensors(run.path, run.metrics)
    portable, local = base_model_names(cfg.model, out)
    causal = cfg.task.get("objective", "classification") != "classification"
    if not head and not causal:
        print(f"warning: {run.path} has no {TRAINED_FILE} (written before heads were stored): the adapter holds the LoRA "
              f"factors only, and PEFT will keep the base model's freshly initialised classifier", file=sys.stderr)
    tensors |= {PREFIX + k: v.contiguous() for k, v in head.items()}
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rule == "rslora", target_modules=list(run.names),
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, lora_dropout=m.get("dropout", 0.0),
                        modules_to_save=sorted({k.rsplit(".", 1)[0] for k in head}) or None,
                        task_type="CAUSAL_LM" if causal else "SEQ_CLS",
                        base_model_name_or_path=portable, inference_mode=True)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    atomic.write_json(out / BASE_FILE, {"base_model_name_or_path": portable, "local_path": local})
    atomic.write_with(out / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    print(f"PEFT adapter: {len(run.names)} modules (r={rank}" + (f", {len(rank_pattern)} of other ranks" if rank_pattern
                                                               else "") + f"){', head ' + ', '.join(sorted(head)) if head else ''} -> {out}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a finished LoRA run directory of lowrank's trainer")
    p.add_argument("--out", type=Path, required=True, help="the adapter folder to write (new or empty)")
    p.add_argument("--force", action="store_true", help="write into --out even if it holds files (an adapter there "
                                                         "is replaced)")
    opts = p.parse_args(argv)
    if LoraConfig is None:
        fail("experiments.export_peft needs peft: pip install peft")
    if opts.out.exists() and not opts.out.is_dir():
        fail(f"argument --out: {str(opts.out)!r} is a file; give a folder for the adapter")
    if opts.out.is_dir() and any(opts.out.iterdir()) and not opts.force:  # another adapter, or anything else
        what = "an adapter" if (opts.out / "adapter_config.json").exists() else "files"
        fail(f"argument --out: {str(opts.out)!r} already holds {what}; give a new or empty folder, or add --force "
             f"to write into it")
    try:
        export(opts.run_dir, opts.out)
    except (SkippedRun, CorruptArtifact) as e:
        fail(f"{opts.run_dir} cannot be exported: {e}")


if __name__ == "__main__":
    main()
