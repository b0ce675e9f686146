"""benchmarks.probes: every probe is a module that imports without running (no work at module level) and has a
main() that parses its command line before touching the GPU."""
import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

import benchmarks.probes

PROBES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.probes.__path__))
RUNNABLE = [name for name in PROBES if name != "common"]


def test_the_probes_are_found():
    assert "common" in PROBES and len(RUNNABLE) >= 9


@pytest.mark.parametrize("name", PROBES)
def test_a_probe_does_nothing_at_module_level(name):
    """Only a docstring, imports, definitions, constants and the `if __name__ == "__main__"` guard."""
    tree = ast.parse(Path(benchmarks.probes.__path__[0], f"{name}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.If):
            assert ast.unparse(node.test) == "__name__ == '__main__'", (name, ast.unparse(node.test))
            assert [ast.unparse(n) for n in node.body] == ["main()"], name
            continue
        assert isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign,
                                 ast.AnnAssign)) or (isinstance(node, ast.Expr)
                                                     and isinstance(node.value, ast.Constant)), \
            (name, node.lineno, ast.unparse(node)[:80])
        if isinstance(node, (ast.Assign, ast.AnnAssign)):  # constants: no call that allocates or measures
            calls = {ast.unparse(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)}
            assert calls <= {"dict", "range", "tuple", "list"}, (name, node.lineno, calls)


@pytest.mark.parametrize("name", PROBES)
def test_a_probe_imports_without_running(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"benchmarks.probes.{name}")
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""
    if name in RUNNABLE:
        assert callable(module.main) and module.__doc__.strip()
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as done:  # argparse answers before any GPU work
            module.main()
        assert done.value.code == 0 and "--out" in capsys.readouterr().out
