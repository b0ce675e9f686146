"""The generative studies' three findings, each measured per setup and stated as holds / does not hold / undecided:

    (a) full_rank:   full fine-tuning's ΔW r90 ≫ LoRA ranks (Biderman et al. 2024: 10-100× typical ranks);
                     holds when the median r90 over the full-FT matrices is ≥ 10× the median LoRA rank run
    (b) forgetting:  LoRA forgets less than full fine-tuning at matched in-domain loss; each LoRA run inside the
                     full runs' loss range is compared with full fine-tuning's frontier (forgetting linearly
                     interpolated between the full runs sorted by loss); holds when the median difference is < 0
    (c) lr_ratio:    best LoRA lr / best full lr ≈ 10 and nearly flat across ranks ("LoRA Without Regret"); holds
                     when every rank's ratio lies within one 3.16× step of 10 and all ratios within one step of
                     each other, no best lr at its grid's edge (curves of three or more learning rates)
(b) and (c) are claims about plain LoRA: its variants (DoRA, PiSSA, ...: analysis.variants) are not pooled in.

From a report's tables (analysis.report adds the section to report.md), or from run directories whose ΔW was
analysed elsewhere (their spectrum.csv given):

    python -m analysis.lm_findings RUNS_ROOT --spectrum REPORT/tables/spectrum.csv --out DIR
        # DIR/tables/{runs,spectrum,lm_findings}.csv, DIR/figures/fig1[1-3]_*, DIR/findings.md
"""
import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from lowrank.rundir.atomic import write_text

from analysis.figures.data import MissingRuns
from analysis.lm_tables import frontier_data, lm_runs, lr_data
from analysis.runs import outcome_runs
from analysis.tables import markdown_table, table_path, write_csv

STEP = 10 ** 0.5          # half a decade: one step of a ~3x learning-rate grid
FACTOR = 10               # "10-100x typical LoRA ranks"; "best LoRA lr ~10x full's"
COLUMNS = ["setup", "finding", "verdict", "measured"]


def full_rank(runs: pd.DataFrame, spectrum: pd.DataFrame) -> list[dict]:
    r = lm_runs(runs, ["eval_loss"])
    full = r[r.method == "full"]
    sp = spectrum[spectrum.run_id.isin(full.run_id)] if len(spectrum) else spectrum
    rows = []
    for setup, f in full.groupby("setup"):
        s = sp[sp.run_id.isin(f.run_id)] if len(sp) else sp
        ranks = sorted({int(k) for k in r[(r.setup == setup) & (r.method == "lora")]["rank"].dropna()})
        if s is None or s.empty:
            rows.append(dict(setup=setup, finding="full_rank", verdict="undecided",
                             measured="no ΔW spectra of its full fine-tuning runs"))
            continue
        r90 = s.r90.astype(float)
        typical = float(np.median(ranks)) if ranks else 16.0
        per_type = s.groupby("matrix_type").r90.median().sort_values()
        ratio = float(r90.median()) / typical
        above = f"; share above the largest LoRA rank {max(ranks)}: {(r90 > max(ranks)).mean():.2f}" if ranks else ""
        rows.append(dict(setup=setup, finding="full_rank", verdict="holds" if ratio >= FACTOR else "does not hold",
                         measured=f"median r90 {r90.median():.0f} over {len(s)} matrices of {s.run_id.nunique()} "
                                  f"full runs (per type {per_type.min():.0f}-{per_type.max():.0f}) = {ratio:.1f}× "
                                  f"the median LoRA rank run ({typical:g}){above}"))
    return rows


def forgetting(runs: pd.DataFrame) -> list[dict]:
    d = frontier_data(runs)
    rows = []
    for setup, g in d.groupby("setup"):
        full, lora = g[g.curve == "full"].sort_values("eval_loss"), g[g.variant == "lora"]  # plain LoRA's claim
        if full.empty or lora.empty:
            continue
        lo, hi = full.eval_loss.min(), full.eval_loss.max()
        inside = lora[(lora.eval_loss >= lo) & (lora.eval_loss <= hi)]
        if full.eval_loss.nunique() < 2 or inside.empty:
            best = lora.loc[lora.eval_loss.idxmin()]
            rows.append(dict(setup=setup, finding="forgetting", verdict="undecided",
                             measured=f"no LoRA run's loss lies within full fine-tuning's {lo:.4f}-{hi:.4f}; LoRA's "
                                      f"lowest {best.eval_loss:.4f} ({best.curve}, forgetting {best.forgetting:.4f}), "
                                      f"full's forgetting {full.forgetting.min():.4f}-{full.forgetting.max():.4f}"))
            continue
        diff = inside.forgetting.to_numpy() - np.interp(inside.eval_loss, full.eval_loss, full.forgetting)
        median = float(np.median(diff))
        rows.append(dict(setup=setup, finding="forgetting", verdict="holds" if median < 0 else "does not hold",
                         measured=f"{len(inside)} LoRA runs within full fine-tuning's loss range {lo:.4f}-{hi:.4f} "
                                  f"({len(full)} full runs): forgetting minus full's at the same loss, median "
                                  f"{median:+.4f} (range {diff.min():+.4f} to {diff.max():+.4f}); lower in "
                                  f"{int((diff < 0).sum())} of {len(diff)}"))
    return rows


def lr_ratio(runs: pd.DataFrame) -> list[dict]:
    data = lr_data(runs)
    grid = data["curves"].groupby(["setup", "curve"]).lr.nunique()
    best = data["best"][[grid[s, c] >= 3 for s, c in zip(data["best"].setup, data["best"].curve)]]
    rows = []
    for setup, b in best.groupby("setup"):  # curves of three or more learning rates: a best inside the grid
        lora, full = b[b.variant == "lora"], b[b.curve == "full"]  # plain LoRA's claim: no variant pooled in
        if lora.empty or full.empty:
            continue
        ratios = lora.lr_over_full.to_numpy(float)
        near = bool(np.all((ratios >= FACTOR / STEP * 0.999) & (ratios <= FACTOR * STEP * 1.001)))
        flat = bool(ratios.max() / ratios.min() <= STEP * 1.001)  # neighbours on a ~3x grid
        edge = list(b.curve[b.edge])
        verdict = "undecided" if edge else "holds" if near and flat else "does not hold"
        rows.append(dict(setup=setup, finding="lr_ratio", verdict=verdict,
                         measured=f"best full lr {full.lr.iloc[0]:.3g}; best LoRA lr ÷ full's: "
                                  + ", ".join(f"{c} {x:.3g}" for c, x in zip(lora.curve, ratios))
                                  + ("; at its grid's edge: " + ", ".join(edge) if edge else "")))
    return rows


def findings(tables: dict) -> pd.DataFrame:
    """One row per setup and finding (COLUMNS); empty without causal-LM runs."""
    rows = []
    for fn, args in ((full_rank, (tables["runs"], tables.get("spectrum", pd.DataFrame()))),
                     (forgetting, (tables["runs"],)), (lr_ratio, (tables["runs"],))):
        try:
            rows += fn(*args)
        except MissingRuns:
            pass
    return pd.DataFrame(rows, columns=COLUMNS)


def report_lines(table: pd.DataFrame) -> list[str]:
    if table.empty:
        return []
    return ["## Generative findings (holds / does not hold / undecided, per setup)", "",
            "(a) full_rank: full-FT ΔW median r90 ≥ 10× the median LoRA rank; (b) forgetting: LoRA's forgetting "
            "below full fine-tuning's frontier at the same held-out loss; (c) lr_ratio: best LoRA lr ÷ best full lr "
            "within a half-decade of 10 for every rank and within one grid step across ranks "
            "(analysis/lm_findings.py).",
            "", markdown_table(table), ""]


def main(argv=None) -> None:
    from analysis.figures.registry import figures_markdown, write_figures  # lazy: matplotlib only here
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("roots", nargs="+", type=Path, help="directories holding run directories")
    p.add_argument("--spectrum", action="append", type=Path, default=[],
                   help="a report's tables/spectrum.csv for these runs (repeatable)")
    p.add_argument("--out", required=True, type=Path)
    opts = p.parse_args(argv)
    runs, _, skipped, not_pooled = outcome_runs(opts.roots)
    spectrum = pd.concat([pd.read_csv(s) for s in opts.spectrum], ignore_index=True).drop_duplicates(
        ["run_id", "module"]) if opts.spectrum else pd.DataFrame(
        columns=["run_id", "module", "r90", "layer", "matrix_type"])
    tables = {"runs": runs, "spectrum": spectrum[spectrum.run_id.isin(runs.run_id)]}
    tables["lm_findings"] = found = findings(tables)
    for name, df in tables.items():
        write_csv(table_path(opts.out, name), df)
    figures = figures_markdown(write_figures(opts.out, tables, [11, 12, 13]), opts.out)
    text = ["# Generative findings", "", f"Roots: {', '.join(map(str, opts.roots))}; spectra: "
            f"{', '.join(map(str, opts.spectrum)) or 'none'}; {len(runs)} runs, {len(skipped)} skipped", ""]
    text += [f"- `{r}`: {why}" for r, why in skipped] + [""] + [f"- {line}" for line in not_pooled]
    text += [""] * bool(not_pooled) + report_lines(found) + [figures]
    write_text(opts.out / "findings.md", "\n".join(text) + "\n")
    print(markdown_table(found) if len(found) else "no causal-LM runs", f"\n-> {opts.out / 'findings.md'}")


if __name__ == "__main__":
    main()
