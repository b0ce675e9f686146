"""Resume after SIGKILL, checkpoint on SIGTERM, divergence marked and the sweep going on."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.cli_batch import run_cli_batch
from tests.conftest import ROOT, TINY, run_cli

RESUMABLE = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.eval_interval"))] + [
    "trainer.max_steps=12", "trainer.eval_interval=4", "trainer.checkpoint_every=2", "method.dropout=0.1"]


def start(args, cwd):
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


def history(run_dir) -> list[dict]:
    """history.csv's rows, but for each step's speed (the clock's, not the run's)."""
    with open(run_dir / "history.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "tokens_per_second"} for row in csv.DictReader(f)]


def resumable_args(root) -> list[str]:
    return [*RESUMABLE, "method.rank=2", f"runs_root={root}"]


MODES = ["before", "mid"]  # killed before the step-8 checkpoint is written, or halfway through writing it


def after_kill(cut_root):
    """What a kill left below CUT_ROOT: (its run dir, is metrics.json there, the checkpoint's step, how many
    half-written checkpoint temp files)."""
    (run,) = [p.parent for p in cut_root.glob("default/*/checkpoint.pt")]
    step = torch.load(run / "checkpoint.pt", weights_only=False)["loop"]["step"]
    return run, (run / "metrics.json").exists(), step, len(list(run.glob(".checkpoint.pt*.tmp")))


@pytest.fixture(scope="module")
def sigkilled(tmp_path_factory):
    """The run never interrupted, and in each mode one killed at step 8 (tests/kill_at_step.py) and then re-run,
    each a process, forked from one tests.cli_batch process per stage (the uninterrupted run and both kills side by
    side, then both re-runs; the imports paid once a stage): ((metrics, ΔW, run dir) uninterrupted,
    {mode: (killed, after_kill() before the re-run, or None, re-run, its runs root)}). The tests only read them."""
    ref_root = tmp_path_factory.mktemp("ref")
    cut = {mode: tmp_path_factory.mktemp(f"cut_{mode}") for mode in MODES}
    first = run_cli_batch([["-m", "experiments.train", *resumable_args(ref_root)]]
                          + [["-m", "tests.kill_at_step", "8", mode, *resumable_args(cut[mode])] for mode in MODES],
                          [ref_root, *cut.values()], timeout=600, preload=["torch._dynamo"])
    done, killed = first[0], dict(zip(MODES, first[1:]))
    assert done.returncode == 0, done.stderr[-2000:]
    left = {mode: after_kill(cut[mode]) if killed[mode].returncode == -signal.SIGKILL else None for mode in MODES}
    resumed = dict(zip(MODES, run_cli_batch([["-m", "experiments.train", *resumable_args(cut[mode])] for mode in MODES],
                                            list(cut.values()), timeout=600, preload=["torch._dynamo"])))
    return final_state(ref_root), {mode: (killed[mode], left[mode], resumed[mode], cut[mode]) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_then_rerun_equals_uninterrupted(mode, sigkilled):
    """Killed at step 8 (checkpoints every 2 steps), before or halfway through writing that checkpoint: the
    re-run resumes from step 6, removes the half-written temp file, and ends bit-identical to a run never
    interrupted."""
    uninterrupted, runs = sigkilled
    killed, left, resumed, cut_root = runs[mode]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run, metrics_written, step, half_written = left  # as the kill left it, before the re-run
    assert not metrics_written
    assert step == 6
    assert half_written == (mode == "mid")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in (run / "train.log").read_text() and "from step 6" in (run / "train.log").read_text()
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))

    (m_ref, d_ref, _), (m_cut, d_cut, run) = uninterrupted, final_state(cut_root)
    for key in ("eval_accuracy", "eval_loss", "train_loss", "train_accuracy", "eval_history"):
        assert m_ref[key] == m_cut[key], key
    assert d_ref.keys() == d_cut.keys()
    for k in d_ref:
        assert torch.equal(d_ref[k], d_cut[k]), k
    assert not (run / "checkpoint.pt").exists()  # removed once the run is final
    # the history goes on from the checkpoint: every step once, as the uninterrupted run's (step 8's row and
    # evaluation were on disk before the kill, and were done again)
    assert [int(r["step"]) for r in history(run)] == list(range(1, 13))
    assert history(run) == history(uninterrupted[2])


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


def test_a_bad_value_ends_its_job_and_the_sweep_goes_on(tmp_path):
    """`method.rank=4,0,8`: rank 0 is recorded as invalid with its reason, rank 8 still runs, and the exit
    code counts the one job that did not finish."""
    result = run_cli(["-m", "experiments.train", "-m", "method.rank=4,0,8", *TINY, f"runs_root={tmp_path}"],
                     cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    by_rank = {}
    for path in tmp_path.glob("default/*/metrics.json"):
        rank = yaml.safe_load((path.parent / ".hydra" / "config.yaml").read_text())["method"]["rank"]
        by_rank[rank] = json.loads(path.read_text())
    assert {r: m["status"] for r, m in by_rank.items()} == {4: "complete", 0: "invalid", 8: "complete"}
    assert by_rank[0]["reason"] == "method.rank=0 is not valid; it must be an integer > 0"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "method.rank=0 is not valid" in errors[0]
    assert result.stderr.strip().splitlines()[-1].startswith("sweep: 1 of 3 jobs did not finish")
    assert "Traceback" not in result.stderr


def test_a_damaged_checkpoint_is_set_aside_and_the_run_starts_again(tiny_run, tmp_path):
    """Empty, garbage, or a sound checkpoint of another model: each is renamed out of the way with one warning,
    and the run trains from step 0 to exactly the result of a run that never had it."""
    from lowrank.train.checkpoint import save_checkpoint
    ref, _ = tiny_run(name="ref")
    other = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(other.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for kind in ("empty", "garbage", "another_model"):
        run = tmp_path / kind
        if kind == "another_model":
            save_checkpoint(run, other, optimizer, scheduler, {"step": 2})
        else:
            run.mkdir()
            (run / "checkpoint.pt").write_bytes(b"" if kind == "empty" else b"PK\x03\x04 not a checkpoint")
        damaged = (run / "checkpoint.pt").read_bytes()
        metrics, _ = tiny_run(name=kind)
        assert metrics["status"] == "complete"
        assert (metrics["eval_history"], metrics["train_loss"]) == (ref["eval_history"], ref["train_loss"])
        assert (run / "checkpoint.pt.corrupt").read_bytes() == damaged and not (run / "checkpoint.pt").exists()
        assert "set aside as checkpoint.pt.corrupt" in (run / "train.log").read_text()


def test_damaged_base_weights_are_written_again_not_reused(tiny_run, tmp_path):
    tiny_run(name="first")
    (base,) = (tmp_path / "base_weights").glob("*.safetensors")
    data = bytearray(base.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 100] ^= 0xFF  # the data part: the header still parses
    base.write_bytes(bytes(data))
    tiny_run("method.rank=2", name="second")
    from lowrank.rundir.integrity import verify_safetensors
    verify_safetensors(base)  # intact again: the same weights, rewritten from the model
    assert "cannot be reused" in (tmp_path / "second" / "train.log").read_text()
