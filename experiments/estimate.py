"""Predict a run's GPU memory from its config alone (no weights, no device), and fit it under a budget.

    python -m experiments.estimate model=llama2_7b_shape method=full trainer.batch_size=1 trainer.max_length=512
    python -m experiments.estimate model=llama_1b_shape method=lora method.rank=16 method.targets=all-linear \
        trainer.batch_size=8 trainer.max_length=1024 budget=16gb
    python -m experiments.estimate -m model=llama_1b_shape budget=8gb,16gb,24gb     # one report each
    python -m experiments.estimate model=llama2_7b_shape method=full trainer.parallel=fsdp trainer.world_size=8 \
        trainer.batch_size=8 trainer.max_length=512 budget=24gb   # per rank: does a 7B full fine-tune fit 8 x 24 GiB?

Prints a breakdown in GiB and, last, one JSON line (weights_bytes, grads_bytes, optimizer_bytes,
activations_bytes, total_bytes, budget_bytes, fits, the micro_batch / grad_accum / activation_checkpointing
the fit chose, and the loss counted: chunked, compiled, eager, or "" for a classifier). With a budget, the fit is
the trainer's search with the estimate standing in for the device.
With `trainer.world_size=N` each rank's micro-batch is its share of the batch, and `trainer.parallel=fsdp`
shards weights, gradients and moments over the N ranks: the numbers are per rank. Writes no files.
The first line says what the estimate assumed and why: the device (`trainer.device`; auto counts as a GPU, even on
a machine without one, since budgets are about GPU memory: `trainer.device=cpu` estimates a CPU run), the compute
precision (`trainer.precision`; auto: bf16 autocast on a GPU, fp32 on the CPU), the frozen weights' dtype
(`model.dtype` as the trainer resolves it: auto is bf16 for LoRA computing in bf16, else fp32; `model.dtype=bf16`
with method=full counts bf16 weights and bf16 AdamW moments), the optimizer state (AdamW's two moments) and, for a
causal LM, the loss as the trainer resolves `trainer.chunked_loss` and `trainer.compile`.
"""
import json
import sys
import tempfile
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from lowrank.train.budget import fit_with_estimate, require_weights_fit
from lowrank.cli import one_line_errors, run_main
from lowrank.train.distributed import PARALLEL
from lowrank.errors import ConfigError, check_choice
from lowrank.train.memory import GIB, estimate_from_cfg
from lowrank.config import budget_bytes, validate
from lowrank.data.shapes import load_hf_config

# Run in place: no run directory, no .hydra/ folder, no log file (a sweep's multirun.yaml goes to the temp dir).
NO_OUTPUT = ["hydra.run.dir=.", f"hydra.sweep.dir={Path(tempfile.gettempdir()) / 'lowrank-estimate'}",
             "hydra.sweep.subdir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
             "hydra/hydra_logging=disabled"]


def estimate(cfg: DictConfig) -> dict:
    """The fitted estimate for `cfg`, as printed in the JSON line."""
    validate(cfg)  # the trainer's checks: one line for a bad value, as `experiments.train` gives
    world = check_estimate_world(cfg.trainer)
    config = load_hf_config(cfg.model, cfg.task.get("num_labels", 2))  # LM tasks have no classes
    budget = budget_bytes(cfg.get("budget"))

    device_type, device_from = estimate_device(cfg.trainer)

    def at(**setting):
        return estimate_from_cfg(cfg, config, device_type=device_type, **setting)

    configured = at()
    print(assumptions(cfg, configured, device_type, device_from))
    report = {"model": cfg.model.name, "method": cfg.method.name, "device": device_type}
    try:
        require_weights_fit(configured, budget)
    except ConfigError as e:  # the trainer stops here; the estimate reports it as a result
        fit, est, note = None, configured, str(e)
    else:
        if budget is None:
            fit, est, note = None, configured, None
        else:
            fit, est = fit_with_estimate(cfg.trainer.batch_size // world, at, budget)
            note = None
    report.update({k: est.as_dict()[k] for k in ("weights_bytes", "grads_bytes", "optimizer_bytes",
                                                 "weight_copies_bytes", "activations_bytes", "total_bytes")})
    report.update(budget_bytes=budget, fits=budget is None or (fit is not None and fit.fits),
                  micro_batch=est.micro_batch, grad_accum=est.grad_accum,
                  activation_checkpointing=est.activation_checkpointing, params=est.params,
                  trainable_params=est.trainable_params, weight_dtype=est.weight_dtype, precision=est.precision,
                  loss=est.loss,
                  world_size=world, parallel=cfg.trainer.get("parallel", "auto"), gather_bytes=est.gather_bytes,
                  note=note)
    print(f"model {cfg.model.name}: {est.table()}")
    if budget is not None:
        if report["fits"]:
            print(f"budget {budget / GIB:g} GiB: fits at micro-batch {est.micro_batch} x grad_accum {est.grad_accum}"
                  f" (checkpointing {'on' if est.activation_checkpointing else 'off'})")
        else:
            print(f"budget {budget / GIB:g} GiB: does not fit" + (f": {note}" if note else
                  f" even at micro-batch 1 with activation checkpointing ({fit.failed_at})"))
    return report


def estimate_device(tc) -> tuple[str, str]:
    """(the device type the estimate is for, where that came from): `trainer.device`, whose `auto` is a GPU here
    whatever this machine has, since a budget is GPU memory; `trainer.device=cpu` estimates a CPU run."""
    device = str(tc.get("device", "auto"))
    if device != "auto":
        return ("cpu" if device == "cpu" else "cuda"), f"trainer.device={device}"
    why = "trainer.device=auto" + ("" if torch.cuda.is_available() else
                                   ", though this machine has no GPU; trainer.device=cpu estimates a CPU run")
    return "cuda", why


def assumptions(cfg, est, device_type: str, device_from: str) -> str:
    """One line: the device, compute precision, frozen weights' dtype and optimizer state the estimate is for, each
    with the setting it came from (the trainer resolves the same `auto`s the same way)."""
    t = cfg.trainer
    autocast = "bf16 autocast" if est.precision == "bf16" else "fp32, no autocast"
    return (f"estimated for: device {'GPU (cuda)' if device_type == 'cuda' else 'cpu'} ({device_from}); "
            f"compute {autocast} (trainer.precision={t.precision}" + (f" on {device_type}" if t.precision == "auto"
                                                                      else "") + "); "
            f"frozen weights {est.weight_dtype} (model.dtype={cfg.model.get('dtype', 'auto')}); "
            f"optimizer AdamW, two moments per trainable parameter in its dtype (trainer.optimizer={t.optimizer})"
            + (f"; loss {LOSS_WHY[est.loss]} (trainer.chunked_loss={_setting(t.get('chunked_loss', 'auto'))}, "
               f"trainer.compile={_setting(t.get('compile', 'auto'))})" if est.loss else ""))


def _setting(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)  # as the override is written


LOSS_WHY = {"chunked": "in chunks of 1,024 positions, no whole logits",
            "compiled": "transformers' compiled, bf16 logits and their gradient",
            "eager": "transformers' eager, fp32 logits, log-softmax and gradients"}


def check_estimate_world(tc) -> int:
    """The ranks the estimate is for: `trainer.world_size` (auto: 1; fsdp needs it set); the batch must split
    over them."""
    check_choice("trainer.parallel", tc.get("parallel", "auto"), PARALLEL)
    world = tc.get("world_size", "auto")
    if world == "auto":
        if tc.get("parallel") == "fsdp":
            raise ConfigError("trainer.world_size=auto is not valid for an estimate with trainer.parallel=fsdp; give "
                              "the number of ranks, e.g. trainer.world_size=8")
        return 1
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"trainer.world_size={world!r} is not valid; it must be auto or an integer >= 1")
    if tc.batch_size % world:
        raise ConfigError(f"trainer.batch_size={tc.batch_size} is not valid with trainer.world_size={world}; it must "
                          f"be a multiple of it")
    return world


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@one_line_errors
def main(cfg: DictConfig) -> None:
    print(json.dumps(estimate(cfg)))


def main_in_place() -> None:
    sys.argv += NO_OUTPUT  # after run_main has checked the user's overrides
    main()


if __name__ == "__main__":
    run_main(main_in_place)
