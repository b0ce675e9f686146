"""Property: a damaged file never gives a traceback or a wrong number. Each file the harness reads is damaged
the ways disks, kills and people damage files (truncated, a byte flipped in its header or in its data,
emptied, replaced by a folder or by another file's bytes); its reader then either returns exactly what was
written or refuses it with a reason (a skipped run, a checkpoint set aside, a rewritten file, one error line).
"""
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from analysis.runs import LowRank, collect_runs
from lowrank.rundir import layout as rundir
from lowrank.train.checkpoint import load_checkpoint, save_checkpoint
from lowrank.errors import ConfigError

from tests.unit.analysis.test_analysis_report import write_base, write_run

DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.sampled_from(["flip_header", "flip_data"]), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.sampled_from(["empty", "folder", "swap"])),
)
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def header_length(data: bytes) -> int:
    """Bytes of a file's header: a safetensors length prefix and JSON header; the first quarter otherwise
    (a zip's local header and pickle opcodes, the first keys of a JSON or YAML file)."""
    if len(data) >= 8:
        n = int.from_bytes(data[:8], "little")
        if 8 + n <= len(data) and data[8:9] == b"{":
            return 8 + n
    return max(1, len(data) // 4)


def damage(path: Path, how: tuple, other: bytes) -> None:
    data = bytearray(path.read_bytes()) if path.is_file() else bytearray()
    kind = how[0]
    if kind == "truncate":
        path.write_bytes(bytes(data[:int(len(data) * how[1])]))
    elif kind.startswith("flip") and data:
        head = min(header_length(bytes(data)), len(data))
        lo, hi = (0, head) if kind == "flip_header" or head == len(data) else (head, len(data))
        data[lo + int((hi - lo) * how[1])] ^= how[2]
        path.write_bytes(bytes(data))
    elif kind == "folder":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(b"" if kind == "empty" else other)


# --- what analysis reads: ΔW, W0, metrics.json, .hydra/config.yaml --------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One full and one LoRA run over a shared W0, as the trainer writes them, and what a reader gets from the
    intact files: {run_id: (metrics, config, {module: ΔW}, {module: W0})}."""
    root = tmp_path_factory.mktemp("study")
    base = write_base(root)
    write_run(root, base, "full", "full", 0)
    write_run(root, base, "lora", "lora", 0, rank=2)
    runs, _, skipped = collect_runs([root])
    assert not skipped and len(runs) == 2
    return root, {r.run_id: read_all(r) for r in runs}


def read_all(run):
    deltas = {n: run.delta(n) for n in run.names}
    return run.metrics, run.config, deltas, {n: run.base_weight(n) for n in run.names}


def same(a, b) -> bool:
    if isinstance(a, LowRank):
        return isinstance(b, LowRank) and torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and a.scaling == b.scaling
    return torch.equal(a, b)


TARGETS = {"full ΔW": "2026-01-01/full/delta_w.safetensors", "LoRA ΔW": "2026-01-01/lora/delta_w.safetensors",
           "W0": "base_weights/tiny-0123456789.safetensors", "metrics": "2026-01-01/full/metrics.json",
           "config": "2026-01-01/lora/.hydra/config.yaml"}


@SETTINGS
@given(target=st.sampled_from(sorted(TARGETS)), how=DAMAGE)
def test_analysis_reads_what_was_written_or_skips_the_run(study, target, how):
    template, intact = study
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        shutil.copytree(template, root)
        other = (root / TARGETS["metrics" if target != "metrics" else "full ΔW"]).read_bytes()
        damage(root / TARGETS[target], how, other)
        runs, _, skipped = collect_runs([root])  # never raises
        assert len(runs) + len(skipped) == 2
        assert all(reason for _, reason in skipped)
        for run in runs:
            try:
                metrics, config, deltas, bases = read_all(run)
            except Exception as e:  # a reader may still refuse (the file changed after the check), never lie
                assert "content hash" in str(e) or "changed" in str(e), e
                continue
            want = intact[run.run_id]
            assert metrics == want[0] and config == want[1]
            assert deltas.keys() == want[2].keys() and all(same(deltas[n], want[2][n]) for n in deltas)
            assert all(torch.equal(bases[n], want[3][n]) for n in bases)
        # The trainer reads these too: is the run finished (metrics), is its directory this config's (config)?
        if target == "metrics":
            run_dir = (root / TARGETS[target]).parent
            assert rundir.read_metrics(run_dir) in (None, intact["2026-01-01/full"][0])
        if target == "config":
            from lowrank.rundir.record import check_same_config
            run_dir = (root / TARGETS[target]).parents[1]
            config = OmegaConf.create(intact["2026-01-01/lora"][1])
            try:
                check_same_config(run_dir, config)  # passes only for the same config (hash of every key)
            except ConfigError as e:
                assert "another configuration" in str(e)
            else:
                stored = OmegaConf.to_container(OmegaConf.load(root / TARGETS[target]), resolve=True)
                assert rundir.config_hash(stored) == rundir.config_hash(intact["2026-01-01/lora"][1])


# --- what the trainer reads: its checkpoint, and W0 it reuses --------------------------------------------------

def tiny_training_state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    return model, optimizer, scheduler


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint after two real optimizer steps, and the parameters it holds."""
    folder = tmp_path_factory.mktemp("checkpoint")
    model, optimizer, scheduler = tiny_training_state(0)
    for _ in range(2):
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    save_checkpoint(folder, model, optimizer, scheduler, {"step": 2, "history": [{"eval_accuracy": 0.75}]})
    return folder / rundir.CHECKPOINT_FILE, {n: p.detach().clone() for n, p in model.named_parameters()}


@SETTINGS
@given(how=DAMAGE)
def test_a_resumed_run_gets_the_saved_state_or_starts_again(checkpoint, how):
    path, saved = checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        shutil.copy(path, run / rundir.CHECKPOINT_FILE)
        damage(run / rundir.CHECKPOINT_FILE, how, json.dumps({"status": "complete"}).encode())
        model, optimizer, scheduler = tiny_training_state(1)
        fresh = {n: p.detach().clone() for n, p in model.named_parameters()}
        loop = load_checkpoint(run, model, optimizer, scheduler)  # never raises
        now = {n: p.detach() for n, p in model.named_parameters()}
        if loop is None:  # set aside: the model is as it was, and the run starts from step 0
            assert all(torch.equal(now[n], fresh[n]) for n in now)
            assert (run / "checkpoint.pt.corrupt").exists() and not (run / rundir.CHECKPOINT_FILE).exists()
        else:
            assert loop == {"step": 2, "history": [{"eval_accuracy": 0.75}]}
            assert all(torch.equal(now[n], saved[n]) for n in now)
            assert scheduler.last_epoch == 2


@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                                vocab_size=30))


@settings(max_examples=25, deadline=None)
@given(how=DAMAGE)
def test_reused_base_weights_are_checked_and_rewritten_when_damaged(tiny_bert, how):
    from lowrank.rundir.delta import ensure_base_weights, linear_weights
    from lowrank.rundir.integrity import verify_safetensors
    from lowrank.adapters.lora import block_linear_names
    with tempfile.TemporaryDirectory() as tmp:
        path = ensure_base_weights(Path(tmp), "tiny", tiny_bert)
        damage(path, how, b'{"status": "complete"}')
        if path.is_dir():  # nothing to rewrite in place: one line that says what to remove
            with pytest.raises(ConfigError, match="is a folder where the base weights file belongs"):
                ensure_base_weights(Path(tmp), "tiny", tiny_bert)
            return
        assert ensure_base_weights(Path(tmp), "tiny", tiny_bert) == path
        verify_safetensors(path)
        from safetensors.torch import load_file
        stored = load_file(path)
        for n, w in linear_weights(tiny_bert, block_linear_names(tiny_bert)).items():
            assert torch.equal(stored[f"{n}.weight"], w)


# --- what the user hands in: a data file and a model folder -------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(how=DAMAGE)
def test_a_damaged_data_file_loads_or_is_one_clear_error(how):
    from lowrank.data.classification import load_task
    from tests.conftest import compose_cfg
    rows = "text,sentiment\n" + "".join(f"tweet number {i} about food,{['negative', 'neutral', 'positive'][i % 3]}\n"
                                         for i in range(60))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tweets.csv"
        path.write_text(rows)
        damage(path, how, b"\x00\x01binary")
        cfg = compose_cfg(["task=tweets", f"task.path={path}", "task.test_size=10"])
        try:
            load_task(cfg.task, 0)
        except ConfigError as e:
            assert "\n" not in str(e) and "task.path" in str(e)
