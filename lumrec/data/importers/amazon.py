"""Import an S3Rec-style Amazon set: `Name.txt` (`user item item ...`, oldest first) + `Name_item2attributes.json`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from lumrec.data.dataset import DatasetMeta, day_bounds
from lumrec.data.importers._common import (
    DEFAULT_BASE_DAY,
    Events,
    dense_ids,
    finish,
    items_table,
    iter_lines,
    prepare_output,
    require_file,
    synthetic_ts,
    write_events,
    write_vocab,
)
from lumrec.data.schema import ACTION_REVIEW, SCENARIO_FEED
from lumrec.data.validate import DataValidationError


def read_sequences(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Parse `user item item ...` lines; return (user raw ids, item raw ids, position in the user's line, empty lines)."""
    users: list[int] = []
    items: list[int] = []
    pos: list[int] = []
    seen: dict[int, int] = {}
    empty = 0
    for lineno, line in iter_lines(path, encoding="utf-8"):
        try:
            tokens = [int(t) for t in line.split()]
        except ValueError:
            bad = next(t for t in line.split() if not t.lstrip("-").isdigit())
            raise DataValidationError(str(path), f"line {lineno}: id {bad!r} is not an integer (expected `user item item ...`)") from None
        user, seq = tokens[0], tokens[1:]
        if user in seen:
            raise DataValidationError(str(path), f"line {lineno}: user {user} already has a line (line {seen[user]})")
        seen[user] = lineno
        if not seq:
            empty += 1
            continue
        users.extend([user] * len(seq))
        items.extend(seq)
        pos.extend(range(len(seq)))
    if not users:
        raise DataValidationError(str(path), "no interactions in file")
    return np.asarray(users, np.int64), np.asarray(items, np.int64), np.asarray(pos, np.int64), empty


def read_attributes(path: Path) -> dict[int, list[int]]:
    """Parse `{"item": [attr, ...]}` into item -> attribute list (order kept)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataValidationError(str(path), f"line {err.lineno}: invalid JSON: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataValidationError(str(path), f"unreadable file: {err}") from None
    if not isinstance(raw, dict):
        raise DataValidationError(str(path), 'expected a JSON object {"item": [attr, ...]}')
    attrs: dict[int, list[int]] = {}
    for key, values in raw.items():
        try:
            item = int(key)
            if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise ValueError
        except ValueError:
            raise DataValidationError(str(path), f"item {key!r}: expected an integer key and a list of integer attributes") from None
        attrs[item] = values
    return attrs


CATEGORY_RULES = {
    "first": "the item's first attribute",
    "most_frequent": "the item's attribute shared by most items (coarsest)",
}


def primary_categories(cats: list[list[int]], rule: str) -> list[int]:
    """One category per item from its attribute codes (0 without attributes), by `rule` (see CATEGORY_RULES)."""
    if rule == "first":
        return [c[0] if c else 0 for c in cats]
    counts = Counter(a for lst in cats for a in lst)
    # Ties go to the smaller code, so the choice does not depend on the order attributes are listed in.
    return [min(c, key=lambda a: (-counts[a], a)) if c else 0 for c in cats]


def import_amazon(
    src: str | Path,
    out: str | Path,
    *,
    attributes: str | Path | None = None,
    base_day: str = DEFAULT_BASE_DAY,
    name: str | None = None,
    overwrite: bool = False,
    category: str = "first",
) -> DatasetMeta:
    """Import an Amazon sequence file; timestamps are synthesised (base_day 00:00 UTC + position seconds).

    `category` picks each item's `category_id` among its attributes: "first" (as listed) or
    "most_frequent" (the one most items share: the coarsest, on Beauty 7 top-level groups).
    """
    if category not in CATEGORY_RULES:
        raise ValueError(f"amazon import: category must be one of {list(CATEGORY_RULES)}, got {category!r}")
    path = require_file(src, "Amazon sequence file (`user item item ...`)")
    attr_path = require_file(
        attributes if attributes is not None else path.with_name(f"{path.stem}_item2attributes.json"),
        "Amazon item attributes JSON",
    )
    day_bounds(base_day)
    user_raw, item_raw, pos, empty = read_sequences(path)
    attrs = read_attributes(attr_path)
    ds = prepare_output(out, overwrite)

    user_uniq, user_id = dense_ids(user_raw)
    item_uniq, item_id = dense_ids(item_raw)
    sizes = {"user_id": write_vocab(ds, "user_id", user_uniq), "item_id": write_vocab(ds, "item_id", item_uniq)}
    item_attrs = [attrs.get(raw, []) for raw in item_uniq.tolist()]
    cat_uniq = sorted({a for lst in item_attrs for a in lst})
    code = {a: i + 1 for i, a in enumerate(cat_uniq)}
    sizes["category_id"] = write_vocab(ds, "category_id", cat_uniq) if cat_uniq else 1
    cats = [[code[a] for a in lst] for lst in item_attrs]
    ds.write_table("items", items_table(np.arange(1, len(item_uniq) + 1), cats))
    primary = np.zeros(len(item_uniq) + 1, np.int64)
    primary[1:] = primary_categories(cats, category)

    events = Events(
        user_id=user_id,
        ts=synthetic_ts(pos, base_day),
        item_id=item_id,
        category_id=primary[item_id],
        action=ACTION_REVIEW,
        scenario=SCENARIO_FEED,
        order=np.arange(len(pos), dtype=np.int64),
    )
    days = write_events(ds, events)
    with_attr = sum(1 for lst in item_attrs if lst)
    notes = (
        f"Amazon reviews as item sequences, no timestamps in the source: ts = {base_day} 00:00 UTC + position "
        f"in the user's line, in seconds (keeps each user's order; {len(days)} day partition(s)). action=review, "
        f"no ratings, no impressions, no users table. categories from {attr_path.name}: category_id = "
        f"{CATEGORY_RULES[category]}, category_ids = all (attributes mix categories and brand); {with_attr} of {len(item_uniq)} "
        f"items have attributes. {empty} user line(s) without items skipped."
    )
    meta = DatasetMeta(
        name=name or f"amazon-{path.stem.lower()}",
        source=str(path.resolve()),
        vocab_sizes=sizes,
        synthetic_timestamps=True,
        notes=notes,
        extra={
            "kind": "amazon",
            "source_files": [str(path.resolve()), str(attr_path.resolve())],
            "base_day": base_day,
            "category_ids_vocab": "category_id",
            "category": category,
        },
    )
    return finish(ds, meta)
