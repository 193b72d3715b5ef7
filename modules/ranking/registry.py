"""Ranking backbones by name: a backbone is one file in ``modules/`` with one ``@register_ranker`` decorator.

A backbone registers a builder ``builder(parts, options) -> nn.Module``:

- `parts` (``lumrec.modules.ranking.base.RankerParts``): what the ranking job derives from the data
  set for every backbone: tables sized from the manifest vocabularies, the candidate and
  behaviour keys, the dense and LUM widths, the shared sizes of ``RankModelConfig``;
- `options`: an instance of the backbone's own options dataclass, read from
  ``sizes.backbones.<name>`` of a rank config (unknown keys are errors naming them).

The model maps ``(sparse_features: KJT, dense_features, lum_features)`` to logits [B], like every
ranking model (``lumrec.modules.ranking.base``), and reports the width of its MLP input as
``in_features`` (results.json's ``input_width``). Its embedding tables are torchrec
``EmbeddingBagCollection`` / ``EmbeddingCollection`` s, so the job gives them the row-wise optimizer
and, on N ranks, shards the pooled ones. ``lumrec rank CONFIG model=<name>`` then trains it: the
registry finds the file itself (``ranker_names`` imports every module under ``modules/`` that uses
the decorator), so nothing else is edited.

Example (what a file ``modules/wide_mlp.py`` would hold)::

    >>> from dataclasses import dataclass
    >>> from lumrec.modules.ranking.base import EmbeddingMLP, EmbeddingMLPConfig
    >>> @dataclass
    ... class WideOptions:
    ...     width: int = 8
    >>> @register_ranker("doc_wide_mlp", options=WideOptions)
    ... def build_wide_mlp(parts, options):
    ...     tables = parts.context_tables + parts.pooled_item_tables()
    ...     return EmbeddingMLP(EmbeddingMLPConfig(tables, parts.dense_dim, parts.lum_dim, [options.width]))
    >>> ranker_options("doc_wide_mlp", {"width": 4})
    WideOptions(width=4)
    >>> ranker_options("doc_wide_mlp", {"widht": 4})
    Traceback (most recent call last):
    lumrec.config.ConfigError: RankModelConfig: unknown config key 'sizes.backbones.doc_wide_mlp.widht'; valid keys here: ['width']
    >>> unregister_ranker("doc_wide_mlp")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from lumrec.config import ConfigError, from_dict
from lumrec.modules.registry_discovery import import_registering_modules

if TYPE_CHECKING:
    from torch import nn

    from lumrec.modules.ranking.base import RankerParts

__all__ = [
    "NoOptions",
    "RankerBuilder",
    "RankerSpec",
    "ranker_names",
    "ranker_options",
    "ranker_spec",
    "register_ranker",
    "unregister_ranker",
]

RankerBuilder = Callable[["RankerParts", Any], "nn.Module"]


@dataclass
class NoOptions:
    """The options of a backbone that has none (its `sizes.backbones.<name>` takes no keys)."""


@dataclass(frozen=True)
class RankerSpec:
    """A registered backbone: its builder, its options dataclass, and what its batches carry."""

    name: str
    builder: RankerBuilder
    options: type = NoOptions
    # The model reads the sample's and the behaviours' unix times from the KJT
    # (keys sample_ts / hist_ts, added by lumrec.modules.ranking.base.with_timestamps).
    timestamps: bool = False


_RANKERS: dict[str, RankerSpec] = {}


def register_ranker(name: str, options: type = NoOptions, timestamps: bool = False) -> Callable[[RankerBuilder], RankerBuilder]:
    """Decorator adding `builder(parts, options) -> nn.Module` as ranking backbone `name` (`model: name` in a rank config).

    `options`: the dataclass of the backbone's own keys (`sizes.backbones.<name>`); `timestamps`:
    the model reads the sample and behaviour times from the KJT.
    """
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"register_ranker({name!r}): options must be a dataclass, got {options!r}")

    def deco(builder: RankerBuilder) -> RankerBuilder:
        old = _RANKERS.get(name)
        if old is not None and _origin(old.builder) != _origin(builder):
            raise ValueError(f"ranking model {name!r} is registered twice: by {_origin(old.builder)} and {_origin(builder)}")
        _RANKERS[name] = RankerSpec(name, builder, options, timestamps)
        return builder

    return deco


def unregister_ranker(name: str) -> None:
    """Remove backbone `name` (for tests and examples that register a throwaway one)."""
    _RANKERS.pop(name, None)


def ranker_names() -> list[str]:
    """The registered backbones' names, sorted (every module under modules/ that registers one is imported first)."""
    _discover()
    return sorted(_RANKERS)


def ranker_spec(name: str) -> RankerSpec:
    """The registered backbone `name`; an unknown name is an error listing the registered ones."""
    _discover()
    if name not in _RANKERS:
        raise ValueError(f"model: unknown ranking model {name!r}; choose from {sorted(_RANKERS)}")
    return _RANKERS[name]


def ranker_options(name: str, values: Mapping[str, Any] | Any = None, prefix: str = "sizes.backbones") -> Any:
    """Backbone `name`'s options from `values` (a mapping of its keys, an options instance, or None for the defaults).

    Errors name the key under `prefix` (e.g. `sizes.backbones.sim.short_len`).
    """
    spec = ranker_spec(name)
    if isinstance(values, spec.options):
        return values
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(f"{prefix}.{name}: expected a mapping of {spec.options.__name__} keys, got {values!r}")
    path = f"{prefix}.{name}"
    try:
        return from_dict(spec.options, values or {}, source="RankModelConfig", prefix=path)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # the options' own checks (__post_init__)
        raise ConfigError(f"{path}: {err}") from None


def _origin(builder: RankerBuilder) -> str:
    return f"{builder.__module__}.{builder.__qualname__}"


def _discover() -> None:
    """Import every module under modules/ that registers a backbone (`registry_discovery`)."""
    import_registering_modules("register_ranker", __name__)
