"""LoRA variants that change what the adapter starts from or how it is applied, each with ΔW defined against the
original W0 so the analysis reads them like any LoRA run.

PiSSA (Meng et al. 2024): the adapter starts as W's top-r singular part, B0 = U_r √S_r / √s,
A0 = √S_r V_rᵀ / √s (s the LoRA scaling, so s·B0 A0 = U_r S_r V_rᵀ), and the frozen base becomes the residual
W0 − s·B0 A0: the model's first forward is the base model's. ΔW = s(B A − B0 A0), a rank ≤ 2r product: it is
written as the factors [B, −B0] and [A; A0] (lowrank.rundir.delta), so spectra still come from QR of factors.

DoRA (Liu et al. 2024): W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row, with the magnitude m (out,) trained and
started at W0's row norms, so again the first forward is the base model's. As in the paper (§4.3) and PEFT, the
norm is treated as a constant in backward. ΔW = W' − W0 is dense (not a product of the factors); it is written as
`{name}.delta`; the analysis gives every run ΔM and ΔD (analysis.amplification.magnitude_direction_change).
"""
import torch
import torch.nn.functional as F
from torch import nn

from lowrank.adapters.lora import LoRALinear


@torch.no_grad()
def pissa_init(layer: LoRALinear) -> None:
    """Set A, B to W's top-r singular part and the base weight to the residual, computed in fp32 (PEFT's way)."""
    w = layer.base_layer.weight
    U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)
    r, s = layer.rank, layer.scaling
    root = (S[:r] / s).sqrt()
    layer.lora_A.copy_(root[:, None] * Vh[:r])
    layer.lora_B.copy_(U[:, :r] * root)
    w.copy_((w.float() - s * layer.lora_B.float() @ layer.lora_A.float()).to(w.dtype))
    layer.register_buffer("lora_A0", layer.lora_A.detach().clone(), persistent=True)
    layer.register_buffer("lora_B0", layer.lora_B.detach().clone(), persistent=True)


def pissa_factors(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with s·B' A' = s(B A − B0 A0) = ΔW against the original W0: B' = [B, −B0], A' = [A; A0]."""
    B, A = layer.lora_B.detach().float(), layer.lora_A.detach().float()
    return torch.cat([B, -layer.lora_B0.float()], 1), torch.cat([A, layer.lora_A0.float()], 0)


class PiSSALinear(LoRALinear):
    """LoRALinear started from W's top-r singular part (`pissa_init`), the base holding the residual; its ΔW
    against the original W0 is the rank-2r product of `pissa_factors`."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 scaling: str = "standard", init: str = "pissa"):
        super().__init__(base_layer, rank, alpha, dropout, scaling, init)
        pissa_init(self)

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return (*pissa_factors(self), self.scaling)


class DoRALinear(LoRALinear):
    """LoRALinear with DoRA's magnitude / direction split. Computes on its own (no fused or shared-input path);
    its ΔW is dense (`delta_factors` is None)."""
    shares_input, dense_delta = False, True

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 scaling: str = "standard", init: str = "kaiming_uniform"):
        super().__init__(base_layer, rank, alpha, dropout, scaling, init)
        w = base_layer.weight
        self.magnitude = nn.Parameter(torch.linalg.vector_norm(w.detach().float(), dim=1).to(w.dtype))

    def _row_scale(self) -> torch.Tensor:
        """m / ‖W0 + s·B A‖_row, the norm detached (DoRA §4.3)."""
        w = self.base_layer.weight
        with torch.no_grad():
            norm = torch.linalg.vector_norm(w.float() + self.scaling * (self.lora_B.float() @ self.lora_A.float()),
                                            dim=1)
        return self.magnitude / norm.to(self.magnitude.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        b = self.base_layer
        lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling
        out = self._row_scale().to(x.dtype) * (F.linear(x, b.weight) + lora)
        return out if b.bias is None else out + b.bias

    def delta_factors(self) -> None:
        return None

    def trainable(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B, self.magnitude]

    def delta_weight(self) -> torch.Tensor:
        """ΔW = m ⊙ (W0 + s·B A) / ‖·‖_row − W0, shape (out, in)."""
        w = self.base_layer.weight.float()
        merged = w + self.scaling * (self.lora_B.float() @ self.lora_A.float())
        return self._row_scale().float()[:, None] * merged - w

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("merge() on an already merged LoRA layer")
        w = self.base_layer.weight
        self._w0 = w.detach().clone()
        w += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("unmerge() on a LoRA layer that is not merged")
        self.base_layer.weight.copy_(self._w0)
        del self._w0
        self.merged = False


@torch.no_grad()
def relora_restart(layer: LoRALinear) -> None:
    """ReLoRA (Lialin et al. 2023): fold s·B A into the base weight, then start a fresh adapter (A re-drawn as at
    injection, B = 0), so the accumulated ΔW = W_base − W0 (+ the live s·B A) can reach rank r × (restarts + 1).
    The caller resets the factors' optimizer state (ReLoRA's reset) and re-warms the learning rate."""
    w = layer.base_layer.weight
    w += (layer.scaling * layer.lora_B.float() @ layer.lora_A.float()).to(w.dtype)
    nn.init.kaiming_uniform_(layer.lora_A, a=5 ** 0.5)
    layer.lora_B.zero_()
