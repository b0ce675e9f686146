"""A run's fine-tuned model rebuilt from its run directory, with the target matrices set to any W0 + ΔW' (ΔW itself, a
truncation of it, nothing), and scored on the run's own evaluation as the trainer scored it.

    model = RebuiltModel(config, trained)            # the run's model: W0 everywhere, its other trained tensors loaded
    model.set_targets({name: w0 + delta_r})          # (out, in) per target matrix
    scores = model.evaluate()                        # classification {loss, accuracy, examples}; causal LM: + ood ...

`config` is the run's resolved config (its task, eval set, max_length, model); `trained` the tensors of its
trained.safetensors (layout.trained_file), loaded over the pretrained model by name. Evaluation is the trainer's
(lowrank.data.objectives) in fp32, one batch size for every evaluation, so truncations of one run compare like with
like. A causal LM is also scored on the out-of-domain text, and its forgetting is against the pretrained model's
perplexity there (taken once, before `trained` is loaded). SFT's exact match (greedy generation) is not computed.
"""
from contextlib import nullcontext

import torch
from omegaconf import OmegaConf

from lowrank.data.lm_eval import forgetting, perplexity
from lowrank.data.objectives import objective_for
from lowrank.errors import ConfigError


class RebuiltModel:
    def __init__(self, config: dict, trained: dict[str, torch.Tensor], device="cpu",
                 eval_batch_size: int | None = None):
        cfg = OmegaConf.create(config)
        self.device = torch.device(device)
        torch.manual_seed(cfg.seed)  # a classifier's fresh head is drawn here; `trained` replaces it
        self.objective = objective_for(cfg.task)
        model, tokenizer, _ = self.objective.load_model(cfg, self.device)
        self.model = model.to(self.device).eval()
        _, self.test = self.objective.batches(cfg, tokenizer, self.model, False, cfg.seed)
        self.batch_size = eval_batch_size or cfg.trainer.eval_batch_size
        self.ood = getattr(self.objective, "extras", {}).get("ood")
        self.ood_base = self._score(self.ood) if self.ood is not None else None
        self._load(trained)

    def _load(self, trained: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        unknown = sorted(set(trained) - set(params))
        if unknown:
            raise ConfigError(f"the run's trained tensors name parameters this model has not: {unknown[:3]}")
        with torch.no_grad():
            for name, t in trained.items():
                if tuple(t.shape) != tuple(params[name].shape):
                    raise ConfigError(f"trained tensor {name} has shape {list(t.shape)}, the model's "
                                      f"{list(params[name].shape)}")
                params[name].copy_(t)

    def set_targets(self, weights: dict[str, torch.Tensor]) -> None:
        """Set each named nn.Linear's weight (out, in) to the given matrix."""
        with torch.no_grad():
            for name, w in weights.items():
                self.model.get_submodule(name).weight.copy_(w)

    def _score(self, batches) -> dict:
        return perplexity(self.model, batches, self.batch_size, self.device, nullcontext)

    def evaluate(self) -> dict:
        """The run's evaluation of the model as it is now: {"loss", "accuracy", "examples"} for a classifier;
        {"loss", "perplexity", "examples"} and, with out-of-domain text, "ood_loss", "ood_perplexity", "forgetting"
        for a causal LM."""
        scores = self.objective.evaluate(self.model, self.test, self.batch_size, self.device, nullcontext, False)
        self.model.eval()  # the trainer's evaluation hands the model back in training mode (dropout on)
        scores["examples"] = len(self.test)
        if self.ood is not None:
            after = self._score(self.ood)
            scores |= {"ood_loss": after["loss"], "ood_perplexity": after["perplexity"],
                       "forgetting": forgetting(self.ood_base, after)}
        return {k: v for k, v in scores.items() if isinstance(v, (int, float))}
