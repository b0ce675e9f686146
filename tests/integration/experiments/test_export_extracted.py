"""experiments.export_peft --rank/--energy-share: a LoRA extracted from a run's dense ΔW loads in PEFT with the logits
of W0 + ΔW_r (a full fine-tune, whose embeddings, norms and biases go in whole); a LoRA run extracted at its own ranks
is its plain export; --energy-share on an import of planted spectra keeps and records the closed-form shares."""
import json

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from analysis.runs import load_run
from analysis.truncate import trained_tensors
from experiments.export_peft import EXTRACTION_FILE, export, main
from experiments.import_delta import import_pair
from lowrank.data.rebuild import RebuiltModel
from lowrank.linalg.truncation import TopSingular
from tests.integration.experiments.test_export_peft import PATTERN
from tests.unit.experiments.test_import_delta import MINILM, TEXT


def peft_logits(adapter, batch, base=None):
    base = base or AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        return model(**batch)


def test_a_full_fine_tune_extracted_at_rank_8_gives_the_logits_of_w0_plus_its_truncation(tmp_path, tiny_run):
    _, run_dir = tiny_run("method=full", "trainer.lr=1e-3")
    main([str(run_dir), "--out", str(tmp_path / "a"), "--rank", "8", "--evaluate", "--device", "cpu"])
    record = json.loads((tmp_path / "a" / EXTRACTION_FILE).read_text())
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and config["bias"] == "lora_only" and not config["rank_pattern"]
    assert {"classifier", "bert.embeddings.word_embeddings",
            "bert.embeddings.LayerNorm"} <= set(config["modules_to_save"])

    run = load_run(run_dir, "run")
    reference = RebuiltModel(run.config, trained_tensors(run))  # W0 + ΔW_8 by hand, every other tensor as trained
    shares = {}
    for name in run.names:
        top = TopSingular.of_dense(run.delta(name), device="cpu")
        reference.set_targets({name: run.base_weight(name) + top.truncated(8)})
        shares[name] = top.energy_share(8)
    assert {n: (m["rank"], round(m["energy_share"], 9)) for n, m in record["modules"].items()} == {
        n: (8, round(s, 9)) for n, s in shares.items()}
    assert record["left_out"] is None and record["target_biases"] == len(run.names)
    assert 0 < record["total"]["energy_share"] < 0.9  # a full-rank ΔW: rank 8 of 384 keeps a part of it
    assert (set(record["evaluation"]) == {"truncated", "whole"}
            and 0 <= record["evaluation"]["truncated"]["accuracy"] <= 1)
    assert record["evaluation"]["whole"]["loss"] != record["evaluation"]["truncated"]["loss"]

    batch = AutoTokenizer.from_pretrained(MINILM)(TEXT, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference.model(**batch).logits
    got = peft_logits(tmp_path / "a", batch).logits
    assert (got - expected).abs().max().item() <= 1e-4
    for name in run.names:  # the whole ΔW: the truncation is not the fine-tune, so the test has teeth
        reference.set_targets({name: run.base_weight(name) + run.delta(name)})
    with torch.no_grad():
        assert (reference.model(**batch).logits - expected).abs().max().item() > 1e-3


def test_a_lora_run_extracted_at_its_own_ranks_is_its_plain_export(tmp_path, tiny_run):
    """Mixed ranks (a rank map, rsLoRA): --rank 8 keeps every module whole (ranks 2, 6, 8), in rank_pattern and
    alpha_pattern with alpha = r."""
    (tmp_path / "pattern.json").write_text(json.dumps(PATTERN))
    _, run_dir = tiny_run(f"method.rank_pattern={tmp_path / 'pattern.json'}", "method.scaling=rslora",
                          "trainer.lr=1e-2")
    export(run_dir, tmp_path / "plain")
    main([str(run_dir), "--out", str(tmp_path / "extracted"), "--rank", "8", "--device", "cpu"])
    config = json.loads((tmp_path / "extracted" / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["rank_pattern"].values()) == [2, 6]  # layer.1.query, layer.0.value
    assert config["alpha_pattern"] == config["rank_pattern"] and not config["use_rslora"]
    record = json.loads((tmp_path / "extracted" / EXTRACTION_FILE).read_text())
    assert all(abs(m["energy_share"] - 1) < 1e-9 for m in record["modules"].values())
    batch = AutoTokenizer.from_pretrained(MINILM)(TEXT, padding=True, return_tensors="pt")
    plain, extracted = peft_logits(tmp_path / "plain", batch).logits, peft_logits(tmp_path / "extracted", batch).logits
    assert (plain - extracted).abs().max().item() <= 1e-5


SIGMAS = {"encoder.layer.0.attention.self.query": [4.0, 2.0, 1.0],
          "encoder.layer.2.intermediate.dense": [3.0, 3.0, 1.0]}


def test_an_energy_share_keeps_and_records_the_closed_form_shares_of_planted_spectra(tmp_path):
    """σ = 4, 2, 1 (energy 16, 4, 1: 0.9 needs the top 2, 20/21) and 3, 3, 1 (9, 9, 1: the top 2, 18/19); every other
    matrix unchanged (ΔW = 0: one zero direction, share 1). An imported pair: its adapter says what it leaves out."""
    base = load_file(MINILM / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    ft = dict(base)
    for m, sigma in SIGMAS.items():
        w = base[f"{m}.weight"]
        u = torch.linalg.qr(torch.randn(w.shape[0], 3, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(w.shape[1], 3, generator=g, dtype=torch.float64)).Q
        ft[f"{m}.weight"] = (w.double() + (u * torch.tensor(sigma, dtype=torch.float64)) @ v.T).float()
    (tmp_path / "ft").mkdir()
    save_file(ft, tmp_path / "ft" / "model.safetensors")
    run_dir = import_pair(str(MINILM), str(tmp_path / "ft"), tmp_path / "runs" / "imported" / "planted", log=print)
    main([str(run_dir), "--out", str(tmp_path / "a"), "--energy-share", "0.9", "--device", "cpu"])

    record = json.loads((tmp_path / "a" / EXTRACTION_FILE).read_text())
    modules = record["modules"]
    assert {m: modules[m]["rank"] for m in SIGMAS} == dict.fromkeys(SIGMAS, 2)
    assert abs(modules["encoder.layer.0.attention.self.query"]["energy_share"] - 20 / 21) < 1e-5
    assert abs(modules["encoder.layer.2.intermediate.dense"]["energy_share"] - 18 / 19) < 1e-5
    assert all(m["energy_share"] >= 0.9 for m in modules.values())
    assert all((m["rank"], m["energy"], m["energy_share"]) == (1, 0.0, 1.0)
               for n, m in modules.items() if n not in SIGMAS)
    assert abs(record["total"]["energy_share"] - 38 / 40) < 1e-5 and abs(record["total"]["energy"] - 40) < 1e-3
    assert record["left_out"].startswith("imported") and record["modules_to_save"] == []

    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["r"] == 1  # most modules: the zero ΔW's one direction
    batch = AutoTokenizer.from_pretrained(MINILM)(TEXT, padding=True, return_tensors="pt")
    got = peft_logits(tmp_path / "a", batch, AutoModel.from_pretrained(MINILM)).last_hidden_state
    reference = AutoModel.from_pretrained(MINILM).eval()
    run = load_run(run_dir, "planted")
    with torch.no_grad():
        for m in SIGMAS:
            top = TopSingular.of_dense(run.delta(m), device="cpu")
            reference.get_submodule(m).weight.copy_(run.base_weight(m) + top.truncated(2))
        expected = reference(**batch).last_hidden_state
    assert (got - expected).abs().max().item() <= 1e-4
