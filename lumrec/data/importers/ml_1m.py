"""Import MovieLens-1M as implicit interactions: `interactions.parquet` (user_id, movie_id, pos) + movies.dat + users.dat."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lumrec.data.dataset import DatasetMeta, day_bounds
from lumrec.data.importers._common import (
    DEFAULT_BASE_DAY,
    check_columns,
    finish,
    int_column,
    prepare_output,
    read_source_parquet,
    require_file,
    source_name,
    synthetic_ts,
)
from lumrec.data.importers._movielens import RatingColumns, read_movies_dat, read_users_dat, write_movielens
from lumrec.data.validate import DataValidationError


def read_interactions(path: Path) -> RatingColumns:
    """Read `user_id, movie_id, pos` from Parquet; pos must be >= 0 and unique per user."""
    table = read_source_parquet(path)
    check_columns(path, table, ["user_id", "movie_id", "pos"])
    users = int_column(path, table, "user_id")
    items = int_column(path, table, "movie_id")
    pos = int_column(path, table, "pos")
    if len(pos) == 0:
        raise DataValidationError(str(path), "no interactions in file")
    bad = int(np.count_nonzero(pos < 0))
    if bad:
        raise DataValidationError(str(path), "negative positions", column="pos", rows=bad)
    perm = np.lexsort((pos, users))
    dup = int(np.count_nonzero((np.diff(users[perm]) == 0) & (np.diff(pos[perm]) == 0)))
    if dup:
        raise DataValidationError(str(path), "positions repeated within a user", column="pos", rows=dup)
    return RatingColumns(user_raw=users, item_raw=items, ts=pos, order=np.arange(len(pos), dtype=np.int64))


def import_ml_1m(
    src: str | Path,
    out: str | Path,
    *,
    movies: str | Path | None = None,
    users: str | Path | None = None,
    base_day: str = DEFAULT_BASE_DAY,
    name: str | None = None,
    overwrite: bool = False,
) -> DatasetMeta:
    """Import ML-1M implicit interactions; timestamps are synthesised from `pos` (base_day 00:00 UTC + pos seconds)."""
    folder = Path(src)
    inter_path = require_file(folder / "interactions.parquet", "ML-1M interactions (user_id, movie_id, pos)")
    movies_path = require_file(movies if movies is not None else folder / "movies.dat", "ML-1M movies.dat")
    users_path = require_file(users if users is not None else folder / "users.dat", "ML-1M users.dat")
    day_bounds(base_day)  # reject a bad day before doing any work
    catalogue = read_movies_dat(movies_path)
    user_features = read_users_dat(users_path)
    cols = read_interactions(inter_path)
    cols.ts = synthetic_ts(cols.ts, base_day)
    ds = prepare_output(out, overwrite)
    genres = {mid: m.genres for mid, m in catalogue.items()}
    titles = {mid: m.title for mid, m in catalogue.items()}
    sizes, days, with_genre = write_movielens(ds, cols, genres, titles, user_features, positive_threshold=0.0)

    n_items = sizes["item_id"] - 1
    unknown = len(set(np.unique(cols.item_raw).tolist()) - set(catalogue))
    without_events = len(set(catalogue) - set(np.unique(cols.item_raw).tolist()))
    notes = (
        f"implicit interactions, no timestamps in the source: ts = {base_day} 00:00 UTC + pos seconds "
        f"(keeps each user's order; {len(days)} day partition(s)). action=rate, no rating, no impressions. "
        f"categories from movies.dat: {with_genre} of {n_items} items have a genre (category_id = first genre, "
        f"category_ids = all); {unknown} interacted movies missing from movies.dat; {without_events} catalogue "
        f"movies without interactions left out. users table from users.dat (gender, age group, occupation, zip3)."
    )
    meta = DatasetMeta(
        name=name or source_name(folder),
        source=str(folder.resolve()),
        vocab_sizes=sizes,
        synthetic_timestamps=True,
        notes=notes,
        extra={
            "kind": "ml-1m",
            "source_files": [str(p.resolve()) for p in (inter_path, movies_path, users_path)],
            "base_day": base_day,
            "category_ids_vocab": "category_id",
        },
    )
    return finish(ds, meta)
