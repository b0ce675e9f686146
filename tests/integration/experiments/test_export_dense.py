"""experiments.export_peft on a run whose ΔW is dense (DoRA): one line naming what exports, not a traceback."""
import pytest

from experiments.export_peft import main


def test_export_refuses_a_dense_lora_variant_in_one_line(tmp_path, tiny_run, capsys):
    _, run_dir = tiny_run("method=dora")
    with pytest.raises(SystemExit) as exit_:
        main([str(run_dir), "--out", str(tmp_path / "adapter")])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: {run_dir} cannot be exported: its ΔW is stored dense (method.dora or method.relora_every), and a PEFT "
        f"LoRA adapter holds factors B, A; runs of LoRA, PiSSA, LoRA+ or rsLoRA export")
    assert not (tmp_path / "adapter").exists()
