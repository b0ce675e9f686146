"""Which linear layers LoRA adapts: one selection rule for real models (lowrank.adapters.lora) and for the memory
model's layer descriptions (lowrank.train.memory), which must agree, and the per-module rank map
(PEFT's `rank_pattern`)."""
import json
import re
from pathlib import Path

from lowrank.errors import ConfigError

ALL_LINEAR = "all-linear"


def select_targets(candidates: list[str], targets, where: str = "", key: str = "method.targets") -> list[str]:
    """The candidate module names that `targets` selects, in candidate order: "all-linear" (every candidate),
    or module-name suffixes on a '.' boundary (`query`, `attention.self.query`). A target that matches
    nothing is a ConfigError listing the valid suffixes; `where` names the model in that message."""
    if targets == ALL_LINEAR or (not isinstance(targets, str) and list(targets) == [ALL_LINEAR]):
        return list(candidates)
    targets = [targets] if isinstance(targets, str) else list(targets)
    chosen = set()
    for t in targets:
        hits = {n for n in candidates if n == t or n.endswith("." + t)}
        if not hits:
            suffixes = sorted({n.split(".")[-1] for n in candidates}
                              | {".".join(n.split(".")[-2:]) for n in candidates})
            raise ConfigError(f"{key} entry {t!r} matches no linear layer{where}; valid suffixes: "
                              f"{', '.join(suffixes)} (or {ALL_LINEAR!r})")
        chosen |= hits
    return [n for n in candidates if n in chosen]


def pattern_key(pattern_keys, name: str) -> str | None:
    """The first key of a PEFT `rank_pattern`/`alpha_pattern` that selects module `name`, else None. PEFT's rule
    (peft.utils.other.get_pattern_key): the key is a regular expression that must match a '.'-bounded end of the
    name, so `query`, `layer.0.attention.self.query` and the full name all select
    `bert.encoder.layer.0.attention.self.query`."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def module_ranks(names: list[str], rank: int, rank_pattern: dict[str, int] | None) -> dict[str, int]:
    """Each module's LoRA rank: its `rank_pattern` entry (pattern_key), else `rank`."""
    pattern = rank_pattern or {}
    return {n: pattern[k] if (k := pattern_key(pattern, n)) is not None else rank for n in names}


def read_rank_pattern(value, key: str = "method.rank_pattern") -> dict[str, int] | None:
    """A rank map as the config gives it: None, a mapping {module-name pattern: rank ≥ 1}, or the path of a JSON file
    holding one (`rank_pattern.json`, as analysis.report writes it). ConfigError naming `key` otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        path = Path(value).expanduser()
        try:
            value = json.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"{key}={str(path)!r} cannot be read ({e.strerror or e}); give a JSON file "
                              f"{{module: rank}} or a mapping") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}={str(path)!r} is not valid JSON ({e}); it must hold {{module: rank}}") from None
        where = f"{key}={str(path)!r}"
    else:
        where = key if hasattr(value, "items") else f"{key}={value!r}"  # a mapping's entries are named one by one
    if not hasattr(value, "items"):
        raise ConfigError(f"{where} is not valid; it must be a mapping {{module-name pattern: rank}} or a JSON file "
                          f"of one")
    pattern = {}
    for k, r in value.items():
        if not isinstance(k, str) or not k or isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"{where} entry {k!r}: {r!r} is not valid; keys are module-name patterns, ranks "
                              f"integers >= 1")
        try:
            re.compile(k)
        except re.error as e:
            raise ConfigError(f"{where} key {k!r} is not a valid regular expression ({e}); PEFT reads keys as "
                              f"patterns") from None
        pattern[k] = r
    return pattern
