"""Several processes, checked in one: bad parallel settings, the SLURM launcher config, the sharded memory estimate by
hand, and the estimate per rank."""
import json
import re

import pytest

from lowrank.errors import ConfigError
from lowrank.train.memory import GIB, estimate_memory
from lowrank.train.recipe import train

from tests.conftest import compose_cfg
from tests.unit.train.test_memory import shape

# A tiny random Llama classifier on synthetic tokens keeps each multi-process run to seconds.
TINY_LLAMA = ["model=llama_1b_shape", "model.shape.hidden_size=32", "model.shape.intermediate_size=64",
              "model.shape.num_hidden_layers=2", "model.shape.num_attention_heads=4",
              "model.shape.num_key_value_heads=2", "model.shape.vocab_size=128", "task=synthetic", "task.vocab=100",
              "task.train_examples=64", "task.test_examples=16", "trainer.max_length=16", "trainer.batch_size=8",
              "trainer.max_steps=6", "trainer.eval_interval=3", "trainer.warmup_steps=1", "trainer.lr=1e-3",
              "trainer.checkpoint_every=2", "logger=none", "trainer.progress_bar=false"]


def one_process(root, overrides):
    cfg = compose_cfg(TINY_LLAMA + overrides + [f"runs_root={root}"])
    return train(cfg, run_dir=root / "default" / "run")


def test_bad_parallel_values_name_the_key_and_end_the_run_as_invalid(tmp_path):
    for i, (bad, needle) in enumerate((("trainer.parallel=ddp", "trainer.parallel=ddp is not valid in one process"),
                                       ("trainer.parallel=threads", "trainer.parallel='threads' is not valid; choose"),
                                       ("trainer.world_size=2", "trainer.world_size=2 is not valid"))):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            one_process(tmp_path / str(i), [bad])
        assert json.loads((tmp_path / str(i) / "default" / "run" / "metrics.json").read_text())["status"] == "invalid"

def test_the_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from lowrank.cli import CONF_DIR, register_resolvers
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "hydra.launcher.gpus_per_node=8", "hydra.launcher.tasks_per_node=8",
                                           "hydra.launcher.nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == ("gpu", 8, 8, 2)
    assert launcher.timeout_min > 0 and launcher.array_parallelism > 0

def test_sharded_7b_full_fine_tuning_per_rank_by_hand():
    """Llama-2-7B, full fine-tuning, fp32 weights under bf16 compute, AdamW, FSDP over 8 ranks, micro-batch 1 × 512:
    per rank 4 + 4 + 8 bytes per parameter / 8, two bf16 blocks gathered and two blocks' fp32 gradients whole,
    no autocast copies (FSDP gathers bf16), activations as one process's."""
    n = 6_607_351_808  # LlamaForSequenceClassification, 2 labels
    block = 4 * 4096 * 4096 + 3 * 4096 * 11008  # q, k, v, o; gate, up, down (no biases)
    kw = dict(weight_dtype="fp32", precision="bf16")
    one = estimate_memory(shape("llama2_7b_shape"), "full", 1, 512, **kw)
    est = estimate_memory(shape("llama2_7b_shape"), "full", 1, 512, shards=8, **kw)
    assert (est.weights_bytes, est.grads_bytes, est.optimizer_bytes) == (4 * n // 8, 4 * n // 8, 8 * n // 8)
    assert est.gather_bytes == 2 * 2 * block + 2 * 4 * block
    assert est.weight_copies_bytes == 0 and est.activations_bytes == one.activations_bytes
    last_layer_without_copy = one.total_bytes - one.weights_bytes - one.optimizer_bytes - one.grads_bytes - 2 * block
    assert one.total_bytes == one.weights_bytes + one.optimizer_bytes + max(
        one.weight_copies_bytes + one.activations_bytes, one.grads_bytes + last_layer_without_copy + 2 * block)
    assert est.total_bytes == (16 * n // 8 - 4 * n // 8) + est.gather_bytes + max(
        est.activations_bytes, 4 * n // 8 + last_layer_without_copy)
    assert est.total_bytes < 24 * GIB < one.total_bytes  # 8 × 24 GiB hold it; one 24 GiB GPU does not

def test_estimate_answers_per_rank_for_fsdp():
    from experiments.estimate import estimate
    out = estimate(compose_cfg(["model=llama2_7b_shape", "method=full", "trainer.parallel=fsdp", "trainer.world_size=8",
                                "trainer.batch_size=8", "trainer.max_length=512", "budget=24gb"]))
    assert (out["world_size"], out["fits"], out["micro_batch"]) == (8, True, 1)
    assert out["weights_bytes"] == 4 * out["params"] // 8
    with pytest.raises(ConfigError, match="trainer.world_size=auto is not valid"):
        estimate(compose_cfg(["model=llama2_7b_shape", "trainer.parallel=fsdp"]))
