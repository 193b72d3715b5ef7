"""Import a MovieLens `ratings.dat` (`UserID::MovieID::Rating::Timestamp`, plain or .gz) with real timestamps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from lumrec.data.dataset import DatasetMeta
from lumrec.data.importers._common import finish, iter_lines, prepare_output, require_file, source_name
from lumrec.data.importers._movielens import RatingColumns, read_movies_dat, read_users_dat, write_movielens
from lumrec.data.validate import DataValidationError

LAYOUT = "UserID::MovieID::Rating::Timestamp"


def read_ratings_dat(path: Path) -> RatingColumns:
    """Parse a ratings.dat file into columns, with errors naming the file and line."""
    fast = _read_fast(path)
    return fast if fast is not None else _read_slow(path)


def _read_fast(path: Path) -> RatingColumns | None:
    """Vectorised parse with Arrow's CSV reader (`::` read as `:` + an empty column); None when anything is off.

    The line-by-line reader then runs to name the first bad line, so both paths accept the same files.
    """
    names = ["user", "e1", "item", "e2", "rating", "e3", "ts"]
    types = {"user": pa.int64(), "item": pa.int64(), "rating": pa.float64(), "ts": pa.int64()}
    types.update({e: pa.string() for e in ("e1", "e2", "e3")})
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names),
            parse_options=pacsv.ParseOptions(delimiter=":", quote_char=False, double_quote=False),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
        )
    except (pa.ArrowException, OSError, EOFError):
        return None
    if table.num_rows == 0 or any(table.column(c).null_count for c in ("user", "item", "rating", "ts")):
        return None
    if any(pc.any(pc.not_equal(pc.utf8_length(table.column(e)), 0)).as_py() for e in ("e1", "e2", "e3")):
        return None
    users, items, ts = (table.column(c).to_numpy() for c in ("user", "item", "ts"))
    rating = table.column("rating").to_numpy()
    if (users <= 0).any() or (items <= 0).any() or (ts < 0).any() or not np.isfinite(rating).all():
        return None
    return RatingColumns(
        user_raw=users.astype(np.int64),
        item_raw=items.astype(np.int64),
        ts=ts.astype(np.int64),
        order=np.arange(table.num_rows, dtype=np.int64),
        rating=rating.astype(np.float32),
    )


def _read_slow(path: Path) -> RatingColumns:
    """Line-by-line parse that names the first malformed line."""
    users: list[int] = []
    items: list[int] = []
    ratings: list[float] = []
    stamps: list[int] = []
    for lineno, line in iter_lines(path, layout=LAYOUT):
        parts = line.split("::")
        try:
            if len(parts) != 4:
                raise ValueError
            u, i, r, t = int(parts[0]), int(parts[1]), float(parts[2]), int(parts[3])
        except ValueError:
            raise DataValidationError(str(path), f"line {lineno}: expected `{LAYOUT}` with numbers, got {line[:80]!r}") from None
        if u <= 0 or i <= 0 or t < 0 or not np.isfinite(r):
            raise DataValidationError(str(path), f"line {lineno}: ids must be positive, timestamp >= 0, rating finite: {line[:80]!r}")
        users.append(u)
        items.append(i)
        ratings.append(r)
        stamps.append(t)
    if not users:
        raise DataValidationError(str(path), "no ratings in file")
    return RatingColumns(
        user_raw=np.asarray(users, np.int64),
        item_raw=np.asarray(items, np.int64),
        ts=np.asarray(stamps, np.int64),
        order=np.arange(len(users), dtype=np.int64),
        rating=np.asarray(ratings, np.float32),
    )


def _beside(src: Path, option: str | Path | None, name: str) -> Path | None:
    """The explicit option path (which must exist), else `name` next to the source when present."""
    if option is not None:
        return require_file(option, f"MovieLens {name}")
    candidate = src.parent / name
    return candidate if candidate.is_file() else None


def import_ml_1m_ratings(
    src: str | Path,
    out: str | Path,
    *,
    movies: str | Path | None = None,
    users: str | Path | None = None,
    positive_threshold: float = 4.0,
    name: str | None = None,
    overwrite: bool = False,
) -> DatasetMeta:
    """Import ratings.dat: every rating is a behaviour and an impression (label = rating >= threshold), daily partitions (UTC)."""
    path = require_file(src, f"MovieLens ratings file ({LAYOUT})")
    movies_path = _beside(path, movies, "movies.dat")
    users_path = _beside(path, users, "users.dat")
    catalogue = read_movies_dat(movies_path) if movies_path else {}
    user_features = read_users_dat(users_path) if users_path else None
    cols = read_ratings_dat(path)
    ds = prepare_output(out, overwrite)
    genres = {mid: m.genres for mid, m in catalogue.items()}
    titles = {mid: m.title for mid, m in catalogue.items()} if movies_path else None
    sizes, days, with_genre = write_movielens(ds, cols, genres, titles, user_features, positive_threshold)

    n_items = sizes["item_id"] - 1
    notes = [
        f"{len(cols.ts)} ratings -> behaviours (action=rate, rating kept) and impressions "
        f"(label 1.0 if rating >= {positive_threshold:g} else 0.0); real timestamps, daily UTC partitions.",
    ]
    if movies_path:
        unknown = len(set(np.unique(cols.item_raw).tolist()) - set(catalogue))
        notes.append(
            f"categories from {movies_path.name}: {with_genre} of {n_items} items have a genre "
            f"(category_id = first genre, category_ids = all); {unknown} rated movies missing from it."
        )
    else:
        notes.append("no movies.dat beside the ratings and no movies= option: category_id is 0 (missing) everywhere.")
    notes.append("users table from users.dat." if users_path else "no users.dat: no users table.")
    meta = DatasetMeta(
        name=name or source_name(path),
        source=str(path.resolve()),
        vocab_sizes=sizes,
        synthetic_timestamps=False,
        notes=" ".join(notes),
        extra={
            "kind": "ml-1m-ratings",
            "source_files": [str(p.resolve()) for p in (path, movies_path, users_path) if p],
            "positive_threshold": positive_threshold,
            "category_ids_vocab": "category_id",
        },
    )
    return finish(ds, meta)
