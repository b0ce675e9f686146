"""Fastfood's memory measured: a projection into 2^22 weights, in a fresh process whose peak RSS says what it held."""
import json
import subprocess
import sys

import torch

from lowrank.adapters.fastfood import Fastfood


def test_fastfood_memory_is_linear_in_D_measured():
    """What a projection stores is three length-L vectors, and projecting into 2^22 weights from d = 10^4 (a dense
    P: 168 GB) raises a fresh process's peak RSS by some copies of the output only."""
    ff = Fastfood(10_000, 2 ** 22, torch.Generator().manual_seed(0))
    assert ff.state_bytes() == ff.L * (1 + 8 + 4)
    code = """
import json, resource, torch
from lowrank.adapters.fastfood import Fastfood
ff = Fastfood(10_000, 2 ** 22, torch.Generator().manual_seed(0))
theta = torch.randn(10_000)
ff(theta)  # warm: the allocator's first pages
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = ff(theta)
for _ in range(3):
    out = ff(theta)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": peak - before, "out": out.numel() * 4}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    m = json.loads(res.stdout)
    # O(D): some D-sized buffers (how many the allocator keeps varies), never anything of size d · D
    assert m["growth"] < 32 * m["out"] < 10_000 * m["out"] / 100, m
