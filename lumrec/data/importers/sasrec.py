"""Import the SASRec "user item" per line format: one interaction per line, each user's lines in time order.

No timestamps in the source: as for the Amazon sequences, ts = base_day 00:00 UTC + the event's position
among its user's lines, in seconds.

>>> import tempfile; from pathlib import Path
>>> d = Path(tempfile.mkdtemp()); _ = (d / "Steam.txt").write_text("1 10\\n2 10\\n1 11\\n")
>>> meta = import_sasrec(d / "Steam.txt", d / "out")
>>> meta.name, meta.vocab_sizes["item_id"]
('Steam', 3)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lumrec.data.dataset import DatasetMeta, day_bounds
from lumrec.data.importers._common import DEFAULT_BASE_DAY, finish, iter_lines, prepare_output, require_file, source_name
from lumrec.data.importers.amazon import write_sequences
from lumrec.data.validate import DataValidationError

LAYOUT = "user item"


def read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse `user item` lines; return (user raw ids, item raw ids, position among the user's lines)."""
    users: list[int] = []
    items: list[int] = []
    pos: list[int] = []
    seen: dict[int, int] = {}
    for lineno, line in iter_lines(path, encoding="utf-8", layout=LAYOUT):
        fields = line.split()
        if len(fields) != 2:
            raise DataValidationError(str(path), f"line {lineno}: expected 2 fields `{LAYOUT}`, got {line[:80]!r}")
        try:
            user, item = int(fields[0]), int(fields[1])
        except ValueError:
            raise DataValidationError(str(path), f"line {lineno}: ids must be integers (`{LAYOUT}`), got {line[:80]!r}") from None
        users.append(user)
        items.append(item)
        pos.append(seen.get(user, 0))
        seen[user] = pos[-1] + 1
    if not users:
        raise DataValidationError(str(path), f"no interactions in file (expected `{LAYOUT}` lines)")
    return np.asarray(users, np.int64), np.asarray(items, np.int64), np.asarray(pos, np.int64)


def import_sasrec(
    src: str | Path,
    out: str | Path,
    *,
    base_day: str = DEFAULT_BASE_DAY,
    name: str | None = None,
    overwrite: bool = False,
) -> DatasetMeta:
    """Import a SASRec `user item` file; no categories (category 0), no ratings, no impressions."""
    path = require_file(src, f"SASRec interactions file (`{LAYOUT}` per line)")
    day_bounds(base_day)
    user_raw, item_raw, pos = read_pairs(path)
    ds = prepare_output(out, overwrite)
    sizes, days, n_items, _ = write_sequences(ds, user_raw, item_raw, pos, {}, "first", base_day)
    notes = (
        f"SASRec `{LAYOUT}` lines, one interaction each, no timestamps in the source: ts = {base_day} 00:00 UTC + "
        f"position among the user's lines, in seconds ({len(days)} day partition(s)). {len(pos)} events, "
        f"{sizes['user_id'] - 1} users, {n_items} items. action=review, no categories (category_id 0), "
        "no ratings, no impressions, no users table."
    )
    meta = DatasetMeta(
        name=name or source_name(path),
        source=str(path.resolve()),
        vocab_sizes=sizes,
        synthetic_timestamps=True,
        notes=notes,
        extra={"kind": "sasrec", "source_files": [str(path.resolve())], "base_day": base_day},
    )
    return finish(ds, meta)
