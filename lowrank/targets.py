"""Which linear layers LoRA adapts: one selection rule for real models (lowrank.lora) and for the memory
model's layer descriptions (lowrank.memory), which must agree."""
from .errors import ConfigError

ALL_LINEAR = "all-linear"


def select_targets(candidates: list[str], targets, where: str = "") -> list[str]:
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
            suffixes = sorted({n.split(".")[-1] for n in candidates} | {".".join(n.split(".")[-2:]) for n in candidates})
            raise ConfigError(f"method.targets entry {t!r} matches no linear layer{where}; valid suffixes: "
                              f"{', '.join(suffixes)} (or {ALL_LINEAR!r})")
        chosen |= hits
    return [n for n in candidates if n in chosen]
