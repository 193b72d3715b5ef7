"""Which id features a ranking or retrieval model reads, and their vocabulary sizes from the dataset manifest.

- context keys: pooled per-sample ids (user_id, scenario, query_id), each needing a vocabulary;
- item list keys: ``X`` (the candidate's ids of the items table's list column X, e.g.
  ``category_ids``) and ``hist_X`` (the bag of X over the kept behaviours), both reading column X.

Errors name the config key (``sizes.context_keys``, ``sizes.list_keys``) and what the data has.

Example::

    >>> context_keys(None, {"user_id": 10, "scenario": 3, "query_id": 1})
    ['user_id', 'scenario']
    >>> list_columns(["category_ids", "hist_category_ids", "hist_tag_ids"])
    ['category_ids', 'tag_ids']
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import pyarrow as pa

from lumrec.data.dataset import Dataset, DatasetMeta
from lumrec.data.ranking.samples import CANDIDATE_KEYS, HISTORY_BAG_PREFIX, RankingSamples
from lumrec.data.schema import vocabulary_column
from lumrec.data.tokens import item_lists_from_table

__all__ = ["DEFAULT_CONTEXT_KEYS", "attach_item_lists", "context_keys", "list_columns", "list_vocab", "vocab_size"]

DEFAULT_CONTEXT_KEYS = ("user_id", "scenario", "query_id")


def context_keys(keys: list[str] | None, vocab: dict[str, int]) -> list[str]:
    """The pooled per-sample keys: `keys` (each must have a vocabulary) or, for None, every default key that has one."""
    if keys is None:
        return [k for k in DEFAULT_CONTEXT_KEYS if vocab.get(k, 0) > 1]
    for key in keys:
        if key not in CANDIDATE_KEYS or key in ("item_id", "category_id"):
            raise ValueError(f"sizes.context_keys: {key!r} is not a context key; choose from {list(DEFAULT_CONTEXT_KEYS)}")
        if key not in vocab:
            raise ValueError(f"sizes.context_keys: {key!r} has no vocabulary size in the dataset manifest (has {sorted(vocab)})")
    return list(keys)


def vocab_size(vocab: dict[str, int], key: str) -> int:
    """The manifest's vocabulary size of id column `key` (an error naming it when absent)."""
    if key not in vocab:
        raise ValueError(f"dataset manifest declares no vocabulary size for {key!r} (has {sorted(vocab)})")
    return int(vocab[key])


def list_columns(list_keys: Sequence[str]) -> list[str]:
    """The item list columns the list keys read, in first-use order (hist_X reads X)."""
    columns: list[str] = []
    for key in list_keys:
        column = key[len(HISTORY_BAG_PREFIX):] if key.startswith(HISTORY_BAG_PREFIX) else key
        if column not in columns:
            columns.append(column)
    return columns


def list_vocab(meta: DatasetMeta, columns: Sequence[str]) -> dict[str, int]:
    """Vocabulary size of each item list column: the manifest's X_vocab column's, else the column's own or x_id's for x_ids."""
    out = {}
    for column in columns:
        source = meta.extra.get(f"{column}_vocab") or vocabulary_column(column, meta.vocab_sizes) or column
        if source not in meta.vocab_sizes:
            raise ValueError(f"sizes.list_keys: the dataset manifest sizes no vocabulary for list column {column!r} "
                             f"(looked for {source!r}; has {sorted(meta.vocab_sizes)})")
        out[column] = int(meta.vocab_sizes[source])
    return out


def attach_item_lists(samples: RankingSamples, data: Dataset, columns: Sequence[str]) -> RankingSamples:
    """The samples with the items table's list columns `columns` attached (ids per item_id), for list keys."""
    missing = [c for c in columns if c not in samples.item_lists]
    if not missing:
        return samples
    source = str(data.table_dir("items"))
    table = data.read_table("items")
    for column in missing:
        if column not in table.column_names:
            raise ValueError(f"sizes.list_keys: the items table ({source}) has no column {column!r}; has {table.column_names}")
        if not pa.types.is_list(table.schema.field(column).type):
            raise ValueError(f"sizes.list_keys: column {column!r} of the items table ({source}) is not a list column")
    num_items = int(data.read_meta().vocab_sizes["item_id"])
    lists = {c: item_lists_from_table(table, c, num_items, source) for c in missing}
    return replace(samples, item_lists={**samples.item_lists, **lists})
