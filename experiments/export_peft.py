"""A run of lowrank's trainer as a PEFT adapter folder, for use with transformers and PEFT: a LoRA run's own factors,
or a LoRA extracted from any run's ΔW.

    python -m experiments.export_peft RUN_DIR --out DIR     # DIR new or empty (--force: write into it anyway)
    python -m experiments.export_peft RUN_DIR --out DIR --rank 8 [--evaluate]     # any run: ΔW kept to rank 8
    python -m experiments.export_peft RUN_DIR --out DIR --energy-share 0.9        # each ΔW: 90 % of ‖ΔW‖_F²
    python -m experiments.export_peft RUN_DIR --out DIR --rank-pattern rank_pattern.json [--rank R]

    # then, in Python (N = the run's task.num_labels; a causal LM: AutoModelForCausalLM; an import: AutoModel)
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
initialised head. Without a rank flag only the trainer's LoRA runs export.

Extraction (--rank, --energy-share, --rank-pattern) works for any run with a ΔW: full fine-tuning, DoRA, ReLoRA,
subspace, imports, LoRA. Each target's ΔW (one at a time) is kept to its top-r singular directions, B = U_r √Σ_r and
A = √Σ_r V_rᵀ, with lora_alpha = r so PEFT's scaling is 1 and B A = ΔW_r exactly; modules of another rank go in
rank_pattern and alpha_pattern. Every other tensor the run trained (trained.safetensors) goes in whole: a module in
`modules_to_save` (the head; for full fine-tuning embeddings, norms and non-target layers too, so the adapter rebuilds
the whole fine-tune with its targets at rank r), a target's own bias under PEFT's bias="lora_only". `extraction.json`
beside it records each module's rank and share of ‖ΔW‖_F² kept, the totals, what the run changed that the adapter
cannot hold (an import's other tensors; a run written before trained.safetensors), and with --evaluate the run's own
evaluation of W0 + ΔW_r and of W0 + ΔW (lowrank.data.rebuild).
"""
import argparse
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omegaconf import OmegaConf
from safetensors.torch import save_file

from analysis.checked_reads import SkippedRun
from analysis.report_cli import _device, _int_at_least, _Parser
from analysis.runs import LowRank, load_run
from analysis.truncate import check_evaluable, trained_tensors
from lowrank.adapters.targets import pattern_key, read_rank_pattern
from lowrank.config import LM_OBJECTIVES, meta_model, model_config, option
from lowrank.data.rebuild import RebuiltModel
from lowrank.linalg.truncation import TopSingular, kept_rank
from lowrank.rundir import atomic
from lowrank.errors import ConfigError, fail
from lowrank.rundir.integrity import CorruptArtifact
from lowrank.adapters.lora import lora_scaling
from lowrank.data.model_files import gguf_cache_dir, hub_id, resolve_path
from lowrank.rundir.peft import ADAPTER_WEIGHTS, BASE_FILE, PREFIX, factor_keys
from lowrank.rundir.layout import TRAINED_FILE, trained_file

EXTRACTION_FILE = "extraction.json"  # beside an extracted adapter: the rule, each module's rank and energy kept
EXTRACT_HINT = "; --rank R, --energy-share S or --rank-pattern FILE extracts a LoRA from any run's ΔW"

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


@dataclass(frozen=True)
class TrainedForPeft:
    """The run's other trained tensors as PEFT carries them: whole modules in `modules_to_save` (a head, and for full
    fine-tuning embeddings, norms, non-target linear layers), and a LoRA target's own trained bias as
    `{module}.base_layer.bias` (PEFT's bias="lora_only"), since a target cannot be saved whole."""
    tensors: dict            # adapter file keys (PREFIX + ...) -> tensor
    modules_to_save: list
    target_biases: int

    @classmethod
    def of(cls, trained: dict, targets, tied: dict | None = None) -> "TrainedForPeft":
        """`tied`: {parameter: its other names} (tied_names): a tied copy goes in too, since PEFT's copy of a module
        in modules_to_save would break the tie (an output layer tied to trained input embeddings)."""
        targets, tensors, whole, biases = set(targets), {}, set(), 0
        trained = trained | {o: t.clone() for k, t in trained.items() for o in (tied or {}).get(k, ())
                             if o not in trained}
        for key, t in trained.items():
            module, param = key.rsplit(".", 1)
            if module in targets:
                if param != "bias":  # a target's weight trains only through ΔW
                    raise SkippedRun(f"its trained tensors hold {key!r}, a parameter of an adapted module that PEFT "
                                     f"can carry only as a bias")
                tensors[f"{PREFIX}{module}.base_layer.bias"], biases = t.contiguous(), biases + 1
                continue
            if any(n.startswith(module + ".") for n in targets):
                raise SkippedRun(f"its trained tensor {key!r} belongs to a module that holds adapted ones; PEFT cannot "
                                 f"save it whole")
            tensors[PREFIX + key] = t.contiguous()
            whole.add(module)
        return cls(tensors, sorted(whole), biases)

    @property
    def bias(self) -> str:
        return "lora_only" if self.target_biases else "none"


def tied_names(cfg) -> dict[str, list[str]]:
    """{parameter name: the other names of the same tensor} in the run's model (input and output embeddings tied), read
    from its config on the meta device (lowrank.config); {} where that config is not at hand."""
    config = model_config(cfg)
    if config is None:
        return {}
    names = {}
    for name, param in meta_model(config, causal_lm=option(cfg, "task.objective") in LM_OBJECTIVES).named_parameters(
            remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {n: [o for o in same if o != n] for same in names.values() if len(same) > 1 for n in same}


def peft_trained(run, trained: dict) -> TrainedForPeft:
    return TrainedForPeft.of(trained, run.names, tied_names(OmegaConf.create(run.config)) if trained else None)


def exact_key(module: str) -> str:
    """A rank_pattern/alpha_pattern key that selects this module alone (PEFT reads keys as regular expressions)."""
    return module.replace(".", r"\.")


def task_type(cfg) -> str | None:
    """PEFT's task type: SEQ_CLS or CAUSAL_LM for the trainer's runs; none for an import, whose model class is
    unknown."""
    if cfg.get("imported"):
        return None
    return "CAUSAL_LM" if cfg.task.get("objective", "classification") != "classification" else "SEQ_CLS"


def write_adapter(out: Path, config, tensors: dict, portable: str, local: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    atomic.write_json(out / BASE_FILE, {"base_model_name_or_path": portable, "local_path": local})
    atomic.write_with(out / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def export(run_dir: Path, out: Path) -> Path:
    """Write the adapter folder of a lowrank LoRA run; returns it. SkippedRun for a run that cannot be exported."""
    run = load_run(Path(run_dir), Path(run_dir).name)
    if run.method != "lora":
        raise SkippedRun(f"it is a {run.method} fine-tuning run; only LoRA runs have an adapter to export"
                         f"{EXTRACT_HINT}")
    if run.config.get("imported"):
        raise SkippedRun("it was imported (experiments.import_delta), not trained here; export the original instead"
                         f"{EXTRACT_HINT}")
    if not run.factored:  # DoRA, ReLoRA: ΔW is not one product B·A of the run's factors
        raise SkippedRun("its ΔW is stored dense (method.dora or method.relora_every), and a PEFT LoRA adapter holds "
                         f"factors B, A; runs of LoRA, PiSSA, LoRA+ or rsLoRA export{EXTRACT_HINT}")
    cfg = OmegaConf.create(run.config)
    m = cfg.method
    rank, alpha, rule = m.rank, m.alpha, m.get("scaling", "standard")
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name in run.names:
        d = run.delta(name)
        r, s = d.A.shape[0], run.scaling(name)
        a_key, b_key = factor_keys(name)
        tensors[a_key], tensors[b_key] = d.A.contiguous(), d.B.contiguous()
        if r != rank:
            rank_pattern[exact_key(name)] = r
        if not math.isclose(lora_scaling(alpha, r, rule), s, rel_tol=1e-12):  # alpha_pattern only where needed
            alpha_pattern[exact_key(name)] = s * (math.sqrt(r) if rule == "rslora" else r)
    trained = peft_trained(run, trained_tensors(run, required=False))
    portable, local = base_model_names(cfg.model, out)
    if not trained.tensors and task_type(cfg) == "SEQ_CLS":
        print(f"warning: {run.path} has no {TRAINED_FILE} (written before heads were stored): the adapter holds the "
              f"LoRA factors only, and PEFT will keep the base model's freshly initialised classifier", file=sys.stderr)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rule == "rslora", target_modules=list(run.names),
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, lora_dropout=m.get("dropout", 0.0),
                        bias=trained.bias, modules_to_save=trained.modules_to_save or None, task_type=task_type(cfg),
                        base_model_name_or_path=portable, inference_mode=True)
    write_adapter(out, config, tensors | trained.tensors, portable, local)
    print(f"PEFT adapter: {len(run.names)} modules (r={rank}"
          + (f", {len(rank_pattern)} of other ranks" if rank_pattern else "") + ")"
          + (f", whole {', '.join(trained.modules_to_save)}" if trained.modules_to_save else "") + f" -> {out}")
    return out


@dataclass(frozen=True)
class RankRule:
    """How many singular directions each target's ΔW keeps: `pattern` ({module pattern: rank}, PEFT's rank_pattern
    rule: lowrank.adapters.targets.pattern_key) where a key selects the module, else a fixed `rank` or the smallest
    rank holding `share` of its ‖ΔW‖_F²."""
    rank: int | None = None
    share: float | None = None
    pattern: dict | None = None

    def check(self, names) -> None:
        """ConfigError, before any work, for a pattern that selects none of the run's modules, or modules it leaves
        without a rank."""
        if not self.pattern:
            return
        chosen = [n for n in names if pattern_key(self.pattern, n) is not None]
        if not chosen:
            raise ConfigError(f"argument --rank-pattern: no key selects any of the run's {len(names)} modules (such as "
                              f"{names[0]!r}); keys are PEFT patterns of module names")
        if (self.rank, self.share) == (None, None) and len(chosen) < len(names):
            left = [n for n in names if n not in chosen]
            raise ConfigError(f"argument --rank-pattern: {len(left)} modules (such as {left[0]!r}) match no key; add "
                              f"--rank R or --energy-share S for them")

    def rank_of(self, name: str, s: torch.Tensor) -> int:
        key = pattern_key(self.pattern or {}, name)
        if key is not None:
            return kept_rank(s, rank=self.pattern[key])
        return kept_rank(s, self.rank, self.share)

    def describe(self) -> dict:
        return {"rank": self.rank, "energy_share": self.share, "rank_pattern": self.pattern}


@dataclass
class Extraction:
    """Per target: the kept factors (B (out, r), A (r, in)) with B @ A = ΔW_r, and what they keep."""
    factors: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict)  # {module: {rank, max_rank, energy, energy_share}}

    def add(self, name: str, top: TopSingular, r: int) -> None:
        self.factors[name] = top.factors(r)
        energy = (top.S.double() ** 2).sum().item()
        self.modules[name] = {"rank": r, "max_rank": top.max_rank, "energy": energy,
                              "energy_share": top.energy_share(r)}

    def totals(self) -> dict:
        energy = sum(m["energy"] for m in self.modules.values())
        kept = sum(m["energy"] * m["energy_share"] for m in self.modules.values())
        return {"modules": len(self.modules), "energy": energy, "energy_kept": kept,
                "energy_share": kept / energy if energy > 0 else 1.0,
                "mean_rank": sum(m["rank"] for m in self.modules.values()) / len(self.modules),
                "lora_parameters": sum(B.numel() + A.numel() for B, A in self.factors.values())}


def extract_factors(run, rule: RankRule, device=None) -> Extraction:
    """One SVD per target, one ΔW in memory at a time (LoRA factors through QR, never forming out × in)."""
    ex = Extraction()
    for name in run.names:
        d = run.delta(name)
        top = TopSingular.of_factors(*d) if isinstance(d, LowRank) else TopSingular.of_dense(d, device)
        r = rule.rank_of(name, top.S)
        ex.add(name, top.kept(r), r)
    return ex


def evaluate_extraction(run, trained: dict, ex: Extraction, device) -> dict:
    """The run's own evaluation (lowrank.data.rebuild) of W0 + ΔW_r and, to compare like with like, of W0 + ΔW."""
    model = RebuiltModel(run.config, trained, device)
    for name, (B, A) in ex.factors.items():
        model.set_targets({name: run.base_weight(name) + B @ A})  # (out, r) @ (r, in)
    truncated = model.evaluate()
    for name in run.names:
        d = run.delta(name)
        model.set_targets({name: run.base_weight(name) + (d.dense() if isinstance(d, LowRank) else d)})
    return {"truncated": truncated, "whole": model.evaluate()}


def left_out(run) -> str | None:
    """What the run changed that the adapter cannot hold, said plainly; None when it holds all of it."""
    if run.config.get("imported"):
        return ("imported (experiments.import_delta): the run holds the ΔW of the block matrices only; whatever else "
                "the fine-tune changed (embeddings, norms, biases, a head) is not in the run, so not in the adapter")
    _, why_not = trained_file(run.path, run.metrics)
    return f"{why_not}: those tensors are not in the adapter" if why_not else None


def extract(run_dir: Path, out: Path, rule: RankRule, evaluate: bool = False, device=None) -> Path:
    """Write a PEFT LoRA adapter of the top singular factors of every target's ΔW (any run: full, DoRA, ReLoRA,
    subspace, imported, LoRA), with EXTRACTION_FILE beside it; returns the folder. ConfigError or SkippedRun before
    any work for a rule or run that does not fit."""
    run = load_run(Path(run_dir), Path(run_dir).name)
    rule.check(list(run.names))
    if evaluate:
        check_evaluable(run)
        trained_raw = trained_tensors(run)  # SkippedRun where the run cannot be rebuilt
    else:
        trained_raw = trained_tensors(run, required=False)
    trained = peft_trained(run, trained_raw)
    cfg = OmegaConf.create(run.config)
    ex = extract_factors(run, rule, device)
    ranks = {n: m["rank"] for n, m in ex.modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    others = {exact_key(n): k for n, k in ranks.items() if k != r}
    # lora_alpha = r for every module: PEFT's scaling alpha/r is 1, so B @ A is ΔW_r itself
    config = LoraConfig(r=r, lora_alpha=r, target_modules=list(run.names), rank_pattern=others,
                        alpha_pattern=dict(others), lora_dropout=0.0, bias=trained.bias,
                        modules_to_save=trained.modules_to_save or None, task_type=task_type(cfg),
                        base_model_name_or_path=(names := base_model_names(cfg.model, out))[0], inference_mode=True)
    tensors = {k: t for n, (B, A) in ex.factors.items() for k, t in zip(factor_keys(n), (A, B))}
    write_adapter(out, config, tensors | trained.tensors, *names)
    record = {"run": str(run.path), "rule": rule.describe(),
              "factors": "B = U_r √Σ_r, A = √Σ_r V_rᵀ, lora_alpha = r (PEFT's scaling 1): B A = ΔW_r",
              "total": ex.totals(), "modules_to_save": trained.modules_to_save,
              "target_biases": trained.target_biases, "left_out": left_out(run), "modules": ex.modules}
    if evaluate:
        record["evaluation"] = evaluate_extraction(run, trained_raw, ex, device or "cpu")
    atomic.write_json(out / EXTRACTION_FILE, record)
    t = record["total"]
    print(f"PEFT adapter extracted: {t['modules']} modules, mean rank {t['mean_rank']:.1f}, {t['energy_share']:.1%} of "
          f"Σ‖ΔW‖_F² kept"
          + (f", whole {len(trained.modules_to_save)} other modules" if trained.modules_to_save else "")
          + f" -> {out}")
    if record["left_out"]:
        print(f"warning: {record['left_out']}", file=sys.stderr)
    return out


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share of ‖ΔW‖_F² in (0, 1] such as 0.9, got {text!r}")
    return value


def rank_rule(opts) -> RankRule | None:
    """The extraction rule the flags give (None: the plain export of a LoRA run's own factors); one line on bad
    input."""
    if opts.rank is not None and opts.energy_share is not None:
        fail("argument --energy-share: not allowed with --rank; give one of them (beside --rank-pattern, it is the "
             "rule for the modules the pattern does not name)")
    pattern = None
    if opts.rank_pattern is not None:
        try:
            pattern = read_rank_pattern(str(opts.rank_pattern), key="--rank-pattern")
        except ConfigError as e:
            fail(f"argument {e}")
        if not pattern:
            fail(f"argument --rank-pattern: {str(opts.rank_pattern)!r} names no module; it must hold {{module pattern: "
                 f"rank}}, as analysis.report's rank_pattern.json does")
    if (opts.rank, opts.energy_share, pattern) == (None, None, None):
        if opts.evaluate:
            fail("argument --evaluate: needs --rank, --energy-share or --rank-pattern (it scores the truncated model)")
        return None
    return RankRule(opts.rank, opts.energy_share, pattern)


def main(argv=None) -> None:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a finished run directory (a LoRA run; any run with --rank and the like)")
    p.add_argument("--out", type=Path, required=True, help="the adapter folder to write (new or empty)")
    p.add_argument("--force", action="store_true", help="write into --out even if it holds files (an adapter there "
                                                         "is replaced)")
    p.add_argument("--rank", type=_int_at_least(1), help="extract: every target's ΔW kept to its top R directions")
    p.add_argument("--energy-share", type=_share, help="extract: each ΔW kept to the smallest rank holding this "
                                                        "share of its ‖ΔW‖_F²")
    p.add_argument("--rank-pattern", type=Path, help="extract: a JSON file {module pattern: rank} (PEFT's "
                                                     "rank_pattern, as analysis.report writes it)")
    p.add_argument("--evaluate", action="store_true", help="with an extraction: score W0 + ΔW_r and W0 + ΔW on the "
                                                           "run's own evaluation (into extraction.json)")
    p.add_argument("--device", type=_device, default="auto", help="auto (GPU when present), cpu or cuda: the SVDs "
                                                                  "and --evaluate")
    opts = p.parse_args(argv)
    if LoraConfig is None:
        fail("experiments.export_peft needs peft: pip install peft")
    rule = rank_rule(opts)
    if opts.out.exists() and not opts.out.is_dir():
        fail(f"argument --out: {str(opts.out)!r} is a file; give a folder for the adapter")
    if opts.out.is_dir() and any(opts.out.iterdir()) and not opts.force:  # another adapter, or anything else
        what = "an adapter" if (opts.out / "adapter_config.json").exists() else "files"
        fail(f"argument --out: {str(opts.out)!r} already holds {what}; give a new or empty folder, or add --force "
             f"to write into it")
    try:
        if rule is None:
            export(opts.run_dir, opts.out)
        else:
            extract(opts.run_dir, opts.out, rule, opts.evaluate, opts.device)
    except (SkippedRun, CorruptArtifact) as e:
        fail(f"{opts.run_dir} cannot be exported: {e}")
    except ConfigError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
