"""experiments.export_peft: a LoRA run of the trainer (with a per-module rank map and rsLoRA scaling, so that ranks and
scalings differ between modules) loads in PEFT with the run's outputs on real text; and the trainer's rank map
gives the factors and delta metadata it says."""
import json

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from analysis.runs import load_run
from experiments.export_peft import export
from experiments.import_delta import import_adapter
from lowrank.adapters.lora import inject_lora, lora_layers
from lowrank.data.models import load_model
from lowrank.rundir.layout import TRAINED_FILE
from lowrank.rundir.peft import BASE_FILE
from omegaconf import OmegaConf

from tests.unit.experiments.test_import_delta import MINILM, TEXT

PATTERN = {"layer.1.attention.self.query": 2, "layer.0.attention.self.value": 6}  # default rank 8


def trained_model(run_dir):
    """The model a run directory describes, rebuilt by lowrank: W0, LoRA layers with the stored factors, the head."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    model, tok, head = load_model(cfg.model, cfg.task.num_labels)
    m = cfg.method
    inject_lora(model, list(m.targets), m.rank, m.alpha, m.dropout, m.scaling, m.init, m.rank_pattern)
    with safe_open(run_dir / "delta_w.safetensors", "pt") as f:
        for name, layer in lora_layers(model).items():
            layer.lora_A.data.copy_(f.get_tensor(f"{name}.lora_A"))
            layer.lora_B.data.copy_(f.get_tensor(f"{name}.lora_B"))
    with safe_open(run_dir / TRAINED_FILE, "pt") as f:
        model.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=False)
    return model.eval(), tok


def test_c_an_exported_run_loads_in_peft_with_the_same_outputs(tmp_path, tiny_run):
    (tmp_path / "pattern.json").write_text(json.dumps(PATTERN))
    metrics, run_dir = tiny_run(f"method.rank_pattern={tmp_path / 'pattern.json'}", "method.scaling=rslora",
                                "trainer.lr=1e-2")
    run = load_run(run_dir, "run")  # the analysis reads it: ranks as the pattern says
    ranks = {n: run.delta(n).A.shape[0] for n in run.names}
    assert (ranks["bert.encoder.layer.1.attention.self.query"] == 2
            and ranks["bert.encoder.layer.0.attention.self.value"] == 6)
    assert (sorted(set(ranks.values())) == [2, 6, 8]
            and run.scaling("bert.encoder.layer.1.attention.self.query") == 16 / 2 ** 0.5)  # alpha 16
    assert run.meta["module_rank"] == {"bert.encoder.layer.1.attention.self.query": 2,
                                       "bert.encoder.layer.0.attention.self.value": 6}

    export(run_dir, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["r"] == 8 and config["modules_to_save"] == ["classifier"]
    assert config["alpha_pattern"] == {}  # lowrank's alpha/√r is PEFT's: nothing to override
    ours, tok = trained_model(run_dir)
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"  # not a path in this venv
    local = json.loads((tmp_path / "adapter" / BASE_FILE).read_text())["local_path"]
    assert local == str(MINILM)  # the exact folder, beside adapter_config.json (the Hub is unreachable here)
    base = AutoModelForSequenceClassification.from_pretrained(local, num_labels=2)
    peft = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert {n: m.r["default"] for n, m in peft.named_modules() if hasattr(m, "lora_A")} == {
        f"base_model.model.{n}": r for n, r in ranks.items()}
    batch = tok(TEXT, padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = ours(**batch).logits, peft(**batch).logits
        with peft.disable_adapter():
            plain = peft(**batch).logits
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - plain).abs().max().item() > 1e-3  # the adapter and head change the outputs: the test has teeth

    # imported again without --base: the base is the local folder the adapter records
    again = load_run(import_adapter(str(tmp_path / "adapter"), tmp_path / "runs" / "imp" / "a", log=print), "imp/a")
    assert again.config["imported"]["base"] == str(MINILM) and len(again.names) == len(ranks)

