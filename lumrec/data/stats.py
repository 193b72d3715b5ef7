"""Summary statistics of a lumrec dataset (events, distinct users/items, days), streamed in bounded memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from lumrec.data.dataset import Dataset

# Beyond this many days the per-day table is shortened to its head and tail.
MAX_DAYS_SHOWN = 20
JSON_KEYS = ("events", "users", "items", "days", "impressions", "positive_labels", "first_day", "last_day")


class _Distinct:
    """Counts distinct non-negative ids over batches: a bitmap when the vocabulary size is known, else merged uniques."""

    def __init__(self, size: int | None):
        self._seen = np.zeros(size, bool) if size else None
        self._uniq = np.empty(0, np.int64)

    def add(self, ids: np.ndarray) -> None:
        if self._seen is not None:
            self._seen[ids] = True
        else:
            self._uniq = np.union1d(self._uniq, np.unique(ids))

    def count(self) -> int:
        return int(self._seen.sum()) if self._seen is not None else len(self._uniq)


def dataset_stats(root: str | Path) -> dict[str, Any]:
    """Count behaviour events, distinct users and items, days and events per day (and impressions, positive labels)."""
    ds = Dataset(root)
    if not ds.root.is_dir():
        raise FileNotFoundError(f"{ds.root}: dataset folder not found")
    meta = ds.read_meta() if ds.manifest_path.exists() else None
    vocab = meta.vocab_sizes if meta else {}
    users, items = _Distinct(vocab.get("user_id")), _Distinct(vocab.get("item_id"))
    per_day: dict[str, int] = {}
    for day, batch in ds.iter_batches("behaviours", columns=["user_id", "item_id"]):
        per_day[day] = per_day.get(day, 0) + batch.num_rows
        users.add(batch.column("user_id").to_numpy(zero_copy_only=False))
        items.add(batch.column("item_id").to_numpy(zero_copy_only=False))
    days = sorted(per_day)
    stats: dict[str, Any] = {
        "name": meta.name if meta else ds.root.name,
        "root": str(ds.root),
        "events": sum(per_day.values()),
        "users": users.count(),
        "items": items.count(),
        "days": len(days),
        "first_day": days[0] if days else None,
        "last_day": days[-1] if days else None,
        "per_day": per_day,
        "synthetic_timestamps": bool(meta.synthetic_timestamps) if meta else False,
    }
    if ds.has_table("impressions"):
        rows = positives = 0
        for _, batch in ds.iter_batches("impressions", columns=["label"]):
            rows += batch.num_rows
            positives += int(pc.sum(pc.greater(batch.column("label"), 0)).as_py() or 0)
        stats["impressions"] = rows
        stats["positive_labels"] = positives
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """A readable summary with a per-day table, ending with one line holding the stats as JSON."""
    lines = [f"dataset {stats.get('name', '?')}" + (f" ({stats['root']})" if stats.get("root") else "")]
    span = f"  ({stats['first_day']} .. {stats['last_day']})" if stats.get("first_day") else ""
    lines += [
        f"  events       {stats['events']:>12,}",
        f"  users        {stats['users']:>12,}",
        f"  items        {stats['items']:>12,}",
        f"  days         {stats['days']:>12,}{span}",
    ]
    if "impressions" in stats:
        share = stats["positive_labels"] / stats["impressions"] if stats["impressions"] else 0.0
        lines.append(f"  impressions  {stats['impressions']:>12,}  ({stats['positive_labels']:,} positive, {share:.1%})")
    if stats.get("synthetic_timestamps"):
        lines.append("  (timestamps synthesised from event order)")
    per_day: dict[str, int] = stats.get("per_day") or {}
    if per_day:
        lines += ["", f"  {'day':<10}  {'events':>10}"]
        days = sorted(per_day)
        half = MAX_DAYS_SHOWN // 2
        shown = days if len(days) <= MAX_DAYS_SHOWN else days[:half] + [None] + days[-half:]
        for day in shown:
            lines.append(f"  {'...':<10}  {'...':>10}" if day is None else f"  {day:<10}  {per_day[day]:>10,}")
    summary = {k: stats[k] for k in JSON_KEYS if k in stats}
    if 0 < len(per_day) <= MAX_DAYS_SHOWN:
        summary["per_day"] = per_day
    lines.append(json.dumps(summary))
    return "\n".join(lines)
