"""benchmarks.bench: the ratios and target checks it reports (benchmarks.harness.ratios), the median of repeats,
merging runs, the step graph's undo (the script's CPU smoke runs: tests/integration/benchmarks/test_bench_smoke.py)."""
import json

import pytest

from benchmarks.harness.ratios import check_targets, ratio_rows, read_targets
from benchmarks.harness.record import median_run, write_result
from lowrank.adapters.targets import ALL_LINEAR


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
    assert (g["memory_ours_over_peft"] == pytest.approx(0.4)
            and g["memory_ours_over_peft_same_mode"] == pytest.approx(8 / 12))
    e = ratios["eager"]
    assert e["ours_over_full"] == pytest.approx(0.9) and e["ours_over_fastest_full"] == pytest.approx(0.75)


def test_targets_are_judged_on_ours_in_its_fastest_mode():
    rows = [row("llama-1.1b", "torch", "eager", 100.0), row("llama-1.1b", "torch", "graphs", 110.0),
            row("llama-1.1b", "ours", "eager", 130.0), row("llama-1.1b", "ours", "graphs", 140.0)]
    (check,) = [c for c in check_targets(ratio_rows(rows), read_targets()) if c["what"] == "ours_over_fastest_full"]
    assert check["mode"] == "graphs" and check["value"] == pytest.approx(140 / 110) and check["met"]


def test_targets_pick_ours_fastest_mode_even_without_full_runs():
    rows = [row("llama-7b", "peft", "eager", 50.0), row("llama-7b", "ours", "eager", 60.0),
            row("llama-7b", "ours", "compile+graphs", 200.0)]
    (check,) = [c for c in check_targets(ratio_rows(rows), read_targets()) if c["what"] == "ours_over_peft"]
    assert check["mode"] == "compile+graphs" and check["value"] == pytest.approx(4.0) and check["met"]


def test_repeated_configs_report_the_median_run_and_keep_every_run():
    runs = [dict(tokens_per_second=t, step_time_s=1 / t) for t in (90.0, 120.0, 100.0)]
    row = median_run(runs)
    assert row["tokens_per_second"] == 100.0 and row["step_time_s"] == 1 / 100.0  # one run, not a blend
    assert row["tokens_per_second_runs"] == [90.0, 120.0, 100.0]
    assert median_run(runs[:2])["tokens_per_second"] == 90.0  # even count: the lower middle
    assert "tokens_per_second_runs" not in median_run(runs[:1])


def test_trainer_targets_are_judged_on_the_trainer_rows():
    rows = [row("llama-7b", "peft", "compile-model", 100.0, mem=20),
            row("llama-7b", "ours", "compile+step-graph", 150.0),
            dict(row("llama-7b", "ours", "trainer", 145.0, mem=18), impl="trainer"),
            dict(row("llama-7b", "torch", "trainer", 90.0), impl="trainer")]
    checks = {c["what"]: c for c in check_targets(ratio_rows(rows), read_targets()) if c["impl"] == "trainer"}
    assert (checks["ours_over_bench_fastest"]["value"] == pytest.approx(145 / 150)
            and checks["ours_over_bench_fastest"]["met"])
    assert (checks["ours_over_peft_compiled"]["value"] == pytest.approx(1.45)
            and checks["ours_over_peft_compiled"]["met"])
    assert (checks["ours_over_trainer_full"]["value"] == pytest.approx(145 / 90)
            and checks["ours_over_trainer_full"]["met"])
    assert checks["memory_ours_over_peft_compiled"]["value"] == pytest.approx(0.9)


def test_all_linear_adapts_the_seven_llama_projections_in_ours_and_in_peft():
    """lowrank.adapters.targets.ALL_LINEAR is the one name for "every linear layer of the blocks"; ours and PEFT's own
    "all-linear" select the same layers of a Llama (not the head), so the parity check can copy A between them."""
    from benchmarks.bench import SHAPES, add_lora, build
    from lowrank.adapters.lora import lora_layers
    import torch
    ours = add_lora(build(SHAPES["tiny"], torch.device("cpu"), torch.float32, 0), "ours", 4, ALL_LINEAR)
    theirs = add_lora(build(SHAPES["tiny"], torch.device("cpu"), torch.float32, 0), "peft", 4, ALL_LINEAR)
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj"]
    expected = [f"model.layers.{i}.{p}" for i in range(SHAPES["tiny"]["num_hidden_layers"]) for p in projections]
    assert list(lora_layers(ours)) == expected
    adapted = [n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")
               and not n.endswith(("lora_A", "lora_B"))]
    assert adapted == expected


def _row(model, method, impl, rank, tps):  # the fields markdown reads
    return dict(model=model, method=method, impl=impl, rank=rank, targets=None if rank is None else "all-linear",
                mode="eager", tokens_per_second=tps, step_time_s=1 / tps, gpu_busy_s=None, peak_memory_bytes=2**30,
                mfu=None)


def test_merge_joins_runs_rows_commands_and_parity(tmp_path):
    from benchmarks.bench import merge
    meta = dict(commit="c0ffee", dirty=False, device="GPU", date="2026-01-01T00:00:00+00:00",
                versions=dict(python="3", torch="t", transformers="tf", peft="p", triton=None))
    par = dict(model="m1", steps=2, rank=16, lr=1e-3, ours=[2.0, 1.0], peft=[2.0, 1.1], max_abs_diff=0.1,
               max_rel_diff=0.1)
    targets = read_targets()

    def run(d, rows, parity, **meta_changes):
        write_result(d, "lora_vs_peft_gpu", rows, dict(hf_mask=False), meta=dict(meta, **meta_changes),
                     details=dict(parity=parity))
    for name, model, run_par in (("a", "m1", par), ("b", "m2", None)):
        rows = [_row(model, "full", "torch", None, 100.0),
                _row(model, "lora", "ours", 16, 130.0 if name == "a" else 150.0)]
        run(tmp_path / name, rows, run_par, command=f"bench {name}")
    merge([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "out", targets)
    merged = json.loads((tmp_path / "out" / "lora_vs_peft_gpu.json").read_text())
    rows = merged["rows"]
    assert [(r["model"], r["impl"]) for r in rows] == [("m1", "torch"), ("m1", "ours"), ("m2", "torch"), ("m2", "ours")]
    assert merged["meta"]["commit"] == "c0ffee" and [m["command"] for m in merged["meta"]["merged_from"]] == [
        "bench a", "bench b"]
    md = (tmp_path / "out" / "lora_vs_peft_gpu.md").read_text()
    assert "`bench a ; bench b`" in md and "max |Δloss| = 0.1000" in md
    assert "| m1 | ours | r=16 all-linear | eager | –× | –× | –× | 1.30× |" in md
    assert "| m2 | ours | r=16 all-linear | eager | –× | –× | –× | 1.50× |" in md
    (tmp_path / "c").mkdir()
    with pytest.raises(SystemExit, match="expected one lora_vs_peft_\\*.json"):
        merge([str(tmp_path / "c")], tmp_path / "out2", targets)
    # refused: the same config from two runs, a run of another setup (versions, commit), a run without rows,
    # writing into an input
    with pytest.raises(SystemExit, match="more than one run"):
        merge([str(tmp_path / "a"), str(tmp_path / "a")], tmp_path / "out2", targets)
    other = tmp_path / "d"
    run(other, [_row("m3", "full", "torch", None, 1.0)], None, command="c",
        versions=dict(meta["versions"], torch="t2"))
    with pytest.raises(SystemExit, match="torch differ"):
        merge([str(tmp_path / "a"), str(other)], tmp_path / "out2", targets)
    run(other, [_row("m3", "full", "torch", None, 1.0)], None, command="c", commit="beef")
    with pytest.raises(SystemExit, match="commit differ"):
        merge([str(tmp_path / "a"), str(other)], tmp_path / "out2", targets)
    run(other, [], None, command="c")
    with pytest.raises(SystemExit, match="lora_vs_peft_gpu.json has no rows"):
        merge([str(other)], tmp_path / "out2", targets)
    with pytest.raises(SystemExit, match="is one of the merged"):
        merge([str(tmp_path / "a")], tmp_path / "a", targets)
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("flat", [True, False])
def test_undo_training_restores_weights_and_a_fresh_optimizer_in_place(flat):
    import torch
    from lowrank.adapters.fused import FlatMasterAdamW
    from benchmarks.harness.graphs import undo_training
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

