"""Training over several processes (lowrank.train.distributed): 2 gloo processes under torchrun give the 1-process
result for full fine-tuning and LoRA, with one run directory; resume after both ranks are killed; SIGTERM on one
rank checkpoints once; FSDP follows DDP's loss curve; gradient traffic is measured. A sweep through Hydra's
submitit launcher. (What needs no second process: tests/unit/train/test_distributed.py.)

A tiny random Llama classifier on synthetic tokens keeps each multi-process run to seconds.
"""
import json
import socket

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.unit.train.test_distributed import TINY_LLAMA, one_process

METHODS = {"full": ["method=full"], "lora": ["method.rank=4"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module: str, args: list[str], cwd, nproc: int = 2):
    return run_cli(["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
                    "-m", module, *args], cwd=cwd, timeout=300)


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
    # The first rank to end makes torchrun SIGTERM the other, which may still be writing: both end on their own,
    # with 143 (not killed by that signal, nor aborted by gloo's threads in the interpreter's teardown).
    assert stopped.stderr.count("exitcode  : 143") == 2, stopped.stderr[-3000:]
    (run,) = [p for p in (tmp_path / "default").iterdir()]
    # rank 1 got SIGTERM while checkpointing step 2: every rank stops after step 3, with its checkpoint
    assert torch.load(run / "checkpoint.pt", weights_only=False)["loop"]["step"] == 3
    assert not (run / "metrics.json").exists()
    assert (run / "train.log").read_text().count("SIGTERM at step") == 1
    assert json.loads((run / "progress.json").read_text())["state"] == "ended"


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


# ---------------------------------------------------------------------------------------------- memory



# MiniLM (the default model) with its own dropout turned off: the exact contract. With dropout on, each rank draws
# the masks of its own slice of the batch, so two processes equal one only in distribution (docs/scale-out.md).
MINILM = ["model.dropout=0", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_interval=2",
          "task.train_size=16", "task.eval_size=8", "trainer.max_length=32", "trainer.checkpoint_every=0",
          "logger=none", "trainer.progress_bar=false"]


def test_on_the_default_model_with_dropout_off_two_processes_equal_one(tmp_path):
    from lowrank.train.recipe import train
    from tests.conftest import compose_cfg
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    m1 = train(compose_cfg(MINILM + [f"runs_root={single}"]), run_dir=single / "default" / "run")
    d1 = load_file(str(single / "default" / "run" / "delta_w.safetensors"))
    ddp.mkdir()
    done = torchrun("experiments.train", MINILM + [f"runs_root={ddp}"], ddp)
    assert done.returncode == 0, done.stderr[-3000:]
    m2, d2, _ = result(ddp)
    assert (m2["world_size"], m2["parallel"]) == (2, "ddp")
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], abs=1e-5)
    assert m2["eval_loss"] == pytest.approx(m1["eval_loss"], abs=1e-5)
    for k in d1:  # every lora_B moved (B starts at 0): the comparison has teeth
        assert d1[k].abs().max() > 0 if k.endswith("lora_B") else True
        torch.testing.assert_close(d2[k], d1[k], rtol=1e-3, atol=1e-6)
