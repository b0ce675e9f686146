"""How an update spreads over its entries. Pure functions over tensors.

    share_above, top_share = update_sparsity(lambda: [delta])          # a dense ΔW, one block
    share_above, top_share = update_sparsity(lambda: factor_rows(B, A, scaling))  # LoRA, row block by row block

share_above: the share of entries with |ΔW_ij| > REL_THRESHOLD · max|ΔW|. Relative, so that it reads the same at any
learning rate, step count or LoRA scaling; 1e-3 counts every entry within three decades of the largest, so a dense
Gaussian update reads ≈ 1 (its max is ~5σ) and a sparse one reads its support (entries the optimiser left at 0 or
moved by rounding only).
top_share: the share of ‖ΔW‖_F² held by the ⌈TOP_FRACTION · n⌉ entries of largest |ΔW_ij|; 0.085 for i.i.d.
Gaussian entries (E[z²; |z| > 2.576]), 1 for an update on 1 % of the entries or fewer.
LoRA's ΔW = scaling · B A is formed ROW_BLOCK_ENTRIES at a time, never as a whole (out, in) matrix.
"""
import math
from typing import Callable, Iterable

import torch

REL_THRESHOLD = 1e-3
SHARE_COLUMN = "share_above_1e-3max"  # the report's column: it names the threshold
TOP_FRACTION = 0.01
ROW_BLOCK_ENTRIES = 1 << 22  # 32 MiB of fp64 per block of B[rows] @ A


def factor_rows(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> Iterable[torch.Tensor]:
    """scaling · B @ A (B: (out, r), A: (r, in)) as row blocks (rows, in), fp64, on the factors' device."""
    B, A = B.double(), A.double()
    rows = max(1, ROW_BLOCK_ENTRIES // A.shape[1])
    for start in range(0, B.shape[0], rows):
        yield (B[start:start + rows] @ A) * scaling  # (rows, r) @ (r, in)


def update_sparsity(blocks: Callable[[], Iterable[torch.Tensor]], rel: float = REL_THRESHOLD,
                    top: float = TOP_FRACTION) -> tuple[float, float]:
    """(share of entries with |x| > rel · max|x|, share of Σx² held by the ⌈top · n⌉ largest |x|) of the matrix
    whose entries `blocks()` yields, block by block (any shapes). Two passes: the threshold and the count of top entries
    need the max and n first. (0, 0) for a zero matrix."""
    n, total, peak = 0, 0.0, 0.0
    for b in blocks():
        a = b.detach().double().abs()
        n, total = n + a.numel(), total + (a * a).sum().item()
        peak = max(peak, a.max().item()) if a.numel() else peak
    if not n or total <= 0:
        return 0.0, 0.0
    k, above, kept = max(1, math.ceil(top * n)), 0, None
    for b in blocks():
        a = b.detach().double().abs().flatten()
        above += int((a > rel * peak).sum().item())
        kept = a if kept is None else torch.cat([kept, a])
        kept = torch.topk(kept, min(k, kept.numel()), sorted=False).values  # the k largest of all blocks so far
    return above / n, (kept ** 2).sum().item() / total
