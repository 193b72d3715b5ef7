"""Shared by the benchmark scripts: merge one row into a results JSON file without losing others."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path


def merge_row(results: Path, name: str, row: dict) -> dict:
    """Add `row` under `name` to the results file; a lock keeps concurrent invocations from losing rows."""
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(results.read_text()) if results.exists() else {}
        rows[name] = row
        tmp = results.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=2, sort_keys=True))
        os.replace(tmp, results)
    return rows
