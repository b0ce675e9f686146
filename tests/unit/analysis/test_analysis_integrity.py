"""Damaged run directories and bad command lines for `analysis.report`: every damaged file (flipped bytes in ΔW
or W0, truncation, NaN written with valid hashes, unreadable metrics or config, base weights that are missing or
elsewhere) makes its run skipped with a reason naming the problem, the other runs are analysed as usual, and a
bad argument gives one line `error: ...` and exit status 2, never a traceback (analysis.report's main in this
process; the command itself: tests/integration/test_entry_points.py)."""
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import analysis.report as report_mod
from analysis.report import main
from analysis.runs import collect_runs
from lowrank.rundir.atomic import write_safetensors
from lowrank.rundir.integrity import DIGEST_KEY, CorruptArtifact
from lowrank.rundir.layout import DELTA_FILE

from tests.conftest import error_line
from tests.unit.analysis.test_analysis_report import module, write_base, write_metrics, write_run

DAY = "2026-01-01"
GOOD = ["full_s0", "lora_r2_s0", "lora_r4_s0", "full_s2_metrics_shadow"]


def flip_data_byte(path: Path, where: float = 0.5) -> None:
    """Flip one byte in the data part of a safetensors file (after the 8-byte length and the JSON header), so
    the header still parses and only the content hashes can tell."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = 8 + header_len
    pos = start + int((len(data) - start) * where)
    assert start <= pos < len(data)
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_tensor_byte(path: Path, key: str) -> None:
    """Flip the first data byte of one tensor, found from the header's data_offsets."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin, _ = json.loads(data[8:8 + header_len])[key]["data_offsets"]
    data[8 + header_len + begin] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite_safetensors(path: Path, edit=None, out: Path | None = None, **meta_changes) -> Path:
    """Re-write a safetensors file through write_safetensors (fresh, valid hashes) after edit(tensors)."""
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != DIGEST_KEY}
    if edit is not None:
        edit(tensors)
    return write_safetensors(out or path, tensors, meta | meta_changes)


def set_nan(tensors):
    k = sorted(tensors)[0]
    tensors[k][0, 0] = float("nan")


def set_inf(tensors):
    k = sorted(tensors)[-1]
    tensors[k][1, 1] = float("inf")


def edit_config(run: Path, **top) -> None:
    path = run / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(path.read_text()) | top
    path.write_text(yaml.safe_dump(cfg))


def point_base(run: Path, target: Path) -> None:
    rewrite_safetensors(run / DELTA_FILE, base_weights=os.path.relpath(target, run))


# expected skip reasons: run name -> substrings the reason must hold
EXPECTED = {
    "full_s1_delta_flipped": ["delta_w.safetensors", "does not match its content hash"],
    "full_s3_base_flipped": ["base weights", "tiny-flipped.safetensors", "does not match its content hash"],
    "lora_r4_s1_truncated": ["delta_w.safetensors", "truncated or corrupt"],
    "full_s4_nan": ["delta_w.safetensors", "holds NaN or inf"],
    "lora_r2_s5_inf_base": ["base weights", "tiny-inf.safetensors", "holds NaN or inf"],
    "lora_r2_s6_invalid": ["metrics status is 'invalid': method.rank=0 is not valid; choose a rank ≥ 1"],
    "full_s7_failed": ["metrics status is 'failed': RuntimeError: boom in step 3"],
    "full_s8_metrics_list": ["metrics.json holds a JSON list, not an object"],
    "full_s9_metrics_garbage": ["metrics.json unreadable", "JSONDecodeError"],
    "full_s10_metrics_dir": ["metrics.json is not a file"],
    "full_s11_config_list": ["config.yaml holds a list, not a mapping"],
    "full_s12_config_garbage": ["config.yaml unreadable"],
    "full_s13_config_dir": ["config.yaml is not a file"],
    "full_s14_method_string": ["config lacks ['method.name']"],
    "full_s15_seed_string": ["config seed is 'one', not an integer"],
    "full_s16_delta_dir": ["delta_w.safetensors is not a file"],
    "full_s17_delta_missing": ["delta_w.safetensors missing"],
    "full_s18_no_hashes": ["delta_w.safetensors has no readable content hash"],
    "full_s19_base_outside": ["base_weights", "points outside"],
    "full_s20_base_missing": ["base weights", "gone.safetensors missing"],
    "full_s21_shape_mismatch": ["intermediate.dense", "do not fit W0"],
    "lora_r2_s22_rank_mismatch": ["rank-2 factors, the config rank 4"],
    "lora_r2_s23_int_delta": ["not floats"],
    "full_s24_metrics_edited": ["metrics.json does not match its content hash"],
    "full_s25_metrics_unhashed": ["metrics.json has no content hash"],
    "full_s26_config_edited": ["config.yaml is not the config metrics.json was computed with"],
}


@pytest.fixture(scope="module")
def damaged_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    base = write_base(root)
    for name, method, seed, rank in [("full_s0", "full", 0, None), ("lora_r2_s0", "lora", 0, 2),
                                     ("lora_r4_s0", "lora", 0, 4)]:
        write_run(root, base, name, method, seed, rank)
    shadow = write_run(root, base, "full_s2_metrics_shadow", "full", 2)  # metrics never replace config columns
    write_metrics(shadow, {"status": "complete", "run_id": "evil", "seed": "x", "method.name": "lora",
                           "eval_accuracy": 0.7})

    flip_data_byte(write_run(root, base, "full_s1_delta_flipped", "full", 1) / DELTA_FILE)
    flipped_base = root / "base_weights" / "tiny-flipped.safetensors"
    shutil.copy(base, flipped_base)
    flip_data_byte(flipped_base, 0.7)
    write_run(root, flipped_base, "full_s3_base_flipped", "full", 3)
    truncated = write_run(root, base, "lora_r4_s1_truncated", "lora", 1, 4) / DELTA_FILE
    truncated.write_bytes(truncated.read_bytes()[:-100])
    rewrite_safetensors(write_run(root, base, "full_s4_nan", "full", 4) / DELTA_FILE, set_nan)
    inf_base = rewrite_safetensors(base, set_inf, out=root / "base_weights" / "tiny-inf.safetensors")
    write_run(root, inf_base, "lora_r2_s5_inf_base", "lora", 5, 2)

    invalid = write_run(root, base, "lora_r2_s6_invalid", "lora", 6, 2)
    write_metrics(invalid, {"status": "invalid", "reason": "method.rank=0 is not valid; choose a rank ≥ 1"})
    (invalid / DELTA_FILE).unlink()  # an invalid run stops before writing ΔW: the status is the reason
    failed = write_run(root, base, "full_s7_failed", "full", 7)
    write_metrics(failed, {"status": "failed", "reason": "RuntimeError: boom\n in step 3"})

    (write_run(root, base, "full_s8_metrics_list", "full", 8) / "metrics.json").write_text("[1, 2]")
    (write_run(root, base, "full_s9_metrics_garbage", "full", 9) / "metrics.json").write_bytes(b'{"status": "comp')
    metrics_dir = write_run(root, base, "full_s10_metrics_dir", "full", 10) / "metrics.json"
    metrics_dir.unlink()
    metrics_dir.mkdir()
    (write_run(root, base, "full_s11_config_list", "full", 11) / ".hydra" / "config.yaml").write_text("- 1\n- 2\n")
    (write_run(root, base, "full_s12_config_garbage", "full", 12) / ".hydra" / "config.yaml").write_bytes(
        b"seed: [0\n\xff\xfe: {")
    config_dir = write_run(root, base, "full_s13_config_dir", "full", 13) / ".hydra" / "config.yaml"
    config_dir.unlink()
    config_dir.mkdir()
    edit_config(write_run(root, base, "full_s14_method_string", "full", 14), method="full")
    edit_config(write_run(root, base, "full_s15_seed_string", "full", 15), seed="one")
    delta_dir = write_run(root, base, "full_s16_delta_dir", "full", 16) / DELTA_FILE
    delta_dir.unlink()
    delta_dir.mkdir()
    (write_run(root, base, "full_s17_delta_missing", "full", 17) / DELTA_FILE).unlink()
    no_hashes = write_run(root, base, "full_s18_no_hashes", "full", 18) / DELTA_FILE
    with safe_open(no_hashes, "pt") as f:  # as written before content hashes: safetensors' own save_file
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in f.metadata().items() if k != DIGEST_KEY}
    save_file(tensors, str(no_hashes), metadata=meta)
    outside = root / "elsewhere" / "tiny-0123456789.safetensors"  # a valid W0 file, but not RUNS_ROOT/base_weights
    outside.parent.mkdir()
    shutil.copy(base, outside)
    point_base(write_run(root, base, "full_s19_base_outside", "full", 19), outside)
    point_base(write_run(root, base, "full_s20_base_missing", "full", 20), root / "base_weights" / "gone.safetensors")

    def transpose_one(tensors):
        k = module(0, "intermediate.dense") + ".delta"
        tensors[k] = tensors[k].T.contiguous()
    rewrite_safetensors(write_run(root, base, "full_s21_shape_mismatch", "full", 21) / DELTA_FILE, transpose_one)
    rank_mismatch = write_run(root, base, "lora_r2_s22_rank_mismatch", "lora", 22, 2)
    edit_config(rank_mismatch, method=yaml.safe_load((rank_mismatch / ".hydra" / "config.yaml").read_text())["method"]
                | {"rank": 4})
    write_metrics(rank_mismatch, {"status": "complete", "eval_accuracy": 0.5})  # recorded with the rank-4 config

    def to_int(tensors):
        k = sorted(tensors)[0]
        tensors[k] = tensors[k].round().to(torch.int32)
    rewrite_safetensors(write_run(root, base, "lora_r2_s23_int_delta", "lora", 23, 2) / DELTA_FILE, to_int)
    edited = write_run(root, base, "full_s24_metrics_edited", "full", 24) / "metrics.json"
    edited.write_text(edited.read_text().replace('"eval_accuracy": 2.9', '"eval_accuracy": 0.9'))  # 0.5 + 24/10
    unhashed = write_run(root, base, "full_s25_metrics_unhashed", "full", 25) / "metrics.json"
    unhashed.write_text(json.dumps({k: v for k, v in json.loads(unhashed.read_text()).items()
                                    if k != "content_sha256"}))
    edit_config(write_run(root, base, "full_s26_config_edited", "full", 26), trainer={"max_steps": 10, "lr": 2e-3})
    return root


def test_each_damaged_run_is_skipped_with_its_reason(damaged_root):
    runs, table, skipped = collect_runs([damaged_root])
    assert sorted(table.run_id) == sorted(f"{DAY}/{n}" for n in GOOD)
    reasons = dict(skipped)
    assert sorted(reasons) == sorted(f"{DAY}/{n}" for n in EXPECTED)
    for name, parts in EXPECTED.items():
        for part in parts:
            assert part in reasons[f"{DAY}/{name}"], (name, reasons[f"{DAY}/{name}"])
    assert all("\n" not in why for why in reasons.values())
    row = table.set_index("run_id").loc[f"{DAY}/full_s2_metrics_shadow"]
    assert row["seed"] == 2 and row["method.name"] == "full" and row["eval_accuracy"] == 0.7


def test_report_analyses_the_rest_and_lists_the_skipped(damaged_root, tmp_path):
    out = tmp_path / "out"
    main([str(damaged_root), "--out", str(out), "--max-dim", "8", "--no-figures"])
    text = (out / "report.md").read_text()
    assert f"Runs analysed ({len(GOOD)})" in text and f"Runs skipped ({len(EXPECTED)})" in text
    assert "`2026-01-01/full_s4_nan`: delta_w.safetensors: tensor" in text
    assert "`2026-01-01/lora_r2_s6_invalid`: metrics status is 'invalid': method.rank=0 is not valid" in text
    spectrum = pd.read_csv(out / "tables" / "spectrum.csv")
    assert set(spectrum.run_id) == {f"{DAY}/{n}" for n in GOOD}
    assert spectrum[["fro_norm", "r90", "stable_rank"]].notna().all().all()
    # the good runs' numbers are those of a root holding only them
    clean = tmp_path / "clean_runs"
    for name in GOOD:
        shutil.copytree(damaged_root / DAY / name, clean / DAY / name)
    shutil.copytree(damaged_root / "base_weights", clean / "base_weights")
    main([str(clean), "--out", str(tmp_path / "clean_out"), "--max-dim", "8", "--no-figures"])
    for table in ["spectrum", "singular_values", "subspace", "amplification"]:
        assert (tmp_path / "clean_out" / "tables" / f"{table}.csv").read_bytes() == \
            (out / "tables" / f"{table}.csv").read_bytes(), table


def test_a_file_damaged_after_the_check_skips_its_run(damaged_root, tmp_path, monkeypatch):
    """ΔW is verified when the run is loaded; a byte flipped before it is analysed is caught on reading."""
    root = tmp_path / "runs"
    for name in ["full_s0", "lora_r2_s0"]:
        shutil.copytree(damaged_root / DAY / name, root / DAY / name)
    shutil.copytree(damaged_root / "base_weights", root / "base_weights")
    runs = {r.run_id: r for r in collect_runs([root])[0]}
    flip_data_byte(root / DAY / "full_s0" / DELTA_FILE, 0.9)
    with pytest.raises(CorruptArtifact, match="changed since it was checked"):
        for name in runs[f"{DAY}/full_s0"].names:
            runs[f"{DAY}/full_s0"].delta(name)
    shutil.copy(damaged_root / DAY / "full_s0" / DELTA_FILE, root / DAY / "full_s0" / DELTA_FILE)

    real = report_mod.collect_runs

    def collect_then_damage(roots):
        found = real(roots)
        # W0 of a matrix both runs analyse
        flip_tensor_byte(root / "base_weights" / "tiny-0123456789.safetensors",
                         module(1, "attention.self.query") + ".weight")
        return found
    monkeypatch.setattr(report_mod, "collect_runs", collect_then_damage)
    main([str(root), "--out", str(tmp_path / "out"), "--no-figures"])
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Runs analysed (0)" in text and "Runs skipped (2)" in text
    assert "while analysing: tiny-0123456789.safetensors: tensor" in text and "changed since it was checked" in text


def test_nested_roots_take_each_run_once(damaged_root):
    runs, table, _ = collect_runs([damaged_root, damaged_root / DAY])
    assert len(table) == len(GOOD) == table.path.nunique()


def cli_case_dir(parent: Path) -> Path:
    """A working directory holding what the bad command lines name: a file, an empty root, two roots named runs."""
    parent.mkdir()
    (parent / "a_file").write_text("x")
    (parent / "empty_root").mkdir()
    for sub in ["one", "two"]:
        (parent / sub / "runs").mkdir(parents=True)
    return parent


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    return cli_case_dir(tmp_path_factory.mktemp("cli") / "cwd")


BAD_ARGS = {  # arguments (ROOT: the damaged runs root) -> what the one error line must name
    "missing root": (["runs/nonexistent", "--out", "o"], ["argument roots", "'runs/nonexistent' does not exist"]),
    "root is a file": (["a_file", "--out", "o"], ["argument roots", "'a_file' is not a directory"]),
    "empty root path": (["", "--out", "o"], ["argument roots", "empty path"]),
    "roots with one name": (["one/runs", "two/runs", "--out", "o"], ["argument roots", "both named 'runs'"]),
    "out is a file": (["ROOT", "--out", "a_file"], ["argument --out", "'a_file' exists and is not a directory"]),
    "out below a file": (["ROOT", "--out", "a_file/sub"], ["argument --out", "cannot be created"]),
    "out tables is a file": (["ROOT", "--out", "."], ["argument --out", "tables"]),
    "no out": (["ROOT"], ["required: --out"]),
    "no roots": (["--out", "o"], ["required: roots"]),
    "threads 0": (["ROOT", "--out", "o", "--threads", "0"], ["argument --threads", "integer ≥ 1", "'0'"]),
    "threads word": (["ROOT", "--out", "o", "--threads", "many"], ["argument --threads", "integer ≥ 1"]),
    "max-dim": (["ROOT", "--out", "o", "--max-dim", "-3"], ["argument --max-dim", "integer ≥ 1"]),
    "intruder-k": (["ROOT", "--out", "o", "--intruder-k", "1.5"], ["argument --intruder-k", "integer ≥ 1"]),
    "intruder-eps": (["ROOT", "--out", "o", "--intruder-eps", "nan"], ["argument --intruder-eps", "(0, 1]"]),
    "amp-ranks": (["ROOT", "--out", "o", "--amp-ranks", "8,x"], ["argument --amp-ranks", "integers ≥ 1"]),
    "exact-max-dim": (["ROOT", "--out", "o", "--exact-max-dim", "0"], ["argument --exact-max-dim", "integer ≥ 1"]),
    "topk": (["ROOT", "--out", "o", "--topk", ""], ["argument --topk", "integer ≥ 1"]),
    "device": (["ROOT", "--out", "o", "--device", "gpu"], ["argument --device", "auto, cpu, cuda or cuda:N"]),
    "wandb": (["ROOT", "--out", "o", "--wandb", "maybe"], ["argument --wandb", "'auto', 'on', 'off'"]),
    "unknown option": (["ROOT", "--out", "o", "--bogus"], ["unrecognized arguments: --bogus"]),
}


def check_one_error_line(capsys, argv, parts, cwd: Path, monkeypatch) -> None:
    """`python -m analysis.report ARGV` in CWD, as this process's analysis.report.main: one `error:` line naming
    the parts, exit 2, and nothing written."""
    monkeypatch.chdir(cwd)
    error_line(capsys, lambda: main(argv), *parts)
    assert not (cwd / "o").exists()  # nothing written on a bad command line


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_cli_input_gives_one_error_line(case, damaged_root, tmp_path, capsys, monkeypatch):
    # was test_bad_cli_input_gives_one_error_line in tests/test_analysis_integrity.py (a process each, from
    # tests/cli_batch.py; the command itself: tests/integration/test_entry_points.py)
    cwd = cli_case_dir(tmp_path / "cwd")
    if case == "out tables is a file":
        (cwd / "tables").write_text("not a folder")
    argv = [str(damaged_root) if a == "ROOT" else a for a in BAD_ARGS[case][0]]
    check_one_error_line(capsys, argv, BAD_ARGS[case][1], cwd, monkeypatch)


def test_cli_on_damaged_and_empty_roots(cli_dir, damaged_root, capsys, monkeypatch):
    # was test_cli_on_damaged_and_empty_roots in tests/test_analysis_integrity.py (two fresh `python -m
    # analysis.report`), now analysis.report.main in this process
    monkeypatch.chdir(cli_dir)
    main([str(damaged_root), "--out", "damaged_out", "--max-dim", "8", "--no-figures"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert f"{len(GOOD)} runs analysed, {len(EXPECTED)} skipped" in out
    assert (cli_dir / "damaged_out" / "report.md").is_file()
    # a root without run directories: one error line, exit 2, nothing written (it used to write an empty report)
    with pytest.raises(SystemExit) as stop:
        main(["empty_root", "--out", "empty_out", "--no-figures"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "empty_root" in err[0], err
    assert not (cli_dir / "empty_out").exists()
