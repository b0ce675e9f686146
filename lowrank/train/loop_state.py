"""The training loop's state: what a checkpoint carries besides weights, optimizer and RNG (lowrank/train/checkpoint.py)
and what the run's metrics are made of. `state_dict()` is the checkpoint's `loop` entry, in the format runs have
always written (plus `step_rows`, absent from older checkpoints: such a run's history.csv starts where it resumed),
so a run checkpointed before resumes after.
"""
from dataclasses import dataclass, field


@dataclass
class LoopState:
    step: int = 0                                         # optimizer steps done: fixes the data position
    history: list = field(default_factory=list)           # one row per evaluation: step, eval_*, train_loss
    step_rows: list = field(default_factory=list)         # one row per step: history.csv (lowrank.train.history)
    recent_losses: list = field(default_factory=list)     # training losses since the last evaluation
    timing: dict | None = None                            # StepClock's state
    dynamics: list | None = None                          # rank-dynamics rows, once the first snapshot is taken
    diverged_at: int | None = None                        # the step whose loss or gradient was not finite
    out_of_memory_at: int | None = None                   # the step that ran out of memory under a budget

    def state_dict(self) -> dict:
        state = {"step": self.step, "history": self.history, "recent_losses": self.recent_losses,
                 "timing": self.timing, "step_rows": self.step_rows}
        return state | ({"dynamics": self.dynamics} if self.dynamics is not None else {})

    @classmethod
    def from_dict(cls, state: dict | None) -> "LoopState":
        state = state or {}
        return cls(step=state.get("step", 0), history=state.get("history", []),
                   recent_losses=state.get("recent_losses", []), timing=state.get("timing"),
                   step_rows=state.get("step_rows", []),
                   dynamics=state.get("dynamics"))
