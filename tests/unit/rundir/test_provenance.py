"""metrics.json's provenance, its parts on their own: data digests (same data, same digest; a changed token, label or
order, another), lowrank's git commit and dirty flag (a temporary repository, clean and dirty, and no repository at
all), weight files hashed once and read from the cache after, and the model revision's fallbacks."""
import os
import shutil
import subprocess

import torch

from lowrank.data.batches import Batches
from lowrank.data.classification import Split
from lowrank.data.lm import PackedLM
from lowrank.rundir import provenance


def batches(texts, labels) -> Batches:
    return Batches(None, Split(texts, labels), max_length=16, pad_id=0)  # token-id lists: no tokenizer needed


BASE = ([[5, 6, 7], [8, 9], [10, 11, 12, 13]], [0, 1, 0])


def test_examples_digest_names_exactly_these_examples_in_this_order():
    digest = batches(*BASE).digest()
    assert batches([list(t) for t in BASE[0]], list(BASE[1])).digest() == digest  # same data: same digest
    token = [[5, 6, 7], [8, 99], [10, 11, 12, 13]]
    label = [0, 1, 1]
    order = ([BASE[0][1], BASE[0][0], BASE[0][2]], [1, 0, 0])
    split = ([[5, 6], [7, 8, 9], [10, 11, 12, 13]], [0, 1, 0])  # the same tokens, cut between other examples
    others = [batches(token, BASE[1]), batches(BASE[0], label), batches(*order), batches(*split)]
    assert len({digest} | {b.digest() for b in others}) == 5


def test_packed_lm_digest_changes_with_a_token_a_label_or_the_order():
    ids = torch.arange(12).view(3, 4)
    digest = PackedLM(ids, ids.clone(), torch.ones_like(ids)).digest()
    assert PackedLM(ids.clone(), ids.clone(), torch.ones_like(ids)).digest() == digest
    token, label = ids.clone(), ids.clone()
    token[1, 2], label[2, 0] = 99, -100
    rows = ids[[1, 0, 2]]
    assert len({digest, PackedLM(token, ids.clone(), torch.ones_like(ids)).digest(),
                PackedLM(ids, label, torch.ones_like(ids)).digest(),
                PackedLM(rows, rows.clone(), torch.ones_like(ids)).digest()}) == 4


def git(folder, *args):
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def test_git_commit_and_dirty_flag_of_a_checkout(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", "code.py")
    git(tmp_path, "commit", "-qm", "first")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    clean = provenance.code_version(tmp_path)
    assert clean["commit"] == head.strip() and clean["dirty"] is False and clean["why"] is None
    (tmp_path / "outputs.txt").write_text("untracked\n")  # run outputs and caches do not make it dirty
    assert provenance.code_version(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert provenance.code_version(tmp_path)["dirty"] is True


def test_no_repository_gives_null_commit_and_says_why(tmp_path):
    out = provenance.code_version(tmp_path)  # pytest's tmp_path is outside any repository
    assert out["commit"] is None and out["dirty"] is None
    assert "not a git checkout" in out["why"] and "installed package" in out["why"]
    inner = tmp_path / "site-packages"  # a package folder inside someone else's repository is not its checkout
    inner.mkdir()
    git(tmp_path, "init", "-q")
    assert provenance.code_version(inner)["commit"] is None


def test_no_git_program_gives_null_commit_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on it
    out = provenance.code_version(tmp_path)
    assert out["commit"] is None and out["why"] == "git is not installed"


def test_weight_files_are_hashed_once_then_read_from_the_cache(tmp_path):
    weights, cache = tmp_path / "model.safetensors", tmp_path / ".cache" / "file_sha256.json"
    weights.write_bytes(b"a" * 1000)
    first = provenance.file_sha256(weights, cache)
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)  # same size; the mtime put back: the cache answers without reading
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert provenance.file_sha256(weights, cache) == first
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again
    assert provenance.file_sha256(weights, cache) == provenance.file_sha256(weights) != first
    cache.write_text("{not json")  # a damaged cache is hashed around, then written again
    assert provenance.file_sha256(weights, cache) != first


def test_files_digest_depends_on_names_and_contents_not_folder(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "model-1.safetensors").write_bytes(b"one")
    (a / "model-2.safetensors").write_bytes(b"two")
    shutil.copytree(a, b)
    files = lambda d: sorted(d.glob("*.safetensors"))  # noqa: E731
    assert provenance.files_sha256(files(a)) == provenance.files_sha256(files(b))
    (b / "model-2.safetensors").write_bytes(b"TWO")
    assert provenance.files_sha256(files(a)) != provenance.files_sha256(files(b))


def test_model_revision_says_why_when_there_is_nothing_to_name_it():
    shape = provenance.model_revision(None, [], why="random weights built from model.shape")
    assert shape["files_sha256"] is None and shape["hub_commit"] is None and "model.shape" in shape["why"]
    hub = provenance.model_revision("org/never-downloaded", [], hub_id="org/never-downloaded")
    assert hub["hub_commit"] is None and "not in the local Hub cache" in hub["why"]


def test_record_has_every_field():
    out = provenance.record("cpu", {"files_sha256": "f"}, {"train_sha256": "t"})
    assert set(out) == {"lowrank", "packages", "device", "model", "data"}
    assert set(out["packages"]) == {"torch", "transformers", "peft", "hydra-core"}
    assert out["packages"]["torch"] == torch.__version__ and out["device"] == provenance.cpu_name() != ""
