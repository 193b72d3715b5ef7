"""Importers that turn public data sets into the lumrec Parquet schema.

Each kind is one module with one function `import_<kind>(src, out, **options) -> DatasetMeta`;
`run_import` dispatches by kind name and checks the options against the function's keywords.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from lumrec.data.dataset import DatasetMeta
from lumrec.data.importers.amazon import import_amazon
from lumrec.data.importers.ml_100k import import_ml_100k
from lumrec.data.importers.ml_1m import import_ml_1m
from lumrec.data.importers.ml_1m_ratings import import_ml_1m_ratings
from lumrec.data.importers.sasrec import import_sasrec
from lumrec.data.importers.table import import_table
from lumrec.locks import LOCK_FILE, RunLock

Importer = Callable[..., DatasetMeta]

IMPORTERS: dict[str, Importer] = {
    "ml-1m": import_ml_1m,
    "ml-1m-ratings": import_ml_1m_ratings,
    "ml-100k": import_ml_100k,
    "amazon": import_amazon,
    "sasrec": import_sasrec,
    "table": import_table,
}


def importer_options(kind: str) -> list[str]:
    """The keyword options an importer accepts (besides src and out)."""
    params = inspect.signature(_importer(kind)).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _importer(kind: str) -> Importer:
    """The importer of `kind`, with an error listing the known kinds."""
    try:
        return IMPORTERS[kind]
    except KeyError:
        raise ValueError(f"unknown import kind {kind!r}; known kinds: {sorted(IMPORTERS)}") from None


def run_import(kind: str, src: str | Path, out: str | Path, **options: Any) -> DatasetMeta:
    """Import the data set of `kind` at `src` into the lumrec dataset folder `out`; return its manifest."""
    fn = _importer(kind)
    allowed = importer_options(kind)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for import kind {kind!r}; accepted: {allowed}")
    created = not Path(out).exists()
    try:
        with RunLock(out, f"import {kind}"):  # one writer per dataset folder; a killed import's files are ours to clear
            return fn(src, out, **options)
    except BaseException:
        if created:
            _remove_if_only_lock(Path(out))
        raise


def _remove_if_only_lock(folder: Path) -> None:
    """Remove a folder that a failed import created and left holding nothing but its released lock file."""
    if folder.is_dir() and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
        (folder / LOCK_FILE).unlink(missing_ok=True)
        folder.rmdir()


__all__ = ["IMPORTERS", "importer_options", "run_import"]
