"""Query conditions, the one parser: `"category_id=5"`, `("category_id", 5)` or `Condition(...)` -> `Condition`.

Every place that reads a condition (the knowledge store's files, ``lum.conditions`` of a ranking
config, ``LUMFeatureConfig.conditions``, a grouped query's arguments, ``lumrec query``'s
condition specs) goes through ``parse_condition``, so one set of rules holds everywhere:

- a string is `feature=value` with nothing else: no spaces, one `=`;
- a pair is `(feature, value)` (a YAML list `[feature, value]` too);
- `feature` is an identifier: letters, digits and `_`, not starting with a digit;
- `value` is an integer id: an int (not a bool), or in a string or pair the digits of one (`-` allowed).

An error quotes the offending entry and names where it came from (`source`).

    >>> parse_condition("category_id=5")
    Condition(feature='category_id', value=5)
    >>> str(parse_condition(["scenario", "2"]))
    'scenario=2'
    >>> parse_condition("scenario: 2", source="lum.conditions")
    Traceback (most recent call last):
    ...
    ValueError: lum.conditions: condition 'scenario: 2' must look like feature=value with an integer value, e.g. 'category_id=5' (no '=')
"""

from __future__ import annotations

import numbers
import re
from typing import Iterable, NamedTuple

__all__ = ["Condition", "ConditionLike", "format_condition", "parse_condition", "parse_conditions"]

_FEATURE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VALUE_RE = re.compile(r"^-?\d+$")
_EXAMPLE = "e.g. 'category_id=5'"


class Condition(NamedTuple):
    """A query condition: one value of one condition feature, e.g. `Condition("category_id", 5)`; `str()` = "category_id=5"."""

    feature: str
    value: int

    def __str__(self) -> str:
        return f"{self.feature}={self.value}"


ConditionLike = Condition | tuple[str, int] | list | str


def _prefix(source: str | None) -> str:
    return f"{source}: " if source else ""


def _integer(value: object) -> int | None:
    """`value` as an int when it is one (an integral number that is not a bool, or a string of digits); else None."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and _VALUE_RE.match(value):
        return int(value)
    return None


def _from_text(text: str, source: str | None) -> Condition:
    feature, sep, value = text.partition("=")
    reason = None
    if not sep:
        reason = "no '='"
    elif not _FEATURE_RE.match(feature):
        reason = f"feature {feature!r} is not an identifier: letters, digits and _, not starting with a digit"
    elif not _VALUE_RE.match(value):
        reason = f"value {value!r} is not an integer"
    if reason is not None:
        raise ValueError(f"{_prefix(source)}condition {text!r} must look like feature=value with an integer value, {_EXAMPLE} ({reason})")
    return Condition(feature, int(value))


def _from_pair(entry: tuple | list, source: str | None) -> Condition:
    feature, value = entry
    if not isinstance(feature, str) or not _FEATURE_RE.match(feature):
        raise ValueError(
            f"{_prefix(source)}condition {entry!r}: feature {feature!r} must be an identifier "
            "(letters, digits and _, not starting with a digit)"
        )
    number = _integer(value)
    if number is None:
        raise ValueError(f"{_prefix(source)}condition {entry!r}: value of {feature!r} must be an integer id, got {value!r}")
    return Condition(feature, number)


def parse_condition(entry: object, source: str | None = None) -> Condition:
    """`"feature=value"`, `(feature, value)`, `[feature, value]` or a `Condition` -> a checked `Condition` (see the module doc).

    `source` names where the entry came from (a config key, a file); errors start with it.
    """
    if isinstance(entry, str):
        return _from_text(entry, source)
    if isinstance(entry, (tuple, list)) and len(entry) == 2:
        return _from_pair(entry, source)
    raise ValueError(f"{_prefix(source)}condition {entry!r} must be 'feature=value' or a (feature, value) pair, {_EXAMPLE}")


def parse_conditions(entries: Iterable[object], source: str | None = None) -> list[Condition]:
    """`parse_condition` of every entry, in order (a single string is an error: conditions are a list)."""
    if isinstance(entries, str):
        raise ValueError(f"{_prefix(source)}expected a list of conditions, got the string {entries!r} (write [{entries!r}])")
    return [parse_condition(entry, source) for entry in entries]


def format_condition(feature: str, value: int) -> str:
    """The store's condition string `"feature=value"` (checked like `parse_condition((feature, value))`)."""
    return str(parse_condition((feature, value)))
