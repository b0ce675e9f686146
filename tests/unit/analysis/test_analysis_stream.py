"""The report streams: each tensor of a run is read (and hashed) once, at most two ΔW matrices are held at a time, and
no file is read whole; the certified top-k solver agrees with an SVD or says it fell back; a streamed safetensors file
is the file write_safetensors writes (the benchmark's shape-only run, analysed like a trained one:
tests/integration/benchmarks/test_analysis_bench.py)."""
import json
import weakref
from collections import Counter

import pytest
import torch
from safetensors import safe_open

import analysis.checked_reads as checked_reads
from lowrank.linalg import spectra
from analysis.report import main
from lowrank.rundir.atomic import write_safetensors, write_safetensors_streamed
from lowrank.rundir.integrity import verify_safetensors
from lowrank.rundir.layout import DELTA_FILE

from tests.unit.analysis.test_analysis_report import write_base, write_run

CPU = torch.device("cpu")


def low_rank_plus_noise(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = (1.0 + torch.arange(40, dtype=torch.float64)) ** -0.8
    U = torch.linalg.qr(torch.randn(out, 40, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(inp, 40, generator=g, dtype=torch.float64)).Q
    return (U * s) @ V.mT + 1e-4 * torch.randn(out, inp, generator=g, dtype=torch.float64) / (out ** 0.5 + inp ** 0.5)


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_top_singular_vectors_agree_with_the_svd(shape):
    x = low_rank_plus_noise(*shape)
    Ue, Se, Vhe = torch.linalg.svd(x, full_matrices=False)
    U, S, Vh, how = spectra.svd_top(x, 8)
    assert how == "iteration"   # a spectrum whose top stands apart: certified by the subspace iteration
    torch.testing.assert_close(S, Se[:8], rtol=1e-12, atol=0)
    assert ((U * Ue[:, :8]).sum(0).abs() - 1).abs().max() < 1e-10           # the same directions, up to sign
    assert ((Vh * Vhe[:8]).sum(1).abs() - 1).abs().max() < 1e-10
    U0, S0, Vh0 = spectra.svd_gram_full(x, 5)   # every left vector and value, the top right ones
    assert U0.shape == (shape[0], min(shape)) and Vh0.shape == (5, shape[1])
    torch.testing.assert_close(S0[:40], Se[:40], rtol=1e-10, atol=0)
    assert ((U0[:, :40] * Ue[:, :40]).sum(0).abs() - 1).abs().max() < 1e-8
    U32, S32 = spectra.svd_top(x.float(), 8)[:2]   # a training-time fp32 ΔW (rank dynamics) is promoted to fp64
    assert U32.dtype == torch.float64 and torch.allclose(S32, Se[:8], rtol=1e-6)
    warm = spectra.svd_top(x + 1e-3 * low_rank_plus_noise(*shape, seed=1), 8, start=(U, Vh.mT))
    assert warm[3] == "iteration" and warm[0].shape == (shape[0], 8)


def test_top_eigh_falls_back_to_eigh_where_it_cannot_certify():
    lam = torch.cat([torch.tensor([5.0, 4.0, 3.0, 3.0]), torch.linspace(1, 0.5, 196)]).double()
    Q = torch.linalg.qr(torch.randn(200, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).Q
    g = (Q * lam) @ Q.mT
    theta, y, how = spectra.top_eigh(g, 3)   # the 3rd and 4th eigenvalues are equal: no unique top-3 subspace
    assert how == "eigh"
    torch.testing.assert_close(theta, lam[:3], rtol=1e-10, atol=0)
    theta, y, how = spectra.top_eigh(g, 2)
    assert how == "iteration" and torch.allclose(theta, lam[:2], rtol=1e-12)
    assert spectra.svd_top(torch.zeros(300, 200, dtype=torch.float64), 4)[3] == "svd"   # no direction: the SVD's


def test_a_streamed_safetensors_file_is_the_one_write_safetensors_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.delta": torch.randn(5, 3, generator=g), "a.delta": torch.randn(2, 7, generator=g).double()}
    made = []

    def make(key):
        made.append(key)
        return tensors[key]
    path, digests = write_safetensors_streamed(tmp_path / "s.safetensors",
                                               {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, make,
                                               {"method": "full"})
    assert made == ["a.delta", "b.delta"]   # one tensor at a time, once each
    keys, meta = verify_safetensors(path)
    _, meta_whole = verify_safetensors(write_safetensors(tmp_path / "w.safetensors", tensors, {"method": "full"}))
    assert sorted(keys) == sorted(tensors) and meta == meta_whole and json.loads(meta["tensor_sha256"]) == digests
    with safe_open(path, "pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())


def test_the_report_reads_each_tensor_once_and_holds_two_at_most(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    base = write_base(root)
    for name, method, seed, rank in [("full_s0", "full", 0, None), ("full_s1", "full", 1, None),
                                     ("lora_r2_s0", "lora", 0, 2)]:
        write_run(root, base, name, method, seed, rank)
    reads, alive, most = Counter(), {}, Counter()
    real_open = checked_reads.safe_open

    class Counting:
        """safe_open, counting each get_tensor and how many ΔW matrices are alive when one is read."""
        def __init__(self, path, framework):
            self.path, self.f = str(path), real_open(path, framework)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):   # keys, metadata, get_slice: as safe_open's
            return getattr(self.f, name)

        def get_tensor(self, key):
            t = self.f.get_tensor(key)
            reads[(self.path, key)] += 1
            kind = "delta" if self.path.endswith(DELTA_FILE) else "base"
            matrix = (self.path, key.rsplit(".", 1)[0])
            live = {m for m, refs in alive.items() if any(r() is not None for r in refs) and m[0].endswith(DELTA_FILE)
                    == (kind == "delta")} | {matrix}
            most[kind] = max(most[kind], len(live))
            alive.setdefault(matrix, []).append(weakref.ref(t))
            return t

    def no_whole_file(*args, **kwargs):
        raise AssertionError("the report checked a whole file up front")
    monkeypatch.setattr(checked_reads, "safe_open", Counting)
    monkeypatch.setattr(checked_reads, "verify_safetensors", no_whole_file)
    main([str(root), "--out", str(tmp_path / "out"), "--max-dim", "8", "--no-figures", "--threads", "1"])
    n_delta = 2 * 10 + 2 * 4         # two full runs × 10 matrices, one LoRA run × 4 matrices × (A, B)
    assert sum(v for (p, _), v in reads.items() if p.endswith(DELTA_FILE)) == n_delta
    assert set(reads.values()) == {1}                       # every tensor read once: hashed once
    assert sum(1 for p, _ in reads if not p.endswith(DELTA_FILE)) == 10   # W0: once for the three runs
    assert most["delta"] <= 2 and most["base"] <= 2          # this matrix and the one read ahead
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Runs analysed (3)" in text and "peak host RSS" in text and "W0 SVDs (all matrices)" in text
    timing = json.loads((tmp_path / "out" / "timing.json").read_text())
    assert {"spectra", "ΔW vectors", "W0 SVDs", "intruders", "amplification", "subspace", "total"} <= set(
        timing["seconds"]) and timing["peak host RSS bytes"] > 0 and timing["device"] == "cpu"

