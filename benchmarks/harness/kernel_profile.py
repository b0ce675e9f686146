"""Where a call's GPU time goes: the kernel time of one profiled call, in total and by kind of kernel.

    busy_s, by_kind_s, top = kernel_time(lambda: step(batch), device)

Against the call's wall time, the total says who sets the pace: on an H200, a 1.1B LoRA step of 86 ms on 82 ms of
kernels was GPU-bound; an eager 7B one of 199 ms on 141 ms waited on the host launching kernels. Kinds come from kernel
names (cuBLAS, cuDNN, Triton, PyTorch's elementwise templates), so a new library's kernels may land in "other".
"""
import torch

# (kind, substrings of a lower-cased kernel name); the first match wins
KERNEL_KINDS = [("attention", ("flash", "fmha", "attention", "cudnn")), ("optimizer", ("adam",)),
                ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "splitk")), ("compiled", ("triton",)),
                ("loss", ("softmax", "nll", "cross_entropy")), ("copy", ("copy", "cat", "fill")),
                ("reduction", ("reduce",)), ("elementwise", ("elementwise", "vectorized", "unrolled"))]


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def kernel_time(fn, device: torch.device, top: int = 25) -> tuple[float | None, dict | None, str | None]:
    """Run fn() once under the profiler: (seconds of kernel time, seconds by kind, the profiler's table of the
    `top` kernels by their own time); (None, None, None) off CUDA."""
    if device.type != "cuda":
        return None, None, None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)  # the kernels run asynchronously: wait for them inside the profile
    events = prof.key_averages()
    kinds: dict[str, float] = {}
    for e in events:
        t = getattr(e, "self_device_time_total", 0) * 1e-6
        if t > 0:
            kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + t
    table = events.table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=70)
    return sum(kinds.values()), kinds, table
