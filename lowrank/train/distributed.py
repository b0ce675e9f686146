"""Training over several processes with torch.distributed: data parallel (DDP) or fully sharded (FSDP2).

    torchrun --nproc_per_node 8 -m experiments.train method=full                       # DDP (trainer.parallel=auto)
    torchrun --nproc_per_node 8 -m experiments.train method=full trainer.parallel=fsdp

`python -m experiments.train` runs unchanged under torchrun: `start` reads torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK), joins the process group (NCCL on CUDA, gloo on the CPU) and puts each process on its
GPU. Each rank trains on its slice of every step's batch (`batch_slice`); DDP averages the gradients, so they
equal those of one process that sees the whole batch. Rank 0 alone writes the run directory; the other ranks
follow its decisions (`share`) and take part in every collective (gathers for checkpoints and ΔW).

Gradient traffic is measured, not computed: under DDP a communication hook wraps torch's own all-reduce hook and
adds up the bytes of every bucket it reduces; under FSDP a reduce-scatter that wraps FSDP's own adds up the bytes
of every gradient buffer it reduce-scatters. Communication time: CUDA events around each collective on GPU, the
wall time until the collective's work completes on the CPU.
"""
import atexit
import logging
import os
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn

from lowrank.errors import ConfigError, check_choice

log = logging.getLogger(__name__)

PARALLEL = ("auto", "none", "ddp", "fsdp")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_parallel(setting, world: int, launched: bool) -> str:
    """`auto`: ddp under a launcher with more than one process, else none. ddp and fsdp need a launcher
    (torchrun sets WORLD_SIZE); none with several processes would train N copies of the run."""
    check_choice("trainer.parallel", setting, PARALLEL)
    if setting == "auto":
        return "ddp" if world > 1 else "none"
    if setting == "none" and world > 1:
        raise ConfigError(f"trainer.parallel=none is not valid with {world} processes (WORLD_SIZE); choose auto, "
                          f"ddp or fsdp")
    if setting in ("ddp", "fsdp") and not launched:
        raise ConfigError(f"trainer.parallel={setting} is not valid in one process; launch it with torchrun "
                          f"--nproc_per_node N, or choose auto or none")
    return setting


def check_world_size(setting, world: int) -> None:
    """`trainer.world_size`: auto (what the launcher started), or the number of processes it must be."""
    if setting == "auto":
        return
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ConfigError(f"trainer.world_size={setting!r} is not valid; it must be auto or an integer >= 1")
    if setting != world:
        raise ConfigError(f"trainer.world_size={setting} is not valid; this run has {world} process(es) "
                          f"(WORLD_SIZE); use auto")


def _export_slurm_tasks() -> None:
    """A submitit SLURM job of several tasks (hydra.launcher.tasks_per_node or nodes > 1) starts one process
    per task, as torchrun would: give them torch.distributed's variables from SLURM's."""
    if ("WORLD_SIZE" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
            and int(os.environ.get("SLURM_NTASKS", "1")) > 1):
        from submitit.helpers import TorchDistributedEnvironment
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # LOCAL_RANK picks the GPU


def start(tc) -> str:
    """Join torchrun's process group (once per process; a multirun's later jobs reuse it) and return the
    parallel mode: none, ddp or fsdp."""
    _export_slurm_tasks()
    launched = "WORLD_SIZE" in os.environ
    world = _env_world()
    mode = resolve_parallel(tc.get("parallel", "auto"), world, launched)
    check_world_size(tc.get("world_size", "auto"), world)
    if mode == "none" or dist.is_initialized():
        return mode
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and str(tc.device) != "cpu"
    if cuda:
        if str(tc.device) not in ("auto", "cuda"):
            raise ConfigError(f"trainer.device={tc.device!r} is not valid under torchrun; each process takes the "
                              f"GPU of its LOCAL_RANK: use auto or cuda")
        torch.cuda.set_device(local_rank)  # before NCCL starts: its communicator binds to this GPU
    dist.init_process_group("nccl" if cuda else "gloo",
                            device_id=torch.device("cuda", local_rank) if cuda else None)
    atexit.register(dist.destroy_process_group)
    return mode


def _device() -> torch.device:
    """Where this rank's collectives run: its GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def share(obj=None):
    """Rank 0's `obj` on every rank (the others pass None): rank 0 decides, the others follow."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def followers_told():
    """Rank 0's side of `share`: yields `tell(verdict)`; an exception before anything was told tells the other
    ranks ("stop", kind, message), so they raise it too instead of waiting forever."""
    told = []

    def tell(verdict):
        told.append(True)
        share(verdict)
    try:
        yield tell
    except BaseException as e:
        if not told:
            share(("stop", type(e).__name__, str(e)))
        raise


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (SIGTERM reaches one rank; all must checkpoint at one step)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of a per-rank value (each rank's loss over its slice: their mean is the whole batch's)."""
    if not dist.is_initialized():
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def sum_over_ranks(values: list[int]) -> list[int]:
    """Per-rank counts (a step's tokens) summed over every rank."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64 if dist.get_backend() == "gloo" else torch.int64, device=_device())
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def batch_slice(idx: list[int]) -> list[int]:
    """This rank's contiguous share of a step's batch indices (the batch is a multiple of the world size)."""
    n, r = len(idx) // world_size(), rank()
    return idx[r * n:(r + 1) * n]


def check_batch(batch_size: int, micro: int) -> int:
    """The per-rank batch; the global batch must split evenly, and the micro-batch divide the per-rank one."""
    w = world_size()
    if batch_size % w:
        raise ConfigError(f"trainer.batch_size={batch_size} is not valid with {w} processes; it must be a "
                          f"multiple of the world size")
    local = batch_size // w
    if local % micro:
        raise ConfigError(f"trainer.micro_batch_size={micro} is not valid with {w} processes; it must divide the "
                          f"per-process batch trainer.batch_size / world_size = {local}")
    return local


# ---------------------------------------------------------------------------------------------- sharded tensors

def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every rank calls it, in the same order); a plain tensor
    as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def load_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, or into this rank's shard of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    with torch.no_grad():
        if isinstance(param, DTensor):
            param.copy_(distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements))
        else:
            param.copy_(full)


# ---------------------------------------------------------------------------------------------- traffic meter

class GradSync:
    """Bytes and time of the gradient collectives of each optimizer step, as they happen."""

    def __init__(self):
        self.bytes = 0
        self.seconds = 0.0
        self.steps = 0
        self._events = []  # CUDA (start, end) pairs not yet read

    def begin(self, tensor: torch.Tensor):
        self.bytes += tensor.numel() * tensor.element_size()
        if tensor.is_cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def end(self, started) -> None:
        if isinstance(started, torch.cuda.Event):
            stop = torch.cuda.Event(enable_timing=True)
            stop.record()
            self._events.append((started, stop))
        else:
            self.seconds += time.perf_counter() - started

    def step_done(self) -> None:
        for start, stop in self._events:
            stop.synchronize()  # the step's result was read already: its collectives are done
            self.seconds += start.elapsed_time(stop) / 1000
        self._events.clear()
        self.steps += 1

    def summary(self) -> dict:
        n = max(1, self.steps)
        return {"grad_sync_bytes_per_step": self.bytes / n if self.steps else None,
                "grad_sync_seconds_per_step": self.seconds / n if self.steps else None}


def _counting_allreduce(meter: GradSync, bucket):
    """DDP's own all-reduce hook (mean over ranks), with its bucket's bytes and time recorded."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    started = meter.begin(bucket.buffer())

    def done(fut):
        meter.end(started)
        return fut.value()
    return allreduce_hook(None, bucket).then(done)


class _CountingReduceScatter:
    """FSDP's reduce-scatter, with the bytes of each gradient buffer it reduces and its time recorded."""

    def __init__(self, inner, meter: GradSync):
        self.inner, self.meter = inner, meter

    def allocate(self, size, *, dtype, device):
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        started = self.meter.begin(input_tensor)
        work = self.inner(output_tensor=output_tensor, input_tensor=input_tensor, group=group, op=op,
                          async_op=async_op)
        if work is not None and async_op:
            work.wait()
        self.meter.end(started)
        return work


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's repeated blocks: the largest ModuleList (Llama's `model.layers`, BERT's `encoder.layer`,
    GPT-2's `transformer.h`)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ConfigError("trainer.parallel=fsdp needs a model with a list of transformer blocks; use ddp")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def wrap_model(model: nn.Module, mode: str, device: torch.device, precision: str, meter: GradSync):
    """(the module to train through, sync(last) -> a context for each micro-batch's backward).

    ddp: a DDP wrapper around `model` (which stays the plain module: evaluation, checkpoints and ΔW use it); its
    gradients are all-reduced once a step, on the last micro-batch. fsdp: `model` itself, sharded in place with
    `fully_shard` per transformer block and at the root; frozen weights are sharded like the rest (only
    parameters that train get gradients to reduce-scatter). Under bf16 precision the blocks compute with bf16
    copies of their weights (all-gathered in bf16) and reduce gradients in fp32."""
    if mode == "none":
        return model, lambda last: nullcontext()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        ddp.register_comm_hook(meter, _counting_allreduce)
        return ddp, lambda last: nullcontext() if last else ddp.no_sync()
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world_size(),))
    weights_fp32 = all(p.dtype == torch.float32 for p in model.parameters())
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16" and weights_fp32 else MixedPrecisionPolicy())
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:  # the same default comm in each: wrap each
                group._reduce_scatter_comm = _CountingReduceScatter(group._reduce_scatter_comm, meter)

    # Every micro-batch's gradients are reduce-scattered at once: skipping the sync would keep unsharded
    # gradients of the whole model on each rank until the step's last micro-batch.
    return model, lambda last: nullcontext()
