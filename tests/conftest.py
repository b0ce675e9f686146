import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is unreachable here; never wait on it
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist each core has a worker: one intra-op thread each, in this process and in every process a
    # test starts (OMP_NUM_THREADS is inherited). Two OpenMP threads per worker would wait on each other's core.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# A real run, shrunk: a few steps on a few examples (MiniLM, fine-food reviews).
TINY = ["trainer.max_steps=3", "trainer.batch_size=8", "trainer.eval_interval=3", "task.train_size=64",
        "task.eval_size=32", "trainer.max_length=64", "logger=none", "trainer.progress_bar=false"]


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from lowrank.cli import register_resolvers
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture
def tiny_run(tmp_path):
    """Run train(cfg) on a tiny config; returns (metrics, run_dir)."""
    from lowrank.train.recipe import train

    def run(*overrides, name="run"):
        cfg = compose_cfg(TINY + [f"runs_root={tmp_path}"] + list(overrides))
        run_dir = tmp_path / name
        return train(cfg, run_dir=run_dir), run_dir
    return run


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 600):
    import subprocess
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def outside_hydra() -> None:
    """Forget the Hydra config a test set process-wide (HydraConfig.instance().set_config, as run directory names are
    resolved), so a command called in-process starts as a fresh process does: no job's Hydra config yet."""
    from hydra.core.hydra_config import HydraConfig
    HydraConfig.instance().cfg = None


def error_line(capsys, call, *needles, code: int = 2) -> str:
    """The one line `call()` prints on stderr as it stops with SystemExit(CODE), as an entry point stops on bad
    input (lowrank.errors.fail): `error: ...`, holding every needle, no traceback."""
    with pytest.raises(SystemExit) as stop:
        call()
    err = capsys.readouterr().err
    assert stop.value.code == code, (stop.value.code, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
