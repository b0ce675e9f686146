"""Every test below this folder trains or starts processes: it carries the `integration` marker, so
`python -m pytest -q -m "not integration"` (or `python -m pytest -q tests/unit`) leaves them out."""
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:  # the hook sees every collected item, not only this folder's
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)
