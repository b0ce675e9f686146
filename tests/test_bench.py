"""experiments.bench: the ratios and target checks it prints, and a CPU smoke run of the script."""
import json

import pytest

from experiments.bench import ALL_LINEAR, check_targets, median_row, ratio_rows
from tests.conftest import ROOT, run_cli


def row(model, impl, mode, tps, rank=16, mem=10):
    method = "full" if impl == "torch" else "lora"
    return dict(model=model, method=method, impl=impl, rank=None if impl == "torch" else rank,
                targets=None if impl == "torch" else "all-linear", mode=mode, tokens_per_second=tps,
                peak_memory_bytes=mem)


def test_ratios_compare_same_modes_and_the_fastest_full_run():
    rows = [row("m", "torch", "eager", 100.0), row("m", "torch", "graphs", 120.0),
            row("m", "peft", "eager", 60.0, mem=20), row("m", "peft", "graphs", 170.0, mem=12),
            row("m", "ours", "eager", 90.0, mem=9), row("m", "ours", "graphs", 180.0, mem=8)]
    ratios = {q["mode"]: q for q in ratio_rows(rows)}
    assert set(ratios) == {"eager", "graphs"}
    g = ratios["graphs"]
    assert g["ours_over_peft"] == pytest.approx(3.0)             # against PEFT as shipped (eager)
    assert g["ours_over_peft_same_mode"] == pytest.approx(180 / 170)
    assert g["ours_over_full"] == pytest.approx(1.5)
    assert g["ours_over_fastest_full"] == pytest.approx(1.5)
    assert g["memory_ours_over_peft"] == pytest.approx(0.4) and g["memory_ours_over_peft_same_mode"] == pytest.approx(8 / 12)
    e = ratios["eager"]
    assert e["ours_over_full"] == pytest.approx(0.9) and e["ours_over_fastest_full"] == pytest.approx(0.75)


def test_targets_are_judged_on_ours_in_its_fastest_mode():
    rows = [row("llama-1.1b", "torch", "eager", 100.0), row("llama-1.1b", "torch", "graphs", 110.0),
            row("llama-1.1b", "ours", "eager", 130.0), row("llama-1.1b", "ours", "graphs", 140.0)]
    (check,) = [c for c in check_targets(ratio_rows(rows)) if c["what"] == "ours_over_fastest_full"]
    assert check["mode"] == "graphs" and check["value"] == pytest.approx(140 / 110) and check["met"]


def test_targets_pick_ours_fastest_mode_even_without_full_runs():
    rows = [row("llama-7b", "peft", "eager", 50.0), row("llama-7b", "ours", "eager", 60.0),
            row("llama-7b", "ours", "compile+graphs", 200.0)]
    (check,) = [c for c in check_targets(ratio_rows(rows)) if c["what"] == "ours_over_peft"]
    assert check["mode"] == "compile+graphs" and check["value"] == pytest.approx(4.0) and check["met"]


def test_repeated_configs_report_the_median_run_and_keep_every_run():
    runs = [dict(tokens_per_second=t, step_time_s=1 / t) for t in (90.0, 120.0, 100.0)]
    row = median_row(runs)
    assert row["tokens_per_second"] == 100.0 and row["step_time_s"] == 1 / 100.0  # one run, not a blend
    assert row["tokens_per_second_runs"] == [90.0, 120.0, 100.0]
    assert median_row(runs[:2])["tokens_per_second"] == 90.0  # even count: the lower middle
    assert "tokens_per_second_runs" not in median_row(runs[:1])


def test_smoke_run_writes_the_rows_the_issue_asks_for(tmp_path):
    result = run_cli(["-m", "experiments.bench", "--smoke", "--out", str(tmp_path), "--modes", "eager",
                      "--only", "full", "lora:ours:16", "lora:peft:16", "--no-parity"], cwd=ROOT,
                     env_extra={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "lora_vs_peft_cpu.json").read_text())
    assert [(r["impl"], r["rank"]) for r in rows] == [("torch", None), ("ours", 16), ("peft", 16)]
    for r in rows:
        assert {"model", "method", "impl", "rank", "targets", "tokens_per_second", "peak_memory_bytes", "mfu"} <= set(r)
        assert r["tokens_per_second"] > 0 and r["peak_memory_bytes"] > 0
    assert rows[1]["targets"] == "all-linear" and ALL_LINEAR[0] == "q_proj"
    assert "| tiny | lora | ours | 16 | all-linear | eager |" in (tmp_path / "lora_vs_peft_cpu.md").read_text()


def _row(model, method, impl, rank, tps):  # the fields markdown reads
    return dict(model=model, method=method, impl=impl, rank=rank, targets=None if rank is None else "all-linear",
                mode="eager", tokens_per_second=tps, step_time_s=1 / tps, gpu_busy_s=None, peak_memory_bytes=2**30,
                mfu=None)


def test_merge_joins_runs_rows_commands_and_parity(tmp_path):
    from experiments.bench import merge
    meta = dict(device="GPU", torch="t", transformers="tf", peft="p", python="3", hf_mask=False)
    par = dict(model="m1", steps=2, rank=16, lr=1e-3, ours=[2.0, 1.0], peft=[2.0, 1.1], max_abs_diff=0.1,
               max_rel_diff=0.1)
    for name, model, run_par in (("a", "m1", par), ("b", "m2", None)):
        d = tmp_path / name
        d.mkdir()
        rows = [_row(model, "full", "torch", None, 100.0), _row(model, "lora", "ours", 16, 130.0 if name == "a" else 150.0)]
        (d / "lora_vs_peft_gpu.json").write_text(json.dumps(rows))
        (d / "lora_vs_peft_gpu_run.json").write_text(json.dumps(dict(meta=dict(meta, command=f"bench {name}"),
                                                                     parity=run_par)))
    merge([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "out")
    rows = json.loads((tmp_path / "out" / "lora_vs_peft_gpu.json").read_text())
    assert [(r["model"], r["impl"]) for r in rows] == [("m1", "torch"), ("m1", "ours"), ("m2", "torch"), ("m2", "ours")]
    md = (tmp_path / "out" / "lora_vs_peft_gpu.md").read_text()
    assert "`bench a ; bench b`" in md and "max |Δloss| = 0.1000" in md
    assert "| m1 | r=16 all-linear | eager | –× | –× | 1.30× |" in md and "| m2 | r=16 all-linear | eager | –× | –× | 1.50× |" in md
    (tmp_path / "c").mkdir()
    with pytest.raises(SystemExit, match="lora_vs_peft_\\*_run.json"):
        merge([str(tmp_path / "c")], tmp_path / "out2")
    # refused: the same config from two runs, a run of another setup, a run without rows, writing into an input
    with pytest.raises(SystemExit, match="more than one run"):
        merge([str(tmp_path / "a"), str(tmp_path / "a")], tmp_path / "out2")
    other = tmp_path / "d"
    other.mkdir()
    (other / "lora_vs_peft_gpu.json").write_text(json.dumps([_row("m3", "full", "torch", None, 1.0)]))
    (other / "lora_vs_peft_gpu_run.json").write_text(json.dumps(dict(meta=dict(meta, torch="t2", command="c"),
                                                                     parity=None)))
    with pytest.raises(SystemExit, match="torch differ"):
        merge([str(tmp_path / "a"), str(other)], tmp_path / "out2")
    (other / "lora_vs_peft_gpu.json").unlink()
    with pytest.raises(SystemExit, match="no lora_vs_peft_gpu.json"):
        merge([str(other)], tmp_path / "out2")
    with pytest.raises(SystemExit, match="is one of the merged"):
        merge([str(tmp_path / "a")], tmp_path / "a")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("flat", [True, False])
def test_undo_training_restores_weights_and_a_fresh_optimizer_in_place(flat):
    import torch
    from experiments.bench import undo_training
    from lowrank.lora_fast import FlatMasterAdamW
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = FlatMasterAdamW(params, lr=0.1) if flat else torch.optim.AdamW(params, lr=0.1)
    before = [p.detach().clone() for p in params]
    undo = undo_training(params, opt)

    def train(n):
        losses = []
        for _ in range(n):
            loss = sum((p ** 2).sum() for p in params)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        return losses
    first = train(3)
    storage = [p.data_ptr() for p in params]
    undo()
    assert [p.data_ptr() for p in params] == storage  # same tensors: a captured graph would still see them
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    assert train(3) == first  # as if the first three steps had not happened
    with pytest.raises(ValueError, match="not stepped"):
        undo_training(params, opt)
