"""The generative studies' three findings (analysis/lm_findings.py) on hand-made tables whose verdicts are known,
and the command that reads run directories without their ΔW."""
import pandas as pd
from omegaconf import OmegaConf

from analysis import lm_findings as F
from lowrank.rundir.layout import COMPLETE, write_metrics
from tests.conftest import compose_cfg


def _run(method, rank, lr, loss, forgetting, seed=0):
    return {"run_id": f"{method}{rank}-{lr}-{seed}", "method.name": method, "seed": seed, "setup": "S1",
            "method.rank": rank, "method.targets": "all-linear" if rank else None, "trainer.lr": lr,
            "task.objective": "cpt", "eval_loss": loss, "forgetting": forgetting, "eval_loss_base": 3.0}


def _lr_runs(lora16_best=3e-3):
    """full: best lr 1e-4; LoRA r=1: best 1e-3 (ratio 10); LoRA r=16: best `lora16_best` inside its grid."""
    full = {1e-5: 1.4, 3e-5: 1.2, 1e-4: 1.0, 3e-4: 1.3}
    r1 = {3e-4: 1.5, 1e-3: 1.1, 3e-3: 1.2}
    r16 = {lr: (1.05 if lr == lora16_best else 1.3) for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)}
    return pd.DataFrame([_run("full", None, lr, x, 1.5) for lr, x in full.items()]
                        + [_run("lora", 1, lr, x, 1.1) for lr, x in r1.items()]
                        + [_run("lora", 16, lr, x, 1.1) for lr, x in r16.items()]
                        + [_run("lora", 4, 1e-3, 1.2, 1.1)])  # one learning rate: not a curve for the lr finding


def _verdicts(tables):
    return F.findings(tables).set_index("finding").verdict.to_dict()


def test_lr_ratio_holds_near_ten_and_flat_and_not_when_a_rank_strays():
    row = F.lr_ratio(_lr_runs(3e-3))[0]            # ratios 10 and 30: within a half-decade of 10, one step apart
    assert row["verdict"] == "holds" and "LoRA r=1 10" in row["measured"] and "LoRA r=16 30" in row["measured"]
    assert "LoRA r=4" not in row["measured"]
    assert F.lr_ratio(_lr_runs(3e-4))[0]["verdict"] == "does not hold"     # r=16: 3, below 10/3.16
    assert F.lr_ratio(_lr_runs(1e-2))[0]["verdict"] == "undecided"         # r=16's best at its grid's edge


def test_forgetting_compares_with_full_fine_tunings_frontier_at_the_same_loss():
    # forgetting = 3 - loss
    full = [_run("full", None, lr, loss, 3.0 - loss) for lr, loss in ((1e-4, 1.0), (1e-5, 2.0))]
    below = pd.DataFrame(full + [_run("lora", 8, 1e-3, 1.5, 1.2), _run("lora", 8, 3e-3, 1.25, 1.6)])
    row = F.forgetting(below)[0]
    assert row["verdict"] == "holds" and "median -0.2250" in row["measured"] and "lower in 2 of 2" in row["measured"]
    above = pd.DataFrame(full + [_run("lora", 8, 1e-3, 1.5, 1.8)])
    assert F.forgetting(above)[0]["verdict"] == "does not hold"
    outside = pd.DataFrame(full + [_run("lora", 8, 1e-3, 2.5, 0.1)])   # learned less than any full run
    assert F.forgetting(outside)[0]["verdict"] == "undecided"


def test_full_rank_is_ten_times_the_median_lora_rank_or_not():
    runs = pd.DataFrame([_run("full", None, 1e-4, 1.0, 1.0)] + [_run("lora", k, 1e-3, 1.1, 1.0) for k in (1, 16, 256)])

    def spectrum(r90):
        return pd.DataFrame([{"run_id": "fullNone-0.0001-0", "layer": i, "matrix_type": "q_proj", "r90": r90,
                              "out_features": 576, "in_features": 576} for i in range(4)])
    row = F.full_rank(runs, spectrum(200))[0]
    assert row["verdict"] == "holds" and "12.5×" in row["measured"] and "above the largest LoRA rank 256: 0.00" \
        in row["measured"]
    assert F.full_rank(runs, spectrum(100))[0]["verdict"] == "does not hold"      # 6.25×
    assert F.full_rank(runs, spectrum(100).iloc[:0])[0]["verdict"] == "undecided"  # no spectra
    assert F.findings({"runs": runs.drop(columns="task.objective")}).empty         # classifiers: no findings


def test_the_command_reads_run_directories_without_their_delta(tmp_path):
    """Runs whose ΔW stayed on another machine: configs and metrics give the runs table, a report's
    spectrum.csv the ranks; a run trained twice (the same config in two study folders) counts once."""
    base = OmegaConf.to_container(compose_cfg(["model=smollm2", "task=code_cpt", "logger=none"]), resolve=True)
    runs = tmp_path / "runs"
    points = [("full", 1e-5, 1.4, 1.0), ("full", 1e-4, 1.0, 2.0), ("full", 1e-3, 1.2, 2.2),
              ("lora", 1e-4, 1.3, 1.0), ("lora", 1e-3, 1.1, 1.2), ("lora", 1e-2, 1.2, 1.4)]
    for study in ("a", "b"):
        for i, (method, lr, loss, forgetting) in enumerate(points if study == "a" else points[:1]):
            config = base | {"method": base["method"] | {"name": method}, "trainer": base["trainer"] | {"lr": lr}}
            run_dir = runs / study / f"r{i}"
            (run_dir / ".hydra").mkdir(parents=True)
            OmegaConf.save(OmegaConf.create(config), run_dir / ".hydra" / "config.yaml")
            write_metrics(run_dir, {"status": COMPLETE, "eval_loss": loss, "forgetting": forgetting,
                                    "eval_loss_base": 3.0}, config)
    spectrum = tmp_path / "spectrum.csv"
    pd.DataFrame([{"run_id": f"a/r{i}", "module": f"m{j}", "layer": j, "matrix_type": "q_proj", "r90": 300,
                   "out_features": 576, "in_features": 576} for i in range(3) for j in range(2)]).to_csv(spectrum)
    F.main([str(runs), "--spectrum", str(spectrum), "--out", str(tmp_path / "out")])
    found = pd.read_csv(tmp_path / "out" / "tables" / "lm_findings.csv").set_index("finding")
    assert found.loc["lr_ratio", "verdict"] == "holds"          # full's best 1e-4, LoRA's 1e-3
    assert found.loc["full_rank", "verdict"] == "holds"         # r90 300 = 37.5× rank 8 (the default rank)
    assert "b/r0: the same config as another run" in (tmp_path / "out" / "findings.md").read_text().replace("`", "")
    assert len(pd.read_csv(tmp_path / "out" / "tables" / "runs.csv")) == 6
    for number in (11, 12, 13):
        assert list((tmp_path / "out" / "figures").glob(f"fig{number}_*.png"))
