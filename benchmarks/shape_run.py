"""A full-fine-tuning run directory of a shape-only model, written without training: what analysis reads, at 7B scale.

    python -m benchmarks.shape_run --model llama2_7b_shape --runs-root /tmp/shape_runs       # 224 matrices, 2 × 26 GB
    python -m benchmarks.shape_run --model llama_1b_shape --layers 2 --runs-root /tmp/r      # 14 matrices of 1.1B shape
    python -m benchmarks.shape_run --model llama_1b_shape --runs-root /tmp/t model.shape.hidden_size=64 ...  # any size
    python -m analysis.report /tmp/shape_runs --out /tmp/shape_report

The directory is the trainer's format exactly (lowrank.rundir.layout, lowrank.rundir.delta): `.hydra/config.yaml` (the
resolved config of `model=MODEL method=full task=synthetic` and any further overrides, `model.shape.num_hidden_layers=N`
for --layers N), the overrides,
`metrics.json` (status complete, hashes of the config), `delta_w.safetensors` (`{name}.delta` fp32 for every block
linear layer, the trainer's metadata) and W0 in `RUNS_ROOT/base_weights/{model}-{fingerprint}.safetensors`, both with
content hashes. Module names and shapes come from the model built on the meta device (no memory). Both files are
written one tensor at a time (lowrank.rundir.atomic.write_safetensors_streamed), so memory holds one matrix, whatever
the model's size. Each matrix is drawn from its own seed (seed and name), so files are reproducible.

Spectra look like trained ones, so that ranks, intruder counts and solver times mean something:
  W0 = 0.02·Gaussian (the Llama init) plus 64 directions with σ_j ∝ (1+j)^-½ rising to 3× the Gaussian's edge:
       pretrained weights have a few strong directions above a random bulk.
  ΔW = benchmarks.svd_bench.synthetic_delta (512 directions with σ_j ∝ (1+j)^-0.8 over a Gaussian floor ~1e-3 of
       the top), scaled so that ‖ΔW‖_F ≈ 2e-3·‖W0‖_F, a short full fine-tuning run's size.
metrics.json says `shape_only: true` and holds no accuracy: the run trained nothing.
"""
import argparse
import time
import zlib
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lowrank.rundir import atomic
from lowrank.rundir.atomic import write_safetensors_streamed
from lowrank.cli import CONF_DIR
from lowrank.rundir.delta import base_weights_path, delta_metadata
from lowrank.errors import fail
from lowrank.adapters.lora import block_linear_names, match_targets
from lowrank.rundir.layout import (CONFIG_FILE, DELTA_FILE, LOG_FILE, NOT_IDENTITY, OVERRIDES_FILE, config_hash,
                            run_dirname, write_metrics)
from lowrank.data.shapes import build_random_model

from benchmarks.svd_bench import synthetic_delta

MODELS = ("llama2_7b_shape", "llama_1b_shape")
W0_STD, W0_SPIKES, REL_DELTA = 0.02, 64, 2e-3


def shape_config(model: str, runs_root: Path, name: str, extra: list[str]) -> tuple[dict, list[str]]:
    """The resolved config of `model=MODEL method=full task=synthetic` plus `extra` overrides (Hydra's composition, as
    the trainer gets it) and the overrides that made it."""
    overrides = [f"model={model}", "method=full", "task=synthetic", "logger=none", f"runs_root={runs_root}",
                 f"name={name}", *extra]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True), overrides


def generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))  # one stream per matrix


def make_w0(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """A Gaussian bulk (edge ≈ std·(√out + √in)) plus W0_SPIKES strong directions above it. fp32 (out, in)."""
    out, inp = shape
    w = torch.randn(out, inp, generator=gen) * W0_STD
    edge = W0_STD * (out ** 0.5 + inp ** 0.5)
    s = 3 * edge * (1.0 + torch.arange(W0_SPIKES)) ** -0.5
    U = torch.randn(out, W0_SPIKES, generator=gen) / out ** 0.5   # nearly orthonormal columns at these sizes
    V = torch.randn(W0_SPIKES, inp, generator=gen) / inp ** 0.5
    return w.addmm_(U * s, V)


def make_delta(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """svd_bench's low rank plus noise, scaled to REL_DELTA of W0's Frobenius norm (≈ W0_STD·√(out·in)). fp32."""
    out, inp = shape
    d = synthetic_delta(out, inp, 1.0, gen, torch.device("cpu"))
    return d.mul_(REL_DELTA * W0_STD * (out * inp) ** 0.5 / torch.linalg.matrix_norm(d))


def write_shape_run(model: str, runs_root: Path, name: str = "shape", overrides: tuple[str, ...] = (), seed: int = 0,
                    log=print) -> Path:
    """Write W0 and one full fine-tuning run directory below runs_root; returns the run directory."""
    t0 = time.perf_counter()
    runs_root = Path(runs_root).absolute()
    config, overrides = shape_config(model, runs_root, name, list(overrides))
    cfg = OmegaConf.create(config)
    net = build_random_model(cfg.model, cfg.task.num_labels, "meta")  # names and shapes only: no memory
    shapes = {n: tuple(net.get_submodule(n).weight.shape) for n in block_linear_names(net)}
    targets = match_targets(net, cfg.method.targets)
    skip = {k.split(".")[0] for k in NOT_IDENTITY}
    settings = {k.lstrip("+"): v for k, v in (o.split("=", 1) for o in overrides if "=" in o)
                if k.lstrip("+").split(".")[0] not in skip}
    run_dir = runs_root / name / run_dirname(settings, config_hash(config))

    def w0_of(key: str) -> torch.Tensor:
        n = key.removesuffix(".weight")
        return make_w0(shapes[n], generator(seed, n))

    folder = runs_root / "base_weights"
    pending, digests = write_safetensors_streamed(folder / f".{model}-pending.safetensors",
                                                  {f"{n}.weight": (torch.float32, s) for n, s in shapes.items()},
                                                  w0_of, {"base_model": cfg.model.name})
    base = base_weights_path(runs_root, cfg.model.name, digests)
    pending.replace(base)  # named by its content, as lowrank.rundir.delta.ensure_base_weights names it
    log(f"W0: {len(shapes)} matrices -> {base} ({time.perf_counter() - t0:.0f} s)")

    def delta_of(key: str) -> torch.Tensor:
        n = key.removesuffix(".delta")
        return make_delta(shapes[n], generator(seed + 1, n))

    meta = {"base_model": cfg.model.path, "base_model_name": cfg.model.name, "scaling": 1.0, "rank": None,
            "alpha": None, "targets": targets}  # what the trainer passes to lowrank.rundir.delta.write_delta
    atomic.write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg))
    atomic.write_text(run_dir / OVERRIDES_FILE, OmegaConf.to_yaml(OmegaConf.create(overrides)))
    write_safetensors_streamed(run_dir / DELTA_FILE, {f"{n}.delta": (torch.float32, shapes[n]) for n in targets},
                               delta_of, delta_metadata(run_dir, "full", base, meta))
    write_metrics(run_dir, {"status": "complete", "method": "full", "shape_only": True, "steps": 0,
                            "delta_file": DELTA_FILE, "wall_seconds": time.perf_counter() - t0}, config)
    atomic.write_text(run_dir / LOG_FILE, f"written by benchmarks.shape_run (seed {seed}); nothing was trained\n")
    log(f"ΔW: {len(targets)} matrices -> {run_dir} ({time.perf_counter() - t0:.0f} s)")
    return run_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="llama2_7b_shape")
    p.add_argument("--runs-root", type=Path, required=True)
    p.add_argument("--name", default="shape", help="the study folder below --runs-root")
    p.add_argument("--layers", type=int, default=None, help="fewer transformer blocks than the model has")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="further config overrides, e.g. model.shape.hidden_size=64")
    opts = p.parse_args(argv)
    if opts.layers is not None and opts.layers < 1:
        fail(f"argument --layers: expected an integer ≥ 1, got {opts.layers}")
    if opts.runs_root.exists() and not opts.runs_root.is_dir():
        fail(f"argument --runs-root: {str(opts.runs_root)!r} is not a directory")
    layers = [f"model.shape.num_hidden_layers={opts.layers}"] if opts.layers else []
    write_shape_run(opts.model, opts.runs_root, opts.name, tuple(layers + opts.overrides), opts.seed)


if __name__ == "__main__":
    main()
