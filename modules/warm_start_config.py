"""WarmStartConfig: where a warm start's old weights are and how their names map (no torch import, so job configs can hold it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lumrec.config import ConfigError

__all__ = ["WarmStartConfig", "WarmStartError"]


class WarmStartError(RuntimeError):
    """An unusable warm-start source or, under `strict_shapes`, a tensor that cannot be carried over; names the path or tensor."""


@dataclass
class WarmStartConfig:
    """Where the old weights are and how their names and shapes map onto the new model.

    `source`: a checkpoint folder of ``lumrec.checkpoint.CheckpointManager`` (its root: the latest
    step; or one ``step-NNNNNNNN``), or a ``torch.save`` d state dict file (or a dict holding one
    under `checkpoint_key`). Not needed when a state dict is passed to ``warm_start`` directly.
    `name_map`: source name -> target name rewrites, tried in order; the first pattern that matches
    at the start of the name (``re.match``) rewrites it (``re.sub``, so `\\1` works); e.g.
    ``{"model\\\\.": ""}`` drops the ``model.`` prefix ``DLRMTrain`` adds. Unmatched names are kept.
    `strict_shapes`: raise (naming the tensors, before copying anything) when a source tensor has
    no target or a shape that is neither equal nor a Linear input widening; else report and skip.
    `exclude`: patterns (``re.search``) on source or target names that are never copied.
    `widen_at`: target name pattern -> column where the new input columns start (default: the end).
    `checkpoint_key`: the subtree of a checkpoint that holds the model's tensors.
    """

    source: str | None = None
    name_map: dict[str, str] = field(default_factory=dict)
    strict_shapes: bool = True
    exclude: list[str] = field(default_factory=list)
    widen_at: dict[str, int] = field(default_factory=dict)
    checkpoint_key: str = "model"

    def __post_init__(self) -> None:
        self.name_map, self.exclude, self.widen_at = dict(self.name_map), list(self.exclude), dict(self.widen_at)
        # Compile once; a bad pattern is a config error naming its key.
        self._name_map = [(_compile(p, f"name_map[{p!r}]"), repl) for p, repl in self.name_map.items()]
        self._exclude = [_compile(p, f"exclude[{i}]") for i, p in enumerate(self.exclude)]
        self._widen_at = []
        for p, col in self.widen_at.items():
            if isinstance(col, bool) or not isinstance(col, int) or col < 0:
                raise ConfigError(f"WarmStartConfig: key 'widen_at[{p!r}]': column must be an integer >= 0, got {col!r}")
            self._widen_at.append((_compile(p, f"widen_at[{p!r}]"), col))

    def target_name(self, source_name: str) -> str:
        """The target name of source tensor `source_name` after `name_map`."""
        for pattern, repl in self._name_map:
            if pattern.match(source_name):
                return pattern.sub(repl, source_name, count=1)
        return source_name

    def excluded(self, *names: str | None) -> bool:
        """Whether an `exclude` pattern matches any of `names`."""
        return any(p.search(n) for p in self._exclude for n in names if n is not None)

    def new_columns_at(self, target_name: str, old_in: int) -> int:
        """Column where a widened layer's new inputs start: `widen_at`'s first match, else `old_in` (the end)."""
        for pattern, col in self._widen_at:
            if pattern.search(target_name):
                if col > old_in:
                    raise WarmStartError(f"{target_name}: widen_at column {col} is past the source's {old_in} input columns")
                return col
        return old_in


def _compile(pattern: str, key: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"WarmStartConfig: key {key!r}: bad regular expression: {err}") from None
