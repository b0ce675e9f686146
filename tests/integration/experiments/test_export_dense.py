"""experiments.export_peft on a run whose ΔW is dense (DoRA): the plain export is one line naming what exports, not a
traceback; --rank extracts a LoRA from its ΔW, the head beside it."""
import json

import pytest

from experiments.export_peft import EXTRACTION_FILE, main


def test_export_refuses_a_dense_lora_variant_in_one_line_and_extracts_one_at_a_rank(tmp_path, tiny_run, capsys):
    _, run_dir = tiny_run("method=dora")
    with pytest.raises(SystemExit) as exit_:
        main([str(run_dir), "--out", str(tmp_path / "adapter")])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: {run_dir} cannot be exported: its ΔW is stored dense (method.dora or method.relora_every), "
        f"and a PEFT LoRA adapter holds factors B, A; runs of LoRA, PiSSA, LoRA+ or rsLoRA export; --rank R, "
        f"--energy-share S or --rank-pattern FILE extracts a LoRA from any run's ΔW")
    assert not (tmp_path / "adapter").exists()

    main([str(run_dir), "--out", str(tmp_path / "adapter"), "--rank", "4", "--device", "cpu"])
    record = json.loads((tmp_path / "adapter" / EXTRACTION_FILE).read_text())
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {m["rank"] for m in record["modules"].values()} == {4} and config["r"] == config["lora_alpha"] == 4
    assert record["modules_to_save"] == config["modules_to_save"] == ["classifier"] and record["left_out"] is None
