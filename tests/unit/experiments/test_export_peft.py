"""experiments.export_peft refuses what it cannot export, in one line."""
import pytest

from benchmarks.shape_run import write_shape_run
from experiments.export_peft import main

SMALL = ("model.shape.num_hidden_layers=1", "model.shape.hidden_size=16", "model.shape.intermediate_size=32",
         "model.shape.num_attention_heads=2", "model.shape.num_key_value_heads=2")


def test_export_refuses_a_full_run_in_one_line(tmp_path, capsys):
    run_dir = write_shape_run("llama_1b_shape", tmp_path, overrides=SMALL, log=lambda *a: None)
    with pytest.raises(SystemExit) as exit_:
        main([str(run_dir), "--out", str(tmp_path / "a")])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: {run_dir} cannot be exported: it is a full fine-tuning run; only LoRA runs have an adapter to export")


@pytest.mark.parametrize("holds,says", [("adapter_config.json", "an adapter"), ("notes.txt", "files")])
def test_export_refuses_an_out_folder_that_holds_something(tmp_path, capsys, holds, says):
    """Another run's adapter (or anything) in --out is never overwritten without --force: one line, nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / holds).write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "any_run"), "--out", str(out)])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: argument --out: {str(out)!r} already holds {says}; give a new or empty folder, or add --force to "
        f"write into it")
    assert [p.name for p in out.iterdir()] == [holds] and (out / holds).read_text() == "{}"


def test_force_writes_into_a_folder_that_holds_something(tmp_path, capsys):
    """--force passes the folder check (then the run itself decides: here a full run, refused as such)."""
    run_dir = write_shape_run("llama_1b_shape", tmp_path, overrides=SMALL, log=lambda *a: None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    with pytest.raises(SystemExit):
        main([str(run_dir), "--out", str(out), "--force"])
    assert "it is a full fine-tuning run" in capsys.readouterr().err
