"""Throughput, MFU and peak memory.

FLOPs per token follow Kaplan et al. (2020) / PaLM appendix B: a matmul weight of N parameters costs 2N in
the forward pass, 2N for the input gradient and 2N for the weight gradient, so full fine-tuning is 6N and a
frozen weight (LoRA) 4N; attention adds 12·L·d·T (nanoGPT's `estimate_mfu`).
"""
import resource
import sys

import torch
from torch import nn

from lowrank.adapters.lora import lora_layers

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets; unknown devices give None.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12,
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision != "bf16":
        return None  # CPU peaks vary too much to guess; fp32 on GPU is not what MFU is quoted against
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(model: nn.Module, seq_len: int, n_layers: int, hidden: int) -> float:
    """Training FLOPs per token: 6N for trainable matmul weights, 4N for frozen ones, plus attention."""
    total = 0.0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            n = m.weight.numel()
            total += (6 if m.weight.requires_grad else 4) * n
    for layer in lora_layers(model).values():  # LoRA factors are plain parameters used as matmul weights
        total += 6 * (layer.lora_A.numel() + layer.lora_B.numel())
    return total + 12 * n_layers * hidden * seq_len


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously): call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated by this process; CPU: peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def state_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)
