"""The shape of analysis/ (each module in a fresh interpreter: tests/integration/analysis/test_fresh_imports.py):
the modules' imports of one another (top-level and inside functions, read from the sources with `ast`) form no
cycle; a function-local import is only there to keep matplotlib or wandb lazy; and from `lowrank` analysis takes
only the modules its `__init__` names, never the model or training code."""
import ast
from tests.conftest import ROOT
MODULES = sorted(".".join(p.relative_to(ROOT / "analysis").with_suffix("").parts)
                 for p in (ROOT / "analysis").rglob("*.py") if p.stem != "__init__")
LOWRANK_ALLOWED = {"lowrank.rundir.layout", "lowrank.rundir.integrity", "lowrank.rundir.atomic", "lowrank.logger",
                   "lowrank.errors", "lowrank.linalg.spectra", "lowrank.linalg.subspace", "lowrank.linalg.sparsity",
                   "lowrank.linalg.drift", "lowrank.linalg.heavy_tail",
                   "lowrank.linalg.truncation"}  # pure math, a leaf
# analysis.truncate scores models (W0 + ΔW_r on the run's own evaluation): the one module that needs the model and data
EVALUATES = {"truncate": {"lowrank.data.rebuild"}}
PACKAGES = {"lowrank", "lowrank.rundir", "lowrank.linalg"}  # their __init__ files are empty
LAZY = {"matplotlib", "wandb"}  # heavy optional dependencies: the only reason for a function-local import


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, inside a function?) for every import in analysis/MODULE.py, relative ones resolved
    (`from . import spectra` -> lowrank.linalg.spectra, `from .runs import Run` -> analysis.runs)."""
    tree = ast.parse((ROOT / "analysis" / f"{module.replace('.', '/')}.py").read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        local = id(node) in in_function
        if isinstance(node, ast.Import):
            found += [(a.name, local) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.append((node.module, local))
            if node.module in ("analysis", "analysis.figures"):  # `from analysis import runs` names a module
                found += [(f"{node.module}.{a.name}", local) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((f"analysis.{node.module}", local))
        elif isinstance(node, ast.ImportFrom):
            found += [(f"analysis.{a.name}", local) for a in node.names]
    return found


def loads_lazy(name: str) -> bool:
    """Does `import NAME` import matplotlib or wandb, itself or through the analysis modules it imports at the top?"""
    top = name.split(".")[0]
    return top in LAZY or (top == "analysis" and "." in name and name.split(".", 1)[1] in MODULES
                           and pulls_in_lazy(name.split(".", 1)[1]))


def pulls_in_lazy(module: str) -> bool:
    return any(loads_lazy(name) for name, local in imports(module) if not local)


def analysis_graph() -> dict[str, set[str]]:
    return {m: {i.removeprefix("analysis.") for i, _ in imports(m) if i.removeprefix("analysis.") in MODULES}
            for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None: depth-first search, a node met again while on the path closes one."""
    state, path = {}, []

    def visit(node):
        state[node] = "on path"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "on path":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_cycle_among_analysis_modules():
    graph = analysis_graph()
    assert set(graph["report"]) >= {"tables", "figures.registry"}   # the graph sees both kinds of import
    assert (cycle := find_cycle(graph)) is None, " -> ".join(cycle)


def test_function_local_imports_only_keep_matplotlib_or_wandb_lazy():
    assert pulls_in_lazy("figures.draw") and pulls_in_lazy("figures.registry") and not pulls_in_lazy("report")
    for m in MODULES:
        for name, local in imports(m):
            assert not local or loads_lazy(name), \
                f"analysis/{m}.py imports {name} inside a function, which keeps nothing heavy lazy"


def test_analysis_takes_from_lowrank_only_the_run_directory_contract():
    used = {name for m in MODULES for name, _ in imports(m) if name.split(".")[0] == "lowrank"
            and name not in EVALUATES.get(m, ())} - PACKAGES
    assert used <= LOWRANK_ALLOWED, used - LOWRANK_ALLOWED
    assert {"lowrank.rundir.layout", "lowrank.rundir.integrity"} <= used   # the parser sees `from lowrank.x import y`

