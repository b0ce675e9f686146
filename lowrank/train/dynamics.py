"""Rank over training time: at snapshot steps, each tracked matrix's ΔW spectrum (r50/r90/r99, effective and stable
rank, ‖ΔW‖_F) and how far its top directions moved since the previous snapshot (φ(k, k) of the LoRA paper's §7 on
the output side, k = 1 and 8: 1 means the top-k subspace stayed, ~k/out that it is as new as a random one).

LoRA's ΔW = s·B A is decomposed from its factors (QR of B and Aᵀ, an r × r core: cheap at any size); a full or
subspace run's ΔW = W − W0 against the W0 copies the trainer keeps, on the weights' device (the Gram path on a
GPU). Rows go to `dynamics.csv` in the run directory and to the logger; `trainer.dynamics_targets` limits the
matrices tracked (module-name suffixes, or all).
"""
import math
from pathlib import Path

import torch
from torch import nn

from lowrank.adapters.targets import select_targets
from lowrank.linalg import spectra
from lowrank.linalg.subspace import phi

from lowrank.rundir.atomic import write_text
from lowrank.rundir.layout import DYNAMICS_FILE

PHI_K = (1, 8)
COLUMNS = ("step", "module", "r50", "r90", "r99", "effective_rank", "stable_rank", "fro_norm", "phi_1", "phi_8")


def tracked(names: list[str], targets) -> list[str]:
    """The matrices `trainer.dynamics_targets` picks among the targets: all (or None), or by the targets' own suffix
    rule (lowrank.adapters.targets), so an entry that matches nothing is an error naming the valid suffixes."""
    if targets in (None, "all"):
        return list(names)
    return select_targets(names, targets, key="trainer.dynamics_targets")


class Dynamics:
    """Snapshots of ΔW for `names`, read as `method` reads it (lowrank.adapters.methods): from its factors where it
    is a product, else dense against `w0` (CPU fp32 copies, moved once to the weights' device)."""

    def __init__(self, model: nn.Module, names: list[str], w0: dict | None, method):
        self.model, self.names, self.w0, self.method = model, names, w0, method
        self.previous: dict[str, torch.Tensor] = {}  # top-8 left singular vectors at the last snapshot (CPU)
        self._w0_dev: dict[str, torch.Tensor] = {}

    def _w0_on_device(self, name: str) -> torch.Tensor | None:
        if not self.method.needs_w0:
            return None
        if name not in self._w0_dev:
            self._w0_dev[name] = self.w0[name].to(self.method.weight(self.model, name).device)
        return self._w0_dev[name]

    def _delta_svd(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(all singular values, the top-8 left singular vectors) of the current ΔW, float64 on the CPU."""
        d = self.method.delta(self.model, name, self._w0_on_device(name))
        if d.factors is not None:  # QR of the factors: an r × r core, cheap at any size
            U, S, _ = spectra.svd_factored(*d.factors)
            return S.cpu(), U[:, :max(PHI_K)].cpu()
        if d.dense.is_cuda:  # the Gram path: one eigh of the smaller Gram matrix
            S = spectra.svdvals_gram(d.dense)[0].cpu()
            U = spectra.svd_top(d.dense, max(PHI_K))[0].cpu()
        else:
            U, S, _ = torch.linalg.svd(d.dense.double(), full_matrices=False)
            U = U[:, :max(PHI_K)]
        return S.double(), U.double()

    @torch.no_grad()
    def snapshot(self, step: int) -> list[dict]:
        rows = []
        for name in self.names:
            S, U = self._delta_svd(name)
            prev = self.previous.get(name)
            row = {"step": step, "module": name,
                   **{f"r{round(p * 100)}": spectra.energy_rank(S, p) for p in (0.5, 0.9, 0.99)},
                   "effective_rank": spectra.effective_rank(S), "stable_rank": spectra.stable_rank(S),
                   "fro_norm": spectra.fro_norm(S)}
            for k in PHI_K:
                ok = prev is not None and float(S[0]) > 0 and min(prev.shape[1], U.shape[1]) >= k
                row[f"phi_{k}"] = phi(prev, U, k, k) if ok else math.nan
            self.previous[name] = U
            rows.append(row)
        return rows


def summary(rows: list[dict]) -> dict:
    """Means over the matrices of one snapshot, for the logger."""
    out = {}
    for key in ("r90", "stable_rank", "fro_norm", "phi_1", "phi_8"):
        vals = [r[key] for r in rows if r[key] is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
        if vals:
            out[f"dynamics/{key}"] = sum(vals) / len(vals)
    return out


def write_dynamics(run_dir, rows: list[dict]) -> None:
    """dynamics.csv in the run directory: one row per snapshot step × matrix (COLUMNS), written whole."""
    lines = [",".join(COLUMNS)]
    for r in rows:
        lines.append(",".join("" if r[c] is None else str(r[c]) for c in COLUMNS))
    write_text(Path(run_dir) / DYNAMICS_FILE, "\n".join(lines) + "\n")
