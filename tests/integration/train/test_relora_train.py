"""ReLoRA through the trainer (`method=relora`): two restarts give a dense ΔW of rank above r, its rank dynamics
end at that ΔW's spectrum, and a run pre-empted after a restart resumes to the uninterrupted result."""
import csv
import os
import signal

import pytest
import torch

from lowrank.linalg import spectra
from analysis.runs import collect_runs
from lowrank.adapters import relora as relora_mod
from tests.integration.train.test_train import read_delta

RELORA = ["method=relora", "method.rank=1", "method.relora_every=2", "method.relora_warmup=1", "trainer.max_steps=6",
          "trainer.eval_interval=3", "trainer.checkpoint_every=0"]


def test_two_restarts_accumulate_rank_above_r_and_resume_exactly(tiny_run, tmp_path, monkeypatch):
    metrics, run_dir = tiny_run(*RELORA, name="whole")
    assert metrics["status"] == "complete" and metrics["relora_restarts"] == 2   # after steps 2 and 4, not 6
    tensors, meta = read_delta(run_dir)
    assert meta["delta_form"] == "dense" and all(k.endswith(".delta") for k in tensors)
    for name, delta in tensors.items():
        S = torch.linalg.svdvals(delta.double())
        assert int((S > 1e-4 * S[0]).sum()) == 3, name   # three rank-1 adapters: r × (restarts + 1)
    rows = [r for r in csv.DictReader(open(run_dir / "dynamics.csv")) if r["step"] == "6"]
    assert rows
    for r in rows:  # the last snapshot is the written ΔW's spectrum (merged base + live adapter − W0)
        S = torch.linalg.svdvals(tensors[r["module"] + ".delta"].double())
        assert int(r["r90"]) == spectra.energy_rank(S, 0.9)
    analysed, _, skipped = collect_runs([tmp_path])
    assert not skipped and len(analysed) == 1

    # pre-empted at step 3, after the first restart: the checkpoint carries the merged base weights
    after_step = relora_mod.ReLoRA.after_step

    def preempt_at_3(self, steps_done, max_steps):
        if steps_done == 3:
            os.kill(os.getpid(), signal.SIGTERM)   # handled as SLURM's: checkpoint at this step, exit 143
        return after_step(self, steps_done, max_steps)
    monkeypatch.setattr(relora_mod.ReLoRA, "after_step", preempt_at_3)
    with pytest.raises(SystemExit):
        tiny_run(*RELORA, name="resumed")
    monkeypatch.setattr(relora_mod.ReLoRA, "after_step", after_step)
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert state["loop"]["step"] == 3 and state["loop"]["relora"]["restarts"] == 1
    metrics_resumed, _ = tiny_run(*RELORA, name="resumed")
    assert metrics_resumed["relora_restarts"] == 2
    resumed, _ = read_delta(tmp_path / "resumed")
    for name, delta in tensors.items():
        torch.testing.assert_close(resumed[name], delta, rtol=1e-5, atol=1e-7)

