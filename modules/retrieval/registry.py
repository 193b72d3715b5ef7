"""Pre-training models by name: a model is one file under ``modules/`` with one ``@register_model`` decorator.

A builder gets ``(model_config dict, dataset manifest, dataset, token config, max_len)`` and
returns a ``SequentialRecommender``; ``model: <name>`` in a pretrain config picks it. The registry
imports the files that register a model itself (``registry_discovery``), so nothing else is edited.
The built-in models (SASRec, HSTU, HSTU-large, LUM) register in ``retrieval.builders``.

    >>> "lum" in model_names() and "sasrec" in model_names()
    True
"""

from __future__ import annotations

from typing import Any, Callable

from lumrec.data.dataset import Dataset, DatasetMeta
from lumrec.data.tokens import TokenConfig
from lumrec.modules.registry_discovery import import_registering_modules
from lumrec.modules.retrieval.sequence_model import SequentialRecommender

__all__ = ["MODEL_BUILDERS", "ModelBuilder", "build_model", "model_names", "register_model"]

# A builder gets (model_config dict, dataset manifest, dataset, token config, max_len).
ModelBuilder = Callable[[dict[str, Any], DatasetMeta, Dataset, TokenConfig, int], SequentialRecommender]
MODEL_BUILDERS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding a builder under `name`."""

    def deco(fn: ModelBuilder) -> ModelBuilder:
        MODEL_BUILDERS[name] = fn
        return fn

    return deco


def model_names() -> list[str]:
    """The registered models' names (every module under modules/ that registers one is imported first)."""
    import_registering_modules("register_model", __name__)
    return sorted(MODEL_BUILDERS)


def build_model(
    name: str, model_config: dict[str, Any], meta: DatasetMeta, data: Dataset, token_config: TokenConfig, max_len: int
) -> SequentialRecommender:
    """The model `name` configured by `model_config` (keys of its config dataclass)."""
    if name not in model_names():
        raise KeyError(f"unknown model {name!r}; known models: {sorted(MODEL_BUILDERS)}")
    return MODEL_BUILDERS[name](model_config, meta, data, token_config, max_len)
