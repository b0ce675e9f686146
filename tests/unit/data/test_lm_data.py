"""LM task data: CPT packing keeps every token once with EOS between documents, the SFT loss mask covers answer
tokens only, splits and caps, and one ConfigError line for bad keys, bad folders and the Hub offline."""
import random

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lowrank.data import lm as lm_data
from lowrank.data.batches import Batches
from lowrank.data.classification import Split
from lowrank.data.lm import IGNORE, PackedLM, encode_examples, load_lm_task, pack_documents, pack_examples
from tests.conftest import CONF, compose_cfg
from tests.unit.data.test_bad_inputs import config_error

WORDS = "<eos> <pad> <unk> <user> <bot> what is a b c cat dog bird fish hi yo def import return x".split()
# The user turn and the generation prompt end in <bot>; the answer's turn is " answer <eos>".
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} <bot>"
            "{% else %} {{ m['content'] }} <eos>{% endif %}{% endfor %}")


def word_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS: one token per word, so counts can be made by hand."""
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=["<user>", "<bot>"])
    tok.chat_template = TEMPLATE if chat else None
    return tok


def tiny_lm(vocab: int = len(WORDS), seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_cpt_packing_keeps_every_token_once_with_eos_between_documents():
    rng = random.Random(0)
    docs = [[rng.randrange(3, 50) for _ in range(rng.randrange(1, 30))] for _ in range(40)]
    stream = [t for d in docs for t in d + [0]]  # EOS (id 0) after each document
    rows = pack_documents(docs, eos_id=0, max_length=16)
    assert len(rows) == len(stream) // 16 and rows.input_ids.shape == (len(rows), 16)
    assert rows.input_ids.flatten().tolist() == stream[:len(rows) * 16]  # in order, each token once, tail dropped
    assert torch.equal(rows.labels, rows.input_ids) and bool(rows.attention_mask.all())
    assert rows.loss_tokens == len(rows) * 15  # the model shifts: the first token of a row is never predicted
    assert len(pack_documents(docs, 0, 16, max_tokens=50)) == 3  # 50 // 16 whole rows


def test_sft_loss_mask_covers_the_answer_tokens_only():
    tok = word_tokenizer()
    (prompt, answer), = encode_examples(tok, [("what is a b", "cat dog")])
    assert prompt == ids(tok, "<user> what is a b <bot>")  # 6 prompt tokens
    assert answer == ids(tok, "cat dog <eos>")  # 3 answer tokens, the end of turn included
    examples = encode_examples(tok, [("what is a b", "cat dog"), ("hi", "yo"), ("c b", "bird fish")])
    rows, stats = pack_examples(examples, max_length=12, pad_id=tok.pad_token_id)
    # 9 + 5 > 12: the second example starts a new row; 5 + 7 = 12 fills it exactly. Never split.
    assert stats == {"examples": 3, "truncated": 0, "dropped": 0} and len(rows) == 2
    first = rows.collate([0])
    assert first["input_ids"][0].tolist() == ids(tok, "<user> what is a b <bot> cat dog <eos>") + [tok.pad_token_id] * 3
    assert first["labels"][0].tolist() == [IGNORE] * 6 + ids(tok, "cat dog <eos>") + [IGNORE] * 3
    assert first["attention_mask"][0].tolist() == [1] * 9 + [0] * 3  # filler: no attention, no loss
    second = rows.collate([1])
    assert second["labels"][0].tolist() == ([IGNORE] * 3 + ids(tok, "yo <eos>") + [IGNORE] * 4
                                            + ids(tok, "bird fish <eos>"))
    assert bool(second["attention_mask"].all())
    assert rows.loss_tokens == 3 + 2 + 3 and rows.unpadded and rows.static_shape


def test_sft_without_a_chat_template_is_prompt_newline_answer_eos():
    tok = word_tokenizer(chat=False)
    assert encode_examples(tok, [("what is a", "cat")]) == [(ids(tok, "what is a"), ids(tok, "cat <eos>"))]
    assert lm_data.prompt_ids(tok, ["what is a"]) == [ids(tok, "what is a")]


def test_long_examples_are_truncated_and_answerless_ones_dropped():
    rows, stats = pack_examples([([5] * 6, [7, 8, 9]), ([5] * 9, [7])], max_length=8, pad_id=1)
    assert stats == {"examples": 1, "truncated": 2, "dropped": 1}
    assert rows.input_ids.tolist() == [[5] * 6 + [7, 8]] and rows.labels.tolist() == [[IGNORE] * 6 + [7, 8]]


def test_training_order_is_the_batches_permutation():
    rows = pack_documents([list(range(3, 200))], 0, 8)  # 24 rows
    steps = [rows.indices_at(step, 5, seed=3) for step in range(8)]
    assert sorted(sum(steps[:4], [])) == sorted(set(sum(steps[:4], [])))  # an epoch sees no row twice
    plain = Batches(None, Split([[1]] * len(rows), [0] * len(rows)), 8, 0)  # the classification tasks' order
    assert steps == [plain.indices_at(step, 5, 3) for step in range(8)]


WORDNET = ("  1 licence header line\n"
           "{:08d} 03 n 01 {} 0 000 | {}\n")


def fake_wordnet(root, n: int = 60):
    """n single-word noun synsets (word{i}: "the thing number i"), plus lines that must be left out."""
    root.mkdir()
    nouns = [WORDNET.format(i, f"word{i}", f'the thing number {i}; "a word{i} example"') for i in range(n)]
    nouns += ["00000001 03 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis\n",  # two words: out
              "00000002 03 n 01 fish 0 000 | a fish that swims\n"]  # the answer in its definition: out
    (root / "data.noun").write_text("".join(nouns))
    (root / "data.adj").write_text("00000003 00 s 01 galore(ip) 0 000 | in great numbers\n")
    for pos in ("verb", "adv"):
        (root / f"data.{pos}").write_text("")
    return root


def test_wordnet_pairs_and_a_word_level_split(tmp_path):
    train, test, meta = lm_data.wordnet_pairs(fake_wordnet(tmp_path / "wn"))
    pairs = dict(train + test)
    assert len(pairs) == 61 and 'Which English noun means "the thing number 7"? Answer with the word only.' in pairs
    assert pairs['Which English adjective means "in great numbers"? Answer with the word only.'] == "galore"
    assert not {"dog", "fish"} & set(pairs.values())
    assert train and test and not {a for _, a in train} & {a for _, a in test}  # test words are never trained


@pytest.fixture
def few_reviews(monkeypatch):
    monkeypatch.setattr(lm_data, "fine_food_reviews", lambda: ["what a cat is a dog"] * 50)


def task_cfg(name: str, **keys):
    cfg = OmegaConf.load(CONF / "task" / f"{name}.yaml")
    cfg.update(keys)
    return cfg


def test_wordnet_sft_task(tmp_path, few_reviews):
    tok = word_tokenizer()
    cfg = task_cfg("wordnet_sft", path=str(fake_wordnet(tmp_path / "wn")), test_examples=4, exact_match_examples=3,
                   ood_tokens=64)
    train, test, extras = load_lm_task(cfg, tok, max_length=32, seed=0)
    _, test_pairs, _ = lm_data.wordnet_pairs(cfg.path)
    assert extras["exact_match"] == test_pairs[:3] and extras["meta"]["test_packing"]["examples"] == 4
    assert train.input_ids.shape[1] == test.input_ids.shape[1] == extras["ood"].input_ids.shape[1] == 32
    assert len(extras["ood"]) == 2 and extras["meta"]["objective"] == "sft"
    other, _, _ = load_lm_task(cfg, tok, max_length=32, seed=1)
    assert not torch.equal(other.input_ids, train.input_ids)  # the run seed orders the training pairs


def test_code_cpt_task(tmp_path, few_reviews):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for i in range(30):
        (src / "pkg" / f"m{i}.py").write_text("import x\n" + "def x return x\n" * (i + 1))
    cfg = task_cfg("code_cpt", path=str(src), train_tokens=64, test_tokens=32, ood_tokens=32)
    train, test, extras = load_lm_task(cfg, word_tokenizer(), max_length=16, seed=0)
    assert (len(train), len(test), len(extras["ood"])) == (4, 2, 2) and extras["exact_match"] == []
    meta = extras["meta"]
    assert meta["documents"]["train"] + meta["documents"]["test"] == 30 and meta["documents"]["test"] > 0
    assert meta["python_version"] and meta["files_digest"]


def test_the_stdlib_corpus_leaves_out_tests_and_vendored_code(tmp_path, monkeypatch):
    keep = ["os.py", "json/decoder.py", "email/mime/text.py"] + [f"m{i}.py" for i in range(20)]
    drop = ["test/test_os.py", "site-packages/numpy/core.py", "tkinter/font.py", "ctypes/test/test_x.py",
            "unittest/tests/test_case.py", "_sysconfigdata__linux.py", "config-3.11-x86_64-linux-gnu/x.py",
            "encodings/cp1252.py", "notes.txt"]
    for rel in keep + drop:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    monkeypatch.setattr(lm_data.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    train, test, meta = lm_data.stdlib_documents(None)
    assert sorted(t[2:-1] for t in train + test) == sorted(keep)
    assert meta["source"] == "python_stdlib" and meta["documents"] == {"train": len(train), "test": len(test)}
    monkeypatch.undo()
    train, test, meta = lm_data.stdlib_documents(None)  # this interpreter's own: hundreds of files
    assert len(train) > 200 and len(test) > 10 and meta["python_version"]


def test_the_task_configs_compose():
    for name in ("code_cpt", "wordnet_sft"):
        assert compose_cfg([f"task={name}"]).task.name == name


@pytest.mark.parametrize("keys, needles", [
    ({"objective": "dpo"}, ["task.objective='dpo'", "cpt", "sft"]),
    ({"bogus": 1}, ["task.bogus is not a key of an sft task"]),
    ({"ood_tokens": 8}, ["task.ood_tokens=8", ">= 16"]),
    ({"train_examples": 0}, ["task.train_examples=0", ">= 1"]),
    ({"exact_match_examples": 99, "test_examples": 4}, ["task.exact_match_examples=99", "<= the"]),
    ({"loader": "glue"}, ["task.loader='glue'", "wordnet"]),
    ({"path": "/nonexistent"}, ["task.path='/nonexistent'", "wordnet-base"]),
    ({"hf_dataset": "someone/qa"}, ["task.hf_dataset='someone/qa'", "unreachable", "task.hf_dataset=null"]),
])
def test_bad_sft_keys_give_one_line(tmp_path, few_reviews, keys, needles):
    cfg = task_cfg("wordnet_sft", path=str(fake_wordnet(tmp_path / "wn")))
    cfg.update(keys)
    config_error(lambda: load_lm_task(cfg, word_tokenizer(), 16, 0), *needles)


@pytest.mark.parametrize("keys, needles", [
    ({"train_tokens": 10}, ["task.train_tokens=10", ">= 16", "trainer.max_length"]),
    ({"test_tokens": 1.5}, ["task.test_tokens=1.5"]),
    ({"path": "/nonexistent"}, ["task.path='/nonexistent'", "no such folder"]),
    ({"hf_dataset": "bigcode/the-stack-smol"}, ["task.hf_dataset='bigcode/the-stack-smol'", "unreachable"]),
])
def test_bad_cpt_keys_give_one_line(few_reviews, keys, needles):
    cfg = task_cfg("code_cpt", **keys)
    config_error(lambda: load_lm_task(cfg, word_tokenizer(), 16, 0), *needles)


def test_a_shape_model_has_no_tokenizer_for_lm_tasks():
    config_error(lambda: load_lm_task(task_cfg("code_cpt"), None, 16, 0), "task=code_cpt needs a tokenizer")


def test_packed_rows_check_their_shapes():
    with pytest.raises(ValueError, match="one shape"):
        PackedLM(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 5))
