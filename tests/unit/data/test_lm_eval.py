"""LM evaluation: perplexity equals a direct exp(mean NLL), an untrained model forgets exactly nothing (with the
base perplexity cached beside the base weights), greedy decoding agrees with transformers' generate, and exact
match scores answers it can check."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from lowrank.data import lm_eval
from lowrank.train.blocks import causal_attention_without_mask
from lowrank.data.lm import IGNORE, encode_examples, pack_documents, pack_examples, prompt_ids
from lowrank.data.lm_eval import cached_base_perplexity, exact_match, forgetting, greedy_generate, perplexity
from lowrank.data.models import load_causal_lm
from tests.conftest import CONF
from tests.unit.data.test_lm_data import WORDS, ids, tiny_lm, word_tokenizer


def sft_rows():
    tok = word_tokenizer()
    pairs = [("what is a b", "cat dog"), ("hi", "yo"), ("c b", "bird fish"), ("what", "x"), ("a", "b c")]
    return pack_examples(encode_examples(tok, pairs), max_length=12, pad_id=tok.pad_token_id)[0]


def test_perplexity_is_exp_of_the_mean_nll_over_labelled_tokens():
    model, rows = tiny_lm(), sft_rows()
    with torch.no_grad():
        logits = model(input_ids=rows.input_ids).logits  # every row at once, the whole vocabulary
    target = rows.labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="none")
    keep = target.flatten() != IGNORE
    expected = nll[keep].double().mean().item()
    got = perplexity(model, rows, batch_size=2, device="cpu", chunk_tokens=3)  # ragged batches, small chunks
    assert got["tokens"] == int(keep.sum()) == rows.loss_tokens
    assert got["loss"] == pytest.approx(expected, rel=1e-6) and got["perplexity"] == pytest.approx(math.exp(expected))
    cpt = pack_documents([list(range(3, len(WORDS)))] * 5, 0, 8)
    assert perplexity(model, cpt, 3, "cpu")["tokens"] == len(cpt) * 7  # every token but a row's first


def test_an_untrained_model_forgets_exactly_nothing_and_the_base_result_is_cached(tmp_path):
    model, ood = tiny_lm(), pack_documents([list(range(3, len(WORDS)))] * 6, 0, 16)
    base = tmp_path / "base_weights" / "tiny-0123456789.safetensors"
    base.parent.mkdir()
    base.write_bytes(b"W0")
    key = {"model": "tiny", "ood": ood.digest(), "max_length": 16, "precision": "fp32"}
    before = cached_base_perplexity(base, key, lambda: perplexity(model, ood, 4, "cpu"))
    assert forgetting(before, perplexity(model, ood, 4, "cpu")) == 1.0
    cached, = base.parent.glob("tiny-0123456789.perplexity-*.json")  # beside the base weights, one file
    assert json.loads(cached.read_text()) == {"key": key, "result": before}

    def must_not_run():
        raise AssertionError("computed again although cached")
    assert cached_base_perplexity(base, key, must_not_run) == before
    other = cached_base_perplexity(base, key | {"max_length": 8}, lambda: {"perplexity": 2.0})  # another key
    assert other == {"perplexity": 2.0} and len(list(base.parent.glob("*.json"))) == 2
    cached.write_text("{garbled")
    assert cached_base_perplexity(base, key, lambda: {"perplexity": 3.0}) == {"perplexity": 3.0}  # rewritten
    assert forgetting({"perplexity": 4.0}, {"perplexity": 5.0}) == 1.25


@pytest.mark.parametrize("mask_free", [False, True])
def test_greedy_decoding_agrees_with_transformers_generate(mask_free):
    model = tiny_lm(seed=1)
    model.generation_config.eos_token_id = None
    prompts = [[3, 5, 6, 7], [3, 8, 9, 4], [3, 10, 4]]  # two of one length share a batch
    expected = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p in prompts]
    if mask_free:  # the trainer's fast path: the model refuses an attention mask
        causal_attention_without_mask(model)
    assert greedy_generate(model, prompts, "cpu", 6, stop_ids=set()) == expected
    stop = expected[0][2]
    cut = greedy_generate(model, prompts[:1], "cpu", 6, stop_ids={stop})
    assert cut == [expected[0][:expected[0].index(stop)]]  # ends before the first stop token


class ScriptedLM(nn.Module):
    """Greedy continuations fixed per prompt: the logits put all their mass on the next scripted token.
    Its k/v `cache` is just the tokens seen so far; past the script it says EOS (id 0)."""

    def __init__(self, scripts: dict[tuple, list[int]], vocab: int):
        super().__init__()
        self.scripts, self.vocab = scripts, vocab
        self.generation_config = None

    def forward(self, input_ids, cache=None, use_cache=True):
        seen = (cache or []) + [input_ids]
        rows = torch.cat(seen, 1)
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(rows.tolist()):
            for prompt, script in self.scripts.items():
                if tuple(row[:len(prompt)]) == prompt:
                    k = len(row) - len(prompt)
                    logits[b, -1, script[k] if k < len(script) else 0] = 1.0
        return type("Out", (), {"logits": logits, "cache": seen})


def test_exact_match_scores_the_greedy_answers():
    tok = word_tokenizer()
    pairs = [("what is a", " Cat  DOG."), ("what is b", "bird"), ("hi", "fish")]
    scripts = {tuple(p): ids(tok, answer) for p, answer in zip(
        prompt_ids(tok, [p for p, _ in pairs]), ["cat dog <eos> yo", "fish <eos>", "fish yo yo yo"])}
    model = ScriptedLM(scripts, len(tok))
    result = exact_match(model, tok, pairs, "cpu", max_new_tokens=3)
    # "cat dog" matches " Cat  DOG." once normalised; "fish" is not "bird"; the last runs out of tokens as
    # "fish yo yo", which is not "fish"
    assert result["outputs"] == ["cat dog", "fish", "fish yo yo"]
    assert (result["correct"], result["examples"], result["accuracy"]) == (1, 3, 1 / 3)
    assert exact_match(model, tok, pairs[:1], "cpu")["accuracy"] == 1.0


def test_answers_are_compared_normalised():
    assert lm_eval.normalise_answer('  "The  Dog."\nand more') == "the dog"
    assert lm_eval.normalise_answer("Paris!") == lm_eval.normalise_answer("paris")
    assert lm_eval.normalise_answer("ice cream") != lm_eval.normalise_answer("icecream")


def test_a_shape_model_loads_as_a_random_causal_lm():
    cfg = OmegaConf.load(CONF / "model" / "llama_1b_shape.yaml")
    cfg.shape.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=64)
    model, tokenizer = load_causal_lm(cfg)
    assert tokenizer is None and type(model).__name__ == "LlamaForCausalLM"
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
