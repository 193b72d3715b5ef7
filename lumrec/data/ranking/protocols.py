"""The three protocols that turn a lumrec dataset into RankingSamples (exact rules: docs/ranking_data.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lumrec.data.dataset import Dataset, day_bounds
from lumrec.data.ranking.config import TEST, TRAIN, VALID, RankingSampleConfig
from lumrec.data.ranking.negatives import sample_negatives
from lumrec.data.ranking.reading import Behaviours, history_lengths, item_categories, read_behaviours, with_users
from lumrec.data.ranking.samples import RankingSamples
from lumrec.data.ranking.split import time_split
from lumrec.data.validate import DataValidationError


def _lookup(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """table[ids], 0 for ids beyond the table."""
    out = np.zeros(len(ids), np.int64)
    inside = ids < len(table)
    out[inside] = table[ids[inside]]
    return out


def build_ranking_samples(data: Dataset | str | Path, config: RankingSampleConfig) -> RankingSamples:
    """Turn the lumrec dataset `data` into ranking samples with point-in-time histories, by `config.protocol`."""
    data = data if isinstance(data, Dataset) else Dataset(data)
    config.validate()
    data.read_meta()  # a clear error when the folder is not a complete lumrec dataset
    builders = {"explicit_ratings": _explicit_ratings, "implicit_next_item": _implicit_next_item, "impressions": _impressions}
    return builders[config.protocol](data, config)


def _in_days(ts: np.ndarray, cfg: RankingSampleConfig) -> np.ndarray:
    """Mask of timestamps inside [first_day, last_day]."""
    keep = np.ones(len(ts), bool)
    if cfg.first_day:
        keep &= ts >= day_bounds(cfg.first_day)[0]
    if cfg.last_day:
        keep &= ts < day_bounds(cfg.last_day)[1]
    return keep


def _finish(
    protocol: str, beh: Behaviours, cols: dict[str, np.ndarray], split: np.ndarray, info: dict[str, Any], hist_len: np.ndarray
) -> RankingSamples:
    """Assemble a RankingSamples over the behaviours store (users already present in it)."""
    user_row = np.searchsorted(beh.seqs.user_ids, cols["user_id"])
    return RankingSamples(
        protocol=protocol,
        user_id=cols["user_id"].astype(np.int64),
        item_id=cols["item_id"].astype(np.int64),
        label=cols["label"].astype(np.float32),
        ts=cols["ts"].astype(np.int64),
        category_id=cols["category_id"].astype(np.int64),
        scenario=cols["scenario"].astype(np.int32),
        query_id=cols["query_id"].astype(np.int64),
        split=split.astype(np.int8),
        user_row=user_row.astype(np.int64),
        history_length=hist_len.astype(np.int64),
        history=beh.seqs,
        history_rating=beh.rating if beh.has_rating_column else None,
        info=info,
    )


def _explicit_ratings(data: Dataset, cfg: RankingSampleConfig) -> RankingSamples:
    """Every rated behaviour is a sample (label = rating >= threshold), split by time."""
    beh = read_behaviours(data)
    source = str(data.table_dir("behaviours"))
    if not beh.has_rating_column:
        raise DataValidationError(
            source, "no rating column: protocol explicit_ratings needs rated behaviours (e.g. `lumrec import ml-1m-ratings`)", column="rating"
        )
    seqs = beh.seqs
    rated = ~np.isnan(beh.rating)
    if not rated.any():
        raise DataValidationError(source, "every rating is null: protocol explicit_ratings has no samples", column="rating")
    row = np.repeat(np.arange(len(seqs), dtype=np.int64), seqs.lengths())
    hist_len = history_lengths(seqs, row, seqs.ts)
    keep = np.flatnonzero(rated & _in_days(seqs.ts, cfg) & (hist_len >= cfg.effective_min_history()))
    if keep.size == 0:
        raise DataValidationError(
            source, f"no rated behaviours left after the first_day / last_day / min_history={cfg.effective_min_history()} filters", column="rating"
        )
    cols = {
        "user_id": seqs.user_ids[row[keep]],
        "item_id": seqs.item_id[keep],
        "label": (beh.rating[keep] >= cfg.positive_threshold).astype(np.float32),
        "ts": seqs.ts[keep],
        "category_id": seqs.category_id[keep],
        "scenario": seqs.scenario[keep],
        "query_id": seqs.query_id[keep],
    }
    split, info = time_split(cols["ts"], cfg, source)
    info["positive_threshold"] = cfg.positive_threshold
    return _finish("explicit_ratings", beh, cols, split, info, hist_len[keep])


def _impressions(data: Dataset, cfg: RankingSampleConfig) -> RankingSamples:
    """Every impression (in [first_day, last_day]) is a sample with its logged label, split by day."""
    source = str(data.table_dir("impressions"))
    if not data.has_table("impressions"):
        raise DataValidationError(source, "no impressions table: protocol impressions needs logged impressions with labels")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("user_id", "item_id", "ts", "scenario", "query_id", "category_id", "label")}
    has_category = True
    for ds, batch in data.iter_batches("impressions", cfg.first_day, cfg.last_day):
        names = batch.schema.names
        where = f"{source}/ds={ds}"
        if cfg.label_column not in names:
            raise DataValidationError(where, f"no label column {cfg.label_column!r}; columns: {names}", column=cfg.label_column)
        label = batch.column(cfg.label_column)
        if label.null_count:
            raise DataValidationError(where, "null labels", column=cfg.label_column, rows=label.null_count)
        label = label.to_numpy(zero_copy_only=False).astype(np.float32)
        if not np.isfinite(label).all():
            raise DataValidationError(where, "non-finite labels", column=cfg.label_column, rows=int((~np.isfinite(label)).sum()))
        parts["label"].append(label)
        for name in ("user_id", "item_id", "ts", "scenario"):
            parts[name].append(batch.column(name).to_numpy().astype(np.int64))
        for name in ("query_id", "category_id"):
            if name in names:
                parts[name].append(batch.column(name).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64))
            else:
                parts[name].append(np.zeros(batch.num_rows, np.int64))
                has_category &= name != "category_id"
    if not parts["ts"]:
        raise DataValidationError(source, f"no impressions in days [{cfg.first_day}, {cfg.last_day}]")
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    beh = with_users(read_behaviours(data), cols["user_id"])
    if not has_category:
        category, _ = item_categories(data, beh.seqs)
        cols["category_id"] = _lookup(category, cols["item_id"])
    user_row = np.searchsorted(beh.seqs.user_ids, cols["user_id"])
    hist_len = history_lengths(beh.seqs, user_row, cols["ts"])
    keep = _in_days(cols["ts"], cfg) & (hist_len >= cfg.effective_min_history())
    if not keep.any():
        raise DataValidationError(source, f"no impressions left after the first_day / last_day / min_history={cfg.effective_min_history()} filters")
    if not keep.all():
        cols = {k: v[keep] for k, v in cols.items()}
        hist_len = hist_len[keep]
    split, info = time_split(cols["ts"], cfg, source)
    return _finish("impressions", beh, cols, split, info, hist_len)


def _implicit_next_item(data: Dataset, cfg: RankingSampleConfig) -> RankingSamples:
    """Each next item (with enough history) is a positive plus sampled unseen negatives; leave-one-out split."""
    beh = read_behaviours(data)
    source = str(data.table_dir("behaviours"))
    seqs = beh.seqs
    row = np.repeat(np.arange(len(seqs), dtype=np.int64), seqs.lengths())
    hist_len = history_lengths(seqs, row, seqs.ts)
    from_end = seqs.offsets[row + 1] - 1 - np.arange(seqs.num_events)
    event_split = np.where(from_end == 0, TEST, np.where(from_end == 1, VALID, TRAIN)).astype(np.int8)
    keep = hist_len >= cfg.effective_min_history()
    if cfg.max_train_per_user is not None:
        # hist_len grows with position, so each user's kept targets are a suffix: cap by distance from the end.
        keep &= from_end < 2 + cfg.max_train_per_user
    targets = np.flatnonzero(keep)
    if not (event_split[targets] == TEST).any():
        raise DataValidationError(source, f"empty test split: no user has a last event with >= {cfg.effective_min_history()} earlier event(s)")

    category, catalogue = item_categories(data, seqs)
    weights = None
    if cfg.negative_sampling == "popularity":
        # Popularity from the events that are not held out, so test targets do not shape the sampler.
        counts = np.bincount(seqs.item_id[event_split == TRAIN], minlength=len(category)).astype(np.float64)
        weights = counts[catalogue]
        if weights.sum() <= 0:
            raise DataValidationError(source, "popularity sampling: no training events to count", column="item_id")
    rng = np.random.default_rng(cfg.seed)
    k = cfg.num_negatives
    neg_rows = np.repeat(row[targets], k)
    neg_ts = np.repeat(seqs.ts[targets], k)
    negatives = sample_negatives(seqs, neg_rows, neg_ts, catalogue, rng, weights, source)

    # Sample order: per target, the positive then its k negatives.
    n_t = len(targets)
    group = np.repeat(targets, k + 1)
    item = np.empty((n_t, k + 1), np.int64)
    item[:, 0] = seqs.item_id[targets]
    item[:, 1:] = negatives.reshape(n_t, k)
    item = item.reshape(-1)
    label = np.zeros((n_t, k + 1), np.float32)
    label[:, 0] = 1.0
    cols = {
        "user_id": seqs.user_ids[row[group]],
        "item_id": item,
        "label": label.reshape(-1),
        "ts": seqs.ts[group],
        # Positives and negatives both take the catalogue's category, so its source cannot give the label away.
        "category_id": _lookup(category, item),
        "scenario": seqs.scenario[group],
        "query_id": seqs.query_id[group],
    }
    info = {"num_negatives": k, "negative_sampling": cfg.negative_sampling, "catalogue_size": int(len(catalogue)), "seed": cfg.seed}
    return _finish("implicit_next_item", beh, cols, event_split[group], info, hist_len[group])
