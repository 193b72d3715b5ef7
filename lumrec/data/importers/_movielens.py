"""MovieLens pieces shared by the ml-* importers: movies.dat / users.dat readers, items, users, title keys."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lumrec.data.dataset import Dataset
from lumrec.data.importers._common import (
    Events,
    dense_ids,
    items_table,
    iter_lines,
    parse_int,
    sort_values,
    split_fields,
    write_events,
    write_vocab,
)
from lumrec.data.schema import ACTION_RATE, SCENARIO_FEED
from lumrec.data.validate import DataValidationError

# ML-1M users.dat age codes are the lower bounds of these groups; ML-100K raw ages are
# bucketed onto the same codes so the two data sets share one `age` feature.
ML_AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)

USER_FEATURES = ("gender", "age", "occupation", "zip3")


@dataclass
class Movie:
    """A catalogue entry: title and genres in the source's order (the first is the primary one)."""

    title: str
    genres: list[str]


def read_movies_dat(path: Path) -> dict[int, Movie]:
    """Parse an ML-1M `movies.dat` (`MovieID::Title::Genres`, Latin-1, genres `|`-separated)."""
    movies: dict[int, Movie] = {}
    for lineno, line in iter_lines(path):
        mid_s, title, genres = split_fields(path, lineno, line, "::", 3, "MovieID::Title::Genres")
        mid = parse_int(path, lineno, mid_s, "MovieID")
        if mid in movies:
            raise DataValidationError(str(path), f"line {lineno}: duplicate MovieID {mid}")
        movies[mid] = Movie(title.strip(), [g for g in genres.strip().split("|") if g and g != "(no genres listed)"])
    return movies


def read_users_dat(path: Path) -> dict[int, dict[str, str]]:
    """Parse an ML-1M `users.dat` (`UserID::Gender::Age::Occupation::Zip-code`) into raw feature strings."""
    users: dict[int, dict[str, str]] = {}
    for lineno, line in iter_lines(path):
        uid_s, gender, age, occupation, zipcode = split_fields(
            path, lineno, line, "::", 5, "UserID::Gender::Age::Occupation::Zip-code"
        )
        uid = parse_int(path, lineno, uid_s, "UserID")
        parse_int(path, lineno, age, "Age")
        parse_int(path, lineno, occupation, "Occupation")
        if uid in users:
            raise DataValidationError(str(path), f"line {lineno}: duplicate UserID {uid}")
        users[uid] = {"gender": gender.strip(), "age": age.strip(), "occupation": occupation.strip(), "zip3": zip3(zipcode)}
    return users


def zip3(zipcode: str | None) -> str:
    """The first three characters of a zip code (its region), '' when absent."""
    return (zipcode or "").strip()[:3].upper()


def age_group(age: int) -> str:
    """The ML-1M age-group code (as a string) of a raw age."""
    group = ML_AGE_GROUPS[0]
    for lower in ML_AGE_GROUPS:
        if age >= lower:
            group = lower
    return str(group)


_YEAR_RE = re.compile(r"\((\d{4})\)")
_PAREN_RE = re.compile(r"\([^()]*\)")
# Articles that catalogues move to the end ("Usual Suspects, The"); English, French, Italian, German, Spanish.
_ARTICLES = ("the", "a", "an", "la", "le", "les", "l'", "il", "das", "der", "die", "el", "los", "las")
_TRAILING_ARTICLE_RE = re.compile(r"^(.*),\s*(" + "|".join(re.escape(a) for a in _ARTICLES) + r")$")


def title_key(title: str) -> str:
    """Normalise "Title, The (Alt title) (1995)" to "thetitle|1995" so catalogues with different styles match."""
    text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode().lower().strip()
    years = _YEAR_RE.findall(text)
    year = years[-1] if years else ""
    if years:
        text = text[: text.rfind(f"({year})")]
    # Alternative (foreign) titles in parentheses differ between catalogues; keep the main one.
    text = _PAREN_RE.sub(" ", text).strip()
    text = re.sub(r"\s+", " ", text)
    match = _TRAILING_ARTICLE_RE.match(text)
    if match:
        text = f"{match.group(2)} {match.group(1)}"
    return re.sub(r"[^a-z0-9]", "", text) + "|" + year


def write_items(
    ds: Dataset, item_raw: np.ndarray, genres: dict[int, list[str]], titles: dict[int, str] | None
) -> tuple[np.ndarray, int]:
    """Write the items table and the category vocab; return (primary category by dense item id, vocab size).

    `item_raw` holds the raw ids in dense-id order (dense id = index + 1).
    """
    names = sort_values({g for raw in item_raw.tolist() for g in genres.get(raw, [])})
    code = {name: i + 1 for i, name in enumerate(names)}
    size = write_vocab(ds, "category_id", names) if names else 1
    cats = [[code[g] for g in genres.get(raw, [])] for raw in item_raw.tolist()]
    title_list = [titles.get(raw, "") for raw in item_raw.tolist()] if titles is not None else None
    ds.write_table("items", items_table(np.arange(1, len(item_raw) + 1), cats, title_list))
    primary = np.zeros(len(item_raw) + 1, np.int64)
    primary[1:] = [c[0] if c else 0 for c in cats]
    return primary, size


def write_users(ds: Dataset, user_raw: np.ndarray, features: dict[int, dict[str, str]]) -> dict[str, int]:
    """Write the users table (categorical int64 codes) and one vocab per feature; return the vocab sizes.

    A user absent from `features`, or an empty value, gets code 0 (missing).
    """
    raws = user_raw.tolist()
    cols: dict[str, pa.Array] = {"user_id": pa.array(np.arange(1, len(raws) + 1), pa.int64())}
    sizes: dict[str, int] = {}
    for name in USER_FEATURES:
        values = [features.get(u, {}).get(name, "") for u in raws]
        vocab = sort_values({v for v in values if v})
        code = {v: i + 1 for i, v in enumerate(vocab)}
        sizes[name] = write_vocab(ds, name, vocab) if vocab else 1
        cols[name] = pa.array([code.get(v, 0) for v in values], pa.int64())
    ds.write_table("users", pa.table(cols))
    return sizes


@dataclass
class RatingColumns:
    """Raw MovieLens events: raw ids, unix-second (or synthetic) timestamps, source order, optional ratings."""

    user_raw: np.ndarray
    item_raw: np.ndarray
    ts: np.ndarray
    order: np.ndarray
    rating: np.ndarray | None = None


def write_movielens(
    ds: Dataset,
    cols: RatingColumns,
    genres: dict[int, list[str]],
    titles: dict[int, str] | None,
    user_features: dict[int, dict[str, str]] | None,
    positive_threshold: float,
) -> tuple[dict[str, int], list[str], int]:
    """Write vocabularies, items, users and events (+ impressions when rated).

    Returns (vocab sizes, days written, number of items with at least one genre).
    Only users and items that have events get ids, so id spaces match the interaction data.
    """
    user_uniq, user_id = dense_ids(cols.user_raw)
    item_uniq, item_id = dense_ids(cols.item_raw)
    sizes = {"user_id": write_vocab(ds, "user_id", user_uniq), "item_id": write_vocab(ds, "item_id", item_uniq)}
    primary, sizes["category_id"] = write_items(ds, item_uniq, genres, titles)
    if user_features is not None:
        sizes.update(write_users(ds, user_uniq, user_features))
    label = None
    if cols.rating is not None:
        label = (cols.rating >= positive_threshold).astype(np.float32)
    events = Events(
        user_id=user_id,
        ts=cols.ts,
        item_id=item_id,
        category_id=primary[item_id],
        action=ACTION_RATE,
        scenario=SCENARIO_FEED,
        order=cols.order,
        rating=cols.rating,
        label=label,
    )
    days = write_events(ds, events)
    with_genre = sum(1 for raw in item_uniq.tolist() if genres.get(raw))
    return sizes, days, with_genre
