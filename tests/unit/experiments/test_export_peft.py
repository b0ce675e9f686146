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
