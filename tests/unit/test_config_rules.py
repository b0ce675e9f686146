"""lowrank.config: each key's rule with a bad value and its one line, each cross-key rule, the model's rules (targets,
ranks, rank_pattern) failing before any weights load, and every config key both ruled and read. In-process and fast:
nothing trains, no process starts, no network."""
import copy
import functools
import re
import socket
import time

import yaml

import pytest
import torch
import transformers
from omegaconf import OmegaConf

import lowrank.config as config
import lowrank.data.models
from lowrank.config import CROSS_KEY_RULES, INTERPOLATED, RULES, check_model_rules, option, validate
from lowrank.errors import ConfigError
from lowrank.rundir.layout import DEFAULT_AS_ABSENT, NULL_AS_ABSENT
from tests.conftest import CONF, ROOT, compose_cfg


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]):
    return compose_cfg(list(overrides))


def composed(overrides: list[str]):
    """compose_cfg(overrides), each distinct composition done once (Hydra takes ~0.2 s): a copy to change at will."""
    return copy.deepcopy(_composed(tuple(overrides)))


def one_line(overrides: list[str], run=validate, cfg=None) -> str:
    with pytest.raises(ConfigError) as info:
        run(composed(overrides) if cfg is None else cfg)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --- one rule per key ---------------------------------------------------------------------------------------------

INTEGER, COUNT, NUMBER = "it must be an integer > 0", "it must be an integer >= 0", "it must be a number > 0"
SWITCH, AUTO_SWITCH, TEXT = "it must be true or false", "choose auto, true or false", "it must be a non-empty string"
BAD = {  # key: (context overrides, bad value, what its one line says after `KEY=VALUE is not valid; `)
    "seed": ([], "-1", "it must be an integer in [0, 2**32)"),  # -1 used to fail mid-run with a traceback
    "name": ([], "[a]", "it must be one folder name below runs_root"),
    "runs_root": ([], "[a]", "it must be a folder path"),
    "method.name": ([], "qlora", "choose one of ['full', 'lora', 'subspace']"),
    "method.targets": ([], "[query,3]", "give module-name suffixes such as [query,value] or all-linear"),
    "method.rank": ([], "0", INTEGER),
    "method.alpha": ([], "0", NUMBER),
    "method.dropout": ([], "1", "it must be in [0, 1)"),
    "method.scaling": ([], "sqrt", "choose one of ['standard', 'rslora']"),
    "method.init": ([], "zeros", "choose one of ['kaiming_uniform', 'gaussian', 'pissa']"),
    "method.rank_pattern": ([], "5", "it must be a mapping {module-name pattern: rank} or a JSON file of one"),
    "method.dora": ([], "maybe", SWITCH),
    "method.loraplus_ratio": ([], "0", NUMBER),
    "method.relora_every": ([], "0", INTEGER),
    "method.relora_warmup": (["method=relora"], "-1", COUNT),
    "method.dim": (["method=subspace"], "0", INTEGER),
    "method.said": (["method=subspace"], "maybe", SWITCH),
    "method.step_size": (["method=subspace"], "0", NUMBER),
    "trainer.max_steps": ([], "0", INTEGER),
    "trainer.batch_size": ([], "0", INTEGER),
    "trainer.max_length": ([], "1", "it must be an integer >= 2"),  # 1 used to train on whole texts silently
    "trainer.eval_interval": ([], "0", INTEGER),
    "trainer.eval_batch_size": ([], "0", INTEGER),
    "trainer.micro_batch_size": ([], "0", INTEGER),
    "trainer.checkpoint_every": ([], "-1", COUNT),
    "trainer.warmup_steps": ([], "-1", COUNT),
    "trainer.timing_warmup_steps": ([], "1.5", COUNT),
    "trainer.lr": ([], "fast", NUMBER),
    "trainer.weight_decay": ([], "-1", "it must be a number >= 0"),
    "trainer.grad_clip": ([], "0", NUMBER),
    "trainer.precision": ([], "fp16", "choose one of ['auto', 'fp32', 'bf16']"),
    "trainer.device": ([], "tpu", "choose auto, cpu, cuda or cuda:N"),
    "trainer.schedule": ([], "step", "choose one of ['linear', 'cosine', 'constant']"),
    "trainer.optimizer": ([], "sgd", "choose one of"),
    "trainer.progress_bar": ([], "maybe", SWITCH),
    "trainer.activation_checkpointing": ([], "maybe", SWITCH),
    "trainer.mask_free_attention": ([], "maybe", SWITCH),
    "trainer.compile": ([], "maybe", AUTO_SWITCH),
    "trainer.chunked_loss": ([], "maybe", AUTO_SWITCH),
    "trainer.write_delta": ([], "maybe", SWITCH),
    "trainer.dynamics": ([], "maybe", SWITCH),
    "trainer.dynamics_targets": ([], "[]", "it must be all or module-name suffixes such as [query,value]"),
    "trainer.cuda_graph": ([], "sometimes", AUTO_SWITCH),
    "trainer.group_by_length": ([], "sometimes", AUTO_SWITCH),
    "trainer.parallel": ([], "threads", "choose one of ['auto', 'none', 'ddp', 'fsdp']"),
    "trainer.world_size": ([], "0", "it must be auto or an integer >= 1"),
    "model.name": ([], "''", TEXT),
    "model.path": ([], "''", TEXT),
    "model.shape": (["model=llama_1b_shape"], "5", "it must be a mapping of config.json keys with a model_type"),
    "model.dtype": ([], "fp16", "choose one of ['auto', 'fp32', 'bf16']"),
    "model.dropout": ([], "1.5", "it must be in [0, 1), or null for the model's own"),
    "model.gguf_file": (["model=smollm2"], "''", TEXT),
    "model.cache_dir": (["model=smollm2"], "''", TEXT),
    "task.name": ([], "''", TEXT),
    "task.loader": ([], "nope",
                    "choose one of ['fine_foods', 'hub', 'synthetic', 'tweets', 'wordnet', 'python_stdlib']"),
    "task.objective": ([], "nope", "choose one of ['classification', 'cpt', 'sft']"),
    "task.num_labels": ([], "0", INTEGER),
    "task.path": (["task=tweets"], "''", TEXT),
    "task.train_size": ([], "0", INTEGER),
    "task.eval_size": ([], "abc", INTEGER),
    "task.test_size": (["task=tweets"], "0", INTEGER),
    "task.train_examples": (["task=synthetic"], "0", INTEGER),
    "task.test_examples": (["task=synthetic"], "0", INTEGER),
    "task.exact_match_examples": (["task=wordnet_sft"], "-1", COUNT),
    "task.train_tokens": (["task=code_cpt"], "0", INTEGER),
    "task.test_tokens": (["task=code_cpt"], "0", INTEGER),
    "task.ood_tokens": (["task=code_cpt"], "null", INTEGER),
    "task.seq_len": (["task=synthetic"], "0", INTEGER),
    "task.vocab": (["task=synthetic"], "1", "it must be an integer >= 2"),
    "task.hub_id": (["task=glue_sst2"], "''", TEXT),
    "task.hub_config": (["task=glue_sst2"], "''", TEXT),
    "task.text_fields": (["task=glue_sst2"], "[]", "it must be a list of strings such as [sentence]"),
    "task.eval_split": (["task=glue_sst2"], "''", TEXT),
    "task.hf_dataset": (["task=code_cpt"], "''", TEXT),
    "task.hf_config": (["task=code_cpt"], "''", TEXT),
    "task.text_field": (["task=code_cpt"], "''", TEXT),
    "task.prompt_field": (["task=wordnet_sft"], "''", TEXT),
    "task.answer_field": (["task=wordnet_sft"], "''", TEXT),
    "logger.name": ([], "nope", "choose one of ['none', 'wandb']"),
    "logger.project": ([], "''", TEXT),
    "logger.entity": ([], "''", TEXT),
    "logger.mode": ([], "bogus", "choose one of [None, 'online', 'offline', 'disabled']"),
    "logger.group": ([], "''", TEXT),
    "budget.gib": ([], "-3", "it must be a number of GiB > 0, or null for no budget"),
}


def test_every_rule_has_a_bad_value_here():
    assert set(BAD) == set(RULES)


@pytest.mark.parametrize("key", list(BAD))
def test_a_bad_value_is_one_line_naming_the_key(key):
    context, value, says = BAD[key]
    cfg = composed(context)
    OmegaConf.update(cfg, key, yaml.safe_load(value), force_add=True)  # as `++KEY=VALUE` would set it
    message = one_line(context, cfg=cfg)
    assert re.match(rf"{re.escape(key)}=.* is not valid; ", message), message
    assert says in message, message


def test_messages_the_entry_points_promise():
    """The wording tests of the command line and of the run record rely on (tests/test_cli.py, test_reliability.py)."""
    assert one_line(["method.rank=0"]) == "method.rank=0 is not valid; it must be an integer > 0"
    assert one_line(["trainer.write_delta=maybe"]) == ("trainer.write_delta='maybe' is not valid; it must be true or "
                                                       "false")
    assert one_line(["trainer.lr=nan"]) == "trainer.lr=nan is not valid; it must be a number > 0"
    assert one_line(["method.targets=[]"]) == ("method.targets is empty; give module-name suffixes such as "
                                               "[query,value] or all-linear")
    assert one_line(["budget.gib=-3"]) == ("budget.gib=-3 is not valid; it must be a number of GiB > 0, or null for "
                                           "no budget")


def test_a_key_of_another_method_is_not_read():
    validate(composed(["method=full", "++method.rank=0", "++method.dora=maybe"]))


def test_a_missing_required_key_is_one_line():
    cfg = composed([])
    OmegaConf.set_struct(cfg, False)
    del cfg.trainer["max_steps"]
    with pytest.raises(ConfigError, match=r"^trainer\.max_steps is missing; it must be an integer > 0$"):
        validate(cfg)


# --- cross-key rules ------------------------------------------------------------------------------------------------

ON_CUDA = "on a CUDA machine"  # a marker among a case's overrides: trainer.device=auto resolves to cuda:0
CROSS = {  # rule: [(overrides, what the one line says), ...]
    "bf16_weights_compute_in_bf16": [(["model.dtype=bf16", "trainer.precision=fp32"],
                                      "model.dtype=bf16 is not valid with trainer.precision=fp32")],
    "flat_master_steps_lora_factors": [(["method=full", "trainer.optimizer=flat_master"],
                                        "trainer.optimizer=flat_master is not valid with method=full")],
    "flat_master_not_with_relora": [(["method=relora", "trainer.optimizer=flat_master"],
                                     "trainer.optimizer=flat_master is not valid with method.relora_every set")],
    "flat_master_not_with_loraplus": [(["method=loraplus", "trainer.optimizer=flat_master"],
                                       "trainer.optimizer=flat_master is not valid with method.loraplus_ratio set")],
    "flat_master_in_one_process": [(["trainer.optimizer=flat_master", "trainer.parallel=ddp"],
                                    "trainer.optimizer=flat_master is not valid with trainer.parallel=ddp; use auto "
                                    "or adamw")],
    "relora_is_one_variant": [(["method=relora", "++method.dora=true"],
                               "method.relora_every=100 is not valid with method.dora=true; use one variant"),
                              (["method=relora", "method.init=pissa"],
                               "method.relora_every=100 is not valid with method.init=pissa; use one variant")],
    "variants_run_in_one_process": [
        (["method=subspace", "trainer.parallel=ddp"], "trainer.parallel=ddp is not valid with method=subspace; it runs "
                                                      "in one process"),
        (["method=dora", "trainer.parallel=fsdp"], "trainer.parallel=fsdp is not valid with method.dora=true"),
        (["method=pissa", "trainer.parallel=ddp"], "trainer.parallel=ddp is not valid with method.init=pissa"),
        (["method=relora", "trainer.parallel=ddp"], "trainer.parallel=ddp is not valid with method.relora_every")],
    "micro_batch_divides_batch": [(["trainer.batch_size=16", "trainer.micro_batch_size=5"],
                                   "trainer.micro_batch_size=5 is not valid; it must divide trainer.batch_size=16")],
    "batch_splits_over_world_size": [
        (["trainer.batch_size=16", "trainer.world_size=3"],
         "trainer.batch_size=16 is not valid with trainer.world_size=3; it must be a multiple of it"),
        (["trainer.batch_size=12", "trainer.world_size=2", "trainer.micro_batch_size=4"],
         "trainer.micro_batch_size=4 is not valid with trainer.world_size=2; it must divide the per-process batch")],
    "batch_fits_training_set": [
        (["task.train_size=8", "trainer.batch_size=16"],
         "trainer.batch_size=16 is not valid; it must be <= the training set size (8)"),
        (["task=synthetic", "model=llama_1b_shape", "trainer.batch_size=1024"],
         "trainer.batch_size=1024 is not valid; it must be <= the training set size (512)"),
        (["task=synthetic_lm", "model=llama_1b_shape", "task.train_examples=8"],
         "trainer.batch_size=16 is not valid; it must be <= the training set size (8)")],
    "cuda_graph_true_is_possible": [
        (["trainer.cuda_graph=true", "trainer.device=cpu"],
         "trainer.cuda_graph=true is not valid here: it runs on the CPU; use auto or false"),
        (["trainer.cuda_graph=true", "trainer.parallel=ddp", ON_CUDA],
         "trainer.cuda_graph=true is not valid here: it runs on several processes (trainer.parallel=ddp)"),
        (["trainer.cuda_graph=true", "trainer.activation_checkpointing=true", ON_CUDA],
         "trainer.cuda_graph=true is not valid here: activation checkpointing saves RNG state on the host"),
        (["trainer.cuda_graph=true", "trainer.mask_free_attention=false", ON_CUDA],
         "trainer.cuda_graph=true is not valid here: its batches are padded")],
    "loader_fits_objective": [(["task=code_cpt", "task.loader=wordnet"],
                               "task.loader='wordnet' is not valid; choose one of ['python_stdlib', 'synthetic']"),
                              (["task.loader=python_stdlib"],
                               "task.loader='python_stdlib' is not valid; choose one "
                               "of ['fine_foods', 'hub', 'synthetic', 'tweets', 'wordnet']")],
    "token_caps_hold_a_sequence": [(["task=code_cpt", "task.test_tokens=100"],
                                    "task.test_tokens=100 is not valid; it must be an integer >= 128 "
                                    "(trainer.max_length: one full sequence) or null for all")],
    "model_has_weights_or_shape": [(["model.path=null"], "model=minilm: set model.path (weights) or model.shape")],
    "gguf_file_has_a_cache": [(["model=smollm2", "model.cache_dir=null"],
                               "model.cache_dir=None is not valid with model.gguf_file")],
}


def test_every_cross_key_rule_is_tested_here():
    assert set(CROSS) == {rule.__name__ for rule in CROSS_KEY_RULES}


@pytest.mark.parametrize("rule,case", [(rule, i) for rule, cases in CROSS.items() for i in range(len(cases))])
def test_a_cross_key_rule_is_one_line(monkeypatch, rule, case):
    overrides, says = CROSS[rule][case]
    if ON_CUDA in overrides:
        monkeypatch.setattr(config, "resolve_device", lambda name: torch.device("cuda", 0))
        overrides = [o for o in overrides if o != ON_CUDA]
    with pytest.raises(ConfigError) as info:
        getattr(config, rule)(composed(overrides))
    assert says in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert says in one_line(overrides, run=lambda c: [r(c) for r in CROSS_KEY_RULES])


# --- the model's rules: before any weights load ---------------------------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    """Every way the trainer loads weights, and the network, raise: validate must not need them."""
    def refuse(*args, **kwargs):
        raise AssertionError("validate loaded a model or opened a connection")
    for module, name in [(lowrank.data.models, "load_model"), (lowrank.data.models, "load_causal_lm"),
                         (transformers.AutoModel, "from_pretrained"),
                         (transformers.AutoModelForSequenceClassification, "from_pretrained"),
                         (transformers.AutoModelForCausalLM, "from_pretrained"), (socket.socket, "connect"),
                         (socket, "create_connection")]:
        monkeypatch.setattr(module, name, refuse)


def rank_pattern_file(tmp_path, text: str) -> str:
    path = tmp_path / "rank_pattern.json"
    path.write_text(text)
    return str(path)


def test_rank_pattern_file_missing(no_loading, tmp_path):
    message = one_line([f"method.rank_pattern={tmp_path / 'nope.json'}"])
    assert message.startswith(f"method.rank_pattern={str(tmp_path / 'nope.json')!r} cannot be read"), message


def test_rank_pattern_file_malformed(no_loading, tmp_path):
    path = rank_pattern_file(tmp_path, "{query: 4")
    assert one_line([f"method.rank_pattern={path}"]).startswith(f"method.rank_pattern={path!r} is not valid JSON")


def test_rank_pattern_rank_above_width(no_loading, tmp_path):
    path = rank_pattern_file(tmp_path, '{"query": 500}')
    assert one_line([f"method.rank_pattern={path}"]) == (
        f"method.rank_pattern={path!r} is not valid; it must be <= min(in, out)=384 of target "
        f"bert.encoder.layer.0.attention.self.query (rank 500 there)")


def test_rank_pattern_key_selecting_no_target(no_loading, tmp_path):
    path = rank_pattern_file(tmp_path, '{"query": 4, "nope": 2}')
    assert one_line([f"method.rank_pattern={path}"]).startswith(
        f"method.rank_pattern={path!r} key 'nope' selects none of the 12 targets")
    assert one_line(["++method.rank_pattern={key: 2}"]).startswith(  # key is not a target: [query, value] are
        "method.rank_pattern key 'key' selects none of the 12 targets")


def test_rank_above_width_and_unknown_target(no_loading):
    assert one_line(["method.rank=400"]) == ("method.rank=400 is not valid; it must be <= min(in, out)=384 of target "
                                             "bert.encoder.layer.0.attention.self.query")
    message = one_line(["method.targets=[query,nope]"])
    assert message.startswith("method.targets entry 'nope' matches no linear layer; valid suffixes: ") and \
        "value" in message
    assert "q_proj" in one_line(["model=llama_1b_shape", "task=synthetic", "method.targets=[query]"])


def test_said_needs_more_dimensions_than_targets(no_loading):
    assert one_line(["method=subspace", "method.said=true", "method.dim=12"]).startswith(
        "method.dim=12 is not valid with method.said=true; it must exceed the number of target matrices (12)")


def test_a_good_rank_pattern_and_every_model_validate_without_loading(no_loading, tmp_path):
    path = rank_pattern_file(tmp_path, '{"query": 4}')
    validate(composed([f"method.rank_pattern={path}"]))
    for model in sorted(p.stem for p in (CONF / "model").glob("*.yaml")):  # Hub ids not cached here: left to the load
        validate(composed([f"model={model}"]))


def test_an_unreadable_model_folder_is_left_to_the_load(no_loading, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    validate(composed([f"model.path={tmp_path}"]))  # the load says `model.path=...: is not a valid JSON file`
    validate(composed(["model.path=/no/such/folder"]))


def test_model_rules_are_fast_for_the_default_model():
    cfg = composed([])
    check_model_rules(cfg)  # the first call imports the model's transformers module, which the load needs anyway
    t0 = time.perf_counter()
    validate(cfg)
    assert time.perf_counter() - t0 < 1.0


# --- defaults in one place ------------------------------------------------------------------------------------------

def test_option_reads_the_config_else_the_table_default():
    cfg = composed([])
    assert option(cfg, "method.rank") == 8 and option(cfg, "method.dora") is False
    assert option(composed(["method=dora"]), "method.dora") is True
    assert option(cfg, "trainer.cuda_graph") == "auto" and option(cfg, "task.objective") == "classification"
    with pytest.raises(KeyError):
        option(cfg, "method.nope")
    assert option(cfg, "method.dim") is None and option(composed(["method=full"]), "method.rank") is None  # not theirs
    cfg = composed(["method=subspace"])
    OmegaConf.set_struct(cfg, False)
    del cfg.method["dim"]
    with pytest.raises(ConfigError, match=r"^method\.dim is missing; it must be an integer > 0$"):
        option(cfg, "method.dim")


def test_run_hash_tables_agree_with_the_defaults():
    """lowrank.rundir.layout leaves a key out of the run's hash where its value means what its absence meant."""
    assert all(RULES[key].default is None for key in NULL_AS_ABSENT)
    assert all(RULES[key].default == default for key, default in DEFAULT_AS_ABSENT.items())


# --- every config key is ruled and read -----------------------------------------------------------------------------

def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compositions() -> list[list[str]]:
    """The default config, each option of each group alone, and each experiment with each group choice it sweeps."""
    combos = [[]] + [[f"{g}={o}"] for g in ("budget", "logger", "method", "model", "target_set", "task", "trainer")
                     for o in group_options(g)]
    for experiment in group_options("experiment"):
        swept = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml").get("hydra", {}).get("sweeper", {})
        params = swept.get("params", {}) if swept else {}
        combos.append([f"experiment={experiment}"])
        for group in set(params) & {"method", "target_set", "task", "model"}:
            combos += [[f"experiment={experiment}", f"{group}={o}"] for o in str(params[group]).split(",")]
    return combos


def leaves(node, prefix="") -> list[str]:
    out = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in RULES:  # model.shape and rank_pattern mappings are one value
            out += leaves(value, dotted + ".")
        else:
            out.append(dotted)
    return out


def test_every_config_key_is_ruled_or_interpolated():
    keys = set()
    for overrides in compositions():
        keys |= set(leaves(OmegaConf.to_container(composed(overrides), resolve=False)))
    unruled = sorted(k for k in keys if k not in RULES
                     and not any(k == i or k.startswith(i + ".") for i in INTERPOLATED))
    assert not unruled, f"config keys without a rule in lowrank.config.RULES: {unruled}"
    assert {"method.dora", "method.relora_warmup", "method.dim", "model.shape", "task.ood_tokens"} <= keys


def test_every_ruled_key_is_read():
    """A static scan: each key's last part as an attribute or string, or its dotted form, in the library, analysis or
    the entry points (lowrank/config.py, which holds the table, apart)."""
    sources = [p for d in ("lowrank", "analysis", "experiments") for p in (ROOT / d).rglob("*.py")
               if p != ROOT / "lowrank" / "config.py"]
    text = "\n".join(p.read_text() for p in sources)
    unread = [key for key in RULES
              if key not in text and not re.search(rf"[.\"']{re.escape(key.split('.')[-1])}\b", text)]
    assert not unread, f"ruled keys that no code reads (dead options): {unread}"


def test_every_conf_option_validates():
    """Alone, with the defaults of the other groups; target sets are SmolLM2's (experiment=lm_targets, whose jobs
    tests/test_experiments.py validates, as every sweep's)."""
    for overrides in compositions():
        if not any(o.startswith(("experiment=", "target_set=")) for o in overrides) or overrides == ["target_set=none"]:
            validate(composed(overrides))


def test_compile_auto_hashes_as_the_old_default():
    """trainer.compile's default became `auto`: a default run hashes as one made when the default was false, so
    re-launched sweeps find their directories; compile=true stays its own configuration."""
    from omegaconf import OmegaConf
    from lowrank.rundir.layout import AS_HASHED, config_hash
    assert all(RULES[key].default in spellings for key, spellings in AS_HASHED.items())
    cfg = OmegaConf.to_container(composed([]), resolve=True)
    assert cfg["trainer"]["compile"] == "auto" and cfg["trainer"]["chunked_loss"] == "auto"
    before = json_copy(cfg)
    before["trainer"]["compile"] = False
    del before["trainer"]["chunked_loss"]  # a key runs made before did not have
    assert config_hash(cfg) == config_hash(before)
    cfg["trainer"]["compile"] = True
    assert config_hash(cfg) != config_hash(before)


def json_copy(d: dict) -> dict:
    import json
    return json.loads(json.dumps(d))
