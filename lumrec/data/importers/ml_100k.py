"""Import MovieLens-100K from its Parquet files (ratings, items, users), genres joined from an ML-1M movies.dat by title."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from lumrec.data.dataset import DatasetMeta
from lumrec.data.importers._common import check_columns, finish, int_column, prepare_output, read_source_parquet, require_file, source_name
from lumrec.data.importers._movielens import (
    RatingColumns,
    age_group,
    read_movies_dat,
    title_key,
    write_movielens,
    zip3,
)
from lumrec.data.validate import DataValidationError

DATA_FILE = "MovieLens100k_data.parquet.brotli"
ITEMS_FILE = "MovieLens100k_items.parquet.brotli"
USERS_FILE = "MovieLens100k_users.parquet.brotli"

# Genre flag columns of the ML-100K item table, named as ML-1M's movies.dat names them.
ML_GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def _read_parquet(path: Path, columns: list[str]) -> pa.Table:
    """Read a Parquet source file and check that it has `columns`."""
    table = read_source_parquet(path)
    check_columns(path, table, columns)
    return table


def read_ratings(path: Path) -> RatingColumns:
    """Read `user_id, movie_id, rating, timestamp` into columns."""
    table = _read_parquet(path, ["user_id", "movie_id", "rating", "timestamp"])
    if table.num_rows == 0:
        raise DataValidationError(str(path), "no ratings in file")
    rating_col = table.column("rating")
    if rating_col.null_count or not (pa.types.is_integer(rating_col.type) or pa.types.is_floating(rating_col.type)):
        raise DataValidationError(str(path), f"ratings must be non-null numbers ({rating_col.type})", column="rating")
    ts = int_column(path, table, "timestamp")
    bad = int(np.count_nonzero(ts < 0))
    if bad:
        raise DataValidationError(str(path), "negative timestamps", column="timestamp", rows=bad)
    return RatingColumns(
        user_raw=int_column(path, table, "user_id"),
        item_raw=int_column(path, table, "movie_id"),
        ts=ts,
        order=np.arange(table.num_rows, dtype=np.int64),
        rating=rating_col.to_numpy().astype(np.float32),
    )


def _own_genres(row: dict) -> list[str]:
    """Genres from the item table's 0/1 flag columns, in ML_GENRES order ("unknown" counts as none)."""
    return [g for g in ML_GENRES if row.get(g)]


def item_genres(
    items_path: Path, movies_path: Path | None, own_genres: bool
) -> tuple[dict[int, list[str]], dict[int, str], dict[str, int]]:
    """Genres and titles per movie_id: ML-1M's by normalised title, else (optionally) the item table's flags.

    Returns (genres, titles, counts of how each item got its genres).
    """
    table = _read_parquet(items_path, ["movie_id", "movie_title"])
    ids = int_column(items_path, table, "movie_id")
    rows = table.to_pylist()
    by_key: dict[str, list[str]] = {}
    by_title: dict[str, list[str]] = {}
    if movies_path is not None:
        # Sorted ids: the lowest MovieID wins when two ML-1M titles normalise alike.
        for mid, movie in sorted(read_movies_dat(movies_path).items()):
            by_title.setdefault(movie.title, movie.genres)
            by_key.setdefault(title_key(movie.title), movie.genres)
    genres: dict[int, list[str]] = {}
    titles: dict[int, str] = {}
    counts = {"exact_title": 0, "normalised_title": 0, "own_flags": 0, "none": 0}
    for mid, row in zip(ids.tolist(), rows):
        title = (row.get("movie_title") or "").strip()
        if mid in titles:
            raise DataValidationError(str(items_path), f"duplicate movie_id {mid}", column="movie_id")
        titles[mid] = title
        if title in by_title:
            genres[mid], how = by_title[title], "exact_title"
        elif title and title_key(title) in by_key:
            genres[mid], how = by_key[title_key(title)], "normalised_title"
        elif own_genres and _own_genres(row):
            genres[mid], how = _own_genres(row), "own_flags"
        else:
            genres[mid], how = [], "none"
        counts[how] += 1
    return genres, titles, counts


def read_users(path: Path) -> dict[int, dict[str, str]]:
    """Raw user features: gender, age group (ML-1M codes), occupation, zip3."""
    table = _read_parquet(path, ["user_id", "age", "gender", "occupation", "zip_code"])
    ids = int_column(path, table, "user_id")
    ages = int_column(path, table, "age")
    users: dict[int, dict[str, str]] = {}
    for uid, age, row in zip(ids.tolist(), ages.tolist(), table.select(["gender", "occupation", "zip_code"]).to_pylist()):
        users[uid] = {
            "gender": str(row["gender"] or "").strip(),
            "age": age_group(age),
            "occupation": str(row["occupation"] or "").strip(),
            "zip3": zip3(row["zip_code"]),
        }
    return users


def import_ml_100k(
    src: str | Path,
    out: str | Path,
    *,
    movies: str | Path | None = None,
    own_genres: bool = True,
    positive_threshold: float = 4.0,
    name: str | None = None,
    overwrite: bool = False,
) -> DatasetMeta:
    """Import ML-100K: ratings -> behaviours + labelled impressions (daily UTC partitions), items with genres, users."""
    folder = Path(src)
    data_path = require_file(folder / DATA_FILE, "ML-100K ratings")
    items_path = require_file(folder / ITEMS_FILE, "ML-100K items")
    users_path = require_file(folder / USERS_FILE, "ML-100K users")
    if movies is not None:
        movies_path: Path | None = require_file(movies, "ML-1M movies.dat")
    else:
        auto = folder.parent / "ml-1m" / "movies.dat"
        movies_path = auto if auto.is_file() else None
    genres, titles, counts = item_genres(items_path, movies_path, own_genres)
    user_features = read_users(users_path)
    cols = read_ratings(data_path)
    ds = prepare_output(out, overwrite)
    sizes, days, with_genre = write_movielens(ds, cols, genres, titles, user_features, positive_threshold)

    rated = set(np.unique(cols.item_raw).tolist())
    unknown = len(rated - set(titles))
    source = f"ML-1M {movies_path}" if movies_path else "no ML-1M movies.dat (none given, none at ../ml-1m/movies.dat)"
    notes = (
        f"{len(cols.ts)} ratings -> behaviours (action=rate, rating kept) and impressions (label 1.0 if rating >= "
        f"{positive_threshold:g} else 0.0); real timestamps, daily UTC partitions. Genres by title join with {source}: "
        f"{counts['exact_title']} items matched exactly, {counts['normalised_title']} by normalised title "
        f"(case, punctuation, trailing article, alternative titles ignored), "
        f"{counts['own_flags']} from the item table's genre flags{'' if own_genres else ' (disabled)'}, "
        f"{counts['none']} without genre; {with_genre} of {sizes['item_id'] - 1} rated items have a category. "
        f"{unknown} rated movies missing from the item table. Users: gender, age bucketed to ML-1M age groups, "
        f"occupation, zip3."
    )
    meta = DatasetMeta(
        name=name or source_name(folder),
        source=str(folder.resolve()),
        vocab_sizes=sizes,
        synthetic_timestamps=False,
        notes=notes,
        extra={
            "kind": "ml-100k",
            "source_files": [str(p.resolve()) for p in (data_path, items_path, users_path, movies_path) if p],
            "positive_threshold": positive_threshold,
            "genre_match": counts,
            "category_ids_vocab": "category_id",
        },
    )
    return finish(ds, meta)
