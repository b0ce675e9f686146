"""benchmarks.bench's end-to-end rows: `lowrank.train.recipe.train` itself on the bench's Llama shapes (what every
sweep runs, not a copy of it), and a loss-curve check of the trainer's fast path against its plain one.

    row = trainer_row("llama-1.1b", SHAPES["llama-1.1b"], "lora", 16, runs_root, warmup=10, steps=60)

A row runs `task=synthetic_lm` (random tokens, next-token loss: the bench's objective) with the trainer's
defaults for a GPU (compiled blocks, mask-free attention, the whole step in one CUDA graph, a bf16 frozen
base) and `trainer.write_delta=false` (a speed run: no ΔW or W0 written). Its tokens/s is the one the run
records in metrics.json: steady steps after `warmup` (compile and graph capture) steps.
"""
import contextlib
import tempfile
from pathlib import Path

import lowrank.train.recipe
import lowrank.train.setup
from lowrank.train.recipe import train

CONF = Path(__file__).resolve().parent.parent / "conf"
MODEL_CONFIGS = {"llama-1.1b": "llama_1b_shape", "llama-7b": "llama2_7b_shape", "tiny": "llama_1b_shape"}
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size")
TRAINER = "trainer"  # the rows' impl and mode


def overrides(key: str, shape: dict, method: str, rank: int | None, warmup: int, steps: int, runs_root,
              extra=()) -> list[str]:
    """The run as a user writes it: the shape config (with the bench shape's sizes), the bench's batch."""
    lora = [f"method.rank={rank}", f"method.alpha={2 * rank}", "method.targets=all-linear", "trainer.lr=1e-4"] \
        if method == "lora" else ["model.dtype=bf16", "trainer.lr=1e-5"]  # bf16 weights and states, as the bench's
    return replaced([f"model={MODEL_CONFIGS[key]}", *(f"model.shape.{k}={shape[k]}" for k in SHAPE_KEYS),
            "task=synthetic_lm", f"task.vocab={min(1000, shape['vocab_size'])}",
            f"task.train_examples={8 * shape['batch']}", f"task.test_examples={shape['batch']}",
            f"method={method}", *lora, f"trainer.batch_size={shape['batch']}", f"trainer.max_length={shape['seq']}",
            f"trainer.max_steps={warmup + steps}", f"trainer.timing_warmup_steps={warmup}",
            f"trainer.eval_interval={warmup + steps}", f"trainer.eval_batch_size={shape['batch']}",
            "trainer.checkpoint_every=0", "trainer.compile=true", "trainer.write_delta=false", "logger=none",
            "trainer.progress_bar=false", f"runs_root={runs_root}"], extra)


def replaced(args: list[str], extra) -> list[str]:
    """`args` with the keys of `extra` given the values there (an override per key, as Hydra wants)."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [a for a in args if a.split("=", 1)[0] not in keys] + list(extra)


def compose(args: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from lowrank.cli import register_resolvers
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=args)


class _LossCurve:
    """A logger that keeps the per-step training loss (the trainer's own logger interface)."""

    def __init__(self):
        self.losses = []

    def log(self, values: dict, step: int) -> None:
        if "train/loss" in values:
            self.losses.append(values["train/loss"])

    def summary(self, metrics: dict) -> None:
        pass

    def finish(self) -> None:
        pass


@contextlib.contextmanager
def _loss_curve():
    curve, real = _LossCurve(), lowrank.train.setup.make_logger
    lowrank.train.setup.make_logger = lambda *a, **k: curve
    try:
        yield curve
    finally:
        lowrank.train.setup.make_logger = real


def run(args: list[str]) -> tuple[dict, list[float]]:
    """(metrics, per-step training losses) of one trainer run in a fresh directory."""
    with tempfile.TemporaryDirectory(dir=args_root(args)) as run_dir, _loss_curve() as curve:
        metrics = train(compose(args), run_dir=run_dir)
    if metrics["status"] != "complete":
        raise RuntimeError(f"trainer run {metrics['status']}: {metrics.get('reason')}")
    return metrics, curve.losses


def args_root(args: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith("runs_root="))


def trainer_row(key: str, shape: dict, method: str, rank: int | None, runs_root, warmup: int, steps: int,
                held_bytes: int = 0, extra=()) -> dict:
    """One bench row from a trainer run. `held_bytes`: memory earlier configs left allocated (the trainer's
    peak counts it; the row does not). `extra`: overrides on top (the CPU smoke test runs eager blocks)."""
    m, _ = run(overrides(key, shape, method, rank, warmup, steps, runs_root, extra))
    mode = TRAINER if m["optimizer"] == "adamw" else f"{TRAINER}+{m['optimizer']}"
    return dict(model=key, method=method, impl=TRAINER, rank=rank, mode=mode,
                targets="all-linear" if method == "lora" else None, tokens_per_second=m["tokens_per_second"],
                peak_memory_bytes=m["peak_memory_bytes"] - held_bytes, memory_held_before_bytes=held_bytes,
                mfu=m["mfu"], step_time_s=m["timed_seconds"] / m["timed_steps"],
                step_seconds_p50=m["step_seconds_p50"], step_seconds_p90=m["step_seconds_p90"],
                batch=shape["batch"], seq_len=shape["seq"], trainable_params=m["trainable_params"],
                flops_per_token=m["flops_per_token"], final_loss=m["train_loss"], warmup_steps=m["warmup_steps"],
                timed_steps=m["timed_steps"], gpu_busy_s=None, gpu_busy_by_kind_s=None,
                setup_s=m["warmup_seconds"], compile_seconds=m["compile_seconds"], cuda_graph=m["cuda_graph"],
                mask_free_attention=m["mask_free_attention"], weight_dtype=m["weight_dtype"])


def trainer_parity(key: str, shape: dict, runs_root, steps: int = 20, extra=()) -> dict:
    """LoRA r=16 loss curves of the trainer's fast path (compiled blocks, mask-free attention, the step graph
    where there is a GPU) and its plain path (eager, transformers' mask), from the same seed: the same
    weights, A and batches."""
    base = overrides(key, shape, "lora", 16, 0, steps, runs_root, ["trainer.lr=1e-3", *extra])
    fast_metrics, fast = run(base)
    _, plain = run(replaced(base, ["trainer.compile=false", "trainer.cuda_graph=false",
                                   "trainer.mask_free_attention=false"]))
    diff = [abs(a - b) for a, b in zip(fast, plain)]
    return dict(model=key, steps=steps, fast=fast, plain=plain, cuda_graph=fast_metrics["cuda_graph"],
                compiled=fast_metrics["compile_seconds"] is not None,
                max_abs_diff=max(diff), max_rel_diff=max(d / abs(b) for d, b in zip(diff, plain)))
