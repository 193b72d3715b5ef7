"""Finding the files under ``modules/`` that register a model, so a model's file is its only registration.

Both registries (``retrieval.registry`` for pre-training models, ``ranking.registry`` for ranking
backbones) call `import_registering_modules` with their decorator's name before a lookup: every
module whose source calls that decorator is imported once, and nothing else is (importing every
module would load unrelated, possibly heavy, code).

    >>> names = registering_module_names("register_ranker")
    >>> "lumrec.modules.ranking.sim" in names and "lumrec.modules.ops.attention" not in names
    True
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

__all__ = ["import_registering_modules", "registering_module_names"]

MODULES_ROOT = Path(__file__).resolve().parent
_done: set[str] = set()


def registering_module_names(decorator: str) -> list[str]:
    """Import names of the modules under modules/ whose source calls `decorator(` (as a decorator or a call)."""
    pattern = re.compile(rf"^\s*@?{re.escape(decorator)}\(", re.MULTILINE)
    names = []
    for path in sorted(MODULES_ROOT.rglob("*.py")):
        parts = path.relative_to(MODULES_ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not all(p.isidentifier() for p in parts) or not pattern.search(path.read_text(encoding="utf-8")):
            continue
        names.append(".".join(("lumrec.modules",) + parts))
    return names


def import_registering_modules(decorator: str, defined_in: str) -> None:
    """Import (once per decorator) every module that calls `decorator`, except `defined_in`, the registry itself."""
    if decorator in _done:
        return
    _done.add(decorator)  # before importing: the imported modules call the decorator, not this
    for name in registering_module_names(decorator):
        if name != defined_in:
            importlib.import_module(name)
