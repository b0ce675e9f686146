"""Training over several processes (lowrank.train.distributed): 2 gloo processes under torchrun give the 1-process
result for full fine-tuning and LoRA, with one run directory; resume after both ranks are killed; SIGTERM on one
rank checkpoints once; FSDP follows DDP's loss curve; gradient traffic is measured. A sweep through Hydra's
submitit launcher; the SLURM launcher config composes; the sharded memory estimate by hand.

A tiny random Llama classifier on synthetic tokens keeps each multi-process run to seconds.
"""
import json
import re
import socket

import pytest
import torch
from safetensors.torch import load_file

from lowrank.errors import ConfigError
from lowrank.train.memory import GIB, estimate_memory
from lowrank.train.recipe import train

from tests.conftest import compose_cfg, run_cli
from tests.unit.train.test_memory import shape

TINY_LLAMA = ["model=llama_1b_shape", "model.shape.hidden_size=32", "model.shape.intermediate_size=64",
              "model.shape.num_hidden_layers=2", "model.shape.num_attention_heads=4",
              "model.shape.num_key_value_heads=2", "model.shape.vocab_size=128", "task=synthetic", "task.vocab=100",
              "task.train_examples=64", "task.test_examples=16", "trainer.max_length=16", "trainer.batch_size=8",
              "trainer.max_steps=6", "trainer.eval_interval=3", "trainer.warmup_steps=1", "trainer.lr=1e-3",
              "trainer.checkpoint_every=2", "logger=none", "trainer.progress_bar=false"]
METHODS = {"full": ["method=full"], "lora": ["method.rank=4"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module: str, args: list[str], cwd, nproc: int = 2):
    return run_cli(["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
                    "-m", module, *args], cwd=cwd, timeout=300)


def one_process(root, overrides):
    cfg = compose_cfg(TINY_LLAMA + overrides + [f"runs_root={root}"])
    return train(cfg, run_dir=root / "default" / "run")


def result(root):
    """(metrics, ΔW tensors) of the one run directory below root/default."""
    (run,) = [p for p in (root / "default").iterdir() if p.is_dir()]
    return json.loads((run / "metrics.json").read_text()), load_file(str(run / "delta_w.safetensors")), run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process and 2-process (DDP) run of each method: {method: (metrics 1, (metrics 2, ΔW 2, dir), ΔW 1)}."""
    out = {}
    for method, overrides in METHODS.items():
        base = tmp_path_factory.mktemp(method)
        single, ddp = base / "single", base / "ddp"
        m1 = one_process(single, overrides)
        d1 = load_file(str(single / "default" / "run" / "delta_w.safetensors"))
        ddp.mkdir()
        done = torchrun("experiments.train", TINY_LLAMA + overrides + [f"runs_root={ddp}"], ddp)
        assert done.returncode == 0, done.stderr[-3000:]
        out[method] = (m1, d1, result(ddp))
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_equal_one_with_the_same_global_batch(runs, method):
    m1, d1, (m2, d2, run) = runs[method]
    assert (m1["world_size"], m2["world_size"], m2["parallel"]) == (1, 2, "ddp")
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], abs=1e-6)
    for h1, h2 in zip(m1["eval_history"], m2["eval_history"], strict=True):
        assert h2["eval_loss"] == pytest.approx(h1["eval_loss"], abs=1e-6)
    assert d1.keys() == d2.keys()
    for k in d1:
        torch.testing.assert_close(d2[k], d1[k], rtol=1e-4, atol=1e-6)
    # exactly one run directory, and beside it only the shared base weights, both written by rank 0 alone
    assert sorted(p.name for p in run.parent.parent.iterdir()) == ["base_weights", "default"]
    assert [p.name for p in run.parent.iterdir()] == [run.name]
    assert not (run / "checkpoint.pt").exists()


def test_gradient_traffic_is_measured_from_the_all_reduce(runs):
    """DDP's hook sees each fp32 gradient once a step: full fine-tuning reduces every parameter, LoRA only the
    adapter and the head; one process reduces nothing."""
    full, lora = runs["full"][2][0], runs["lora"][2][0]
    assert full["grad_sync_bytes_per_step"] == 4 * full["trainable_params"]
    assert lora["grad_sync_bytes_per_step"] == 4 * lora["trainable_params"]
    assert lora["grad_sync_bytes_per_step"] < full["grad_sync_bytes_per_step"] / 4
    assert full["grad_sync_seconds_per_step"] > 0
    assert runs["full"][0]["grad_sync_bytes_per_step"] == 0


def test_resume_after_killing_both_ranks_gives_the_uninterrupted_result(runs, tmp_path):
    args = TINY_LLAMA + METHODS["full"] + [f"runs_root={tmp_path}"]
    killed = torchrun("tests.kill_at_step", ["4", "before", *args], tmp_path)
    assert killed.returncode != 0
    (run,) = [p for p in (tmp_path / "default").iterdir()]
    assert torch.load(run / "checkpoint.pt", weights_only=False)["loop"]["step"] == 2
    assert not (run / "metrics.json").exists()
    resumed = torchrun("experiments.train", args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 2" in (run / "train.log").read_text()
    m_ref, d_ref, _ = runs["full"][2]
    m, d, _ = result(tmp_path)
    assert (m["eval_history"], m["train_loss"]) == (m_ref["eval_history"], m_ref["train_loss"])
    for k in d_ref:
        assert torch.equal(d[k], d_ref[k]), k


def test_sigterm_on_one_rank_checkpoints_once_on_every_rank(tmp_path):
    args = TINY_LLAMA + METHODS["lora"] + [f"runs_root={tmp_path}", "trainer.max_steps=50"]
    stopped = torchrun("tests.kill_at_step", ["2", "term", *args], tmp_path)
    assert stopped.returncode != 0
    # the first rank to end pre-empted makes torchrun stop the other (which may still be on its way out)
    assert "exitcode  : 143" in stopped.stderr, stopped.stderr[-3000:]
    (run,) = [p for p in (tmp_path / "default").iterdir()]
    # rank 1 got SIGTERM while checkpointing step 2: every rank stops after step 3, with its checkpoint
    assert torch.load(run / "checkpoint.pt", weights_only=False)["loop"]["step"] == 3
    assert not (run / "metrics.json").exists()
    assert (run / "train.log").read_text().count("SIGTERM at step") == 1


def test_fsdp_follows_the_ddp_loss_curve(runs, tmp_path):
    args = TINY_LLAMA + METHODS["full"] + [f"runs_root={tmp_path}", "trainer.parallel=fsdp"]
    done = torchrun("experiments.train", args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    m, d, _ = result(tmp_path)
    m_ddp, d_ddp, _ = runs["full"][2]
    assert m["parallel"] == "fsdp"
    for h, h_ddp in zip(m["eval_history"], m_ddp["eval_history"], strict=True):
        assert h["eval_loss"] == pytest.approx(h_ddp["eval_loss"], abs=1e-5)
        assert h["train_loss"] == pytest.approx(h_ddp["train_loss"], abs=1e-5)
    for k in d_ddp:  # ΔW gathered shard by shard to rank 0
        torch.testing.assert_close(d[k], d_ddp[k], rtol=1e-3, atol=1e-6)
    # reduce-scatter sizes: every gradient once a step, padded to a multiple of the world size per block
    assert 4 * m["trainable_params"] <= m["grad_sync_bytes_per_step"] <= 4 * m["trainable_params"] + 4 * 2 * 64


def test_bad_parallel_values_name_the_key_and_end_the_run_as_invalid(tmp_path):
    for i, (bad, needle) in enumerate((("trainer.parallel=ddp", "trainer.parallel=ddp is not valid in one process"),
                                       ("trainer.parallel=threads", "trainer.parallel='threads' is not valid; choose"),
                                       ("trainer.world_size=2", "trainer.world_size=2 is not valid"))):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            one_process(tmp_path / str(i), [bad])
        assert json.loads((tmp_path / str(i) / "default" / "run" / "metrics.json").read_text())["status"] == "invalid"


# ---------------------------------------------------------------------------------------------- launchers

@pytest.mark.slow
def test_a_sweep_through_the_submitit_launcher_writes_complete_run_dirs(tmp_path):
    args = ["-m", "experiments.train", "-m", "hydra/launcher=submitit_local", "method.rank=2,4", *TINY_LLAMA,
            f"runs_root={tmp_path}"]
    r = run_cli(args, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [p for p in (tmp_path / "default").iterdir() if (p / "metrics.json").exists()]
    assert len(runs) == 2
    for run in runs:
        assert json.loads((run / "metrics.json").read_text())["status"] == "complete"
        assert (run / "delta_w.safetensors").exists() and (run / ".hydra" / "config.yaml").exists()


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


# ---------------------------------------------------------------------------------------------- memory

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
