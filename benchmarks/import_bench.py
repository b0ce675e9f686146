"""Importing an existing fine-tune at 7B scale and analysing it: a base checkpoint and its fine-tuned sibling written as
sharded Hugging Face safetensors, then `experiments.import_delta` and `analysis.report` on the result, each timed as
a user runs it (a child process; its peak RSS from getrusage once it has ended).

    python -m benchmarks.import_bench --pair /dev/shm/pair --runs-root /tmp/imp --out benchmarks/results   # 7B shape
    python -m benchmarks.import_bench --smoke --out /tmp/ib                                              # seconds, CPU

The pair (bf16, one shard per block, `model.safetensors.index.json`, a config.json): W0 is 0.02·Gaussian; the
fine-tune adds a planted rank-PLANTED update to half the matrices (the q, v, up projections: ‖·‖_F ≈ 5% of W0's)
and a dense Gaussian perturbation (the same norm) to the others, all drawn on the GPU when there is one. The result
says whether the report found the planted rank (r90 of the planted matrices ≤ PLANTED; the dense ones far above).
Writes `import_{device}.{json,md}` under --out (benchmarks.harness.record).
"""
import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.harness.record import Column, collect_metadata, result_name, write_result

ROOT = Path(__file__).resolve().parent.parent
PLANTED, REL = 8, 0.05
PLANTED_IN = ("q_proj", "v_proj", "up_proj")
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
SMOKE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2)


def block_shapes(hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    return {**{f"self_attn.{p}": (hidden, hidden) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}


def write_pair(folder: Path, hidden: int, inter: int, layers: int, device) -> tuple[Path, Path]:
    """base/ and finetuned/ under `folder`: one bf16 shard per block and an index, as save_pretrained shards."""
    base, ft = folder / "base", folder / "finetuned"
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 128),
              "torch_dtype": "bfloat16"}
    gen = torch.Generator(device=device).manual_seed(0)
    index = {"base": {}, "ft": {}}
    for d in (base, ft):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config))
    for i in range(layers):
        shard = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        w0s, fts = {}, {}
        for name, (out, inp) in block_shapes(hidden, inter).items():
            key = f"model.layers.{i}.{name}.weight"
            w0 = torch.randn(out, inp, device=device, generator=gen) * 0.02
            size = REL * 0.02 * (out * inp) ** 0.5  # ‖ΔW‖_F
            if name.endswith(PLANTED_IN):
                u = torch.randn(out, PLANTED, device=device, generator=gen)
                v = torch.randn(PLANTED, inp, device=device, generator=gen)
                delta = u @ v
            else:
                delta = torch.randn(out, inp, device=device, generator=gen)
            delta *= size / torch.linalg.matrix_norm(delta)
            w0s[key] = w0.to(torch.bfloat16).cpu()
            fts[key] = (w0 + delta).to(torch.bfloat16).cpu()
        save_file(w0s, base / shard, metadata={"format": "pt"})
        save_file(fts, ft / shard, metadata={"format": "pt"})
        for k in w0s:
            index["base"][k] = index["ft"][k] = shard
    for d, which in ((base, "base"), (ft, "ft")):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index[which]}))
    return base, ft


def child(args: list[str]) -> dict:
    """`python ARGS` from this checkout: wall seconds, peak RSS of the child (the largest so far), its output."""
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({res.returncode}): {res.stderr[-2000:]}")
    return {"wall_s": wall, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "command": " ".join(["python", *args]), "stdout": res.stdout[-4000:]}


def planted_ranks(report: Path) -> dict:
    """r90 of the planted and of the dense matrices, from the report's spectrum table."""
    rows = list(csv.DictReader(open(report / "tables" / "spectrum.csv")))
    planted = [int(r["r90"]) for r in rows if r["module"].endswith(PLANTED_IN)]
    dense = [int(r["r90"]) for r in rows if not r["module"].endswith(PLANTED_IN)]
    return {"planted": len(planted), "planted_r90_max": max(planted), "dense": len(dense),
            "dense_r90_min": min(dense)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", type=Path, default=None, help="where the two checkpoints go (default: a temp dir)")
    p.add_argument("--runs-root", type=Path, default=None, help="where the imported run goes (default: a temp dir)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU, in seconds")
    p.add_argument("--layers", type=int, default=None, help="fewer blocks than Llama-2-7B's 32")
    opts = p.parse_args(argv)
    meta = collect_metadata()
    shape = dict(SMOKE if opts.smoke else LLAMA_7B)
    if opts.layers:
        shape["num_hidden_layers"] = opts.layers
    device = torch.device("cuda" if torch.cuda.is_available() and not opts.smoke else "cpu")
    import tempfile
    pair = opts.pair or Path(tempfile.mkdtemp(prefix="import_pair_"))
    runs = opts.runs_root or Path(tempfile.mkdtemp(prefix="import_runs_"))
    rows, details = [], {}
    try:
        t0 = time.perf_counter()
        base, ft = write_pair(pair, shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"],
                              device)
        print(f"pair written: {time.perf_counter() - t0:.1f} s", flush=True)
        imp = child(["-m", "experiments.import_delta", "--base", str(base), "--finetuned", str(ft),
                     "--out", str(runs / "imported" / "pair")])
        rows.append({"step": "experiments.import_delta", "seconds": imp["wall_s"],
                     "peak_rss_gib": imp["peak_rss_bytes"] / 2**30})
        print(f"import: {imp['wall_s']:.1f} s, peak RSS {imp['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        shutil.rmtree(pair, ignore_errors=True)  # the report reads the run directory only
        report = opts.out / "report_import"
        args = ["--no-figures", "--threads", "1", "--device", "cpu"] if opts.smoke else []
        rep = child(["-m", "analysis.report", str(runs), "--out", str(report), *args])
        timing = json.loads((report / "timing.json").read_text())
        rows.append({"step": "analysis.report", "seconds": rep["wall_s"],
                     "peak_rss_gib": rep["peak_rss_bytes"] / 2**30})
        rows += [{"step": f"  report: {k}", "seconds": v, "peak_rss_gib": None} for k, v in timing["seconds"].items()]
        details = {"import": imp, "report": rep, "timing": timing, "ranks": planted_ranks(report)}
        print(f"report: {rep['wall_s']:.1f} s; {details['ranks']}", flush=True)
    finally:
        if opts.pair is None:
            shutil.rmtree(pair, ignore_errors=True)
        if opts.runs_root is None:
            shutil.rmtree(runs, ignore_errors=True)
    ranks, timing = details["ranks"], details["timing"]
    peak_gpu = timing.get("peak CUDA allocated bytes")
    summary = (f"Shape {shape}, bf16 shards, {ranks['planted'] + ranks['dense']} matrices; device "
               f"{timing.get('device')}. Planted rank {PLANTED} in {ranks['planted']} matrices: r90 at most "
               f"{ranks['planted_r90_max']}; the {ranks['dense']} dense ones: r90 at least {ranks['dense_r90_min']}."
               + (f" Peak GPU memory of the report: {peak_gpu / 2**30:.2f} GiB." if peak_gpu else ""))
    write_result(opts.out, result_name("import"), rows, dict(shape=shape, planted_rank=PLANTED, rel=REL),
                 meta=meta, title="Import of a base/fine-tuned checkpoint pair and its analysis",
                 description=f"`{details['import']['command']}`, then `{details['report']['command']}`",
                 columns=[Column("step", "step"), Column("seconds", "seconds", ".3g"),
                          Column("peak RSS (GiB)", "peak_rss_gib", ".3g")],
                 sections=[summary], details={k: v for k, v in details.items() if k in ("ranks", "timing")})
    print(summary)


if __name__ == "__main__":
    main()
