"""ΔW analysis speed: every singular value of a 7B-shaped full-fine-tuning ΔW set, and a LoRA r=64 set.

One measurement, end to end (about 440 lines: writing the set, the streaming reader, the naive and the fast
paths, and the check that they agree).

    python -m benchmarks.svd_bench --dir /tmp/dw --out benchmarks/results       # on one GPU
    python -m benchmarks.svd_bench --smoke --dir /tmp/dw_smoke --out /tmp/svd   # tiny shapes on CPU

1. Writes a synthetic Llama-2-7B-shaped ΔW set to --dir: 32 layers × 7 matrices (q,k,v,o 4096², gate/up
   11008×4096, down 4096×11008), fp32, one safetensors file per layer (`{name}.delta`, as the harness
   names them), ~26 GB. Each ΔW is low rank plus noise: a power-law spectrum over 512 directions on a noise
   floor, scaled per layer and matrix type, so the spectrum spans many decades as real updates do.
2. Naive path: one `torch.linalg.svd` (fp32) per matrix on the GPU, timed on a sample of each shape and
   extrapolated to the 224 matrices (stated as such in the output).
3. Fast path: σ² are the eigenvalues of the smaller Gram matrix (4096² for every shape here), formed and
   diagonalised in fp64 (`eigvalsh`), so squaring the condition number costs nothing at the accuracy asked.
   Reader threads stream the files from disk into pinned buffers (reads drop the GIL) and on to the GPU
   while worker threads, each on its own CUDA stream, compute; the page cache is dropped first (root only),
   so the time includes real disk reads. Residual check on every matrix: Σλ = ‖ΔW‖_F² (= trace of the Gram).
4. Accuracy: against fp64 `svdvals` on a sample of matrices, relative error of every σ ≥ 1e-4·σ_max.
5. LoRA r=64 adapter set of the same model (224 pairs A, B, one file): σ(B A) from the r×r core
   R_B R_Aᵀ of the QR factors, batched by shape in fp64.
Writes `svd_{device}.{json,md}` under --out (benchmarks.harness.record), after each phase.
"""
import argparse
import json
import os
import queue
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowrank.linalg.spectra import svdvals_factored_batched, svdvals_gram
from benchmarks.harness.record import Column, collect_metadata, markdown_table, result_name, write_result
from lowrank.train.perf import sync

MATRICES = {"self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("h", "h"), "self_attn.v_proj": ("h", "h"),
            "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("i", "h"), "mlp.up_proj": ("i", "h"),
            "mlp.down_proj": ("h", "i")}
SHAPES = {"llama-7b": dict(h=4096, i=11008, layers=32), "tiny": dict(h=64, i=172, layers=2)}


def names_and_shapes(shape):
    return [(f"model.layers.{l}.{m}", (shape[o], shape[i]))
            for l in range(shape["layers"]) for m, (o, i) in MATRICES.items()]


def synthetic_delta(out: int, inp: int, scale: float, gen: torch.Generator, device) -> torch.Tensor:
    """Low rank plus noise: Σ_j s_j u_j v_jᵀ over k = min(512, ·) random directions with s_j ∝ (1+j)^-0.8,
    plus a Gaussian floor ~1e-3 of the top: singular values from 1 down past 1e-5, as in real ΔW."""
    k = min(512, out, inp)
    s = (1.0 + torch.arange(k, device=device)) ** -0.8
    U = torch.randn(out, k, device=device, generator=gen) / out ** 0.5
    V = torch.randn(k, inp, device=device, generator=gen) / inp ** 0.5
    noise = torch.randn(out, inp, device=device, generator=gen) * (2e-3 / (out ** 0.5 + inp ** 0.5))
    return (scale * (U * s) @ V).add_(noise, alpha=scale)


def write_raw_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A standard fp32 safetensors file, written straight from the tensors' memory (file.write drops the
    GIL; `safetensors.torch.save_file` first copies every tensor to bytes)."""
    header, offset = {}, 0
    for n, t in tensors.items():
        nb = t.numel() * 4
        header[n] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + nb]}
        offset += nb
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for t in tensors.values():
            f.write(memoryview(t.contiguous().numpy()).cast("B"))


def write_full_set(d: Path, shape, device, seed=0, n_writers=4) -> dict:
    """One fp32 safetensors file per layer; writer threads overlap disk writes with GPU generation."""
    d.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    todo = queue.Queue(maxsize=n_writers)

    def writer():
        while (job := todo.get()) is not None:
            write_raw_safetensors(*job)

    threads = [threading.Thread(target=writer) for _ in range(n_writers)]
    for th in threads:
        th.start()
    t0, nbytes = time.perf_counter(), 0
    items = names_and_shapes(shape)
    for layer in range(shape["layers"]):
        tensors = {}
        for j, (n, (o, i)) in enumerate(items[layer * 7:(layer + 1) * 7]):
            scale = 1e-3 * (1 + layer / shape["layers"]) * (1 + j / 7)
            tensors[f"{n}.delta"] = synthetic_delta(o, i, scale, gen, device).cpu()
            nbytes += o * i * 4
        todo.put((d / f"layer_{layer:02d}.safetensors", tensors))
    for _ in threads:
        todo.put(None)
    for th in threads:
        th.join()
    return dict(write_s=time.perf_counter() - t0, bytes=nbytes, files=shape["layers"])


def write_lora_set(path: Path, shape, rank, device, seed=1) -> None:
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for n, (o, i) in names_and_shapes(shape):
        tensors[f"{n}.lora_A"] = (torch.randn(rank, i, device=device, generator=gen) / i ** 0.5).cpu()
        # a trained B: decaying column norms, so the spectrum is not flat
        cols = (1.0 + torch.arange(rank, device=device)) ** -1.0
        tensors[f"{n}.lora_B"] = (torch.randn(o, rank, device=device, generator=gen) * cols * 1e-2).cpu()
    save_file(tensors, str(path), metadata={"scaling": "2.0", "rank": str(rank)})


def drop_page_cache() -> tuple[str, float]:
    """Flush and drop the page cache so reads hit the disk (needs root; otherwise the reads are warm, and the result
    says so)."""
    t0 = time.perf_counter()
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        state = "cold"
    except OSError:
        state = "warm (could not drop the page cache)"
    return state, time.perf_counter() - t0


def safetensors_index(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


class Reader:
    """Streams tensors of safetensors files into a reusable pinned buffer (file.readinto drops the GIL)
    and on to the device; puts (name, device tensor) on `q`."""

    def __init__(self, paths, q, device, max_numel):
        self.paths, self.q, self.device = paths, q, device
        cuda = device.type == "cuda"
        self.buf = torch.empty(max_numel, dtype=torch.float32, pin_memory=cuda)
        self.stream = torch.cuda.Stream(device) if cuda else None

    def run(self):
        for path in self.paths:
            base, header = safetensors_index(path)
            with open(path, "rb", buffering=0) as f:
                for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                    start, end = info["data_offsets"]
                    numel = (end - start) // 4
                    assert info["dtype"] == "F32", info["dtype"]
                    host = self.buf[:numel]
                    f.seek(base + start)
                    view = memoryview(host.numpy()).cast("B")
                    got = 0
                    while got < end - start:
                        got += f.readinto(view[got:])
                    if self.stream is None:
                        t = host.clone()
                    else:
                        with torch.cuda.stream(self.stream):
                            t = host.to(self.device, non_blocking=True)
                        self.stream.synchronize()  # the pinned buffer is reused for the next tensor
                    self.q.put((name.removesuffix(".delta"), t.view(info["shape"])))


def fast_full_set(files, device, n_readers, n_workers, max_numel) -> tuple[dict, dict]:
    q = queue.Queue(maxsize=max(4, 2 * n_workers))
    results, resid = {}, {}
    readers = [Reader(files[r::n_readers], q, device, max_numel) for r in range(n_readers)]

    def work():
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            while (item := q.get()) is not None:
                name, x = item
                if stream is not None:
                    x.record_stream(stream)  # made on a reader's stream, used and freed on this one
                results[name], resid[name] = svdvals_gram(x, device=x.device)
                del x
        if stream is not None:
            stream.synchronize()

    t0 = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(n_workers)]
    rthreads = [threading.Thread(target=r.run) for r in readers]
    for t in workers + rthreads:
        t.start()
    for t in rthreads:
        t.join()
    for _ in workers:
        q.put(None)
    for t in workers:
        t.join()
    spectra = results  # svdvals_gram returns them on the CPU
    r = max(resid.values())
    return spectra, dict(total_s=time.perf_counter() - t0, matrices=len(spectra), max_trace_residual=r)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def read_one(files, name):
    """One tensor from the per-layer files (for the naive path and the reference)."""
    layer = int(name.split(".")[2])
    with safe_open(str(files[layer]), framework="pt") as f:
        return f.get_tensor(f"{name}.delta")


def probe_eigvalsh(device, n, reps=2, threads=(1, 4)) -> dict:
    """Seconds per fp64 eigvalsh of an n×n Gram matrix: by backend (cusolver, magma where built in) on one
    stream, and with cusolver on several threads/streams at once."""
    x = torch.randn(n, n, device=device, dtype=torch.float64)
    g = x.mT @ x
    torch.linalg.eigvalsh(g)  # warm-up: handles, workspace
    out = {}

    def run(k):
        def one():
            s = torch.cuda.Stream(device) if device.type == "cuda" else None
            with torch.cuda.stream(s) if s is not None else nullcontext():
                for _ in range(reps):
                    torch.linalg.eigvalsh(g)
            if s is not None:
                s.synchronize()
        sync(device)
        t0 = time.perf_counter()
        ths = [threading.Thread(target=one) for _ in range(k)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        sync(device)
        return (time.perf_counter() - t0) / (k * reps)

    if device.type == "cuda":
        try:
            torch.backends.cuda.preferred_linalg_library("magma")
            torch.linalg.eigvalsh(g)
            out["magma x1"] = run(1)
        except RuntimeError as e:
            print("magma:", e)
        finally:
            torch.backends.cuda.preferred_linalg_library("cusolver")
    for k in threads:
        out[f"cusolver x{k}"] = run(k)
    return out


def lora_spectra(path: Path, device, scaling: float) -> tuple[dict, float]:
    """σ(scaling · B A) for every pair in one adapter file, batched by shape: B = Q_B R_B, Aᵀ = Q_A R_A,
    σ(B A) = σ(R_B R_Aᵀ) (r×r). Timed from the file on disk to the values on the CPU."""
    t0 = time.perf_counter()
    tensors = load_file(str(path), device="cpu")
    groups = {}
    for k in tensors:
        if k.endswith(".lora_A"):
            n = k.removesuffix(".lora_A")
            A, B = tensors[k], tensors[f"{n}.lora_B"]
            groups.setdefault((tuple(A.shape), tuple(B.shape)), []).append(n)
    out = {}
    for _, names in groups.items():
        A = torch.stack([tensors[f"{n}.lora_A"] for n in names])  # (b, r, in)
        B = torch.stack([tensors[f"{n}.lora_B"] for n in names])  # (b, out, r)
        out |= dict(zip(names, svdvals_factored_batched(B, A, scaling, device=device)))
    return out, time.perf_counter() - t0


def max_rel_err(s: torch.Tensor, ref: torch.Tensor, floor=1e-4) -> tuple[float, int]:
    """Max relative error over the singular values σ ≥ floor·σ_max of the reference, and how many."""
    keep = ref >= floor * ref[0]
    return ((s[keep] - ref[keep]).abs() / ref[keep]).max().item(), int(keep.sum())


def path_rows(res) -> list[dict]:
    """The table: one row per path measured so far (naive, fast from a cold and a warm page cache, LoRA)."""
    n, f, fw, lr = (res.get(k) for k in ("naive", "fast", "fast_warm", "lora"))
    rows = []
    if n:
        rows.append(dict(path="naive: `torch.linalg.svd` fp32, one per matrix", seconds=n["extrapolated_total_s"],
                         matrices=sum(v["count"] for v in n["per_shape"].values()),
                         note=f"extrapolated from {n['sampled']} timed matrices (read + SVD)"))
    if f:
        rows.append(dict(path="fast: fp64 Gram + `eigvalsh`, streamed", matrices=f["matrices"], seconds=f["total_s"],
                         note=f"measured, page cache {f['cache']}; {f['readers']} readers, {f['workers']} GPU "
                              f"streams, {res['eigvalsh_backend']}"))
    if fw and fw is not f:
        rows.append(dict(path="fast, page cache warm", matrices=fw["matrices"], seconds=fw["total_s"], note="measured"))
    if lr:
        rows.append(dict(path=f"LoRA r={lr['rank']}: QR of the factors, batched", matrices=lr["pairs"],
                         seconds=lr["total_s"], note=f"measured, page cache {lr['cache']}; "
                                                     f"{lr['warm_total_s']:.2f} s warm"))
    return rows


COLUMNS = [Column("path", "path"), Column("matrices", "matrices"), Column("seconds", "seconds", ".4g"),
           Column("note", "note")]
ACCURACY_COLUMNS = [Column("matrix", "name"), Column("shape", lambda a: f"{a['shape'][0]}×{a['shape'][1]}"),
                    Column("σ checked", "checked"), Column("max rel. error", "max_rel_err", ".2e"),
                    Column("fp64 svdvals s", "ref_s", ".2f")]


def sections(res) -> list[str]:
    """What the table leaves out, for the phases that have run: naive samples, the eigensolver probe, accuracy."""
    out = []
    if res.get("naive"):
        out.append("Naive samples (seconds each): " + ", ".join(
            f"{k}: read {v['read_s']:.2f} + svd {v['svd_s']:.2f}" for k, v in res["naive"]["per_shape"].items()) + ".")
    if res.get("probe_eigvalsh_s"):
        out.append(f"fp64 eigvalsh probe ({res['probe_n']}², seconds per matrix by concurrent streams): "
                   + ", ".join(f"{k}: {v:.3f}" for k, v in res["probe_eigvalsh_s"].items()) + ".")
    if res.get("accuracy"):
        out += ["Accuracy against fp64 `svdvals` (relative error over σ ≥ 1e-4·σ_max):",
                markdown_table(res["accuracy"], ACCURACY_COLUMNS)]
    if res.get("lora"):
        out.append(f"LoRA accuracy (against fp64 svdvals of the dense product): max rel. error "
                   f"{res['lora']['max_rel_err']:.2e}. Max trace residual of the fast path: "
                   f"{res['fast']['max_trace_residual']:.1e}.")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/delta_7b", help="where the synthetic ΔW files are written")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0, help="GPU streams for eigvalsh; 0: pick from a probe")
    ap.add_argument("--naive-per-shape", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the ΔW files")
    args = ap.parse_args()

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    shape = SHAPES["tiny" if args.smoke else "llama-7b"]
    meta = collect_metadata(device)
    settings = dict(shape=shape, readers=args.readers, workers=args.workers, naive_per_shape=args.naive_per_shape,
                    dir=args.dir)
    res = {}  # every phase's measurements: the result's details, and its table (path_rows) and sections

    def save():
        synthetic = res.get("synthetic")
        description = (f"Synthetic Llama-2-7B-shaped ΔW: {synthetic['files']} fp32 safetensors files, "
                       f"{synthetic['bytes'] / 1e9:.1f} GB, low rank plus noise." if synthetic else "")
        return write_result(args.out, result_name("svd", device), path_rows(res), settings, meta=meta,
                            title=f"ΔW singular spectra on {meta['device']}", description=description,
                            columns=COLUMNS, sections=sections(res), details=res)

    d = Path(args.dir)
    items = names_and_shapes(shape)
    files = [d / f"layer_{l:02d}.safetensors" for l in range(shape["layers"])]

    res["synthetic"] = write_full_set(d, shape, device)
    write_lora_set(d / "lora_r64.safetensors", shape, 64 if not args.smoke else 8, device)
    print("wrote", res["synthetic"], flush=True)

    q = min(shape["h"], shape["i"])
    res["probe_n"] = q
    res["probe_eigvalsh_s"] = probe_eigvalsh(device, q, threads=(1, 2, 4) if device.type == "cuda" else (1, 2))
    best = min(res["probe_eigvalsh_s"], key=res["probe_eigvalsh_s"].get)
    lib, k = best.split(" x")
    workers = args.workers or int(k)
    if device.type == "cuda":
        torch.backends.cuda.preferred_linalg_library(lib)
    res["eigvalsh_backend"] = lib
    estimate = res["probe_eigvalsh_s"][best] * len(items)
    print("probe", res["probe_eigvalsh_s"], "->", lib, "with", workers, "streams; estimate", estimate, flush=True)

    # warm: the files were just written, so they sit in the page cache; cold: after sync + drop_caches.
    # A slow eigensolver gets one pass only, the cold one.
    if device.type != "cuda" or estimate < 60:
        spectra, fast = fast_full_set(files, device, args.readers, workers, shape["h"] * shape["i"])
        res["fast_warm"] = dict(fast, cache="warm", readers=args.readers, workers=workers)
        print("fast (warm cache)", res["fast_warm"], flush=True)
    if device.type == "cuda":
        cache, res["sync_drop_s"] = drop_page_cache()
        spectra, fast = fast_full_set(files, device, args.readers, workers, shape["h"] * shape["i"])
        res["fast"] = dict(fast, cache=cache, readers=args.readers, workers=workers)
        print("fast (after dropping the cache)", res["fast"], flush=True)
    else:
        res["fast"] = res["fast_warm"]
    res.setdefault("fast_warm", None)
    save()

    acc = []
    sample = [items[0][0], items[len(items) // 2 + 4][0], items[-1][0]]  # one of each shape
    for n in sample:
        x = read_one(files, n)
        ref, t = timed(lambda: torch.linalg.svdvals(x.to(device, torch.float64)).cpu(), device)
        err, k = max_rel_err(spectra[n], ref)
        acc.append(dict(name=n, shape=list(x.shape), checked=k, of=len(ref), max_rel_err=err, ref_s=t))
        print("accuracy", acc[-1], flush=True)
        res["accuracy"] = acc
        save()

    lcache = drop_page_cache()[0] if device.type == "cuda" else "warm (smoke)"
    lora, lt = lora_spectra(d / "lora_r64.safetensors", device, scaling=2.0)
    lt2 = lora_spectra(d / "lora_r64.safetensors", device, scaling=2.0)[1]  # page cache warm now
    ad = load_file(str(d / "lora_r64.safetensors"))
    errs = []
    for n in (items[0][0], items[-1][0]):
        dense = 2.0 * ad[f"{n}.lora_B"].double().to(device) @ ad[f"{n}.lora_A"].double().to(device)
        ref = torch.linalg.svdvals(dense).cpu()[: len(lora[n])]
        errs.append(max_rel_err(lora[n], ref)[0])
    res["lora"] = dict(rank=64 if not args.smoke else 8, pairs=len(lora), total_s=lt, warm_total_s=lt2,
                       cache=lcache, max_rel_err=max(errs))
    print("lora", res["lora"], flush=True)

    # naive: read + one fp32 torch.linalg.svd per matrix, on a sample of each shape
    torch.linalg.svd(torch.randn(256, 256, device=device))  # warm-up: cusolver handle
    per_shape, counts = {}, {}
    for n, s in items:
        counts[s] = counts.get(s, 0) + 1
    for s in counts:
        picks = [n for n, t in items if t == s][:: max(1, counts[s] // args.naive_per_shape)][:args.naive_per_shape]
        reads, svds = [], []
        for n in picks:
            x, tr = timed(lambda: read_one(files, n).to(device), device)
            _, ts = timed(lambda: torch.linalg.svd(x, full_matrices=False), device)
            reads.append(tr)
            svds.append(ts)
        per_shape[f"{s[0]}x{s[1]}"] = dict(count=counts[s], read_s=sum(reads) / len(reads),
                                           svd_s=sum(svds) / len(svds), sampled=picks)
    res["naive"] = dict(per_shape=per_shape, sampled=sum(len(v["sampled"]) for v in per_shape.values()),
                        extrapolated_total_s=sum(v["count"] * (v["read_s"] + v["svd_s"]) for v in per_shape.values()))
    print("naive", res["naive"], flush=True)
    print(save()[1].read_text())
    if not args.keep:
        for p in files + [d / "lora_r64.safetensors"]:
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
