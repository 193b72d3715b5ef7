"""Checks of a lum_tables config against its data set, run before any LUM trains.

Every condition feature and value the config names (``pretrain.data.condition_features``,
``knowledge.conditions``, ``lum`` / ``single_condition`` / ``extra_rows`` conditions and
``candidate_condition_feature``) must exist in the data: a column of its behaviours (or, for a
candidate's feature, of its items table) and, for a value, an id below the manifest's vocabulary
size that occurs in the behaviours (a config listing a data set's attribute codes, as the Beauty
configs list category ids, is checked against the codes that import wrote). A missing one is a ``ConfigMismatch`` naming the config file, the key, the value and what the
data has. ``none`` (the unconditioned question) and ``const`` (the constant condition token) are
condition tokens, not columns.

    >>> facts = DataFacts("d", columns={"category_id"}, item_columns=set(), vocab={"category_id": 3})
    >>> check_condition_text("category_id=2", "lum.conditions", facts, "c.yaml")
    >>> check_condition_text("category_id=7", "lum.conditions", facts, "c.yaml")
    Traceback (most recent call last):
    ...
    lum_tables_checks.ConfigMismatch: c.yaml: lum.conditions: condition 'category_id=7': data set d has category_id ids 1..2 (vocabulary size 3); the value is an id of the data set's own coding (see its import), not a name
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Condition tokens that are not data columns (modules/retrieval/grouped_query.py).
TOKEN_FEATURES = {"none", "const"}


class ConfigMismatch(ValueError):
    """A config names a condition feature or value the data set does not have."""


@dataclass
class DataFacts:
    """What a data set offers to conditions: behaviours columns, items columns and id vocabulary sizes."""

    name: str
    columns: set[str]
    item_columns: set[str]
    vocab: dict[str, int] = field(default_factory=dict)
    path: Path | None = None  # the data set folder: values are looked up in its behaviours (None: vocabulary sizes only)
    coding: str = ""  # how the import coded category ids (its `category` rule), shown beside a missing code
    _seen: dict[str, dict[int, int]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, path: Path) -> "DataFacts":
        """Read from the data set folder's manifest and table schemas (no event is loaded beyond one day's schema)."""
        from lumrec.data.dataset import Dataset

        data = Dataset(path)
        if not data.manifest_path.exists():
            raise ConfigMismatch(f"{path}: not a lumrec data set (no {data.manifest_path.name}); import one with `lumrec import`")
        meta = data.read_meta()
        days = data.days("behaviours")
        columns = set(data.read_days("behaviours", days[-1], days[-1]).schema.names) if days else set()
        items = set(data.read_table("items", validate=False).schema.names) if data.has_table("items") else set()
        coding = f", category ids coded by the import's `category: {meta.extra['category']}` rule" if "category" in meta.extra else ""
        return cls(f"{meta.name} ({path})", columns, items, dict(meta.vocab_sizes), Path(path), coding)

    def counts(self, feature: str) -> dict[int, int] | None:
        """How often each id of behaviours column `feature` occurs (read once); None without a data folder."""
        if self.path is None or feature not in self.columns:
            return None
        if feature not in self._seen:
            import numpy as np

            from lumrec.data.dataset import Dataset

            values = Dataset(self.path).read_days("behaviours", columns=[feature]).column(feature).to_numpy()
            ids, counts = np.unique(values, return_counts=True)
            self._seen[feature] = dict(zip(ids.tolist(), counts.tolist()))
        return self._seen[feature]

    def describe(self) -> str:
        return f"behaviours columns {sorted(self.columns)}" + (f", items columns {sorted(self.item_columns)}" if self.item_columns else "")


def check_feature(feature: str, key: str, facts: DataFacts, config: str, items_too: bool = False) -> None:
    """`feature` is a condition token or a column of the data (of behaviours, or items with `items_too`)."""
    if feature in TOKEN_FEATURES:
        return
    if feature in facts.columns or (items_too and feature in facts.item_columns):
        return
    raise ConfigMismatch(f"{config}: {key}: feature {feature!r} is not in data set {facts.name}, which has {facts.describe()}")


def check_value(feature: str, value: Any, key: str, facts: DataFacts, config: str, shown: str) -> None:
    """`value` is an id of `feature` the data can hold: an integer in 1..vocab-1 (0 = missing); `none` takes 0 only."""
    if feature == "none":
        if value != 0:
            raise ConfigMismatch(f"{config}: {key}: condition {shown!r}: the unconditioned question takes value 0 only")
        return
    if feature == "const":
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigMismatch(f"{config}: {key}: condition {shown!r}: value {value!r} must be an integer id")
    size = facts.vocab.get(feature)
    if size is not None and not 0 < value < size:
        raise ConfigMismatch(f"{config}: {key}: condition {shown!r}: data set {facts.name} has {feature} ids 1..{size - 1} "
                             f"(vocabulary size {size}); the value is an id of the data set's own coding (see its import), not a name")
    counts = facts.counts(feature)
    if counts is not None and not counts.get(value):
        common = sorted((v for v in counts if v > 0), key=lambda v: -counts[v])[:10]
        raise ConfigMismatch(f"{config}: {key}: condition {shown!r}: no behaviour of data set {facts.name} has {feature} {value}"
                             f"{facts.coding}; its most frequent {feature} ids are {common}")


def check_condition_text(text: str, key: str, facts: DataFacts, config: str) -> None:
    """A RankLUMConfig condition `feature=value`: the feature is a column, the value one of its ids."""
    from lumrec.knowledge.conditions import parse_condition

    cond = parse_condition(text, f"{config}: {key}")
    check_feature(cond.feature, key, facts, config)
    check_value(cond.feature, cond.value, key, facts, config, text)


def check_config(cfg: Any, lum_data: Path, rank_data: Path, config: str) -> None:
    """Every condition of lum_tables config `cfg` against the LUM's data (`lum_data`) and the ranker's (`rank_data`)."""
    lum_facts = DataFacts.of(lum_data)
    rank_facts = lum_facts if Path(rank_data) == Path(lum_data) else DataFacts.of(rank_data)
    trained = list(cfg.pretrain.get("data", {}).get("condition_features", []))
    for feature in trained:
        check_feature(feature, "pretrain.data.condition_features", lum_facts, config)
    queried: dict[str, Any] = {}
    for i, cond in enumerate(cfg.knowledge.conditions):
        key = f"knowledge.conditions[{i}]"
        feature, values = cond.get("feature"), cond.get("values", "all")
        if not isinstance(feature, str):
            raise ConfigMismatch(f"{config}: {key}: needs a feature name, got {cond!r}")
        check_feature(feature, key, lum_facts, config)
        if feature not in TOKEN_FEATURES and feature not in trained:
            raise ConfigMismatch(f"{config}: {key}: feature {feature!r} is asked but the LUM is not trained on it "
                                 f"(pretrain.data.condition_features is {trained})")
        if values != "all":
            for value in values:
                check_value(feature, value, key, lum_facts, config, f"{feature}={value}")
        queried[feature] = values
    specs = {"lum": cfg.lum, "single_condition": cfg.single_condition, **{f"extra_rows.{k}": v for k, v in cfg.extra_rows.items()}}
    for name, spec in specs.items():
        for text in spec.conditions:
            check_condition_text(text, f"{name}.conditions", lum_facts, config)
            feature, _, value = text.partition("=")
            if feature != "const" and feature not in queried:
                raise ConfigMismatch(f"{config}: {name}.conditions: {text!r} is never asked of the LUM "
                                     f"(knowledge.conditions ask {sorted(queried)})")
            if queried.get(feature, "all") != "all" and int(value) not in queried[feature]:
                raise ConfigMismatch(f"{config}: {name}.conditions: {text!r} is not among knowledge.conditions' "
                                     f"{feature} values {queried[feature]}")
        feature = spec.candidate_condition_feature
        if feature is not None:
            key = f"{name}.candidate_condition_feature"
            check_feature(feature, key, rank_facts, config, items_too=True)
            if feature not in queried:
                raise ConfigMismatch(f"{config}: {key}: {feature!r} is never asked of the LUM (knowledge.conditions ask {sorted(queried)})")
