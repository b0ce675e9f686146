"""The training package reads as a recipe: no function in lowrank/train longer than a screen (80 lines), no closure
that rebinds its caller's variables (`nonlocal`) anywhere in lowrank, and variants told apart by type, not by
probing attributes (`hasattr(layer, "magnitude")`-style dispatch). No line of the project's Python is wider than
120 characters."""
import ast
import re

from tests.conftest import ROOT

LONGEST = 80
WIDEST = 120
PYTHON = ("lowrank", "experiments", "analysis", "benchmarks", "tests")


def functions(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node


def test_no_function_in_the_training_package_is_longer_than_a_screen():
    long = [(str(p), f.name, f.end_lineno - f.lineno + 1) for p, f in functions("lowrank/train")
            if f.end_lineno - f.lineno + 1 > LONGEST]
    assert not long, long


def test_no_nonlocal_in_the_library():
    found = [(str(p), f.name) for p, f in functions("lowrank") for n in ast.walk(f) if isinstance(n, ast.Nonlocal)]
    assert not found, found


def test_variants_are_not_told_apart_by_their_attributes():
    """An adapter's kind is its type (lowrank.adapters.methods, LoRALinear's protocol): no hasattr on the names only a
    variant has."""
    variant_attrs = re.compile(r"hasattr\([^)]*[\"'](magnitude|lora_A0|lora_B0|base_layer|lora_A|lora_B)[\"']")
    found = [str(p.relative_to(ROOT)) for p in (ROOT / "lowrank").rglob("*.py") if variant_attrs.search(p.read_text())]
    assert not found, found


def test_no_line_is_wider_than_the_limit():
    wide = [f"{p.relative_to(ROOT)}:{i}" for package in PYTHON for p in sorted((ROOT / package).rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if len(line) > WIDEST]
    assert not wide, wide


def test_the_checks_see_what_they_look_for():
    tree = ast.parse("def f():\n    x = 1\n    def g():\n        nonlocal x\n        x = 2\n")
    assert any(isinstance(n, ast.Nonlocal) for n in ast.walk(tree))
    assert re.search(r"hasattr\([^)]*[\"'](magnitude)[\"']", 'if hasattr(layer, "magnitude"):')
