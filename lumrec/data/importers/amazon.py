"""Import an S3Rec-style Amazon set: `Name.txt` (`user item item ...`, oldest first) + `Name_item2attributes.json`."""

from __future__ import annotations

import json
from collections import Counter
import logging
from pathlib import Path

import numpy as np

from lumrec.data.dataset import Dataset, DatasetMeta, day_bounds
from lumrec.data.importers._common import (
    DEFAULT_BASE_DAY,
    Events,
    dense_ids,
    finish,
    items_table,
    iter_lines,
    prepare_output,
    require_file,
    source_name,
    synthetic_ts,
    write_events,
    write_vocab,
)
from lumrec.data.schema import ACTION_REVIEW, SCENARIO_FEED
from lumrec.data.validate import DataValidationError

log = logging.getLogger(__name__)

LAYOUT = "user item item ..."


def read_sequences(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Parse `user item item ...` lines; return (user raw ids, item raw ids, position in the user's line, empty lines)."""
    users: list[int] = []
    items: list[int] = []
    pos: list[int] = []
    seen: dict[int, int] = {}
    empty = 0
    for lineno, line in iter_lines(path, encoding="utf-8", layout=LAYOUT):
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


# An attribute listed by at least this share of the items that have attributes is a root (e.g. "Beauty"
# on every Beauty item): `most_frequent` skips it, or every item would fall into that one group.
ROOT_SHARE = 0.9

CATEGORY_RULES = {
    "first": "the item's first attribute",
    "most_frequent": (
        f"the item's attribute shared by most items (coarsest), skipping root attributes listed by >= {ROOT_SHARE:.0%} "
        "of the items with attributes (a root is kept only when the item has nothing else)"
    ),
}


def primary_categories(cats: list[list[int]], rule: str) -> list[int]:
    """One category per item from its attribute codes (0 without attributes), by `rule` (see CATEGORY_RULES).

    >>> primary_categories([[1, 7], [1, 7], [1, 8], [1]], "most_frequent")  # 1 is a root: on every item
    [7, 7, 8, 1]
    """
    if rule == "first":
        return [c[0] if c else 0 for c in cats]
    counts = Counter(a for lst in cats for a in set(lst))
    listed = sum(1 for lst in cats if lst)
    roots = {a for a, n in counts.items() if n >= ROOT_SHARE * listed}

    def pick(lst: list[int]) -> int:
        candidates = [a for a in lst if a not in roots] or lst
        # Ties go to the smaller code, so the choice does not depend on the order attributes are listed in.
        return min(candidates, key=lambda a: (-counts[a], a))

    return [pick(c) if c else 0 for c in cats]


def write_sequences(
    ds: Dataset,
    user_raw: np.ndarray,
    item_raw: np.ndarray,
    pos: np.ndarray,
    attrs: dict[int, list[int]],
    category: str,
    base_day: str,
) -> tuple[dict[str, int], list[str], int, int]:
    """Write vocabularies, items and behaviours of events given as per-user positions (ts synthesised from `pos`).

    Returns (vocab sizes, day partitions, item count, items with attributes). Each item's category is
    chosen once (`category` rule over `attrs`) and written to the items table and the behaviours alike.
    """
    user_uniq, user_id = dense_ids(user_raw)
    item_uniq, item_id = dense_ids(item_raw)
    sizes = {"user_id": write_vocab(ds, "user_id", user_uniq), "item_id": write_vocab(ds, "item_id", item_uniq)}
    item_attrs = [attrs.get(raw, []) for raw in item_uniq.tolist()]
    cat_uniq = sorted({a for lst in item_attrs for a in lst})
    code = {a: i + 1 for i, a in enumerate(cat_uniq)}
    sizes["category_id"] = write_vocab(ds, "category_id", cat_uniq) if cat_uniq else 1
    cats = [[code[a] for a in lst] for lst in item_attrs]
    primary = np.zeros(len(item_uniq) + 1, np.int64)
    primary[1:] = primary_categories(cats, category)
    ds.write_table("items", items_table(np.arange(1, len(item_uniq) + 1), cats, primary=primary[1:].tolist()))
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
    return sizes, days, len(item_uniq), sum(1 for lst in item_attrs if lst)


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
    "most_frequent" (the one most items share: the coarsest, on Beauty 7 top-level groups; root
    attributes on (almost) every item are skipped). The items table, the behaviours and any other
    table carry the same category for an item. Without an attributes file (none given, none named
    `<stem>_item2attributes.json` beside `src`) every item has category 0 (missing).
    """
    if category not in CATEGORY_RULES:
        raise ValueError(f"amazon import: category must be one of {list(CATEGORY_RULES)}, got {category!r}")
    path = require_file(src, f"Amazon sequence file (`{LAYOUT}`)")
    beside = path.with_name(f"{path.stem}_item2attributes.json")
    if attributes is not None:
        attr_path: Path | None = require_file(attributes, "Amazon item attributes JSON")
    elif beside.is_file():
        attr_path = beside
    else:
        attr_path = None
        log.info("%s: no attributes file %s beside it and no --attributes: importing without categories (category 0)", path, beside.name)
    day_bounds(base_day)
    user_raw, item_raw, pos, empty = read_sequences(path)
    attrs = read_attributes(attr_path) if attr_path is not None else {}
    ds = prepare_output(out, overwrite)

    sizes, days, n_items, with_attr = write_sequences(ds, user_raw, item_raw, pos, attrs, category, base_day)
    categories = (
        f"categories from {attr_path.name}: category_id = {CATEGORY_RULES[category]} (the same in every table), "
        f"category_ids = all (attributes mix categories and brand); {with_attr} of {n_items} items have attributes."
        if attr_path is not None
        else "no attributes file: category_id is 0 (missing) everywhere."
    )
    notes = (
        f"Amazon reviews as item sequences, no timestamps in the source: ts = {base_day} 00:00 UTC + position "
        f"in the user's line, in seconds (keeps each user's order; {len(days)} day partition(s)). action=review, "
        f"no ratings, no impressions, no users table. {categories} {empty} user line(s) without items skipped."
    )
    meta = DatasetMeta(
        name=name or source_name(path),
        source=str(path.resolve()),
        vocab_sizes=sizes,
        synthetic_timestamps=True,
        notes=notes,
        extra={
            "kind": "amazon",
            "source_files": [str(p.resolve()) for p in (path, attr_path) if p is not None],
            "base_day": base_day,
            "category_ids_vocab": "category_id",
            "category": category,
        },
    )
    return finish(ds, meta)
