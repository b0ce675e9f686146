"""A full fine-tune rebuilt from its run directory (W0 + ΔW + trained.safetensors) scores what the trained model
scored; a planted rank-3 ΔW is truncated to models whose logits at r ≥ 3 are the whole ΔW's, r_f90 ≤ 3; the
command writes its tables, and a run written before trained.safetensors existed is skipped in one line."""
import pandas as pd
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from analysis.functional_rank import kept_share, smallest_rank
from analysis.runs import load_run
from analysis.truncate import Spectra, main, trained_tensors
from lowrank.data.rebuild import RebuiltModel
from lowrank.rundir.atomic import write_safetensors
from lowrank.rundir.layout import DELTA_FILE, TRAINED_FILE, load_metrics, write_metrics
from tests.unit.experiments.test_import_delta import TEXT


def test_a_rebuilt_full_fine_tune_scores_as_trained_and_a_planted_rank_3_delta_is_whole_from_r_3(tmp_path, tiny_run):
    metrics, run_dir = tiny_run("method=full", "trainer.lr=1e-4")
    assert metrics["trained_file"] == TRAINED_FILE
    run = load_run(run_dir, "run")
    trained = trained_tensors(run)
    assert "classifier.weight" in trained and "bert.embeddings.word_embeddings.weight" in trained
    assert not any(f"{n}.weight" in trained for n in run.names)  # the targets' change is ΔW's, stored once
    weights = {n: run.base_weight(n) + run.delta(n) for n in run.names}
    model = RebuiltModel(run.config, trained)
    model.set_targets(weights)
    assert abs(model.evaluate()["loss"] - metrics["eval_loss"]) < 1e-5  # the trainer's own final evaluation
    without = RebuiltModel(run.config, {})
    without.set_targets(weights)
    assert abs(without.evaluate()["loss"] - metrics["eval_loss"]) > 1e-3  # the other trained tensors matter

    with safe_open(run_dir / DELTA_FILE, "pt") as f:
        meta = f.metadata()
    g = torch.Generator().manual_seed(0)
    planted = {}
    for n in run.names:
        w0 = run.base_weight(n)
        U = torch.linalg.qr(torch.randn(w0.shape[0], 3, generator=g))[0]
        V = torch.linalg.qr(torch.randn(w0.shape[1], 3, generator=g))[0]
        # a few % of W0: large, yet far from chaotic attention
        planted[f"{n}.delta"] = (U * torch.tensor([3.0, 2.0, 1.0]) * w0.norm() / 100) @ V.T
    write_safetensors(run_dir / DELTA_FILE, planted, {k: v for k, v in meta.items() if k != "tensor_sha256"})
    spectra = Spectra(load_run(run_dir, "run"), [1, 2, 3, 4, 8], [0.9], seed=0, device="cpu")
    batch = model.objective.tokenizer(TEXT, padding=True, return_tensors="pt")

    def logits(kind, value):
        model.set_targets(spectra.point(kind, value)[0])
        with torch.no_grad():
            return model.model(**batch).logits
    whole = logits("full", None)
    assert all((logits("truncated", r) - whole).abs().max() < 1e-4 for r in (3, 4, 8))
    assert (logits("truncated", 2) - whole).abs().max() > 1e-3 and spectra.point("truncated", 3)[1] > 0.999999
    losses = {r: (model.set_targets(spectra.point("truncated", r)[0]), model.evaluate()["loss"])[1]
              for r in (1, 2, 3, 4)}
    model.set_targets(spectra.point("w0", 0)[0])
    w0_loss = model.evaluate()["loss"]
    model.set_targets(spectra.point("full", None)[0])
    assert smallest_rank(list(losses), kept_share(list(losses.values()), w0_loss, model.evaluate()["loss"])) <= 3


def test_the_command_writes_its_tables_and_skips_a_run_without_its_trained_tensors(tmp_path, tiny_run):
    _, run_dir = tiny_run("method=full", name="new")
    _, old_dir = tiny_run("method=full", "seed=1", name="old")
    (old_dir / TRAINED_FILE).unlink()  # as a run written before trained.safetensors existed
    old = load_metrics(old_dir)
    old.pop("trained_file")
    write_metrics(old_dir, {k: v for k, v in old.items() if k not in ("config_hash", "config_sha256")},
                  OmegaConf.to_container(OmegaConf.load(old_dir / ".hydra" / "config.yaml")))
    main([str(tmp_path), "--ranks", "1,4", "--shares", "0.9", "--out", str(tmp_path / "out"), "--no-figures"])
    table = pd.read_csv(tmp_path / "out" / "tables" / "truncation.csv")
    assert list(table.kind) == ["w0", "truncated", "truncated", "energy", "random", "random", "full"]
    assert set(table.run) == {"new"} and (table.others_as_trained > 0).all()
    functional = pd.read_csv(tmp_path / "out" / "tables" / "functional_rank.csv")
    assert list(functional.level) == ["run", "setup"]
    report = (tmp_path / "out" / "truncation.md").read_text()
    assert "- old: written before runs kept trained.safetensors" in report
    # --redraw: nothing evaluated again, the same points, now with the figure
    main([str(tmp_path), "--ranks", "1,4", "--shares", "0.9", "--out", str(tmp_path / "out"), "--redraw"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out" / "tables" / "truncation.csv"), table)
    assert (tmp_path / "out" / "figures" / "truncation.png").is_file()
