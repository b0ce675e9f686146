"""Arrows point one way (library <- analysis <- entry points <- benchmarks): no module under lowrank/ imports
analysis, experiments or benchmarks, by any import statement, top-level or inside a function (read with `ast`), nor
by importlib.import_module or __import__ of a literal name; and every command in experiments/ is named in
README.md, as `python -m experiments.NAME` or `experiments/NAME.py`."""
import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

UPPER_LAYERS = ("analysis", "experiments", "benchmarks")
COMMANDS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem != "__init__")


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in SOURCE, wherever it stands: `import a.b`, `from a.b import
    c` (and a.b.c, which may be a module), importlib.import_module("a.b") and __import__("a.b"). Relative imports
    stay inside their own package and are left out."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def upper_layer_imports(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {name}" for line, name in imported_modules(path.read_text())
            if name.split(".")[0] in UPPER_LAYERS]


def test_the_scan_sees_every_kind_of_import():
    source = '''
import analysis.report
from experiments import demo
def late():
    from benchmarks.harness import record
    import importlib
    return importlib.import_module("analysis.runs"), __import__("experiments.train")
from . import sibling
'''
    names = [name for _, name in imported_modules(source)]
    assert {"analysis.report", "experiments", "experiments.demo", "benchmarks.harness", "benchmarks.harness.record",
            "analysis.runs", "experiments.train", "importlib"} == set(names)


def test_the_library_imports_no_upper_layer():
    offenders = [line for path in sorted((ROOT / "lowrank").rglob("*.py")) for line in upper_layer_imports(path)]
    assert offenders == [], "\n".join(offenders)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_is_named_in_the_readme(name):
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"python -m experiments\.{name}\b|experiments/{name}\.py\b", readme), \
        f"README.md names neither `python -m experiments.{name}` nor `experiments/{name}.py`"


def test_the_commands_are_found():
    assert {"train", "demo", "estimate", "import_delta", "export_peft"} <= set(COMMANDS)
