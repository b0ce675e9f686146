"""What a run learns and how it is scored: sequence classification, or a causal LM's next-token loss
(continued pre-training, `task.objective=cpt`; instruction tuning, `sft`). The trainer's loop is the same
for both; this module holds what differs: the model class, the batches, the evaluation, the final scores.

    objective = objective_for(cfg.task)                       # Classification() or CausalLM()
    model, tokenizer, head = objective.load_model(cfg.model, device)
    train, test = objective.batches(cfg, tokenizer, model, device_type)   # Batches / PackedLM: one interface
    scores = objective.evaluate(model, test, batch_size, device, autocast, mask_free)   # {"loss", ...}

Classification: AutoModelForSequenceClassification with a fresh head, accuracy. Causal LM: the model's own LM
head (nothing new trains beside the adapted matrices; embeddings and `lm_head` only with method=full or when
targeted), held-out loss and perplexity, forgetting (perplexity on out-of-domain text after / before; the base
model's figure cached beside the base weights) and, for SFT, exact match of greedy answers.
"""
import torch

from lowrank.data.batches import Batches
from lowrank.data.classification import load_synthetic, load_task
from lowrank.errors import check_choice
from lowrank.data.lm import OBJECTIVES as LM_OBJECTIVES, PackedLM, load_lm_task
from lowrank.data.lm_eval import cached_base_perplexity, exact_match, forgetting, perplexity
from lowrank.data.models import load_causal_lm, load_model


@torch.no_grad()
def evaluate_classifier(model, batches, batch_size: int, device, autocast, mask_free: bool = False) -> dict:
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for batch in batches.by_length(batch_size):
        batch = {k: v.to(device) for k, v in batch.items() if not (mask_free and k == "attention_mask")}
        with autocast():
            out = model(**batch)
        k = batch["labels"].numel()
        loss_sum += out.loss.float().item() * k
        correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
        n += k
    model.train()
    return {"loss": loss_sum / n, "accuracy": correct / n}


class Classification:
    name = "classification"

    def load_model(self, cfg, device):
        return load_model(cfg.model, cfg.task.num_labels, device)

    def batches(self, cfg, tokenizer, model, group_by_length: bool, seed: int):
        train_split, test_split = load_task(cfg.task, seed)
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.tokenizer, self.pad_id, self.max_length, self.train_split = \
            tokenizer, pad_id, cfg.trainer.max_length, train_split
        self.eval_label_counts = {str(k): test_split.labels.count(k) for k in sorted(set(test_split.labels))}
        self.seed_picks_train = cfg.task.get("train_size") is not None  # a seeded subsample: differs per seed
        return (Batches(tokenizer, train_split, self.max_length, pad_id, group_by_length=group_by_length),
                Batches(tokenizer, test_split, self.max_length, pad_id))

    def evaluate(self, model, batches, batch_size, device, autocast, mask_free) -> dict:
        return evaluate_classifier(model, batches, batch_size, device, autocast, mask_free)

    def before_training(self, model, base_path, key, device, autocast, test_batches=None) -> None:
        pass

    def final(self, model, test_batches, batch_size, device, autocast, mask_free) -> dict:
        """Training accuracy on (up to) as many training examples as the test set has, for over-fitting plots;
        the test set's label counts, for the majority-class line."""
        n = min(len(self.train_split.labels), len(test_batches))
        train = Batches(self.tokenizer, self.train_split.subset(n, 0), self.max_length, self.pad_id)
        ev = evaluate_classifier(model, train, batch_size, device, autocast, mask_free)
        return {"train_accuracy": ev["accuracy"], "train_eval_loss": ev["loss"],
                "eval_label_counts": self.eval_label_counts}


class CausalLM:
    name = "causal_lm"

    def __init__(self, objective: str):
        self.objective = objective

    def load_model(self, cfg, device):
        model, tokenizer = load_causal_lm(cfg.model, device)
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer, None  # no new head: the LM head is the model's own

    def batches(self, cfg, tokenizer, model, group_by_length: bool, seed: int):
        self.eval_batch_size = cfg.trainer.eval_batch_size
        self.seed_picks_train = cfg.task.loader != "synthetic"  # load_lm_task shuffles documents by the seed
        if cfg.task.loader == "synthetic":  # random tokens, exactly max_length each: speed runs of shape models
            train, test = load_synthetic(cfg.task)
            self.extras = {"ood": None, "exact_match": [], "meta": {"objective": self.objective}}
            return tuple(PackedLM(ids, ids.clone(), torch.ones_like(ids))
                         for ids in (torch.tensor(train.texts), torch.tensor(test.texts)))
        train, test, self.extras = load_lm_task(cfg.task, tokenizer, cfg.trainer.max_length, seed)
        self.tokenizer = tokenizer
        return train, test

    def evaluate(self, model, batches, batch_size, device, autocast, mask_free) -> dict:
        return perplexity(model, batches, batch_size, device, autocast)

    def before_training(self, model, base_path, key: dict, device, autocast, test_batches=None) -> None:
        """The base model's perplexity on the out-of-domain set and on the held-out in-domain set, once per base
        model and data (cached beside W0; a run that keeps no W0 computes them)."""
        def base(rows):
            if rows is None:
                return None
            compute = lambda: perplexity(model, rows, self.eval_batch_size, device, autocast)  # noqa: E731
            return compute() if base_path is None else cached_base_perplexity(
                base_path, {**key, "data": rows.digest()}, compute)
        self.ood_before, self.test_before = base(self.extras["ood"]), base(test_batches)

    def final(self, model, test_batches, batch_size, device, autocast, mask_free) -> dict:
        out = {"task_meta": self.extras["meta"]}
        if self.test_before is not None:
            out |= {"eval_loss_base": self.test_before["loss"], "eval_perplexity_base": self.test_before["perplexity"]}
        if self.ood_before is not None:
            after = perplexity(model, self.extras["ood"], batch_size, device, autocast)
            out |= {"ood_perplexity_base": self.ood_before["perplexity"], "ood_perplexity": after["perplexity"],
                    "ood_loss_base": self.ood_before["loss"], "ood_loss": after["loss"],
                    "forgetting": forgetting(self.ood_before, after)}
        if self.extras["exact_match"]:
            em = exact_match(model, self.tokenizer, self.extras["exact_match"], device, autocast=autocast)
            out |= {"exact_match": em["accuracy"], "exact_match_examples": em["examples"],
                    "exact_match_outputs": em["outputs"][:20]}
        return out


def objective_for(cfg_task):
    """`task.objective`: absent or `classification` for the classification tasks, cpt or sft for LM tasks."""
    objective = cfg_task.get("objective", "classification")
    check_choice("task.objective", objective, ("classification", *LM_OBJECTIVES))
    return CausalLM(objective) if objective in LM_OBJECTIVES else Classification()
