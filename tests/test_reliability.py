"""Resume after SIGKILL, checkpoint on SIGTERM, divergence marked and the sweep going on."""
import json
import random
import signal
import subprocess
import sys
import time

import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY, run_cli

RESUMABLE = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.eval_interval"))] + [
    "trainer.max_steps=12", "trainer.eval_interval=4", "trainer.checkpoint_every=2", "method.dropout=0.1"]


def start(args, cwd):
    import os
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"exited early: {proc.stderr.read()}"
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def final_state(runs_root):
    (run,) = [p.parent for p in runs_root.glob("default/*/metrics.json")]
    metrics = json.loads((run / "metrics.json").read_text())
    return metrics, load_file(str(run / "delta_w.safetensors")), run


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    ref_root, cut_root = tmp_path / "ref", tmp_path / "cut"
    for root in (ref_root, cut_root):
        root.mkdir()
    args = lambda root: [*RESUMABLE, "method.rank=2", f"runs_root={root}"]  # noqa: E731
    assert run_cli(["-m", "experiments.train", *args(ref_root)], cwd=ref_root).returncode == 0

    proc = start(args(cut_root), cut_root)
    wait_for(lambda: any(cut_root.glob("default/*/checkpoint.pt")), proc)
    time.sleep(random.uniform(0, 1.5))  # a random step after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not any(cut_root.glob("default/*/metrics.json")), "killed before it could finish"
    resumed = run_cli(["-m", "experiments.train", *args(cut_root)], cwd=cut_root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in next(cut_root.glob("default/*/train.log")).read_text()

    (m_ref, d_ref, _), (m_cut, d_cut, run) = final_state(ref_root), final_state(cut_root)
    for key in ("eval_accuracy", "eval_loss", "train_loss", "train_accuracy", "eval_history"):
        assert m_ref[key] == m_cut[key], key
    assert d_ref.keys() == d_cut.keys()
    for k in d_ref:
        assert torch.equal(d_ref[k], d_cut[k]), k
    assert not (run / "checkpoint.pt").exists()  # removed once the run is final


def test_sigterm_writes_a_checkpoint(tmp_path):
    args = [*[o for o in RESUMABLE if not o.startswith(("trainer.max_steps", "trainer.checkpoint_every"))],
            "trainer.max_steps=500", "trainer.checkpoint_every=0", "trainer.eval_interval=1", f"runs_root={tmp_path}"]
    proc = start(args, tmp_path)
    log = lambda: next(tmp_path.glob("default/*/train.log"), None)  # noqa: E731
    wait_for(lambda: log() is not None and "step 1:" in log().read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    run = log().parent
    assert (run / "checkpoint.pt").exists() and not (run / "metrics.json").exists()
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert 1 <= state["loop"]["step"] < 500


def test_divergence_is_marked_and_the_sweep_goes_on(tmp_path):
    result = run_cli(["-m", "experiments.train", "-m", "method=full", "trainer.lr=5e-5,1e12",
                      "trainer.grad_clip=null", *TINY, f"runs_root={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    by_lr = {}
    for path in tmp_path.glob("default/*/metrics.json"):
        lr = float(yaml.safe_load((path.parent / ".hydra" / "config.yaml").read_text())["trainer"]["lr"])
        by_lr[lr] = (json.loads(path.read_text()), path.parent)
    assert sorted(by_lr) == [5e-5, 1e12]
    diverged, diverged_dir = by_lr[1e12]
    assert diverged["status"] == "diverged" and diverged["diverged_at_step"] >= 1
    assert by_lr[5e-5][0]["status"] == "complete"
    assert not (diverged_dir / "delta_w.safetensors").exists()  # no ΔW from a diverged run
