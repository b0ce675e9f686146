"""ΔW on disk: one file per run, one shared copy of W0 per base model.

`delta_w.safetensors` keys, by module path `name` of an adapted/analysed nn.Linear:
  full fine-tuning: `{name}.delta` (out, in) fp32, exactly W_ft − W_0
  LoRA:             `{name}.lora_A` (r, in) and `{name}.lora_B` (out, r); ΔW = scaling · B @ A
Metadata (strings): method, scaling, rank, alpha, targets, base_model (path), base_model_name, base_weights
(path relative to the run dir); LoRA with per-module ranks or scalings (`method.rank_pattern`, an imported PEFT
adapter's rank_pattern/alpha_pattern): `module_rank` and `module_scaling`, JSON {module: value} for the modules whose
rank or scaling differ from `rank` and `scaling`, so module m's ΔW = module_scaling.get(m, scaling) · B A.
`trained.safetensors` holds every trained parameter whose change ΔW does not already hold (a classifier's head; with
full fine-tuning also the embeddings, norms, biases and the linear layers that are not targets), fp32, by its name in
the model, so W0 + ΔW plus this file rebuilds the fine-tuned model (lowrank.data.rebuild) and an exported adapter has
its head (experiments.export_peft). No file where nothing else trained (LoRA on a causal LM). LoRA runs written before
it existed kept their head in `head.safetensors` (layout.trained_file finds either).
`RUNS_ROOT/base_weights/{model}-{fingerprint}.safetensors` holds W0 of every block linear layer once; the
fingerprint is a hash of all of W0, so a file of that name holds exactly these weights (checked on reuse). An import
(experiments.import_delta) reuses a file that holds its W0 under names with a leading prefix (shared_base_weights).
Every file carries per-tensor content hashes (`lowrank.rundir.integrity`).
"""
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from lowrank.train import distributed
from lowrank.rundir.atomic import remove_stale_temps, write_safetensors, write_safetensors_streamed
from lowrank.errors import ConfigError
from lowrank.rundir.integrity import (DIGEST_KEY, CorruptArtifact, combined_digest, read_header, tensor_digests,
                                      verify_safetensors)
from lowrank.adapters.lora import LoRALinear, block_linear_names, lora_layers
from lowrank.rundir.layout import BASE_WEIGHTS_DIR, DELTA_FILE, MODULE_RANK_KEY, MODULE_SCALING_KEY, TRAINED_FILE

log = logging.getLogger(__name__)


def linear_param(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of the named nn.Linear, or of the frozen base of a LoRA layer."""
    m = model.get_submodule(name)
    return m.base_layer.weight if isinstance(m, LoRALinear) else m.weight


def linear_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the weight of each named nn.Linear (or of the frozen base of a LoRA layer)."""
    return {n: linear_param(model, n).detach().float().cpu().clone() for n in names}


def base_weights_path(runs_root, model_name: str, digests: dict[str, str]) -> Path:
    """RUNS_ROOT/base_weights/{model}-{fingerprint}.safetensors, the fingerprint from W0's tensor hashes."""
    return Path(runs_root) / BASE_WEIGHTS_DIR / f"{model_name}-{combined_digest(digests)[:10]}.safetensors"


def shared_base_weights(runs_root, digests: dict[str, str]) -> tuple[Path, str] | None:
    """A file in RUNS_ROOT/base_weights/ that already holds these W0 tensors ({key: SHA-256}), and the prefix its keys
    add to ours (`bert.` when the trainer stored a classifier's W0 and an import names modules as the bare checkpoint
    does); None if there is none. Judged from the files' recorded hashes, so a file holding other weights is never
    taken; a damaged one is passed over."""
    folder = Path(runs_root) / BASE_WEIGHTS_DIR
    if not digests or not folder.is_dir():
        return None
    first, found = min(digests), []
    for path in sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith(".")):  # not temp files
        try:
            _, _, theirs = read_header(path)
        except CorruptArtifact:
            continue
        for key in theirs:
            if key == first or key.endswith("." + first):
                prefix = key[:len(key) - len(first)]
                if all(theirs.get(prefix + k) == d for k, d in digests.items()):
                    found.append((len(prefix), path, prefix))
    return min(found)[1:] if found else None  # the same names first


def delta_metadata(run_dir: Path, method: str, base_weights: Path, meta: dict) -> dict[str, str]:
    """The delta file's metadata: `meta` (base_model, scaling, rank, ...; non-strings JSON-encoded), the method, and
    W0's file relative to the run directory."""
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    return metadata | {"method": method, "base_weights": os.path.relpath(base_weights, run_dir)}


def ensure_base_weights(runs_root: Path, model_name: str, model: nn.Module) -> Path:
    """Write W0 of every block linear layer once per base model; later runs reuse the file after checking
    that it holds exactly these weights (a damaged or truncated one is rewritten, with a warning)."""
    tensors = {f"{n}.weight": w for n, w in linear_weights(model, block_linear_names(model)).items()}
    digests = tensor_digests(tensors)  # SHA-256 of all of W0: ~1.5 GB/s, a few seconds for a 7B model
    path = base_weights_path(runs_root, model_name, digests)
    folder = path.parent
    if folder.is_dir():
        remove_stale_temps(folder)  # what a writer killed mid-write left behind
    if path.is_dir():
        raise ConfigError(f"{path} is a folder where the base weights file belongs; remove it (runs_root="
                          f"{runs_root})")
    if path.exists():
        try:
            _, metadata = verify_safetensors(path)
            if json.loads(metadata[DIGEST_KEY]) == digests:
                return path
            reason = "it holds other weights"
        except CorruptArtifact as e:
            reason = str(e)
        log.warning("%s cannot be reused (%s); writing it again from the model", path, reason)
    write_safetensors(path, tensors, {"base_model": model_name})
    return path


def write_delta(run_dir: Path, model: nn.Module, method, names: list[str], w0: dict | None,
                base_weights: Path, meta: dict) -> Path:
    """Write ΔW of `names` as `method` reads it (lowrank.adapters.methods: factors, or dense against `w0`, CPU fp32
    copies of the targets' W0), one matrix at a time; a LoRA run's head goes beside it."""
    if distributed.world_size() > 1:
        return _write_delta_gathered(run_dir, model, method, names, w0, base_weights, meta)
    tensors, ranks = {}, {}
    for n in names:
        d = method.delta(model, n, w0[n] if method.needs_w0 else None)
        if d.factors is None:
            tensors[f"{n}.delta"] = d.dense.cpu()
        else:
            B, A, scaling = d.factors  # PiSSA's are [B, −B0], [A; A0]: rank 2r
            tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"] = A.float(), B.float()
            ranks[n] = (A.shape[0], scaling)
    if method.name == "lora":
        meta = meta | (module_overrides(ranks, meta.get("rank"), meta.get("scaling")) if ranks
                       else {"delta_form": "dense"})
    write_trained(run_dir, model, method, names)
    return write_safetensors(Path(run_dir) / DELTA_FILE, tensors, delta_metadata(run_dir, method.name, base_weights,
                                                                                 meta))


def module_overrides(per_module: dict[str, tuple[int, float]], rank, scaling) -> dict:
    """The `module_rank` / `module_scaling` metadata: {module: value} where a module's (rank, scaling) differs from
    the file's `rank` and `scaling`; nothing where none does."""
    ranks = {n: r for n, (r, _) in per_module.items() if r != rank}
    scalings = {n: s for n, (_, s) in per_module.items() if s != scaling}
    return ({MODULE_RANK_KEY: ranks} if ranks else {}) | ({MODULE_SCALING_KEY: scalings} if scalings else {})


def trained_params(model: nn.Module, method, names: list[str]) -> dict[str, nn.Parameter]:
    """{name in the model: parameter} of every parameter that trained and is not part of the targets' ΔW (each
    method says which are: `delta_params`). Tied weights appear once, as named_parameters gives them."""
    in_delta = method.delta_params(model, names)
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_delta}


def write_trained(run_dir: Path, model: nn.Module, method, names: list[str]) -> Path | None:
    """trained.safetensors: `trained_params` in fp32, streamed one tensor at a time (with full fine-tuning it is most
    of the model); nothing when there is none."""
    params = trained_params(model, method, names)
    if not params:
        return None
    specs = {n: (torch.float32, tuple(p.shape)) for n, p in params.items()}
    return write_safetensors_streamed(Path(run_dir) / TRAINED_FILE, specs,
                                      lambda n: params[n].detach().float().cpu())[0]


def _write_delta_gathered(run_dir: Path, model: nn.Module, method, names: list[str], w0: dict | None,
                          base_weights: Path, meta: dict) -> Path | None:
    """write_delta under torchrun: rank 0 writes. An FSDP model's tensors are gathered one at a time on every rank
    (in the file's key order) and streamed into the file, so no rank ever holds the whole model; a DDP model is
    whole on rank 0 already. `w0` is needed on rank 0 only."""
    sharded, main = distributed.is_sharded(model), distributed.is_main()
    if not sharded and not main:
        return None
    if method.name == "full":
        params = {f"{n}.delta": linear_param(model, n) for n in names}
    else:
        layers = lora_layers(model)
        params = {f"{n}.lora_{f}": getattr(layer, f"lora_{f}") for n, layer in layers.items() for f in "AB"}
        meta = meta | module_overrides({n: (layer.rank, layer.scaling) for n, layer in layers.items()},
                                       meta.get("rank"), meta.get("scaling"))
    _write_gathered(Path(run_dir) / TRAINED_FILE, trained_params(model, method, names), None, main)

    against_w0 = (lambda key, t: t - w0[key.removesuffix(".delta")]) if method.name == "full" and main else None
    return _write_gathered(Path(run_dir) / DELTA_FILE, params, against_w0, main,  # W0's path: rank 0 knows it
                           delta_metadata(run_dir, method.name, base_weights, meta) if main else None)


def _write_gathered(path: Path, params: dict, finish, main: bool, metadata: dict | None = None) -> Path | None:
    """Stream `params` into `path` on rank 0, each gathered on every rank in the file's key order (a collective under
    FSDP) and passed through finish(key, tensor) when given; nothing where `params` is empty."""
    def make(key: str) -> torch.Tensor:
        full = distributed.full_tensor(params[key].detach()).float().cpu()
        return finish(key, full) if finish is not None else full
    specs = {key: (torch.float32, tuple(p.shape)) for key, p in params.items()}
    if not specs:
        return None
    if not main:
        for key in sorted(specs):  # rank 0's order: each gather pairs with its own
            make(key)
        return None
    return write_safetensors_streamed(path, specs, make, metadata)[0]
