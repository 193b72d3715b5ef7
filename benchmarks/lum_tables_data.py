"""Step 0 of the lum_tables benchmark: the data set, imported or generated once, and the LUM's knowledge view.

``SourceSpec`` says how to get a data set (a ``lumrec import`` kind and source, or the synthetic
generator); ``ensure_dataset`` imports it into a folder once (a later call with the same options
reuses it), ``ensure_lum_dataset`` imports the LUM's own copy when its importer options differ, and
``write_knowledge_view`` cuts each user's last events off for the user_cut point-in-time mode.

    >>> SourceSpec(kind="amazon", src="amazon-beauty/Beauty.txt").options
    {}
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

@dataclass
class SourceSpec:
    """How to get the data set: `lumrec import KIND SRC` (paths relative to --data), or the synthetic generator."""

    kind: str = "synthetic"  # synthetic | ml-1m | ml-1m-ratings | amazon
    src: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # importer options; *path* options relative to --data
    synth: dict[str, Any] = field(default_factory=dict)  # SynthConfig keys (kind synthetic)



def ensure_dataset(src: SourceSpec, data_root: Path, folder: Path) -> Path:
    """Import (or generate) the data set into `folder` once; a complete earlier import is reused."""
    from lumrec.data.dataset import Dataset

    if src.kind == "synthetic":
        from lumrec.data.synthetic import SynthConfig, ensure_generated

        ensure_generated(folder, SynthConfig(**src.synth))
        return folder
    data_root = data_root.resolve()  # the stamp compares absolute paths: ../shared/data and /x/shared/data are one source
    options = {k: (str(data_root / v) if k in ("movies", "users", "attributes") else v) for k, v in src.options.items()}
    wanted = {"kind": src.kind, "src": str(data_root / src.src), "options": options}
    stamp = folder / "_lum_tables_import.json"  # what the folder was imported with: other options re-import
    if not Dataset(folder).manifest_path.exists() or not stamp.exists() or json.loads(stamp.read_text()) != wanted:
        from lumrec.data.importers import run_import

        stamp.unlink(missing_ok=True)  # the importer refuses to overwrite a folder holding files it did not write
        run_import(src.kind, data_root / src.src, folder, overwrite=True, **options)
        stamp.write_text(json.dumps(wanted, sort_keys=True))
    return folder


def ensure_lum_dataset(cfg: Any, data_root: Path, out: Path, dataset: str, data_path: Path) -> Path:
    """The data set the LUM trains on: the ranker's own, or (knowledge.lum_source_options) the source imported with other options."""
    import numpy as np

    from lumrec.data.dataset import Dataset

    options = cfg.knowledge.lum_source_options
    if not options:
        return data_path
    spec = SourceSpec(kind=cfg.source.kind, src=cfg.source.src, options={**cfg.source.options, **options}, synth=cfg.source.synth)
    lum_path = ensure_dataset(spec, data_root, out / f"{dataset}-lum-import")
    # Knowledge is joined by user_id and item_id, and the point-in-time check compares timestamps: all must agree.
    mine, theirs = Dataset(data_path), Dataset(lum_path)
    my_vocab, their_vocab = mine.read_meta().vocab_sizes, theirs.read_meta().vocab_sizes
    for column in ("user_id", "item_id"):
        if my_vocab.get(column) != their_vocab.get(column):
            raise ValueError(f"knowledge.lum_source_options: the LUM's import {lum_path} numbers {column} differently from {data_path}")
    a, b = mine.read_days("behaviours"), theirs.read_days("behaviours")
    for column in ("user_id", "item_id", "ts"):
        if not np.array_equal(a.column(column).to_numpy(), b.column(column).to_numpy()):
            raise ValueError(f"knowledge.lum_source_options: behaviours column {column!r} differs between {lum_path} and {data_path}")
    return lum_path


def write_knowledge_view(data_path: Path, view: Path, holdout: int) -> Path:
    """A copy of the data set whose behaviours keep, per user, all but the last `holdout` events (user_cut mode)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401 - pa.compute

    from lumrec.data.dataset import Dataset

    src, dst = Dataset(data_path), Dataset(view)
    # Reused only if cut the same way from the same import (a re-import rewrites the source's manifest).
    source_stamp, view_stamp = src.manifest_path.read_text(), view / "_source_manifest.json"
    if dst.manifest_path.exists() and view_stamp.exists() and view_stamp.read_text() == source_stamp \
            and dst.read_meta().extra.get("knowledge_view_holdout") == holdout:
        return view
    if view.exists():
        shutil.rmtree(view)
    for table in ("items", "users"):
        if src.has_table(table):
            dst.write_table(table, src.read_table(table))
    events = src.read_days("behaviours")
    users = events.column("user_id").to_numpy()
    # Per user, in time order (stable, as the sequence builder orders them): how many of its events come later.
    order = np.lexsort((events.column("ts").to_numpy(), users))
    sorted_users = users[order]
    ends = np.flatnonzero(np.r_[sorted_users[1:] != sorted_users[:-1], True])  # each user's last sorted position
    positions = np.arange(len(order))
    from_end = ends[np.searchsorted(ends, positions)] - positions
    keep = np.zeros(len(order), bool)
    keep[order] = from_end >= holdout
    kept = events.filter(pa.array(keep))
    for day in src.days("behaviours"):
        part = kept.filter(pa.compute.equal(kept.column("ds"), day)).drop(["ds"])
        if part.num_rows:
            dst.write_day("behaviours", day, part)
    meta = src.read_meta()
    meta.extra = {**meta.extra, "knowledge_view_holdout": holdout, "knowledge_view_of": str(data_path)}
    dst.write_meta(meta)
    view_stamp.write_text(source_stamp)
    return view
