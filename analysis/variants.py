"""Which method a run is, read from its config in this one place: full fine-tuning, the subspace method, plain LoRA or
one of its variants, trained here or imported. Every table and figure labels, colours and pools runs by it, so that a
DoRA run is never averaged or paired with plain LoRA of the same rank.

    variant_of({"method.name": "lora", "method.dora": True, "method.rank": 8})   # Variant('dora', 'DoRA', 'lora', ...)
    [v.name for v in variants(runs_table)]                                       # 'full', 'lora', 'pissa', ...

The variants keep `method.name: lora` in their configs (conf/method/*.yaml add one key to lora.yaml), and some store
a dense ΔW instead of factors (DoRA, ReLoRA: `delta_form: dense`), so neither the method name nor the ΔW file says
which one a run is; these keys do. Several may be set at once (DoRA with rsLoRA scaling): the variant is then all of
them, 'dora+rslora' ('DoRA/rsLoRA'). An imported run (experiments/import_delta.py: an `imported.*` section) is
'imported lora' or 'imported full'.
"""
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

# (name, label, flattened config key, whether its value makes the run this variant), in table order
LORA_VARIANTS = (
    ("pissa", "PiSSA", "method.init", lambda v: v == "pissa"),
    ("dora", "DoRA", "method.dora", lambda v: v in (True, "True", "true")),
    ("loraplus", "LoRA+", "method.loraplus_ratio", lambda v: v is not None),
    ("relora", "ReLoRA", "method.relora_every", lambda v: v is not None),
    ("rslora", "rsLoRA", "method.scaling", lambda v: v == "rslora"),
)
LABELS = {"full": "full", "lora": "LoRA", "subspace": "subspace"} | {n: label for n, label, _, _ in LORA_VARIANTS}
IMPORTED = "imported"  # the config section experiments.import_delta writes


@dataclass(frozen=True)
class Variant:
    name: str     # 'full', 'lora', 'dora', 'dora+rslora', 'subspace', 'imported lora', ...
    label: str    # as tables and legends show it: 'full', 'LoRA', 'DoRA', 'DoRA/rsLoRA', 'imported LoRA', ...
    method: str   # method.name: 'full', 'lora' or 'subspace' (what the ΔW is of, and which keys apply)
    order: tuple  # plain first, then the variants in LORA_VARIANTS' order, imported runs last


def _value(v):
    """One spelling: NaN (a column other runs have) and None alike, numpy scalars as Python's."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if isinstance(v, np.generic) else v


def variant_of(flat: Mapping) -> Variant:
    """The variant of one run from its flattened config (`method.name`, `method.dora`, ...; a runs.csv row)."""
    method = str(_value(flat.get("method.name")))
    features = [i for i, (_, _, key, test) in enumerate(LORA_VARIANTS)
                if method == "lora" and test(_value(flat.get(key)))]
    name = "+".join(LORA_VARIANTS[i][0] for i in features) or method
    imported = any(k.startswith(IMPORTED + ".") and _value(v) is not None for k, v in flat.items())
    name = f"{IMPORTED} {name}" if imported else name
    return Variant(name, label_of(name), method, (int(imported), len(features), *features))


def label_of(name: str) -> str:
    """A variant's label from its name: 'dora+rslora' -> 'DoRA/rsLoRA', 'imported lora' -> 'imported LoRA'."""
    base = name.removeprefix(IMPORTED + " ")
    label = "/".join(LABELS.get(part, part) for part in base.split("+"))
    return label if base == name else f"{IMPORTED} {label}"


def variants(table: pd.DataFrame) -> list[Variant]:
    """variant_of for every row of a runs table (flattened config columns), in its order."""
    return [variant_of(row) for row in table.to_dict("records")]
