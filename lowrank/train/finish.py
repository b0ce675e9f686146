"""The recipe's last phase: the final evaluation, ΔW and rank dynamics on disk, and metrics.json (or the record of
a run that diverged), then the checkpoint removed: what remains of a finished run is its record.
"""
import logging
import time

import torch

from lowrank.adapters.lora import lora_scaling
from lowrank.config import option
from lowrank.data.model_files import revision_source
from lowrank.rundir import provenance
from lowrank.rundir.delta import trained_params, write_delta
from lowrank.rundir.layout import CHECKPOINT_FILE, DELTA_FILE, TRAINED_FILE, TRAINED_FILE_KEY
from lowrank.rundir.record import write_run_metrics
from lowrank.train import distributed
from lowrank.train.dynamics import write_dynamics
from lowrank.train.loop_state import LoopState
from lowrank.train.perf import flops_per_token, peak_flops, peak_memory_bytes, state_bytes
from lowrank.train.setup import Run
from lowrank.train.throughput import compile_seconds

log = logging.getLogger("lowrank.train.recipe")


def diverged(run: Run, state: LoopState) -> dict:
    metrics = {"status": "diverged", "diverged_at_step": state.diverged_at, "method": run.cfg.method.name,
               "eval_history": state.history, "wall_seconds": time.perf_counter() - run.t_start,
               "provenance": _provenance(run)}
    log.error("non-finite loss or gradient at step %d: run marked diverged", state.diverged_at)
    return _record(run, metrics)


def finish(run: Run, state: LoopState, timing: dict) -> dict:
    cfg, mc = run.cfg, run.cfg.method
    final_scores = run.objective.final(run.model, run.test_batches, run.eval_batch_size, run.device, run.autocast,
                                       run.mask_free)
    if run.dynamics is not None and run.main:
        write_dynamics(run.run_dir, state.dynamics or [])
    if run.keep_delta:
        write_delta(run.run_dir, run.model, run.method, run.names, run.w0, run.base_path,
                    {"base_model": cfg.model.path, "base_model_name": cfg.model.name,
                     "scaling": lora_scaling(mc.alpha, mc.rank, mc.scaling) if mc.name == "lora" else 1.0,
                     "rank": option(cfg, "method.rank"), "alpha": option(cfg, "method.alpha"), "targets": run.names})
    metrics = {"status": "complete", "method": mc.name,
               "objective": run.objective.name if run.objective.name == "classification" else cfg.task.objective,
               **{k: v for k, v in state.history[-1].items() if k != "step"},  # eval_loss, eval_accuracy, train_loss
               **final_scores,  # train accuracy (classification); forgetting, exact match (causal LM)
               **_sizes(run), **_speed(run, timing), **_how(run), "wall_seconds": time.perf_counter() - run.t_start,
               "eval_history": state.history, "delta_file": DELTA_FILE if run.keep_delta else None,
               "provenance": _provenance(run),
               TRAINED_FILE_KEY: TRAINED_FILE if run.keep_delta and trained_params(run.model, run.method, run.names)
               else None}
    metrics = _record(run, metrics)
    log.info("%s", headline(metrics, run.run_dir))  # the run's last line
    return metrics


def headline(metrics: dict, run_dir) -> str:
    """A complete run in one line: its headline metric on how much test data, after how many steps, and where, e.g.
    `complete: eval_accuracy 0.812 (1,000 test examples) after 150 steps in 41 s -> RUN_DIR`; a causal LM gives
    eval_loss and perplexity over its test sequences."""
    if "eval_accuracy" in metrics:
        quality, unit = f"eval_accuracy {metrics['eval_accuracy']:.3f}", "examples"
    else:
        quality, unit = (f"eval_loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}",
                         "sequences")
    return (f"complete: {quality} ({metrics['eval_examples']:,} test {unit}) after {metrics['steps']:,} steps in "
            f"{metrics['wall_seconds']:.0f} s -> {run_dir}")


def _record(run: Run, metrics: dict) -> dict:
    """metrics.json, then the checkpoint removed (the run is final), the logger told and closed."""
    metrics = write_run_metrics(run.run_dir, run.cfg, metrics)
    if run.main:
        (run.run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    run.logger.summary(metrics)
    run.logger.finish()
    return metrics


def _provenance(run: Run) -> dict:
    """Code, libraries, device, the model's revision and digests of the examples trained and evaluated on, in
    their order (lowrank/rundir/provenance.py). `train_seeded`: the run's seed picked or ordered the training
    examples (task.train_size, LM tasks' shuffle), so train_sha256 differs between seeds by design. Rank 0 only
    (the others write no metrics)."""
    if not run.main:
        return None
    files, hub_id, why = revision_source(run.cfg.model)
    model = provenance.model_revision(run.cfg.model.path, files, hub_id, provenance.cache_file_of(run.runs_root), why)
    data = {"train_sha256": run.train_batches.digest(), "eval_sha256": run.test_batches.digest(),
            "train_seeded": run.objective.seed_picks_train}
    return provenance.record(run.device, model, data)


def _sizes(run: Run) -> dict:
    trainable = sum(p.numel() for p in run.trainable)
    return {"trainable_params": trainable, **run.method.metrics(), "head_params": run.head_params,
            "adapted_params": trainable - run.head_params,
            "total_params": sum(p.numel() for p in run.model.parameters())}


def _speed(run: Run, timing: dict) -> dict:
    """Throughput over the steady steps, MFU from the FLOPs per token (lowrank/train/perf.py), peak memory."""
    tc, model = run.cfg.trainer, run.model
    tokens_per_second = timing["tokens_per_second"]
    seq = timing["timed_tokens"] / max(1, timing["timed_steps"]) / tc.batch_size  # real tokens per sequence
    fpt = flops_per_token(model, max(1, int(seq)), model.config.num_hidden_layers, model.config.hidden_size)
    peak = peak_flops(run.device, run.precision)
    return {**timing,  # tokens_per_second (real tokens, steady steps), padded_tokens_per_second, warm-up, ...
            "compile_seconds": compile_seconds() if run.compiled else None,
            "flops_per_token": fpt,
            "mfu": fpt * tokens_per_second / peak if peak and tokens_per_second else None,
            "peak_memory_bytes": peak_memory_bytes(run.device),
            "checkpoint_bytes": state_bytes(run.trainable)}  # adapter + head for LoRA, every weight for full


def _how(run: Run) -> dict:
    """How the run trained: data, batch, processes, budget and the settings `auto` resolved to."""
    tc, fit = run.cfg.trainer, run.fit
    return {"train_examples": len(run.train_batches), "eval_examples": len(run.test_batches),
            "steps": tc.max_steps, "micro_batch": run.micro, "grad_accum": run.local_batch // run.micro,
            "world_size": distributed.world_size(), "parallel": run.parallel,
            **run.grad_sync.summary(),  # bytes (and seconds) of gradient all-reduce / reduce-scatter per step
            "activation_checkpointing": run.checkpointing, "budget_bytes": fit.budget_bytes, "fits": True,
            "memory_estimate": fit.memory_estimate,
            "device": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu",
            "precision": run.precision, "weight_dtype": run.weight_dtype, "optimizer": run.optimizer_kind,
            "mask_free_attention": run.mask_free, "cuda_graph": run.graphed, "group_by_length": run.by_length,
            "compile": run.compiled, "chunked_loss": run.chunked_loss}
