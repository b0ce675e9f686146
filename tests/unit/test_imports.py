"""The package's modules import one another without cycles, counting imports inside functions too (a
function-local import that dodges a cycle is still a cycle), and each module's first docstring line says its
one job."""
import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("lowrank", "analysis", "experiments")


def modules() -> dict[str, Path]:
    """Every module of the packages, subpackages included, by its dotted name."""
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for pkg in PACKAGES
            for p in sorted((ROOT / pkg).rglob("*.py")) if p.stem != "__init__"}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (top level or inside a function)."""
    package = name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y / from . import x
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from . import atomic` names a module
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None
    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(modules()))
def test_each_module_states_its_job_and_stays_small(name):
    path = modules()[name]
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and doc.strip(), f"{name} has no docstring"
    lines = len(path.read_text().splitlines())
    # A file past ~400 lines says why in its docstring, in a sentence that speaks of its lines.
    assert lines <= 420 or " lines" in doc.lower(), \
        f"{name}: {lines} lines and no reason in its docstring"
