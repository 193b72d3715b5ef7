"""YAML configs mapped onto dataclasses; an unknown, mistyped or out-of-range key is an error naming the key.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Train:
    ...     epochs: int = 1
    ...     day: str | None = None
    ...     def __post_init__(self) -> None:
    ...         check_at_least(self, 1, "epochs", section="train")
    ...         check_days(self, "day", section="train")
    >>> from_dict(Train, {"epochs": 0}, source="run.yaml", prefix="train")
    Traceback (most recent call last):
    lumrec.config.ConfigError: run.yaml: key 'train.epochs' must be >= 1, got 0
    >>> from_dict(Train, {"day": parse_yaml("2026-13-45")}, source="run.yaml", prefix="train")
    Traceback (most recent call last):
    lumrec.config.ConfigError: run.yaml: key 'train.day' is not a valid date: '2026-13-45' (month must be in 1..12); expected YYYY-MM-DD, e.g. 2026-01-15
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from lumrec.errors import UserError, one_line

T = TypeVar("T")

DATE_FORMAT = "YYYY-MM-DD, e.g. 2026-01-15"


class ConfigError(UserError, ValueError):
    """A config that does not fit its dataclass; the message names the key path and the file."""

    source: str | None = None  # the file (or reader) named first in the message, when `_located` made it
    detail: str = ""


class ConfigValueError(ConfigError):
    """A field value out of range, raised by a config's own checks (`__post_init__`); `from_dict` adds file and key path."""

    def __init__(self, key: str, problem: str, section: str = "") -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{section}.{key} {problem}" if section else f"{key} {problem}")


def check_at_least(obj: Any, minimum: float, *names: str, section: str = "") -> None:
    """Raise ConfigValueError for the first field of `names` below `minimum` (a None value is allowed: "not set")."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < minimum:
            raise ConfigValueError(name, f"must be >= {minimum}, got {value!r}", section)


def check_above(obj: Any, minimum: float, *names: str, section: str = "") -> None:
    """Raise ConfigValueError for the first field of `names` not strictly above `minimum` (None allowed)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value > minimum:
            raise ConfigValueError(name, f"must be > {minimum}, got {value!r}", section)


def date_problem(text: Any) -> str | None:
    """Why `text` is not a YYYY-MM-DD calendar day, or None when it is one."""
    if not isinstance(text, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return "not in the form YYYY-MM-DD"
    try:
        datetime.date.fromisoformat(text)
    except ValueError as err:
        return str(err)
    return None


def check_days(obj: Any, *names: str, section: str = "") -> None:
    """Raise ConfigValueError for the first field of `names` (a day string or None) that is not a valid date."""
    for name in names:
        value = getattr(obj, name)
        problem = None if value is None else date_problem(value)
        if problem is not None:
            raise ConfigValueError(name, f"is not a valid date: {value!r} ({problem}); expected {DATE_FORMAT}", section)


class _InvalidDate(str):
    """A YAML scalar shaped like a date that is no date (2026-13-45): kept as text, rejected by `_coerce` with its key."""

    reason: str = ""


class _ConfigLoader(yaml.SafeLoader):
    """yaml's safe loader, except that an impossible date does not fail the whole file without naming its key."""


def _timestamp_or_text(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    try:
        return yaml.SafeLoader.construct_yaml_timestamp(loader, node)
    except ValueError as err:
        text = _InvalidDate(loader.construct_scalar(node))
        text.reason = str(err)
        return text


_ConfigLoader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_or_text)


def parse_yaml(text: str) -> Any:
    """YAML text as Python values; an impossible date stays text, so the key that holds it can be named."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, source: str) -> Any:
    """Convert a YAML value to the annotated type `tp`, recursing into dataclasses and containers."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _InvalidDate):
        raise ConfigError(f"{source}: key {path!r} is not a valid date: {str(value)!r} ({value.reason}); expected {DATE_FORMAT}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # `X | None`: X's own error (e.g. an unknown key inside a section) is the useful one
            return _coerce(value, candidates[0], path, source)
        errors = []
        for arg in candidates:
            try:
                return _coerce(value, arg, path, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{source}: key {path!r}: {value!r} fits none of {[_type_name(a) for a in args]}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: key {path!r}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, source=source, prefix=path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key {path!r}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: key {path!r}: expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, val_tp, f"{path}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key {path!r}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key {path!r}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key {path!r}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, datetime.date):  # YAML reads a bare 2026-01-15 as a date: keep the text
            return value.isoformat()
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key {path!r}: expected a string, got {value!r}")
        return value
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: key {path!r}: {value!r} is not one of {list(args)}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError naming them."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{source}: unknown config key {key!r}; valid keys here: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], path, source)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(f"{source}: missing required config key {key!r}")
    try:
        return cls(**kwargs)
    except ConfigValueError as err:  # the class's own range checks: add the file and the full key path
        key = f"{prefix}.{err.key}" if prefix else err.key
        raise _located(source, f"key {key!r} {err.problem}") from None
    except ConfigError as err:
        # Raised by a nested reader (e.g. a registry's from_dict with its own source): the key path is
        # in its text already; only the file is added, in place of that reader's source.
        if err.source == source:
            raise
        raise _located(source, err.detail if err.source is not None else str(err)) from None
    except ValueError as err:  # other checks in __post_init__ say what is wrong; add where
        raise _located(source, f"{prefix}: {err}" if prefix else str(err)) from None


def _located(source: str, detail: str) -> ConfigError:
    """ConfigError "SOURCE: DETAIL" that remembers both parts, so an outer reader can put its own file in front."""
    err = ConfigError(f"{source}: {detail}")
    err.source, err.detail = source, detail
    return err


def load_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Load a YAML file into dataclass `cls`, applying `key.sub=value` overrides (YAML-parsed values)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    for item in overrides or []:
        apply_override(data, item, source=str(path))
    return from_dict(cls, data, source=str(path))


def apply_override(data: dict, item: str, source: str = "<override>") -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 3, true, [1,2] work)."""
    if "=" not in item:
        raise ConfigError(f"{source}: override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: override {item!r}: {part!r} is not a mapping")
    try:
        node[parts[-1]] = parse_yaml(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: override {item!r}: the value is not valid YAML ({one_line(str(err))})") from None


def to_dict(obj: Any) -> dict:
    """A dataclass config as a plain dict (for logging and saving next to checkpoints)."""
    return dataclasses.asdict(obj)


def default_values(config: Any) -> dict | None:
    """The default values of `config`'s class as a plain dict (what a key a saved config lacks counts as);
    None where the class cannot be built without arguments.

        >>> @dataclasses.dataclass
        ... class Train:
        ...     lr: float = 0.1
        >>> default_values(Train(lr=0.5)), default_values(None)
        ({'lr': 0.1}, None)
    """
    if config is None:
        return None
    try:
        return to_dict(type(config)())
    except TypeError:
        return None


_ABSENT = "(absent)"  # a key one side does not have


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"a.b.c": leaf}. An empty mapping has no leaves: `model_config: {}` and none say the same."""
    if not isinstance(value, Mapping):
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any], allowed: tuple[str, ...] = (),
                   defaults: Mapping[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, current value)} where two config dicts differ, leaving out `allowed` keys and keys under them.

    A key the saved config lacks (written before the key existed) counts as its value in `defaults`.
    """
    # Through JSON first, so tuples compare equal to the lists a saved config.json holds.
    old, new, base = (_flat(json.loads(json.dumps(c))) for c in (saved, current, defaults or {}))
    for k, v in base.items():
        # Only where the saved config has nothing at, above or below this key.
        if not any(o == k or o.startswith(k + ".") or k.startswith(o + ".") for o in old):
            old[k] = v

    def is_allowed(key: str) -> bool:
        return any(key == a or key.startswith(a + ".") for a in allowed)

    keys = sorted(k for k in set(old) | set(new) if old.get(k, _ABSENT) != new.get(k, _ABSENT) and not is_allowed(k))
    return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys}


def check_same_run(config_file: Path, current: Mapping[str, Any], allowed: tuple[str, ...],
                   defaults: Mapping[str, Any] | None = None) -> None:
    """Refuse to resume a run whose saved config differs from `current` outside `allowed`: two experiments would mix."""
    if not config_file.exists():
        return
    try:
        saved = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_file}: not valid JSON ({e}); delete the run folder to start afresh") from e
    changes = config_changes(saved, current, allowed, defaults)
    if changes:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:5])
        more = f" and {len(changes) - 5} more" if len(changes) > 5 else ""
        raise ConfigError(f"{config_file.parent} holds checkpoints of a run with another config ({shown}{more}); "
                          "use another out folder, or delete it to start afresh")
