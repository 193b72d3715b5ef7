"""Every example in a docstring of lumrec's core, modules and pipelines runs and prints what it shows."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> import prefix (pyproject maps modules/ and pipelines/ into the lumrec package).
PACKAGES = {"lumrec": "lumrec", "modules": "lumrec.modules", "pipelines": "lumrec.pipelines"}


def _module_names() -> list[str]:
    names = []
    for folder, prefix in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if ">>>" in path.read_text(encoding="utf-8"):
                names.append(".".join((prefix,) + parts))
    return names


@pytest.mark.parametrize("name", _module_names())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed"
