"""experiments.import_delta killed (SIGKILL) at each of its writes resumes as runs do: the same command again gives
the uninterrupted import, bit for bit, and leaves no temp file behind. Kill points: mid-W0 (in base_weights/),
mid-ΔW (a half-written temp file in the run directory), and between ΔW and metrics.json."""
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from experiments.import_delta import import_pair
from tests.conftest import run_cli
from tests.unit.experiments.test_import_delta import read_all

NAMES = [f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("up", "down")]
KILL_POINTS = {  # what the child patches, and at which call it kills itself there
    "mid_w0": ("read_matrix", 2),           # W0 is written first: its 2nd matrix
    "mid_delta": ("read_matrix", len(NAMES) + 3),  # ΔW reads W_ft and W0 per matrix: inside the 2nd ΔW matrix
    "before_metrics": ("_finish", 1),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(64, 48, generator=g) for n in NAMES}
    for folder, state in (("base", base),
                          ("ft", {n: w + 1e-3 * torch.randn(64, 48, generator=g) for n, w in base.items()})):
        (root / folder).mkdir()
        save_file(state, root / folder / "model.safetensors")
    clean = import_pair(str(root / "base"), str(root / "ft"), root / "clean" / "imp" / "run", "toy",
                        log=lambda *a: None)
    return root, read_all(clean / "delta_w.safetensors")


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_an_import_killed_at_each_write_imports_again_to_the_same_result(tmp_path, pair, point):
    root, clean = pair
    out = tmp_path / "imp" / "run"
    function, at = KILL_POINTS[point]
    child = textwrap.dedent(f"""
        import os, signal
        import experiments.import_delta as imp
        real, calls = imp.{function}, [0]

        def dying(*a, **k):
            calls[0] += 1
            if calls[0] == {at}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        imp.{function} = dying
        from pathlib import Path
        imp.import_pair({str(root / "base")!r}, {str(root / "ft")!r}, Path({str(out)!r}), "toy")
    """)
    assert run_cli(["-c", child], cwd=tmp_path).returncode == -9  # killed where it was meant to be
    assert not (out / "metrics.json").exists()
    import_pair(str(root / "base"), str(root / "ft"), out, "toy", log=lambda *a: None)  # the same command again
    delta = read_all(out / "delta_w.safetensors")
    assert delta.keys() == clean.keys() and all(torch.equal(delta[k], clean[k]) for k in clean)
    assert (out / "metrics.json").exists()
    leftovers = [p.name for p in tmp_path.rglob(".*") if p.is_file() and p.name != ".lock"]
    assert leftovers == [], leftovers
