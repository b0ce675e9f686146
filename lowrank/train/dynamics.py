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

from lowrank.linalg import spectra
from lowrank.linalg.subspace import phi

from lowrank.rundir.atomic import write_text
from lowrank.adapters.lora import lora_layers
from lowrank.adapters.variants import pissa_factors

PHI_K = (1, 8)
FILE = "dynamics.csv"
COLUMNS = ("step", "module", "r50", "r90", "r99", "effective_rank", "stable_rank", "fro_norm", "phi_1", "phi_8")


def tracked(names: list[str], targets) -> list[str]:
    """The matrices `trainer.dynamics_targets` picks: all (or None), or those whose name ends in a suffix."""
    if targets in (None, "all"):
        return list(names)
    suffixes = [targets] if isinstance(targets, str) else list(targets)
    return [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]


class Dynamics:
    """Snapshots of ΔW for `names` (LoRA layers by their factors; other methods against `w0`, CPU fp32; with
    `merged_base`, ReLoRA's LoRA layers as their base weight + s·B A against `w0`)."""

    def __init__(self, model: nn.Module, names: list[str], w0: dict | None, merged_base: bool = False):
        self.model, self.names, self.w0, self.merged_base = model, names, w0, merged_base
        self.lora = lora_layers(model)
        self.previous: dict[str, torch.Tensor] = {}  # top-8 left singular vectors at the last snapshot (CPU)
        self._w0_dev: dict[str, torch.Tensor] = {}

    def _delta_svd(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(all singular values, the top-8 left singular vectors) of the current ΔW, float64 on the CPU."""
        layer = self.lora.get(name)
        if layer is not None and not hasattr(layer, "magnitude") and not self.merged_base:  # B·A (PiSSA: [B, −B0][A; A0])
            B, A = pissa_factors(layer) if hasattr(layer, "lora_A0") else (layer.lora_B, layer.lora_A)
            U, S, _ = spectra.svd_factored(B.detach(), A.detach(), layer.scaling)
            return S.cpu(), U[:, :max(PHI_K)].cpu()
        if layer is not None and not self.merged_base:  # DoRA: ΔW against the base it scales
            delta = layer.delta_weight().detach().float()
        else:
            w = (layer.base_layer if layer is not None else self.model.get_submodule(name)).weight.detach()
            if name not in self._w0_dev:
                self._w0_dev[name] = self.w0[name].to(w.device)
            delta = w.float() - self._w0_dev[name]
            if layer is not None:  # ReLoRA: what was folded into the base, and the live adapter
                delta += layer.delta_weight().detach().float()
        if delta.is_cuda:  # the Gram path: one eigh of the smaller Gram matrix
            S = spectra.svdvals_gram(delta)[0].cpu()
            U = spectra.svd_top(delta, max(PHI_K))[0].cpu()
        else:
            U, S, _ = torch.linalg.svd(delta.double(), full_matrices=False)
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
    write_text(Path(run_dir) / FILE, "\n".join(lines) + "\n")
