"""Every matrix of every run analysed with one matrix in memory at a time: the spectrum, intruder and amplification
rows and the subspace bases that analysis.report turns into tables.

    results, failed, timing = analyse_runs(runs, opts, keep_bases={"2026-01-01/full_s0", ...})

Matrix by matrix, not run by run: for each base-weights file and each of its matrices, W0 is read and decomposed once
(every left singular vector: intruder dimensions compare with all of them) and every run that stored that matrix is
analysed against it; then both are dropped. What stays is small: singular values, table rows, and the top
directions a φ grid needs, for the runs a pair will compare (`keep_bases`). A background thread reads, hashes and
checks the next tensor while this one is analysed (file reads, hashlib and torch drop the GIL). Tensors come
unverified (report.collect_runs reads headers only), so each is read and hashed once; one that fails its check
skips its run with the reason a full check gives, and a damaged W0 skips every run on that base file.

Per matrix, in fp64 on opts.device (each a phase of `timing`, seconds summed over matrices):
  read           waiting for the background reader (its own time is `read+hash (background)`)
  spectra        every σ of a dense ΔW: eigenvalues of its smaller Gram matrix (spectra.svdvals_from_gram; accurate
                 to ~1e-8 relative for σ ≥ 1e-4·σ_max, svdvals_gram's contract); LoRA through its factors
  ΔW vectors     ΔW's top K directions only: the largest amplification r, or --max-dim where a pair compares them
                 (spectra.svd_top: certified subspace iteration, a full eigh where it cannot certify)
  W0 SVDs        every σ and left vector of W0 from one eigh of its Gram matrix, once per base matrix
  W_ft SVD       every σ and the top max(--intruder-k, 64) vectors of W_ft = W0 + ΔW (spectra.svd_gram_top: one eigh)
  intruders      W_ft's top --intruder-k left vectors against every left vector of W0
  W_ft drift     principal-angle overlap of W0's and W_ft's top-k subspaces, σ_i(W_ft)/σ_i(W0) (lowrank.linalg.drift)
  update sparsity  share of |ΔW_ij| above 1e-3·max and the top 1 %'s energy share (LoRA: B·A a row block at a time)
  heavy tail     weightwatcher's power-law fit of ΔW's and W_ft's ESD (lowrank.linalg.heavy_tail)
  amplification  ‖UᵀWV‖_F for each r (amplification.amplification)
Matrices wider than --exact-max-dim get randomised top-k SVDs and no intruder count, W_ft drift or α
(spectra.svd_dense).
"""
import resource
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lowrank.rundir.integrity import CorruptArtifact

from analysis import amplification as amp
from lowrank.linalg import spectra
from lowrank.linalg.drift import sigma_drift, top_overlap
from lowrank.linalg.heavy_tail import ESD_COLUMNS, esd_metrics
from lowrank.linalg.sparsity import SHARE_COLUMN, factor_rows, update_sparsity
from analysis.checked_reads import DamagedFile
from analysis.runs import LowRank, Run, layer_and_matrix
from lowrank.linalg.subspace import factor_bases, random_phi

PHASES = ("read", "spectra", "ΔW vectors", "W0 SVDs", "W_ft SVD", "intruders", "W_ft drift", "update sparsity",
          "heavy tail", "amplification")
ANGLE_KS = (1, 8, 64)  # top-k singular subspaces of W0 and W_ft compared by their principal angles
DRIFT_K = 8  # σ_i(W_ft) / σ_i(W0) averaged over i ≤ 8 (and i = 1 alone)


@dataclass
class RunResult:
    """One run's rows; `sigmas` as (identity and place, S (q,) numpy) per matrix, expanded into rows at the end."""
    spectrum: list = field(default_factory=list)
    sigmas: list = field(default_factory=list)
    amps: list = field(default_factory=list)
    bases: dict = field(default_factory=dict)
    phases: Counter = field(default_factory=Counter)

    @property
    def seconds(self) -> float:
        return sum(self.phases.values())


@dataclass
class Base:
    """W0 of one matrix on the device, fp64, with its SVD: U every left vector (top-k only when `truncated`), S every
    value on the CPU, Vh the top right vectors."""
    w: torch.Tensor
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    truncated: bool


class PhaseClock:
    """Seconds per phase (PHASES), in total and per run. The device is synchronised at the end of each phase, so
    GPU work counts in the phase that queued it."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.counts = device, Counter(), Counter()

    @contextmanager
    def __call__(self, phase: str, run: RunResult | None = None):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.seconds[phase] += dt
            if run is not None:
                run.phases[phase] += dt


def amplification_ranks(run: Run, name: str, amp_ranks: list[int], n_delta: int, n_w: int) -> list[int]:
    """LoRA: the module's own rank (the paper's Table 7). Full fine-tuning: every r in amp_ranks that fits."""
    ranks = [run.module_rank(name)] if run.method == "lora" else amp_ranks
    return [r for r in ranks if r <= min(n_delta, n_w)]


def _prefetched(jobs: list, load):
    """(job, future of load(job)) in order; each job's read starts while the one before is analysed. One reader
    thread: at most two tensors are read ahead of the analysis at any time (this one's and the next)."""
    with ThreadPoolExecutor(1, thread_name_prefix="analysis-read") as pool:
        following = pool.submit(load, jobs[0]) if jobs else None
        for i, job in enumerate(jobs):
            current = following
            following = pool.submit(load, jobs[i + 1]) if i + 1 < len(jobs) else None
            yield job, current
            del current  # the consumer has the tensor; the future no longer holds it


def _decompose_w0(w0: torch.Tensor, k: int, opts) -> Base:
    dev = opts.device
    w = w0.to(dev).double()
    if opts.exact_max_dim is not None and min(w.shape) > opts.exact_max_dim:
        U, S, Vh = spectra.svd_dense(w0, k=opts.topk, randomized=True, device=dev)
        return Base(w, U.to(dev), S, Vh.to(dev), True)
    return Base(w, *spectra.svd_gram_full(w, min(k, *w.shape)), False)


def _analyse_matrix(run: Run, name: str, d, base: Base, where: dict, res: RunResult, keep: bool, opts,
                    clock: PhaseClock) -> None:
    """Rows and bases of one matrix of one run, appended to `res`."""
    dev, lora = opts.device, isinstance(d, LowRank)
    ident = {"run_id": run.run_id, "method": run.method, "rank": run.rank, "seed": run.seed}
    exact = lora or opts.exact_max_dim is None or min(d.shape) <= opts.exact_max_dim
    total, x = None, None
    with clock("spectra", res):
        if lora:  # the r×r core of the factors: exact, and never (out, in)
            U, S, Vh = spectra.svd_factored(d.B, d.A, d.scaling)
            U, Vh = U.to(dev), Vh.to(dev)
        elif exact:
            x = d.to(dev).double()
            g, _ = spectra.gram(x)
            S, _ = spectra.svdvals_from_gram(g)
            del g
        else:
            U, S, Vh = spectra.svd_dense(d, k=opts.topk, randomized=True, device=dev)
            U, Vh = U.to(dev), Vh.to(dev)
            total = torch.linalg.matrix_norm(d.double()).item() ** 2
    ranks = amplification_ranks(run, name, opts.amp_ranks, len(S), len(base.S))
    if x is not None:  # only the directions something reads: the top r for amplification, --max-dim for φ grids
        with clock("ΔW vectors", res):
            K = max(ranks + ([opts.max_dim] if keep else []), default=0)
            U, _, Vh, how = spectra.svd_top(x, K)
            clock.counts[f"ΔW vectors by {how}"] += 1
    fro = spectra.fro_norm(S) if total is None else total ** 0.5
    intruders, dm, dd, S_ft, w_ft = None, None, None, None, dict.fromkeys(W_FT_COLUMNS)
    if total is None and not base.truncated:  # intruders and W_ft's drift need every singular vector of W0
        dense = (d.B.to(dev).double() @ d.A.to(dev).double()) * d.scaling if lora else x
        intruders, S_ft, w_ft = _against_w0(base, dense, res, opts, clock)
        with clock("magnitude and direction", res):
            dm, dd = amp.magnitude_direction_change(base.w, dense)
            del dense
    with clock("update sparsity", res):  # LoRA's B·A a row block at a time
        share, top = update_sparsity(lambda: factor_rows(d.B.to(dev), d.A.to(dev), d.scaling) if lora
                                     else [x if x is not None else d])
    with clock("heavy tail", res):  # ΔW's α needs its whole spectrum: none from a randomised top-k SVD
        tails = esd_columns("dw_", S if total is None else None) | esd_columns("wft_", S_ft)
    out_dim, in_dim = base.w.shape
    res.spectrum.append(ident | where | {
        "module": name, "out_features": out_dim, "in_features": in_dim,
        **{f"r{round(p * 100)}": spectra.energy_rank(S, p, total) for p in (0.5, 0.9, 0.99)},
        "effective_rank": spectra.effective_rank(S) if total is None else None,
        "stable_rank": spectra.stable_rank(S) if total is None else total / S[0].item() ** 2,
        "fro_norm": fro, "spectral_norm": S[0].item(), "rel_norm": spectra.relative_norm(fro, base.w),
        "intruders": intruders, "delta_m": dm, "delta_d": dd,
        SHARE_COLUMN: share, "top1pct_energy": top, **w_ft, **tails})
    res.sigmas.append((ident | where, S.numpy()))
    with clock("amplification", res):
        for r in ranks:
            res.amps.append(ident | where | {"r": r}
                            | amp.amplification(base.w, (base.U, base.S, base.Vh), (U, S, Vh), r, seed=0, delta_fro=fro)
                            | {"random_phi_out": random_phi(r, r, out_dim), "random_phi_in": random_phi(r, r, in_dim)})
    if keep:
        cap = opts.max_dim  # φ grids never look further than this many directions
        res.bases[name] = where | {"delta": (U[:, :cap].cpu(), Vh[:cap].mT.cpu())}
        if lora:
            U_b, V_a = factor_bases(d.B, d.A)
            res.bases[name]["factor"] = (U_b[:, :cap].cpu(), V_a[:, :cap].cpu())


def _against_w0(base: Base, dense: torch.Tensor, res: RunResult, opts, clock: PhaseClock) -> tuple:
    """W_ft = W0 + ΔW against W0: (intruder count, every σ of W_ft, w_ft_columns). One eigh of W_ft's Gram matrix
    gives its whole spectrum (its ESD) and the top directions both the intruder count and the principal angles read."""
    with clock("W_ft SVD", res):
        U_ft, S_ft, Vh_ft, how = spectra.svd_gram_top(base.w + dense, max(opts.intruder_k, *ANGLE_KS))
        clock.counts[f"W_ft vectors by {how}"] += 1
    with clock("intruders", res):
        intruders = amp.intruder_count(base.U, U_ft, opts.intruder_k, opts.intruder_eps)
    with clock("W_ft drift", res):
        columns = w_ft_columns(base, U_ft, S_ft, Vh_ft)
    return intruders, S_ft, columns


def esd_columns(prefix: str, s: torch.Tensor | None) -> dict:
    """weightwatcher's columns (heavy_tail.esd_metrics) of the spectrum s, each named prefix + column;
    None without s."""
    return {prefix + c: v for c, v in (esd_metrics(s) if s is not None else dict.fromkeys(ESD_COLUMNS)).items()}


W_FT_COLUMNS = [f"cos2_{side}_k{k}" for side in ("out", "in") for k in ANGLE_KS] + ["sigma1_drift",
                                                                                 f"sigma_top{DRIFT_K}_drift"]


def w_ft_columns(base: Base, U_ft: torch.Tensor, S_ft: torch.Tensor, Vh_ft: torch.Tensor) -> dict:
    """W0 against W_ft: mean cos² of the principal angles between their top-k left ("out") and right ("in") singular
    subspaces for each k in ANGLE_KS (capped at the directions both have), σ_1's ratio and the mean ratio
    σ_i(W_ft)/σ_i(W0) over i ≤ DRIFT_K (W_FT_COLUMNS)."""
    out = {f"cos2_out_k{k}": v for k, v in top_overlap(base.U, U_ft, ANGLE_KS).items()}
    out |= {f"cos2_in_k{k}": v for k, v in top_overlap(base.Vh.mT, Vh_ft.mT, ANGLE_KS).items()}
    drift = sigma_drift(S_ft, base.S, DRIFT_K)
    return out | {"sigma1_drift": drift[0].item(), f"sigma_top{DRIFT_K}_drift": drift.mean().item()}


def _jobs(runs: list[Run]) -> list[tuple]:
    """(runs on one base file, matrix name, run or None for W0) in reading order: per base file, per matrix of it,
    W0 then each run's ΔW. Every W0 tensor is read, used or not: a damaged one skips its runs, as a full check does."""
    groups = {}
    for r in runs:
        groups.setdefault(str(r.base_path), []).append(r)
    jobs = []
    for _, group in sorted(groups.items()):
        for name in group[0].base_names():
            jobs.append((group, name, None))
            jobs += [(group, name, r) for r in group if name in r.names]
    return jobs


def analyse_runs(runs: list[Run], opts, keep_bases: set[str]) -> tuple[dict[str, RunResult], list, dict]:
    """({run_id: RunResult} of the runs analysed, [(run_id, reason)] of those that failed a check or an SVD on the way,
    timing: seconds per phase, how vectors were found, bytes read, peak memory)."""
    clock = PhaseClock(opts.device)
    results = {r.run_id: RunResult() for r in runs}
    kinds = {r.run_id: layer_and_matrix(dict.fromkeys(r.base_names() + list(r.names))) for r in runs}
    failed: dict[str, str] = {}
    background = Counter()

    def load(job):
        group, name, run = job
        if all(r.run_id in failed for r in ([run] if run else group)):
            return None  # nothing left to check it for
        t0 = time.perf_counter()
        t = run.delta(name) if run else group[0].base_weight(name)
        background["seconds"] += time.perf_counter() - t0
        parts = [t.A, t.B] if isinstance(t, LowRank) else [t]
        background["bytes"] += sum(x.numel() * x.element_size() for x in parts)
        return t

    def fail(rs, why):
        for r in rs:
            failed.setdefault(r.run_id, why)

    jobs, base, t0 = _jobs(runs), None, time.perf_counter()
    t_last = t0
    for i, ((group, name, run), future) in enumerate(_prefetched(jobs, load)):
        users = [r for r in group if name in r.names and r.run_id not in failed]
        if run is None:
            base = None  # the last matrix's W0 is done with
        try:
            with clock("read", results[run.run_id] if run else None):
                t = future.result()
            if t is None:
                continue
            if run is None:
                if users:  # W0's SVD, for every run that stored this matrix
                    k = max([opts.intruder_k, *ANGLE_KS] + opts.amp_ranks + [r.max_rank for r in users])
                    with clock("W0 SVDs"):
                        base = _decompose_w0(t, k, opts)
            elif base is not None:
                where = dict(zip(("layer", "matrix_type"), kinds[run.run_id][name]))
                _analyse_matrix(run, name, t, base, where, results[run.run_id], run.run_id in keep_bases, opts, clock)
            del t
        except DamagedFile as e:  # from before the analysis: W0's damage skips every run on that file
            if run is None:
                for r in group:
                    fail([r], r.base_prefix + e.problem)
            else:
                fail([run], str(e))
        except (CorruptArtifact, torch.linalg.LinAlgError) as e:  # changed while analysed, or an SVD that failed
            fail([run] if run else users, f"while analysing: {e}")
        if time.perf_counter() - t_last > 10 or i == len(jobs) - 1:
            t_last = time.perf_counter()
            print(f"analysis: {i + 1}/{len(jobs)} tensors read and analysed ({t_last - t0:.1f} s)", flush=True)
    timing = {"phases": {p: clock.seconds[p] for p in PHASES}, "counts": dict(clock.counts),
              "read+hash (background)": background["seconds"], "bytes read": background["bytes"],
              "peak host RSS bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if opts.device.type == "cuda":
        timing["peak CUDA allocated bytes"] = torch.cuda.max_memory_allocated(opts.device)
    return {k: v for k, v in results.items() if k not in failed}, sorted(failed.items()), timing
