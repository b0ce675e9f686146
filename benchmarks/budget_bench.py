"""GPU memory budgets, measured: budgets × {full fine-tuning, LoRA r=16 all-linear} on the 1.1B Llama shape.

    python -m benchmarks.budget_bench --out benchmarks/results        # one call on a GPU machine

Every (budget, method) cell is a real `experiments.train` run (model=llama_1b_shape, task=synthetic, fp32
weights with bf16 autocast, batch 8 × 1024 tokens, fused AdamW) that caps the process at its budget and fits
itself (largest micro-batch that runs, then activation checkpointing). This script launches the two sweeps
and tabulates, per cell: does it fit, the chosen micro-batch, measured peak (max allocated) vs budget, and
the memory model's estimate at that setting. Writes `budget_{device}.{json,md}` under --out
(benchmarks.harness.record).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.harness.record import Column, collect_metadata, result_name, write_result
from lowrank.train.memory import GIB
from lowrank.adapters.targets import ALL_LINEAR

BUDGETS = "8gb,16gb,24gb,40gb,80gb"
COMMON = ["model=llama_1b_shape", "task=synthetic", "trainer.batch_size=8", "trainer.max_length=1024",
          "trainer.max_steps=3", "trainer.eval_interval=3", "trainer.warmup_steps=0", "task.train_examples=64",
          "task.test_examples=8", "logger=none", "trainer.progress_bar=false", f"budget={BUDGETS}"]
SWEEPS = {"full": ["method=full", "method.targets=[q_proj]"],  # full FT: ΔW stored for q_proj only (disk)
          "lora": ["method=lora", "method.rank=16", "method.alpha=32", f"method.targets={ALL_LINEAR}"]}


def run_sweeps(runs_root: Path) -> None:
    for name, args in SWEEPS.items():
        cmd = [sys.executable, "-m", "experiments.train", "-m", *COMMON, *args, f"runs_root={runs_root}",
               f"name=budget_{name}"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def collect(runs_root: Path) -> list[dict]:
    rows = []
    for path in sorted(runs_root.glob("budget_*/*/metrics.json")):
        m = json.loads(path.read_text())
        est = m["memory_estimate"]["total_bytes"]
        peak = m.get("peak_memory_bytes")
        rows.append({
            "model": "llama-1.1b-shape", "method": m["method"],
            "rank": 16 if m["method"] == "lora" else None,
            "targets": ALL_LINEAR if m["method"] == "lora" else None,
            "budget_gib": m["budget_bytes"] / GIB, "fits": m["fits"],
            "micro_batch": m.get("micro_batch"), "grad_accum": m.get("grad_accum"),
            "activation_checkpointing": m.get("activation_checkpointing"),
            "peak_memory_bytes": peak, "estimate_bytes": est,
            "estimate_over_peak": est / peak if peak else None,
            "peak_within_budget": peak <= m["budget_bytes"] if peak else None,
            "tokens_per_second": m.get("tokens_per_second"), "mfu": m.get("mfu"),
            "reason": m.get("reason"), "failed_at": m.get("failed_at"),
            "estimate_breakdown_gib": {k: v / GIB for k, v in m["memory_estimate"].items()
                                       if k.endswith("_bytes") and isinstance(v, (int, float))},
        })
    return sorted(rows, key=lambda r: (r["method"], r["budget_gib"]))


def gib(key):
    return lambda r: r[key] and r[key] / GIB


COLUMNS = [Column("method", "method"), Column("budget GiB", "budget_gib", "g"),
           Column("fits", lambda r: "yes" if r["fits"] else "no"),
           Column("micro-batch × accum", lambda r: f"{r['micro_batch']} × {r['grad_accum']}" if r["fits"] else None),
           Column("checkpointing", lambda r: r["activation_checkpointing"] if r["fits"] else None),
           Column("peak GiB", gib("peak_memory_bytes"), ".2f"), Column("estimate GiB", gib("estimate_bytes"), ".2f"),
           Column("estimate / peak", "estimate_over_peak", ".3f"),
           Column("peak ≤ budget", lambda r: r["peak_within_budget"] if r["fits"] else None),
           Column("tokens/s", "tokens_per_second", ".0f")]
DESCRIPTION = ("Llama 1.1B shape (random init), fp32 weights, bf16 autocast, fused AdamW, batch 8 × 1024 tokens. "
               "Peak = `torch.cuda.max_memory_allocated` after fitting; estimate = lowrank.train.memory at the chosen "
               "setting. tokens/s come from 3 steps and include warm-up: not a throughput benchmark.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--runs-root", default="/tmp/budget_runs")
    args = ap.parse_args()
    runs_root, out = Path(args.runs_root), Path(args.out)
    meta = collect_metadata()  # before the sweeps: the device is the GPU the runs fit themselves on
    run_sweeps(runs_root)
    rows = collect(runs_root)
    settings = dict(budgets=BUDGETS, common=COMMON, sweeps=SWEEPS, runs_root=str(runs_root))
    _, md = write_result(out, result_name("budget"), rows, settings, meta=meta,
                         title=f"Memory budgets on {meta['device']}", description=DESCRIPTION, columns=COLUMNS)
    print(md.read_text())


if __name__ == "__main__":
    main()
