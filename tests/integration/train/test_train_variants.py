"""The method variants through the trainer: each run completes, writes the ΔW its method defines, and the analysis
reads it; a LoRA run's rank dynamics end at the spectrum of its final ΔW."""
import csv
import math


from lowrank.linalg import spectra
from analysis.runs import collect_runs
from tests.integration.train.test_train import read_delta


def test_variants_train_and_are_analysed(tiny_run, tmp_path):
    runs = {}
    for name, overrides in {"lora": ["method=lora", "method.rank=4"],
                            "pissa": ["method=pissa", "method.rank=4"],
                            "dora": ["method=dora", "method.rank=4"],
                            "loraplus": ["method=loraplus", "method.rank=4"],
                            "subspace": ["method=subspace", "method.dim=64"]}.items():
        metrics, run_dir = tiny_run(*overrides, "trainer.eval_interval=2", "trainer.max_steps=4", name=name)
        assert metrics["status"] == "complete", name
        runs[name] = (metrics, run_dir)

    assert runs["subspace"][0]["adapted_params"] == 64  # θ_d only; the head trains too
    assert runs["dora"][0]["adapted_params"] == 12 * (4 * 768 + 384)  # A, B and the magnitude of 12 matrices
    tensors, meta = read_delta(runs["dora"][1])
    assert meta["delta_form"] == "dense" and all(k.endswith(".delta") for k in tensors)
    tensors, meta = read_delta(runs["pissa"][1])
    assert all(t.shape[0] == 8 for k, t in tensors.items() if k.endswith(".lora_A"))  # [A; A0]: 2r rows
    tensors, meta = read_delta(runs["subspace"][1])
    assert meta["method"] == "subspace" and all(k.endswith(".delta") for k in tensors)

    analysed, table, skipped = collect_runs([tmp_path])
    assert not skipped and len(analysed) == len(runs)
    assert set(table["method.name"]) == {"lora", "subspace"}

    # dynamics of the plain LoRA run: snapshots at steps 2 and 4, the last one the final ΔW's spectrum
    rows = list(csv.DictReader(open(runs["lora"][1] / "dynamics.csv")))
    assert sorted({int(r["step"]) for r in rows}) == [2, 4]
    tensors, meta = read_delta(runs["lora"][1])
    scaling = float(meta["scaling"])
    for r in (r for r in rows if r["step"] == "4"):
        S = spectra.svdvals_factored(tensors[r["module"] + ".lora_B"], tensors[r["module"] + ".lora_A"], scaling)
        assert math.isclose(float(r["fro_norm"]), spectra.fro_norm(S), rel_tol=1e-9)
        assert int(r["r90"]) == spectra.energy_rank(S, 0.9)
        assert 0.0 <= float(r["phi_1"]) <= 1.0 + 1e-9  # against step 2's directions
    full_rows = list(csv.DictReader(open(runs["subspace"][1] / "dynamics.csv")))
    assert full_rows and all(float(r["fro_norm"]) > 0 for r in full_rows)
