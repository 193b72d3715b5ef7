"""YAML -> dataclass configs: nesting, types, overrides and errors naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field

import dataclasses

import pytest

from lumrec.config import ConfigError, from_dict, load_config


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)


@dataclass
class Job:
    name: str
    steps: int = 10
    features: list[str] = field(default_factory=lambda: ["item_id"])
    optim: Optim = field(default_factory=Optim)
    tag: str | None = None


def test_nested_and_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nsteps: 5\noptim:\n  lr: 0.01\n  betas: [0.8, 0.9]\n")
    cfg = load_config(Job, path)
    assert cfg == Job(name="x", steps=5, optim=Optim(lr=0.01, betas=(0.8, 0.9)))


def test_unknown_key_is_named_with_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\noptim:\n  lrr: 0.01\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'optim\.lrr'; valid keys here: \['betas', 'lr'\]"):
        load_config(Job, path)


def test_wrong_type_and_missing_key():
    with pytest.raises(ConfigError, match="key 'steps': expected an integer, got 'ten'"):
        from_dict(Job, {"name": "x", "steps": "ten"})
    with pytest.raises(ConfigError, match="missing required config key 'name'"):
        from_dict(Job, {})
    with pytest.raises(ConfigError, match=r"key 'features\[1\]': expected a string"):
        from_dict(Job, {"name": "x", "features": ["a", 3]})


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    cfg = load_config(Job, path, overrides=["optim.lr=0.5", "features=[a, b]", "tag=null"])
    assert cfg.optim.lr == 0.5 and cfg.features == ["a", "b"] and cfg.tag is None
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        load_config(Job, path, overrides=["stepz=3"])


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        load_config(Job, path)


def test_bare_yaml_dates_become_strings(tmp_path):
    """`start: 2026-01-15` (a YAML date) fills a str field as '2026-01-15'."""
    from dataclasses import dataclass

    from lumrec.config import load_config

    @dataclass
    class Days:
        start: str = ""
        end: str | None = None

    path = tmp_path / "days.yaml"
    path.write_text("start: 2026-01-15\nend: 2026-01-20\n")
    cfg = load_config(Days, path, overrides=["end=2026-02-01"])
    assert (cfg.start, cfg.end) == ("2026-01-15", "2026-02-01")


@dataclasses.dataclass
class Inner:
    store: str = ""


@dataclasses.dataclass
class Outer:
    lum: Inner | None = None


def test_unknown_key_inside_optional_section_is_named(tmp_path):
    """A typo inside an `X | None` section names the key, not just 'fits none of'."""
    from lumrec.config import ConfigError, from_dict

    assert from_dict(Outer, {"lum": None}).lum is None
    assert from_dict(Outer, {"lum": {"store": "x"}}).lum == Inner("x")
    with pytest.raises(ConfigError, match="unknown config key 'lum.stor'"):
        from_dict(Outer, {"lum": {"stor": "x"}})


def test_config_changes_names_dotted_keys_with_both_values():
    from lumrec.config import config_changes

    saved = {"out": "a", "train": {"lr": 1e-3, "betas": [0.9, 0.98]}, "model_config": {}}
    current = {"out": "b", "train": {"lr": 2e-3, "betas": (0.9, 0.98), "new_key": 1}, "model_config": {"dim": 4}}
    # Tuples compare equal to the lists a saved config.json holds; allowed keys (and keys under them) are left out.
    assert config_changes(saved, current, allowed=("out",)) == {
        "train.lr": (1e-3, 2e-3), "train.new_key": ("(absent)", 1), "model_config.dim": ("(absent)", 4)}
    # A key the saved config lacks counts as its default; a default never masks what the saved config does hold.
    defaults = {"train": {"new_key": 1, "init": None}, "model_config": {}}
    saved["train"]["init"] = {"source": "x"}
    current["train"]["init"] = {"source": "x"}
    assert config_changes(saved, current, allowed=("out", "train.lr", "model_config"), defaults=defaults) == {}
    assert config_changes(saved, {**current, "train": {**current["train"], "new_key": 2}}, ("out", "train.lr", "model_config"),
                          defaults) == {"train.new_key": (1, 2)}


@dataclass
class Sized:
    epochs: int = 1
    size: int | None = None
    day: str | None = None

    def __post_init__(self) -> None:
        from lumrec.config import check_at_least, check_days

        check_at_least(self, 1, "epochs", "size", section="train")
        check_days(self, "day", section="train")


@dataclass
class SizedJob:
    train: Sized = field(default_factory=Sized)


@dataclass
class Registry:
    """Stands for a registry that reads its section with its own `from_dict(source="Registry")`."""

    def __post_init__(self) -> None:
        from lumrec.config import _located

        raise _located("Registry", "key 'sizes.x' must be >= 1, got 0")


@dataclass
class Top:
    sizes: Registry = field(default_factory=Registry)


def test_range_and_date_checks_name_the_file_and_full_key(tmp_path):
    from lumrec.config import ConfigValueError

    with pytest.raises(ConfigValueError, match=r"^train\.epochs must be >= 1, got 0$"):
        Sized(epochs=0)  # built in Python: the section the class declares
    assert Sized(size=None).size is None  # None = not set, never out of range
    path = tmp_path / "job.yaml"
    for text, message in (
        ("train: {epochs: -1}\n", "key 'train.epochs' must be >= 1, got -1"),
        ("train: {size: 0}\n", "key 'train.size' must be >= 1, got 0"),
        ("train: {day: 2026-02-30}\n", "key 'train.day' is not a valid date: '2026-02-30' (day is out of range for month)"),
        ("train: {day: '2026-13-01'}\n", "key 'train.day' is not a valid date: '2026-13-01' (month must be in 1..12)"),
        ("train: {day: 20260101}\n", "key 'train.day': expected a string, got 20260101"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_config(SizedJob, path)
        assert str(caught.value).startswith(f"{path}: {message}")
    path.write_text("train: {day: 2026-01-15}\n")
    assert load_config(SizedJob, path, ["train.epochs=3"]).train == Sized(epochs=3, day="2026-01-15")


def test_yaml_keeps_an_impossible_date_as_text():
    from lumrec.config import parse_yaml

    assert parse_yaml("a: 2026-13-45\nb: 2026-01-02\n") == {"a": "2026-13-45", "b": __import__("datetime").date(2026, 1, 2)}


def test_an_error_of_a_nested_reader_names_the_outer_file():
    with pytest.raises(ConfigError, match=r"^top\.yaml: key 'sizes\.x' must be >= 1, got 0$"):
        from_dict(Top, {"sizes": {}}, source="top.yaml")
