"""Evaluation of causal LMs: perplexity over labelled tokens, forgetting on an out-of-domain set (with the base
model's perplexity cached beside its weights), and exact match of greedy answers.

    ppl = perplexity(model, test, batch_size=8, device=device)               # {"loss", "perplexity", "tokens"}
    before = cached_base_perplexity(base_path, key, lambda: perplexity(model, ood, 8, device))  # once per base
    ...train...
    ratio = forgetting(before, perplexity(model, ood, 8, device))              # 1.0: nothing forgotten
    em = exact_match(model, tokenizer, extras["exact_match"], device)         # {"accuracy", ...}

Nothing here passes an attention mask: PackedLM rows have filler only at their ends (no real token attends to
it under causal attention), and generation batches only prompts of one length. So it runs as it is on a model
whose attention refuses a mask (`blocks.causal_attention_without_mask`).
"""
import hashlib
import inspect
import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from lowrank.rundir.atomic import write_json
from lowrank.data.lm import IGNORE, prompt_ids


@torch.no_grad()
def perplexity(model, batches, batch_size: int, device, autocast=nullcontext, chunk_tokens: int = 1024) -> dict:
    """Token-weighted mean NLL over every position with a label != -100 (position t predicts label t+1, as
    transformers shifts them): {"loss": mean NLL in nats, "perplexity": exp(loss), "tokens": n}.

    The LM head runs on `chunk_tokens` labelled positions at a time, so the fp32 logits held at once are
    chunk_tokens × vocab (200 MB at SmolLM2's 49,152), not batch × length × vocab. The body and head are
    called apart (`base_model`, `get_output_embeddings`): right for Llama, Mistral, Qwen2 and GPT-2 heads,
    which apply nothing after the projection (a model with logit soft-capping would need its own)."""
    was_training = model.training
    model.eval()
    body, head = model.base_model, model.get_output_embeddings()
    nll, n = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in batches.by_length(batch_size):
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        with autocast():
            hidden = body(input_ids=ids, use_cache=False).last_hidden_state  # [b, L, hidden]
        target = labels[:, 1:]
        keep = target != IGNORE
        h, y = hidden[:, :-1][keep], target[keep]  # [n, hidden], [n]; selecting by mask syncs (once a batch)
        for s in range(0, len(y), chunk_tokens):
            with autocast():
                logits = head(h[s:s + chunk_tokens])
            nll += F.cross_entropy(logits.float(), y[s:s + chunk_tokens], reduction="sum").double()
        n += len(y)
    model.train(was_training)
    loss = nll.item() / n if n else math.nan
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n}


def forgetting(before: dict, after: dict) -> float:
    """Perplexity on the out-of-domain set after fine-tuning over before it (= exp of the loss increase):
    1.0 when nothing changed, > 1 when the model got worse at general text."""
    return after["perplexity"] / before["perplexity"]


def cached_base_perplexity(base, key: dict, compute) -> dict:
    """The base model's perplexity result for `key` (JSON values naming what it depends on: the OOD data's
    digest, max_length, precision, ...), computed once by `compute()` and kept as a small JSON file: beside
    `base` when it is the base weights file (`{stem}.perplexity-{hash}.json`), inside it when it is a folder.
    A file that is unreadable or holds another key is computed again and replaced (atomically)."""
    base = Path(base)
    key = json.loads(json.dumps(key, sort_keys=True))  # as it reads back (tuples become lists)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = (base / f"perplexity-{digest}.json" if base.is_dir()
            else base.with_name(f"{base.stem}.perplexity-{digest}.json"))
    try:
        stored = json.loads(path.read_text())
        if stored["key"] == key:
            return stored["result"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not there yet, or damaged: computed and written below
    result = compute()
    write_json(path, {"key": key, "result": result})
    return result


def normalise_answer(text: str) -> str:
    """What exact match compares: the first line, whitespace runs as one space, case folded, and the
    surrounding spaces, quotes and final punctuation (.,;:!?) stripped. "  The Dog." -> "the dog"."""
    first = text.strip().split("\n")[0]
    return " ".join(first.split()).casefold().strip(" \"'`").rstrip(".,;:!?").strip(" \"'`")


def _stop_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(config_eos) if isinstance(config_eos, list) else {config_eos}
    return {i for i in ids if i is not None}


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], device, max_new_tokens: int, stop_ids: set[int],
                    batch_size: int = 32, autocast=nullcontext) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids, up to and without the first stop token). Prompts
    are batched only with prompts of the same length, so no batch needs padding or an attention mask; the
    k/v cache makes each new token one short forward."""
    # transformers 5.2x calls the k/v cache `cache` (`past_key_values` before, and deprecated now)
    cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = [None] * len(prompts)
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    stop = torch.tensor(sorted(stop_ids), device=device)
    for group in by_length.values():
        for s in range(0, len(group), batch_size):
            idx = group[s:s + batch_size]
            ids = torch.tensor([prompts[i] for i in idx], device=device)  # [b, prompt length]
            new, done, past = [], torch.zeros(len(idx), dtype=torch.bool, device=device), None
            for _ in range(max_new_tokens):
                with autocast():
                    result = model(input_ids=ids, use_cache=True, **{cache_key: past})
                past = getattr(result, cache_key)
                ids = result.logits[:, -1].argmax(-1, keepdim=True)  # [b, 1]
                new.append(ids)
                done |= torch.isin(ids[:, 0], stop)
                if done.all():  # a host sync per token: fine for answers of a few tokens
                    break
            for row, i in zip(torch.cat(new, 1).tolist(), idx):
                cut = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
                out[i] = row[:cut]
    return out


def exact_match(model, tokenizer, pairs, device, max_new_tokens: int = 16, batch_size: int = 32,
                autocast=nullcontext) -> dict:
    """Greedy answers to (prompt, answer) pairs, formatted as in training (`lm_data.prompt_ids`), compared
    after `normalise_answer`: {"accuracy", "correct", "examples", "outputs": decoded answers}."""
    if not pairs:
        return {"accuracy": math.nan, "correct": 0, "examples": 0, "outputs": []}
    was_training = model.training
    model.eval()
    prompts = prompt_ids(tokenizer, [p for p, _ in pairs])
    generated = greedy_generate(model, prompts, device, max_new_tokens, _stop_ids(model, tokenizer), batch_size,
                                autocast)
    model.train(was_training)
    outputs = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    correct = sum(normalise_answer(o) == normalise_answer(a) for o, (_, a) in zip(outputs, pairs))
    return {"accuracy": correct / len(pairs), "correct": correct, "examples": len(pairs), "outputs": outputs}
