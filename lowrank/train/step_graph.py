"""The whole training step (forward, backward, optimizer step) captured as one CUDA graph and replayed.

    opt = torch.optim.AdamW(params, fused=True, capturable=True)   # step count on the GPU: capturable
    step = StepGraph(step, warmup=3)    # the first 3 calls run as they are, each on its own batch, then replays

Why: with compiled blocks a step is a few thousand kernels, and per-block graphs still leave the host
launching the embeddings, the head, the loss and the optimizer between them; with the whole step in one
graph nothing waits on the host. Needs one static batch shape, no host reads of GPU values inside the step
(transformers' mask building does one: `lowrank.train.blocks.causal_attention_without_mask`), and an optimizer that
updates its parameters in place with its state on the GPU.
"""
import torch
from torch.utils._pytree import tree_flatten, tree_map


class StepGraph:
    """`step(batch) -> outputs` (tensors, or any nesting of lists, tuples and dicts of them) run as it is for its
    first `warmup` calls, each on its own batch, then captured on the next call and replayed for every call
    after: a trainer's warm-up steps are real steps, nothing is undone. The warm-up runs on a side stream, as
    torch.cuda.graph needs; it compiles and creates the optimizer's state (created inside the capture, the
    moments would restart from zero at every replay). Every batch must have the first one's shapes and dtypes.
    A capture runs no kernels, so the capturing call replays at once."""

    def __init__(self, step, warmup: int = 3):
        self.step, self.warmup, self.calls = step, warmup, 0
        self.static, self.outputs, self.graph = None, None, None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _load(self, batch) -> None:
        new, _ = tree_flatten(batch)
        if self.static is None:
            self.static = tree_map(lambda t: t.clone(), batch)
            return
        for dst, src in zip(tree_flatten(self.static)[0], new, strict=True):
            if dst.shape != src.shape or dst.dtype != src.dtype:
                raise ValueError(f"a captured step needs one static batch shape: got {tuple(src.shape)} "
                                 f"{src.dtype} after {tuple(dst.shape)} {dst.dtype}")
            dst.copy_(src, non_blocking=True)

    def __call__(self, batch):
        self._load(batch)
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(self.static)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.step(self.static)
        self.graph.replay()
        return tree_map(lambda t: t.clone(), self.outputs)  # the next replay overwrites the captured outputs
