"""Fine-tune one model on one task, fully or with LoRA, and write its run directory.

    python -m experiments.train                                   # LoRA r=8 on MiniLM, fine-food reviews
    python -m experiments.train method=full trainer.max_steps=150
    python -m experiments.train -m method=lora method.rank=1,4 seed=0,1   # a sweep, one dir per run
"""
import hydra
from omegaconf import DictConfig

from lowrank.cli import one_line_errors, run_main
from lowrank.train.recipe import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    # what a Hydra sweeper optimises; None for a run that has none (diverged, or does not fit the budget)
    return train(cfg).get("eval_accuracy")


if __name__ == "__main__":
    run_main(main)
