"""`python -m analysis.report` on a synthetic runs root written in the run-directory format by hand (ΔW and W0
through lowrank.rundir.atomic.write_safetensors, so they carry content hashes as the trainer's do): tables are written,
broken runs are named as skipped, and the numbers equal the math functions' answers (Table 7's, for a run planted
so that they are known by hand)."""
import contextlib
import io
import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors import safe_open

from analysis import amplification as amp
from lowrank.linalg import spectra
from lowrank.linalg.heavy_tail import esd_metrics
from analysis.report import main, select_pairs
from analysis.runs import collect_runs
from lowrank.linalg.subspace import factor_bases, phi_grid, random_basis
from lowrank.rundir import layout as rundir
from lowrank.rundir.atomic import write_safetensors
from lowrank.rundir.integrity import DIGEST_KEY

LAYERS = 2
SHAPES = {"attention.self.query": (16, 16), "attention.self.value": (16, 16),
          "attention.output.dense": (16, 16), "intermediate.dense": (24, 16), "output.dense": (16, 24)}
TARGETS = ["query", "value"]


def module(layer, kind):
    return f"bert.encoder.layer.{layer}.{kind}"


def write_base(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    path = root / "base_weights" / "tiny-0123456789.safetensors"
    path.parent.mkdir(parents=True)
    w0 = {f"{module(i, k)}.weight": torch.randn(*s, generator=g) for i in range(LAYERS) for k, s in SHAPES.items()}
    write_safetensors(path, w0, {"base_model": "tiny"})
    return path


def write_run(root: Path, base: Path, name: str, method: str, seed: int, rank: int | None = None) -> Path:
    """A run directory as experiments.train leaves it: unresolved Hydra config, metrics.json, ΔW file."""
    run = root / "2026-01-01" / name
    (run / ".hydra").mkdir(parents=True)
    cfg = {"model": {"name": "tiny", "path": "nowhere", "attention_targets": TARGETS},
           "task": {"name": "fine_foods", "train_size": None},
           "trainer": {"max_steps": 10, "lr": 1e-3},
           "method": {"name": method, "targets": "all-linear"}, "seed": seed, "runs_root": str(root)}
    if method == "lora":
        cfg["method"] = {"name": "lora", "rank": rank, "alpha": 2 * rank, "scaling": "standard",
                         "targets": "${model.attention_targets}"}  # Hydra keeps interpolations unresolved
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    g = torch.Generator().manual_seed(100 * seed + (rank or 0))
    tensors, names = {}, []
    for i in range(LAYERS):
        for kind, (out, inp) in SHAPES.items():
            if method == "lora" and kind.split(".")[-1] not in TARGETS:
                continue
            names.append(module(i, kind))
            if method == "lora":
                tensors[f"{names[-1]}.lora_A"] = torch.randn(rank, inp, generator=g)
                tensors[f"{names[-1]}.lora_B"] = 0.1 * torch.randn(out, rank, generator=g)
            else:
                tensors[f"{names[-1]}.delta"] = 0.01 * torch.randn(out, inp, generator=g)
    meta = {"method": method, "scaling": json.dumps(2.0 if method == "lora" else 1.0), "rank": json.dumps(rank),
            "alpha": json.dumps(2 * rank if rank else None), "targets": json.dumps(names),
            "base_model": "nowhere", "base_model_name": "tiny", "base_weights": os.path.relpath(base, run)}
    write_safetensors(run / "delta_w.safetensors", tensors, meta)
    write_metrics(run, {"status": "complete", "eval_accuracy": 0.5 + seed / 10, "eval_history": [{"step": 10}],
                        "wall_seconds": 1.0})
    return run


def write_metrics(run: Path, metrics: dict) -> None:
    """metrics.json as the trainer writes it: with the hash of the run's config and a content hash."""
    config = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"), resolve=True)
    rundir.write_metrics(run, metrics, config)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    base = write_base(root)
    write_run(root, base, "lora_r2_s0", "lora", 0, 2)
    write_run(root, base, "lora_r4_s0", "lora", 0, 4)
    write_run(root, base, "lora_r2_s1", "lora", 1, 2)
    write_run(root, base, "full_s0", "full", 0)
    truncated = write_run(root, base, "lora_r4_s1_truncated", "lora", 1, 4) / "delta_w.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (write_run(root, base, "full_s1_no_config", "full", 1) / ".hydra" / "config.yaml").unlink()
    running = write_run(root, base, "lora_r8_s0_running", "lora", 0, 8)
    (running / "metrics.json").unlink()
    wandb = root / "2026-01-01" / "lora_r2_s0" / "wandb" / "run-x"  # never searched for runs
    wandb.mkdir(parents=True)
    (wandb / "metrics.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def report(runs_root, tmp_path_factory):
    """`python -m analysis.report RUNS_ROOT --out OUT --max-dim 8` as this process's analysis.report.main (it was a
    fresh process; the command itself: tests/integration/test_entry_points.py): (OUT, its tables, its stdout)."""
    out = tmp_path_factory.mktemp("out")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main([str(runs_root), "--out", str(out), "--max-dim", "8"])
    tables = {p.stem: pd.read_csv(p) for p in (out / "tables").glob("*.csv")}
    return out, tables, printed.getvalue()


def test_collect_runs_lists_skipped_with_reasons(runs_root):
    runs, table, skipped = collect_runs([runs_root])
    assert sorted(table.run_id) == ["2026-01-01/full_s0", "2026-01-01/lora_r2_s0", "2026-01-01/lora_r2_s1",
                                    "2026-01-01/lora_r4_s0"]
    reasons = dict(skipped)
    assert "truncated or corrupt" in reasons["2026-01-01/lora_r4_s1_truncated"]
    assert "config.yaml missing" in reasons["2026-01-01/full_s1_no_config"]
    assert "metrics.json missing" in reasons["2026-01-01/lora_r8_s0_running"]
    assert len(skipped) == 3
    row = table.set_index("run_id").loc["2026-01-01/lora_r2_s0"]
    assert row["method.targets"] == '["query", "value"]' and row["eval_accuracy"] == 0.5
    assert "eval_history" not in table


def test_report_writes_every_table_and_names_skipped_runs(report):
    out, tables, stdout = report
    assert set(tables) == {"runs", "setups", "spectrum", "singular_values", "subspace", "amplification", "rank_advice",
                           "dynamics", "lm_findings", "summary", "loss_curves"}
    assert tables["lm_findings"].empty and "Generative findings" not in (out / "report.md").read_text()  # classifiers
    text = (out / "report.md").read_text()
    for name in ["lora_r4_s1_truncated", "full_s1_no_config", "lora_r8_s0_running"]:
        assert name in text
    assert "Runs analysed (4)" in text and "Runs skipped (3)" in text
    assert "total:" in stdout
    spec = tables["spectrum"]
    assert list(spec.columns[:6]) == ["run_id", "method", "rank", "seed", "layer", "matrix_type"]
    for col in ["r50", "r90", "r99", "effective_rank", "stable_rank", "fro_norm", "rel_norm", "intruders"]:
        assert col in spec
    # 3 LoRA runs × 2 layers × {query, value} + 1 full run × 2 layers × 5 matrices
    assert len(spec) == 3 * 4 + 10
    assert set(spec.matrix_type) == {"query", "value", "attention.output.dense", "intermediate.dense",
                                     "output.dense"}


def test_spectrum_numbers_equal_the_math(runs_root, report):
    _, tables, _ = report
    runs = {r.run_id: r for r in collect_runs([runs_root])[0]}
    spec = tables["spectrum"].set_index(["run_id", "layer", "matrix_type"])
    for run_id, name, kind in [("2026-01-01/lora_r4_s0", module(1, "attention.self.value"), "value"),
                               ("2026-01-01/full_s0", module(0, "intermediate.dense"), "intermediate.dense")]:
        run, layer = runs[run_id], int(name.split(".")[3])
        d, w0 = run.delta(name), run.base_weight(name)
        dense = d.dense() if run.method == "lora" else d
        S = spectra.svdvals_dense(dense, device=torch.device("cpu"))
        row = spec.loc[(run_id, layer, kind)]
        for p in (0.5, 0.9, 0.99):
            assert row[f"r{round(p * 100)}"] == spectra.energy_rank(S, p)
        # a dense SVD of B·A has rounding-noise values past the rank, which the factored path never sees
        assert row.effective_rank == pytest.approx(spectra.effective_rank(S[S > 1e-6 * S[0]]), rel=1e-5)
        assert row.stable_rank == pytest.approx(spectra.stable_rank(S), rel=1e-5)
        assert row.fro_norm == pytest.approx(torch.linalg.matrix_norm(dense.double()).item(), rel=1e-6)
        assert row.rel_norm == pytest.approx(spectra.relative_norm(row.fro_norm, w0), rel=1e-6)
        assert row.intruders == amp.intruder_dimensions(w0, dense, k=10, eps=0.5)
    sv = tables["singular_values"]
    assert len(sv[sv.run_id == "2026-01-01/lora_r4_s0"]) == 4 * 4    # r values per LoRA matrix
    assert len(sv[sv.run_id == "2026-01-01/full_s0"]) == 2 * (16 * 3 + 16 + 16)


SPECTRUM_BEFORE = Path(__file__).parent / "data" / "spectrum_8ed7ee9.csv"  # this root's report before the new columns


def test_new_spectrum_columns_leave_the_existing_ones_unchanged(report):
    before = pd.read_csv(SPECTRUM_BEFORE)
    after = report[1]["spectrum"]
    assert list(after.columns[:len(before.columns)]) == list(before.columns)
    pd.testing.assert_frame_equal(after[before.columns], before, rtol=1e-6, atol=1e-12)


def test_update_and_drift_columns_equal_their_definitions(runs_root, report):
    """Each new spectrum.csv column against its definition, computed here from dense SVDs of W0 and W_ft."""
    runs = {r.run_id: r for r in collect_runs([runs_root])[0]}
    spec = report[1]["spectrum"].set_index(["run_id", "layer", "matrix_type"])
    for run_id, name, kind in [("2026-01-01/lora_r4_s0", module(1, "attention.self.value"), "value"),
                               ("2026-01-01/full_s0", module(0, "intermediate.dense"), "intermediate.dense")]:
        run, row = runs[run_id], spec.loc[(run_id, int(name.split(".")[3]), kind)]
        d, w0 = run.delta(name), run.base_weight(name).double()
        dense = (d.dense() if run.method == "lora" else d).double()
        a = dense.abs().flatten()
        assert row["share_above_1e-3max"] == pytest.approx((a > 1e-3 * a.max()).double().mean().item(), rel=1e-6)
        top = a.sort(descending=True).values[:math.ceil(0.01 * len(a))]
        assert row.top1pct_energy == pytest.approx(((top ** 2).sum() / (a ** 2).sum()).item(), rel=1e-6)
        U0, S0, Vh0 = torch.linalg.svd(w0, full_matrices=False)
        U1, S1, Vh1 = torch.linalg.svd(w0 + dense, full_matrices=False)
        for k in (1, 8, 64):
            q = min(k, *w0.shape)  # capped at the matrix's rank
            assert row[f"cos2_out_k{k}"] == pytest.approx((U0[:, :q].T @ U1[:, :q]).square().sum().item() / q, rel=1e-6)
            assert row[f"cos2_in_k{k}"] == pytest.approx((Vh0[:q] @ Vh1[:q].T).square().sum().item() / q, rel=1e-6)
        assert row.sigma1_drift == pytest.approx((S1[0] / S0[0]).item(), rel=1e-6)
        assert row.sigma_top8_drift == pytest.approx((S1[:8] / S0[:8]).mean().item(), rel=1e-6)
        for prefix, s in (("dw_", torch.linalg.svdvals(dense)), ("wft_", S1)):
            for col, value in esd_metrics(s).items():
                assert row[prefix + col] == pytest.approx(value, rel=1e-6), prefix + col


def test_pairs_and_subspace_grid(runs_root, report):
    _, tables, _ = report
    sub = tables["subspace"]
    kinds = sub.groupby("kind")[["run_a", "run_b"]].apply(lambda g: sorted(set(map(tuple, g.values))))
    assert kinds["rank"] == [("2026-01-01/lora_r2_s0", "2026-01-01/lora_r4_s0")]
    assert kinds["seed"] == [("2026-01-01/lora_r2_s0", "2026-01-01/lora_r2_s1")]
    assert kinds["lora_vs_full"] == [(f"2026-01-01/{r}", "2026-01-01/full_s0")
                                     for r in ["lora_r2_s0", "lora_r2_s1", "lora_r4_s0"]]
    # LoRA grids stop at the ranks; full fine-tuning at --max-dim 8
    rank = sub[sub.kind == "rank"]
    assert rank.i.max() == 2 and rank.j.max() == 4 and len(rank) == 4 * 2 * 2 * 4
    assert sub[sub.kind == "lora_vs_full"].j.max() == 8
    # φ on the input side from A's right singular vectors, as the paper
    runs = {r.run_id: r for r in collect_runs([runs_root])[0]}
    name = module(0, "attention.self.query")
    a, b = runs["2026-01-01/lora_r2_s0"].delta(name), runs["2026-01-01/lora_r4_s0"].delta(name)
    expected = phi_grid(factor_bases(a.B, a.A)[1], factor_bases(b.B, b.A)[1])
    got = rank[(rank.side == "input") & (rank.layer == 0) & (rank.matrix_type == "query")].sort_values(["i", "j"])
    assert torch.allclose(torch.tensor(got.phi.values), expected.flatten(), atol=1e-7)
    assert (got.random_baseline.values == [max(i, j) / 16 for i, j in zip(got.i, got.j)]).all()
    assert set(sub.basis[sub.kind == "lora_vs_full"]) == {"delta"} and set(rank.basis) == {"factor"}


def test_amplification_rows_are_one_per_lora_rank(report):
    _, tables, _ = report
    amps = tables["amplification"]
    full = amps[amps.method == "full"]
    assert sorted(full.r.unique()) == [2, 4]                       # the LoRA ranks found
    assert (amps[amps.method == "lora"].r == amps[amps.method == "lora"]["rank"]).all()


def replace_tensors(path: Path, tensors: dict) -> None:
    """Re-write a safetensors file with some tensors replaced, through write_safetensors (fresh content hashes)."""
    with safe_open(path, "pt") as f:
        old = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in f.metadata().items() if k != DIGEST_KEY}
    write_safetensors(path, old | tensors, meta)


def test_amplification_of_a_planted_run_is_known_by_hand(tmp_path):
    """The report on a run built so that its Table 7 row is known by hand: W0 = Σ σ_i u_i v_iᵀ with σ = 16, ..., 1
    and a rank-1 LoRA ΔW = c · u_16 v_16ᵀ along W0's weakest pair. Then ‖UᵀW0V‖_F = σ_16 = 1 for ΔW's
    directions, σ_1 = 16 for W0's, ‖ΔW‖_F = c, the amplification c / σ_16,
    and φ(ΔW, W0, 1, 1) = 0 on both sides."""
    c, name = 3.0, module(1, "attention.self.query")
    sigma = torch.arange(16, 0, -1, dtype=torch.float64)
    U, V = (random_basis(16, 16, torch.Generator().manual_seed(seed)) for seed in (1, 2))
    w0 = (U @ torch.diag(sigma) @ V.mT).float()
    root = tmp_path / "runs"
    base = write_base(root)
    replace_tensors(base, {f"{name}.weight": w0})
    run = write_run(root, base, "lora_r1_planted", "lora", 0, 1)
    replace_tensors(run / "delta_w.safetensors", {f"{name}.lora_B": (c / 2.0 * U[:, 15:]).float(),  # scaling 2
                                                  f"{name}.lora_A": V[:, 15:].mT.float()})
    main([str(root), "--out", str(tmp_path / "out"), "--no-figures", "--threads", "1"])
    amps = pd.read_csv(tmp_path / "out" / "tables" / "amplification.csv")
    row = amps[(amps.layer == 1) & (amps.matrix_type == "query")].iloc[0]
    assert row.r == 1
    want = {"proj_delta": 1.0, "delta_fro": c, "delta_top_fro": c, "amplification": c / 1.0, "proj_w": 16.0,
            "w_fro": math.sqrt((sigma ** 2).sum().item()), "random_phi_out": 1 / 16, "random_phi_in": 1 / 16}
    for k, v in want.items():  # W0 and the factors are stored in fp32: ~1e-7 of σ_1
        assert row[k] == pytest.approx(v, rel=1e-5), k
    assert row.phi_out == pytest.approx(0.0, abs=1e-9) and row.phi_in == pytest.approx(0.0, abs=1e-9)
    g = torch.Generator().manual_seed(0)  # the random directions: seed 0, output side drawn first
    u, v = random_basis(16, 1, g), random_basis(16, 1, g)
    assert row.proj_random == pytest.approx(abs((u.mT @ w0.double() @ v).item()), rel=1e-5)
    assert 0 < row.proj_random <= 16.0    # |uᵀWv| ≤ σ_1 for unit u, v


def test_report_is_deterministic(runs_root, report, tmp_path):
    out, _, _ = report
    main([str(runs_root), "--out", str(tmp_path), "--max-dim", "8"])
    for p in (out / "tables").glob("*.csv"):
        assert (tmp_path / "tables" / p.name).read_bytes() == p.read_bytes(), p.name


def test_select_pairs_falls_back_to_any_full_run():
    table = pd.DataFrame([
        {"run_id": "a", "setup": "S1", "method.name": "lora", "method.rank": 8, "method.targets": "q", "seed": 3},
        {"run_id": "b", "setup": "S1", "method.name": "full", "method.rank": None, "method.targets": "all", "seed": 0},
        {"run_id": "c", "setup": "S2", "method.name": "lora", "method.rank": 8, "method.targets": "q", "seed": 0},
    ])
    pairs = select_pairs(table)
    assert pairs.values.tolist() == [["a", "b", "lora_vs_full"]]   # c is another setup: no pair


def test_report_lists_its_setups_and_the_runs_table_names_them(report):
    out, tables, _ = report
    text = (out / "report.md").read_text()
    assert "## Setups (1)" in text
    assert list(tables["runs"].columns[:2]) == ["run_id", "setup"] and set(tables["runs"].setup) == {"S1"}
    assert tables["setups"].n_runs.tolist() == [4]
    assert "## Amplification" in text and "Σ‖ΔW‖/Σ‖UᵀWV‖" in text


def test_randomized_path_for_large_matrices(runs_root, report, tmp_path):
    """Matrices wider than --exact-max-dim get a randomised top-k SVD: ranks it can resolve agree with the
    exact report, the rest (effective rank, intruders) are left empty rather than guessed."""
    _, tables, _ = report
    main([str(runs_root), "--out", str(tmp_path), "--max-dim", "8", "--exact-max-dim", "12", "--topk", "12"])
    approx = pd.read_csv(tmp_path / "tables" / "spectrum.csv").set_index(["run_id", "layer", "matrix_type"])
    exact = tables["spectrum"].set_index(["run_id", "layer", "matrix_type"])
    full = approx.loc["2026-01-01/full_s0"]
    assert full.effective_rank.isna().all() and full.intruders.isna().all()
    assert full.dw_alpha.isna().all() and full.wft_alpha.isna().all() and full.cos2_out_k8.isna().all()
    assert full.top1pct_energy.values == pytest.approx(exact.loc["2026-01-01/full_s0"].top1pct_energy.values, rel=1e-6)
    assert full.fro_norm.values == pytest.approx(exact.loc["2026-01-01/full_s0"].fro_norm.values, rel=1e-6)
    resolved = full.r50.notna()
    assert resolved.any()
    assert (full.r50[resolved] == exact.loc["2026-01-01/full_s0"].r50[resolved]).all()
    lora_approx, lora_exact = approx.loc["2026-01-01/lora_r2_s0"], exact.loc["2026-01-01/lora_r2_s0"]
    assert lora_approx.intruders.isna().all() and lora_approx.sigma1_drift.isna().all()  # W0 is truncated too
    cols = ["r50", "r90", "r99", "effective_rank", "stable_rank", "fro_norm", "dw_alpha",  # factored: exact
            "share_above_1e-3max"]
    pd.testing.assert_frame_equal(lora_approx[cols], lora_exact[cols], check_dtype=False)


def test_report_with_nothing_analysable_still_writes(tmp_path):
    root = tmp_path / "runs"
    run = root / "crashed"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\nmethod: {name: full}\n")
    write_metrics(run, {"status": "running"})
    main([str(root), "--out", str(tmp_path / "out")])
    assert "`crashed`: metrics status is 'running'" in (tmp_path / "out" / "report.md").read_text()
    assert {p.name for p in (tmp_path / "out" / "tables").iterdir()} == {
        "runs.csv", "setups.csv", "spectrum.csv", "singular_values.csv", "subspace.csv", "amplification.csv",
        "rank_advice.csv", "dynamics.csv", "lm_findings.csv", "summary.csv", "loss_curves.csv"}
