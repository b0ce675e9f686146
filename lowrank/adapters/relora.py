"""ReLoRA (Lialin et al. 2023) in the trainer: `method.relora_every=N` folds every adapter into its base weight
after each N steps and starts a fresh one (lora_variants.relora_restart), so the accumulated
ΔW = W_base + s·B A − W0 can reach rank r × (restarts + 1). At each restart the factors' Adam moments and step
count are reset (in place, so a captured CUDA graph keeps its tensors) and the learning rate re-warms over
`method.relora_warmup` steps (ReLoRA's jagged schedule). ΔW is written dense, against W0, and the merged base
weights travel in the checkpoint (they no longer are the shared W0).
"""
import torch

from lowrank.adapters.lora import lora_layers
from lowrank.adapters.variants import relora_restart


def jagged(base, every: int, warmup: int):
    """The learning-rate factor `base(step)`, re-warmed linearly over `warmup` steps after each restart."""
    def f(step: int) -> float:
        if step < every or warmup <= 0:
            return base(step)
        return base(step) * min(1.0, (step % every + 1) / warmup)
    return f


class ReLoRA:
    def __init__(self, model, optimizer, every: int):
        self.model, self.optimizer, self.every = model, optimizer, every
        self.layers = lora_layers(model)
        self.restarts = 0

    def due(self, steps_done: int, max_steps: int) -> bool:
        return steps_done % self.every == 0 and steps_done < max_steps

    @torch.no_grad()
    def after_step(self, steps_done: int, max_steps: int) -> bool:
        """Restart every adapter when `steps_done` is a multiple of the period (never after the last step)."""
        if not self.due(steps_done, max_steps):
            return False
        factors = set()
        for layer in self.layers.values():
            relora_restart(layer)
            factors |= {id(layer.lora_A), id(layer.lora_B)}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) in factors:
                    for v in self.optimizer.state.get(p, {}).values():
                        if torch.is_tensor(v):
                            v.zero_()
        self.restarts += 1
        return True

    def state_dict(self) -> dict:
        """The restarts so far and, after one, the merged base weights (what a resumed run must start from)."""
        weights = {n: layer.base_layer.weight.detach().cpu().clone() for n, layer in self.layers.items()}
        return {"restarts": self.restarts, "base_weights": weights if self.restarts else {}}

    @torch.no_grad()
    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        self.restarts = state["restarts"]
        for n, w in state["base_weights"].items():
            self.layers[n].base_layer.weight.copy_(w)
