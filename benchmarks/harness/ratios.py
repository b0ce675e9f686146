"""How the rows of the LoRA throughput benchmark (benchmarks.bench) compare: ratios and targets.

    ratios = ratio_rows(rows)                              # one per (model, LoRA config, block mode) of ours
    checks = check_targets(ratios, read_targets())          # judged against benchmarks/targets.json
    text = ratio_sections(ratios, checks)                  # markdown tables

A row is one measured config: model, method, impl (torch: full fine-tuning; peft; ours and its variants
ours-unfused, ours-plain, ours-single, ours-cublas), rank, targets (None for full fine-tuning), mode (how the
blocks ran), tokens_per_second and peak_memory_bytes. Every ratio compares rows of one result, so of one run
(or runs merged by model): numbers from different runs differ by more than some of the effects measured.
Pure functions over rows: tested without a GPU.
"""
import json
from pathlib import Path

from benchmarks.harness.record import Column, markdown_table

TRAINER = "trainer"  # rows of lowrank.train.recipe.train itself (benchmarks/bench_trainer.py): impl and mode
COMPILE_MODEL = "compile-model"  # torch.compile(model), the way a PEFT user speeds it up
TARGETS_FILE = Path(__file__).resolve().parent.parent / "targets.json"  # benchmarks/targets.json


def ratio_rows(rows):
    """Per model, LoRA config and block mode of ours (or of the trainer's own rows): ours/PEFT (PEFT as
    shipped, eager; PEFT in the same mode; PEFT under torch.compile(model)), ours/full (full fine-tuning in the
    same mode; its fastest row, the trainer's included; the trainer's full run), trainer/bench (a trainer row
    over ours' fastest bench row), and peak memory over PEFT's (eager; compiled)."""
    out = []
    by = {(r["model"], r["impl"], r["rank"], r["targets"], r.get("mode", "eager")): r for r in rows}

    def tps(key):
        return by[key]["tokens_per_second"] if key in by else None

    def ratio(a, b):
        return a / b if a is not None and b is not None else None

    def memory(key):
        return by.get(key, {}).get("peak_memory_bytes")

    for (model, impl, rank, targets, mode), r in by.items():
        if impl not in ("ours", TRAINER) or rank is None:
            continue
        ours = r["tokens_per_second"]
        fulls = [q["tokens_per_second"] for k, q in by.items() if k[0] == model and k[1] in ("torch", TRAINER)
                 and k[2] is None]
        bench = [q["tokens_per_second"] for k, q in by.items() if k[:4] == (model, "ours", rank, targets)]
        peft_eager, peft_compiled = (model, "peft", rank, targets, "eager"), (model, "peft", rank, targets,
                                                                              COMPILE_MODEL)
        out.append(dict(model=model, impl=impl, rank=rank, targets=targets, mode=mode, ours_tokens_per_second=ours,
                        ours_over_peft=ratio(ours, tps(peft_eager)),
                        ours_over_peft_same_mode=ratio(ours, tps((model, "peft", rank, targets, mode))),
                        ours_over_peft_compiled=ratio(ours, tps(peft_compiled)),
                        ours_over_full=ratio(ours, tps((model, "torch", None, None, mode))),
                        ours_over_fastest_full=ratio(ours, max(fulls) if fulls else None),
                        ours_over_trainer_full=ratio(ours, tps((model, TRAINER, None, None, TRAINER))),
                        ours_over_bench_fastest=ratio(ours, max(bench) if bench and impl == TRAINER else None),
                        ours_over_unfused=ratio(ours, tps((model, "ours-unfused", rank, targets, mode))),
                        ours_over_plain=ratio(ours, tps((model, "ours-plain", rank, targets, mode))),
                        ours_over_single=ratio(ours, tps((model, "ours-single", rank, targets, mode))),
                        ours_over_cublas=ratio(ours, tps((model, "ours-cublas", rank, targets, mode))),
                        memory_ours_over_peft=ratio(r["peak_memory_bytes"], memory(peft_eager)),
                        memory_ours_over_peft_same_mode=ratio(r["peak_memory_bytes"], memory(
                            (model, "peft", rank, targets, mode))),
                        memory_ours_over_peft_compiled=ratio(r["peak_memory_bytes"], memory(peft_compiled))))
    return out


def read_targets(path=TARGETS_FILE) -> list[dict]:
    """The targets of the record (benchmarks/targets.json): {model, rank, ratio, op (>= or <=), bound} each."""
    targets = json.loads(Path(path).read_text())["targets"]
    for t in targets:
        if t.get("op") not in (">=", "<="):
            raise ValueError(f"{path}: target {t} needs op '>=' or '<='")
    return targets


def check_targets(ratios, targets):
    """Each target judged on ours in its fastest mode (by tokens/s) among the ratio rows that have its ratio."""
    out = []
    for t in targets:
        key, bound, op = t["ratio"], t["bound"], t["op"]
        cands = [q for q in ratios if q["model"] == t["model"] and q["rank"] == t["rank"] and q[key] is not None
                 and q.get("impl", "ours") == t.get("impl", "ours")]
        if not cands:
            continue
        q = max(cands, key=lambda q: q["ours_tokens_per_second"])  # ours' fastest mode
        same = {"ours_over_peft": "ours_over_peft_same_mode",
                "memory_ours_over_peft": "memory_ours_over_peft_same_mode"}.get(key)
        out.append(dict(model=t["model"], impl=t.get("impl", "ours"), rank=t["rank"], mode=q["mode"], what=key,
                        value=q[key],
                        target=f"{op} {bound}", met=q[key] >= bound if op == ">=" else q[key] <= bound,
                        same_mode_peft=q[same] if same else None))
    return out


RATIO_COLUMNS = [Column("model", "model"), Column("impl", lambda q: q.get("impl", "ours")),
                 Column("LoRA", lambda q: f"r={q['rank']} {q['targets']}"), Column("blocks (ours)", "mode")] + [
    Column(header, key, ".2f", "×") for header, key in (
        ("ours/PEFT (eager PEFT)", "ours_over_peft"), ("ours/PEFT (same blocks)", "ours_over_peft_same_mode"),
        ("ours/PEFT compile(model)", "ours_over_peft_compiled"),
        ("ours/full (same blocks)", "ours_over_full"), ("ours/fastest full", "ours_over_fastest_full"),
        ("ours/trainer's full", "ours_over_trainer_full"), ("trainer/bench's fastest", "ours_over_bench_fastest"),
        ("fused/unfused", "ours_over_unfused"), ("fused/plain", "ours_over_plain"),
        ("grouped/single", "ours_over_single"), ("Triton/cuBLAS factor products", "ours_over_cublas"))] + [
    Column("ours/PEFT peak memory", "memory_ours_over_peft", ".2f"),
    Column("ours/compiled PEFT peak memory", "memory_ours_over_peft_compiled", ".2f")]
TARGET_COLUMNS = [Column("target", lambda c: f"{c['what']} {c['target']}"), Column("model", "model"),
                  Column("impl", lambda c: c.get("impl", "ours")),
                  Column("LoRA rank", "rank"), Column("ours' blocks", "mode"), Column("measured", "value", ".3f"),
                  Column("against PEFT in the same blocks", "same_mode_peft", ".2f"),
                  Column("met", lambda c: "yes" if c["met"] else "no")]


def ratio_sections(ratios, checks) -> list[str]:
    """The ratio table and, given checks, the target table, as markdown."""
    return [markdown_table(ratios, RATIO_COLUMNS)] + ([markdown_table(checks, TARGET_COLUMNS)] if checks else [])
