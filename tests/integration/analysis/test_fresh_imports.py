"""Every analysis module imports on its own in a fresh interpreter (forked from one that imported only numpy,
pandas and torch), loading from lowrank only the run-directory contract and matplotlib or wandb only where its
top-level imports ask for them; `analysis.report` in a new interpreter loads the same."""
import json
import subprocess
import sys

import pytest

from tests.cli_batch import run_cli_batch
from tests.conftest import ROOT
from tests.unit.analysis.test_analysis_imports import EVALUATES, LAZY, LOWRANK_ALLOWED, MODULES, PACKAGES, pulls_in_lazy


# Third-party packages that analysis modules import at their top, imported once before each module's fresh
# process is forked (see tests/cli_batch.py): top-level packages only, none of lowrank, analysis, matplotlib or wandb.
PRELOAD = ["numpy", "pandas", "torch"]

def import_code(module: str) -> str:
    return (f"import sys, json, analysis.{module}\n"
            "print(json.dumps([m for m in sys.modules if m.startswith('lowrank') or m in ('matplotlib', 'wandb')]))")

@pytest.fixture(scope="module")
def fresh_imports():
    """{module: result} of `python -c "import analysis.MODULE ..."` for every module, each in a process of its own
    forked from one that imported only PRELOAD (so each import of analysis, lowrank, matplotlib and wandb is the
    module's own), all from one tests.cli_batch process."""
    results = run_cli_batch([["-c", import_code(m)] for m in MODULES], [ROOT] * len(MODULES), timeout=600,
                            preload=PRELOAD)
    first = {m.split(".")[0] for m in results[0].preloaded}
    assert set(PRELOAD) <= first and not first & {"analysis", "lowrank", *LAZY}, first & {"analysis", "lowrank", *LAZY}
    return dict(zip(MODULES, results))

@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_in_a_fresh_interpreter(fresh_imports, module):
    """On its own, and loading from lowrank only the contract modules, and matplotlib or wandb only where its
    top-level imports ask for them (so `analysis.report` stays light until figures are drawn)."""
    res = fresh_imports[module]
    assert res.returncode == 0, res.stderr
    loaded = set(json.loads(res.stdout.splitlines()[-1]))
    lowrank = {m for m in loaded if m.split(".")[0] == "lowrank"}
    if module in EVALUATES:  # it scores models: the library module it names, and what that imports
        assert EVALUATES[module] <= lowrank, lowrank
    else:
        assert lowrank <= LOWRANK_ALLOWED | PACKAGES, lowrank  # errors: what cli and rundir use
    assert bool(loaded & LAZY) == pulls_in_lazy(module), loaded & LAZY

def test_report_imports_the_same_in_a_new_interpreter(fresh_imports):
    """`analysis.report` in an interpreter of its own, nothing imported before: the same modules as above."""
    res = subprocess.run([sys.executable, "-c", import_code("report")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1]) == json.loads(fresh_imports["report"].stdout.splitlines()[-1])
