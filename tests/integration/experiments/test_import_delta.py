"""experiments.import_delta beside the trainer: an imported pair reported next to a trained run, and the peak memory
of a large import measured in a fresh process."""
import json
import textwrap

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from analysis.report import main as report
from experiments.import_delta import import_pair

from tests.conftest import run_cli
from tests.unit.experiments.test_import_delta import DENSE, MINILM, PLANTED, read_all
from tests.unit.experiments.test_import_delta import checkpoints  # noqa: F401 (a fixture, used by name)


def test_a_pair_is_recovered_exactly_and_reported_next_to_a_trained_run(tmp_path, checkpoints, tiny_run):
    out = import_pair(str(MINILM), str(checkpoints["whole"]), tmp_path / "imported" / "pair", "minilm", log=print)
    delta = read_all(out / "delta_w.safetensors")
    base, ft = checkpoints["base_state"], checkpoints["ft_state"]
    assert len(delta) == 36  # every block matrix of the 6-layer encoder
    for key, d in delta.items():
        m = key.removesuffix(".delta")
        assert torch.equal(d, ft[f"bert.{m}.weight"] - base[f"{m}.weight"]), m  # bitwise, in fp32
    assert (not delta[f"{PLANTED[0]}.delta"].eq(0).all()
            and delta["encoder.layer.2.attention.self.key.delta"].eq(0).all())

    tiny_run(name="trained")  # a LoRA run of the trainer, under the same runs root
    report([str(tmp_path), "--out", str(tmp_path / "report"), "--threads", "1"])
    runs = pd.read_csv(tmp_path / "report" / "tables" / "runs.csv")
    assert sorted(runs.run_id) == ["imported/pair", "trained"]
    sp = pd.read_csv(tmp_path / "report" / "tables" / "spectrum.csv").set_index(["run_id", "module"])
    for m in PLANTED:
        assert sp.loc[("imported/pair", m), ["r90", "r99"]].tolist() == [3, 3], m
    for m in DENSE:
        assert sp.loc[("imported/pair", m), "r90"] > 100, m
    advice = pd.read_csv(tmp_path / "report" / "tables" / "rank_advice.csv").set_index("module")
    assert advice.loc[PLANTED, "energy_rank"].tolist() == [3, 3]
    pattern = json.loads((tmp_path / "report" / "rank_pattern.json").read_text())
    assert len(pattern) == 36 and [pattern[m] for m in PLANTED] == [3, 3]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Rank advice" in text and "Runs skipped (0)" in text

def test_e_peak_memory_of_a_large_import_stays_below_one_model(tmp_path):
    """8 matrices of 1024 × 1024 fp32 per checkpoint (32 MB each): the import reads and writes one matrix at a time.
    Peak RSS is measured in a fresh child process, from its RSS once everything is imported."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(4) for p in ("up", "down")]
    base = {n: torch.randn(1024, 1024, generator=g) for n in names}
    for folder, state in (("base", base), ("ft", {n: w + 1e-3 for n, w in base.items()})):
        (tmp_path / folder).mkdir()
        save_file(state, tmp_path / folder / "model.safetensors")
    model_bytes = 8 * 1024 * 1024 * 4
    del base
    child = textwrap.dedent(f"""
        import json, resource
        from experiments.import_delta import import_pair

        def status(field):  # bytes, from /proc/self/status
            return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak) to the present RSS: what imports and start-up used is not counted
        before = status("VmRSS:")
        import_pair("{tmp_path / 'base'}", "{tmp_path / 'ft'}", __import__("pathlib").Path("{tmp_path / 'runs/s/r'}"),
                    "synthetic", log=lambda *a: None)
        print(json.dumps({{"growth": status("VmHWM:") - before,
                           "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
        """)
    r = run_cli(["-c", child], tmp_path)
    assert r.returncode == 0, r.stderr
    growth = json.loads(r.stdout.strip().splitlines()[-1])["growth"]
    print(f"peak RSS growth while importing: {growth / 2**20:.1f} MiB (one model: {model_bytes / 2**20:.0f} MiB)")
    assert growth < model_bytes
    with safe_open(tmp_path / "runs/s/r/delta_w.safetensors", "pt") as f:
        d = f.get_tensor(f"{names[0].removesuffix('.weight')}.delta")
    assert torch.allclose(d, torch.full_like(d, 1e-3), atol=1e-5)
