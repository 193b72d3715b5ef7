"""lumrec: TorchRec-based LUM and HSTU generative recommenders."""

from __future__ import annotations

from typing import Any

# Public names that live in lumrec.modules. They load on first use, so `import lumrec` (and
# the core at large) never imports model code: the layering pipelines -> modules -> core holds.
_LAZY = {
    "LUMFeatureModule": "lumrec.modules.lum_features",
    "LUMFeatureConfig": "lumrec.modules.lum_features",
    "KnowledgeSource": "lumrec.modules.lum_features",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lumrec' has no attribute {name!r}")
