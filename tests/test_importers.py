"""Importers: hand-written fixtures with exact expectations, bad input, and round trips on slices of the real files."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lumrec.data.dataset import Dataset, day_bounds
from lumrec.data.importers import IMPORTERS, importer_options, run_import
from lumrec.data.importers._movielens import title_key
from lumrec.data.schema import ACTION_RATE, ACTION_REVIEW, SCENARIO_FEED
from lumrec.data.stats import dataset_stats
from lumrec.data.validate import DataValidationError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BASE = day_bounds("2000-01-01")[0]

MOVIES_DAT = [
    "1::Toy Story (1995)::Animation|Children's|Comedy",
    "5::Cité des enfants perdus, La (1995)::Adventure|Sci-Fi",
    "10::Usual Suspects, The (1995)::Crime|Thriller",
    "20::Unwatched (1990)::Drama",
]
USERS_DAT = ["2::F::1::10::48067", "10::M::56::16::98107-2117", "33::M::25::15::55117"]


def _write_lines(path: Path, lines: list[str], encoding: str = "latin-1") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(lines) + "\n").encode(encoding)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def _vocab(root: Path, column: str) -> dict[str, int]:
    t = pq.read_table(root / "vocab" / f"{column}.parquet")
    return dict(zip(t.column("raw_id").to_pylist(), t.column("id").to_pylist()))


def _behaviours(root: Path) -> pa.Table:
    return Dataset(root).read_days("behaviours")


# -- ml-1m ------------------------------------------------------------------------------------


def _ml1m_folder(tmp_path: Path) -> Path:
    src = tmp_path / "ml-1m"
    src.mkdir()
    # User 10 has out-of-order rows: the importer must order by pos.
    rows = [(10, 5, 1), (10, 1, 0), (2, 10, 0), (2, 1, 1), (2, 5, 2), (33, 10, 0)]
    pq.write_table(
        pa.table({"user_id": [r[0] for r in rows], "movie_id": [r[1] for r in rows], "pos": [r[2] for r in rows]}),
        src / "interactions.parquet",
    )
    _write_lines(src / "movies.dat", MOVIES_DAT)
    _write_lines(src / "users.dat", USERS_DAT)
    return src


def test_ml_1m_counts_ids_genres_and_synthetic_time(tmp_path):
    out = tmp_path / "out"
    meta = run_import("ml-1m", _ml1m_folder(tmp_path), out)
    # Numeric order (2 < 10 < 33), not string order.
    assert _vocab(out, "user_id") == {"2": 1, "10": 2, "33": 3}
    assert _vocab(out, "item_id") == {"1": 1, "5": 2, "10": 3}  # movie 20 has no events: left out
    genres = ["Adventure", "Animation", "Children's", "Comedy", "Crime", "Sci-Fi", "Thriller"]
    assert _vocab(out, "category_id") == {g: i + 1 for i, g in enumerate(genres)}
    assert meta.vocab_sizes == {
        "user_id": 4, "item_id": 4, "category_id": 8, "gender": 3, "age": 4, "occupation": 4, "zip3": 4
    }  # fmt: skip
    assert meta.synthetic_timestamps and "pos seconds" in meta.notes
    assert meta.extra["kind"] == "ml-1m" and len(meta.extra["source_files"]) == 3

    beh = _behaviours(out)
    assert beh.num_rows == 6 and beh.column("ds").unique().to_pylist() == ["2000-01-01"]
    rows = list(zip(*(beh.column(c).to_pylist() for c in ("user_id", "item_id", "ts", "category_id"))))
    # user 2 (id 1): movies 10, 1, 5 at pos 0, 1, 2; primary genre = first listed genre.
    anim, adv, crime = 2, 1, 5
    assert rows[:3] == [(1, 3, BASE, crime), (1, 1, BASE + 1, anim), (1, 2, BASE + 2, adv)]
    assert rows[3:5] == [(2, 1, BASE, anim), (2, 2, BASE + 1, adv)]  # reordered by pos
    assert set(beh.column("action").to_pylist()) == {ACTION_RATE}
    assert set(beh.column("scenario").to_pylist()) == {SCENARIO_FEED}
    assert not Dataset(out).has_table("impressions")

    items = Dataset(out).read_table("items").to_pylist()
    assert items[0] == {
        "item_id": 1, "category_id": anim, "category_ids": [anim, 3, 4], "title": "Toy Story (1995)"
    }  # fmt: skip
    assert items[1]["title"] == "Cité des enfants perdus, La (1995)"  # Latin-1 decoded
    assert items[1]["category_ids"] == [adv, 6]

    users = Dataset(out).read_table("users").to_pylist()
    assert [u["user_id"] for u in users] == [1, 2, 3]
    assert _vocab(out, "zip3") == {"480": 1, "551": 2, "981": 3}
    assert _vocab(out, "age") == {"1": 1, "25": 2, "56": 3}
    assert users[1] == {"user_id": 2, "gender": 2, "age": 3, "occupation": 3, "zip3": 3}


def test_ml_1m_rejects_bad_input(tmp_path):
    src = _ml1m_folder(tmp_path)
    (src / "users.dat").unlink()
    with pytest.raises(FileNotFoundError, match="users.dat"):
        run_import("ml-1m", src, tmp_path / "a")
    _write_lines(src / "users.dat", USERS_DAT[:1] + ["10::M::56"])
    with pytest.raises(DataValidationError, match=r"users\.dat: line 2: expected 5 fields"):
        run_import("ml-1m", src, tmp_path / "b")
    _write_lines(src / "users.dat", USERS_DAT)
    pq.write_table(pa.table({"user_id": [1], "item": [1], "pos": [0]}), src / "interactions.parquet")
    with pytest.raises(DataValidationError, match=r"interactions\.parquet: column 'movie_id'"):
        run_import("ml-1m", src, tmp_path / "c")
    pq.write_table(pa.table({"user_id": [1, 1], "movie_id": [1, 5], "pos": [0, 0]}), src / "interactions.parquet")
    with pytest.raises(DataValidationError, match=r"column 'pos': positions repeated"):
        run_import("ml-1m", src, tmp_path / "d")
    assert not (tmp_path / "d").exists()  # nothing written before the input is known good


# -- ml-1m-ratings ----------------------------------------------------------------------------

DAY1 = day_bounds("2001-03-04")[0]
DAY2 = day_bounds("2001-03-06")[0]
RATINGS = [
    f"10::5::4::{DAY2 + 10}",
    f"10::1::3::{DAY1 + 5}",
    f"2::10::5::{DAY1 + 7}",
    f"2::1::1::{DAY1 + 7}",  # same second as the line before: source order kept
    f"33::10::2::{DAY2 + 86399}",
]


@pytest.mark.parametrize("suffix", [".dat", ".dat.gz"])
def test_ml_1m_ratings_days_labels_and_categories(tmp_path, suffix):
    src = _write_lines(tmp_path / "ml" / f"ratings{suffix}", RATINGS)
    _write_lines(tmp_path / "ml" / "movies.dat", MOVIES_DAT)
    out = tmp_path / "out"
    meta = run_import("ml-1m-ratings", src, out)
    assert not meta.synthetic_timestamps
    assert Dataset(out).days("behaviours") == ["2001-03-04", "2001-03-06"]
    assert Dataset(out).days("impressions") == ["2001-03-04", "2001-03-06"]
    beh = _behaviours(out)
    got = list(zip(*(beh.column(c).to_pylist() for c in ("ds", "user_id", "item_id", "ts", "rating"))))
    assert got == [
        ("2001-03-04", 1, 3, DAY1 + 7, 5.0),
        ("2001-03-04", 1, 1, DAY1 + 7, 1.0),
        ("2001-03-04", 2, 1, DAY1 + 5, 3.0),
        ("2001-03-06", 2, 2, DAY2 + 10, 4.0),
        ("2001-03-06", 3, 3, DAY2 + 86399, 2.0),
    ]
    imp = Dataset(out).read_days("impressions")
    assert imp.column("label").to_pylist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert imp.column("item_id").to_pylist() == beh.column("item_id").to_pylist()
    assert beh.column("category_id").to_pylist() == [5, 2, 2, 1, 5]
    assert not Dataset(out).has_table("users")  # no users.dat beside
    stats = dataset_stats(out)
    assert (stats["events"], stats["users"], stats["items"], stats["days"]) == (5, 3, 3, 2)
    assert (stats["impressions"], stats["positive_labels"]) == (5, 2)


def test_ml_1m_ratings_without_movies_and_with_option(tmp_path):
    src = _write_lines(tmp_path / "r" / "ratings.dat", RATINGS)
    meta = run_import("ml-1m-ratings", src, tmp_path / "a")
    assert "category_id is 0" in meta.notes and meta.vocab_sizes["category_id"] == 1
    assert set(_behaviours(tmp_path / "a").column("category_id").to_pylist()) == {0}
    movies = _write_lines(tmp_path / "elsewhere" / "movies.dat", MOVIES_DAT)
    users = _write_lines(tmp_path / "elsewhere" / "users.dat", USERS_DAT)
    meta = run_import("ml-1m-ratings", src, tmp_path / "b", movies=movies, users=users, positive_threshold=3)
    assert meta.vocab_sizes["category_id"] == 8 and meta.vocab_sizes["gender"] == 3
    assert Dataset(tmp_path / "b").read_days("impressions").column("label").to_pylist() == [1, 0, 1, 1, 0]


def test_ml_1m_ratings_names_malformed_line(tmp_path):
    lines = RATINGS[:2] + ["3::7::x::978300760"] + RATINGS[2:]
    src = _write_lines(tmp_path / "ratings.dat.gz", lines)
    with pytest.raises(DataValidationError, match=r"ratings\.dat\.gz: line 3: expected"):
        run_import("ml-1m-ratings", src, tmp_path / "out")
    src = _write_lines(tmp_path / "r2" / "ratings.dat", RATINGS + ["4:5:3:978300760"])
    with pytest.raises(DataValidationError, match=r"line 6"):
        run_import("ml-1m-ratings", src, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nope.dat"):
        run_import("ml-1m-ratings", tmp_path / "nope.dat", tmp_path / "out")


# -- ml-100k ----------------------------------------------------------------------------------


def _ml100k_folder(tmp_path: Path, with_ml1m: bool = True) -> Path:
    src = tmp_path / "data" / "ml-100k"
    src.mkdir(parents=True)
    pq.write_table(
        pa.table({
            "user_id": [7, 7, 3, 3], "movie_id": [2, 1, 3, 2], "rating": [5, 2, 4, 3],
            "timestamp": [DAY1 + 1, DAY1 + 2, DAY2, DAY1 + 9],
        }),  # fmt: skip
        src / "MovieLens100k_data.parquet.brotli",
        compression="brotli",
    )
    pq.write_table(
        pa.table({
            "movie_id": [1, 2, 3],
            "movie_title": ["Toy Story (1995)", "City of Lost Children, The (1995) ", "Local Film (1996)"],
            "Action": [0, 0, 1], "Drama": [1, 0, 0], "Western": [0, 0, 1],
        }),  # fmt: skip
        src / "MovieLens100k_items.parquet.brotli",
    )
    pq.write_table(
        pa.table({
            "user_id": [3, 7], "age": [24, 60], "gender": ["M", "F"],
            "occupation": ["writer", "other"], "zip_code": ["85711", "T8H1N"],
        }),  # fmt: skip
        src / "MovieLens100k_users.parquet.brotli",
    )
    if with_ml1m:
        _write_lines(
            tmp_path / "data" / "ml-1m" / "movies.dat",
            MOVIES_DAT[:1] + ["2::City of Lost Children, The (Cité des enfants perdus, La) (1995)::Adventure|Sci-Fi"],
        )
    return src


def test_ml_100k_title_join_and_users(tmp_path):
    out = tmp_path / "out"
    meta = run_import("ml-100k", _ml100k_folder(tmp_path), out)
    assert meta.extra["genre_match"] == {"exact_title": 1, "normalised_title": 1, "own_flags": 1, "none": 0}
    assert "1 by normalised title" in meta.notes
    cats = {g: i + 1 for i, g in enumerate(["Action", "Adventure", "Animation", "Children's", "Comedy", "Sci-Fi", "Western"])}
    assert _vocab(out, "category_id") == cats
    items = Dataset(out).read_table("items").to_pylist()
    assert [it["category_ids"] for it in items] == [
        [cats["Animation"], cats["Children's"], cats["Comedy"]],
        [cats["Adventure"], cats["Sci-Fi"]],
        [cats["Action"], cats["Western"]],  # own flags, Drama not set
    ]
    beh = _behaviours(out)
    assert beh.column("ds").to_pylist() == ["2001-03-04"] * 3 + ["2001-03-06"]
    assert beh.column("user_id").to_pylist() == [1, 2, 2, 1]
    assert Dataset(out).read_days("impressions").column("label").to_pylist() == [0.0, 1.0, 0.0, 1.0]
    users = Dataset(out).read_table("users").to_pylist()
    assert _vocab(out, "age") == {"18": 1, "56": 2}  # 24 -> 18-24 group, 60 -> 56+
    assert _vocab(out, "zip3") == {"857": 1, "T8H": 2}
    assert users == [
        {"user_id": 1, "gender": 2, "age": 1, "occupation": 2, "zip3": 1},
        {"user_id": 2, "gender": 1, "age": 2, "occupation": 1, "zip3": 2},
    ]


def test_ml_100k_without_ml1m_and_without_own_genres(tmp_path):
    src = _ml100k_folder(tmp_path, with_ml1m=False)
    meta = run_import("ml-100k", src, tmp_path / "out", own_genres=False)
    assert meta.extra["genre_match"]["none"] == 3 and meta.vocab_sizes["category_id"] == 1
    with pytest.raises(FileNotFoundError, match="missing.dat"):
        run_import("ml-100k", src, tmp_path / "out2", movies=tmp_path / "missing.dat")
    pq.write_table(pa.table({"user_id": [1], "movie_id": [1], "rating": [4]}), src / "MovieLens100k_data.parquet.brotli")
    with pytest.raises(DataValidationError, match=r"MovieLens100k_data\.parquet\.brotli: column 'timestamp'"):
        run_import("ml-100k", src, tmp_path / "out3")


def test_title_key_matches_catalogue_styles():
    assert title_key("Usual Suspects, The (1995)") == title_key("The Usual Suspects (1995)")
    assert title_key("Jungle2Jungle (1997)") == title_key("Jungle2Jungle (a.k.a. Jungle 2 Jungle) (1997)")
    assert title_key("Alien 3 (1992)") != title_key("Alien (1979)")
    assert title_key("Heat (1995)") != title_key("Heat (1986)")


# -- amazon -----------------------------------------------------------------------------------


def _amazon(tmp_path: Path, lines: list[str], attrs: dict) -> Path:
    src = _write_lines(tmp_path / "am" / "Toys.txt", lines, "utf-8")
    (tmp_path / "am" / "Toys_item2attributes.json").write_text(json.dumps(attrs))
    return src


def test_amazon_sequences_attributes_and_time(tmp_path):
    src = _amazon(tmp_path, ["5 30 4 30", "12 4", "3 100 4"], {"4": [70, 9], "30": [9], "100": []})
    out = tmp_path / "out"
    meta = run_import("amazon", src, out)
    assert meta.name == "Toys" and meta.synthetic_timestamps
    assert meta.vocab_sizes == {"user_id": 4, "item_id": 4, "category_id": 3}
    assert _vocab(out, "item_id") == {"4": 1, "30": 2, "100": 3}
    assert _vocab(out, "category_id") == {"9": 1, "70": 2}
    beh = _behaviours(out)
    got = list(zip(*(beh.column(c).to_pylist() for c in ("user_id", "item_id", "ts", "category_id"))))
    assert got == [
        (1, 3, BASE, 0), (1, 1, BASE + 1, 2),
        (2, 2, BASE, 1), (2, 1, BASE + 1, 2), (2, 2, BASE + 2, 1),
        (3, 1, BASE, 2),
    ]  # fmt: skip
    assert set(beh.column("action").to_pylist()) == {ACTION_REVIEW}
    items = Dataset(out).read_table("items").to_pylist()
    assert [it["category_ids"] for it in items] == [[2, 1], [1], []]


def test_amazon_category_most_frequent_attribute(tmp_path):
    # Attribute 9 is shared by items 4, 30 and 7; 70 and 5 by one item each; item 8's 5 and 6 tie (smaller code wins).
    src = _amazon(tmp_path, ["1 4 30 7 8"], {"4": [70, 9], "30": [9], "7": [5, 9], "8": [6, 5]})
    first = run_import("amazon", src, tmp_path / "first")
    coarse = run_import("amazon", src, tmp_path / "coarse", category="most_frequent")
    code = _vocab(tmp_path / "coarse", "category_id")
    by_item = lambda out: dict(zip(_behaviours(out).column("item_id").to_pylist(), _behaviours(out).column("category_id").to_pylist()))
    items = _vocab(tmp_path / "coarse", "item_id")
    assert by_item(tmp_path / "first") == {items["4"]: code["70"], items["30"]: code["9"], items["7"]: code["5"], items["8"]: code["6"]}
    assert by_item(tmp_path / "coarse") == {items["4"]: code["9"], items["30"]: code["9"], items["7"]: code["9"], items["8"]: code["5"]}
    assert first.extra["category"] == "first" and coarse.extra["category"] == "most_frequent"
    with pytest.raises(ValueError, match="category must be one of"):
        run_import("amazon", src, tmp_path / "bad", category="brand")


def test_amazon_bad_input(tmp_path):
    src = _amazon(tmp_path, ["1 2 3", "2 4 x5"], {})
    with pytest.raises(DataValidationError, match=r"Toys\.txt: line 2: id 'x5'"):
        run_import("amazon", src, tmp_path / "out")
    src = _amazon(tmp_path, ["1 2 3", "1 4"], {})
    with pytest.raises(DataValidationError, match=r"line 2: user 1 already has a line \(line 1\)"):
        run_import("amazon", src, tmp_path / "out")
    src = _amazon(tmp_path, ["1 2 3"], {})
    (tmp_path / "am" / "Toys_item2attributes.json").write_text('{"2": [1],\n "3": [2')
    with pytest.raises(DataValidationError, match=r"Toys_item2attributes\.json: line 2: invalid JSON"):
        run_import("amazon", src, tmp_path / "out")
    (tmp_path / "am" / "Toys_item2attributes.json").unlink()
    with pytest.raises(FileNotFoundError, match="Other_item2attributes.json"):
        run_import("amazon", src, tmp_path / "out", attributes=tmp_path / "am" / "Other_item2attributes.json")


def _categories_agree(out: Path) -> dict[int, int]:
    """Assert every event's category is its item's category in the items table; return item -> category."""
    items = Dataset(out).read_table("items")
    by_item = dict(zip(items.column("item_id").to_pylist(), items.column("category_id").to_pylist()))
    beh = _behaviours(out)
    for item, cat in zip(beh.column("item_id").to_pylist(), beh.column("category_id").to_pylist()):
        assert by_item[item] == cat, f"item {item}: behaviours say {cat}, items table {by_item[item]}"
    return by_item


@pytest.mark.parametrize("rule", ["first", "most_frequent"])
def test_amazon_items_and_behaviours_agree_on_category(tmp_path, rule):
    src = _amazon(tmp_path, ["1 4 30 7 8", "2 8 4"], {"4": [70, 9], "30": [9], "7": [5, 9], "8": [6, 5]})
    run_import("amazon", src, tmp_path / "out", category=rule)
    by_item = _categories_agree(tmp_path / "out")
    code, items = _vocab(tmp_path / "out", "category_id"), _vocab(tmp_path / "out", "item_id")
    want = {"4": "9", "30": "9", "7": "9", "8": "5"} if rule == "most_frequent" else {"4": "70", "30": "9", "7": "5", "8": "6"}
    assert by_item == {items[i]: code[c] for i, c in want.items()}


def test_amazon_most_frequent_skips_a_root_attribute_on_every_item(tmp_path):
    # 1 is the catalogue's root (every item lists it, first); 9 and 5 are the groups below it.
    attrs = {"4": [1, 70, 9], "30": [1, 9], "7": [1, 5, 9], "8": [1, 6, 5], "11": [1]}
    src = _amazon(tmp_path, ["1 4 30 7 8 11"], attrs)
    run_import("amazon", src, tmp_path / "out", category="most_frequent")
    by_item = _categories_agree(tmp_path / "out")
    code, items = _vocab(tmp_path / "out", "category_id"), _vocab(tmp_path / "out", "item_id")
    # Item 11 has nothing but the root, so it keeps it.
    assert by_item == {items["4"]: code["9"], items["30"]: code["9"], items["7"]: code["9"], items["8"]: code["5"], items["11"]: code["1"]}
    assert len(set(by_item.values())) == 3


def test_amazon_without_attributes_imports_without_categories(tmp_path, caplog):
    src = _write_lines(tmp_path / "am" / "Games.txt", ["1 2 3", "2 3"], "utf-8")
    with caplog.at_level("INFO"):
        meta = run_import("amazon", src, tmp_path / "out")
    assert "no attributes file Games_item2attributes.json" in caplog.text and "without categories" in caplog.text
    assert meta.name == "Games" and meta.vocab_sizes["category_id"] == 1 and "no attributes file" in meta.notes
    assert set(_behaviours(tmp_path / "out").column("category_id").to_pylist()) == {0}
    assert meta.extra["source_files"] == [str(src.resolve())]


# -- sasrec -----------------------------------------------------------------------------------


def test_sasrec_one_interaction_per_line(tmp_path):
    src = _write_lines(tmp_path / "Steam.txt", ["1 10", "2 30", "1 20", "1 10", "2 10"], "utf-8")
    meta = run_import("sasrec", src, tmp_path / "out", name="steam")
    assert meta.name == "steam" and meta.synthetic_timestamps and meta.extra["source_files"] == [str(src.resolve())]
    assert meta.vocab_sizes == {"user_id": 3, "item_id": 4, "category_id": 1}
    beh = _behaviours(tmp_path / "out")
    got = list(zip(*(beh.column(c).to_pylist() for c in ("user_id", "item_id", "ts"))))
    items = _vocab(tmp_path / "out", "item_id")
    assert got == [(1, items["10"], BASE), (1, items["20"], BASE + 1), (1, items["10"], BASE + 2),
                   (2, items["30"], BASE), (2, items["10"], BASE + 1)]  # fmt: skip
    assert run_import("sasrec", src, tmp_path / "default").name == "Steam"


def test_sasrec_bad_input(tmp_path):
    with pytest.raises(DataValidationError, match=r"Steam\.txt: line 2: expected 2 fields `user item`, got '1 2 3'"):
        run_import("sasrec", _write_lines(tmp_path / "Steam.txt", ["1 2", "1 2 3"]), tmp_path / "out")
    with pytest.raises(DataValidationError, match=r"line 1: ids must be integers"):
        run_import("sasrec", _write_lines(tmp_path / "Steam.txt", ["u1 2"]), tmp_path / "out")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataValidationError, match=r"empty\.txt: no interactions in file"):
        run_import("sasrec", tmp_path / "empty.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- wrong formats ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ml-1m-ratings", "amazon", "sasrec"])
def test_line_importers_name_a_parquet_or_zip_file(tmp_path, kind):
    parquet = tmp_path / "events.dat"
    pq.write_table(pa.table({"user_id": [1], "item_id": [2]}), parquet)
    with pytest.raises(DataValidationError, match=r"events\.dat: is a Parquet file, not `.*` lines; use `lumrec import table`"):
        run_import(kind, parquet, tmp_path / "out")
    gz = tmp_path / "events.parquet.gz"
    gz.write_bytes(gzip.compress(parquet.read_bytes()))
    with pytest.raises(DataValidationError, match=r"events\.parquet\.gz: is a gzipped Parquet file.*`lumrec import table`"):
        run_import(kind, gz, tmp_path / "out")
    zipped = tmp_path / "events.zip"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 30)
    with pytest.raises(DataValidationError, match=r"events\.zip: is a zip archive.*unzip it"):
        run_import(kind, zipped, tmp_path / "out")


def test_a_gzipped_file_without_gz_suffix_is_read(tmp_path):
    src = tmp_path / "Steam.txt"
    src.write_bytes(gzip.compress(b"1 10\n1 20\n"))
    assert run_import("sasrec", src, tmp_path / "out").vocab_sizes["item_id"] == 3


def test_dataset_name_is_the_option_or_the_source_stem(tmp_path):
    src = _write_lines(tmp_path / "my_ratings.dat.gz", ["1::1::5::978300760"])
    assert run_import("ml-1m-ratings", src, tmp_path / "a").name == "my_ratings"
    assert run_import("ml-1m-ratings", src, tmp_path / "b", name="shop-2024").name == "shop-2024"


# -- dispatch and output folder ---------------------------------------------------------------


def test_run_import_dispatch_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown import kind 'ml-20m'.*'amazon'.*'ml-100k'"):
        run_import("ml-20m", tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\].*accepted"):
        run_import("amazon", tmp_path, tmp_path / "out", colour="red")
    assert set(IMPORTERS) == {"ml-1m", "ml-1m-ratings", "ml-100k", "amazon", "sasrec", "table"}
    assert "overwrite" in importer_options("ml-100k") and "movies" in importer_options("ml-1m-ratings")


def test_output_folder_is_protected_and_overwritable(tmp_path):
    src = _amazon(tmp_path, ["1 2 3"], {"2": [5]})
    out = tmp_path / "out"
    run_import("amazon", src, out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        run_import("amazon", src, out)
    _amazon(tmp_path, ["1 2", "4 2"], {"2": [5]})
    meta = run_import("amazon", src, out, overwrite=True)
    assert meta.vocab_sizes["user_id"] == 3 and dataset_stats(out)["events"] == 2
    (out / "my_notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="my_notes.txt"):
        run_import("amazon", src, out, overwrite=True)


def test_an_interrupted_import_is_replaced_without_overwrite(tmp_path):
    src = _amazon(tmp_path, ["1 2 3"], {"2": [5]})
    out = tmp_path / "out"
    run_import("amazon", src, out)
    # What a killed import leaves: tables, a manifest's temporary file, no manifest.
    (out / "_lumrec.json").unlink()
    (out / "._lumrec.json.0123456789abcdef0123456789abcdef.tmp").write_text("{")
    meta = run_import("amazon", src, out)
    assert meta.vocab_sizes["user_id"] == 2 and Dataset(out).read_meta() == meta
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    # Not a dataset's entry: refused with or without a manifest, nothing removed.
    (out / "_lumrec.json").unlink()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"refusing to import into it: the folder holds non-dataset entries \['notes.txt'\]"):
        run_import("amazon", src, out)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "behaviours").is_dir()


def test_a_failed_first_import_leaves_no_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="Amazon sequence file"):
        run_import("amazon", tmp_path / "missing.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # the dataset lock's folder goes with the failed import


# -- round trips on slices of the real files --------------------------------------------------


def _shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def test_real_ml_1m_slice(tmp_path):
    inter = pq.read_table(_shared("ml-1m", "interactions.parquet")).slice(0, 5000)
    src = tmp_path / "ml-1m"
    src.mkdir()
    pq.write_table(inter, src / "interactions.parquet")
    for name in ("movies.dat", "users.dat"):
        (src / name).symlink_to(_shared("ml-1m", name))
    meta = run_import("ml-1m", src, tmp_path / "out")
    stats = dataset_stats(tmp_path / "out")
    users, movies = inter.column("user_id").to_numpy(), inter.column("movie_id").to_numpy()
    assert stats["events"] == 5000 and stats["users"] == len(np.unique(users)) and stats["items"] == len(np.unique(movies))
    assert meta.vocab_sizes["category_id"] == 19  # the 18 ML-1M genres + missing
    beh = _behaviours(tmp_path / "out")
    assert 0 not in beh.column("category_id").to_pylist()
    # Each user's sequence comes back in pos order.
    first = inter.filter(pc.equal(inter.column("user_id"), int(users[0]))).sort_by("pos")
    vocab = {int(k): v for k, v in _vocab(tmp_path / "out", "item_id").items()}
    mine = beh.filter(pc.equal(beh.column("user_id"), 1))
    assert mine.column("item_id").to_pylist() == [vocab[m] for m in first.column("movie_id").to_pylist()]


def test_real_ml_1m_ratings_slice(tmp_path):
    with gzip.open(_shared("ml-1m", "ratings_partial_first487650.dat.gz"), "rt") as fh:
        lines = [line.rstrip("\n") for line in itertools.islice(fh, 3000)]
    src = _write_lines(tmp_path / "ml" / "ratings.dat.gz", lines)
    (tmp_path / "ml" / "movies.dat").symlink_to(_shared("ml-1m", "movies.dat"))
    run_import("ml-1m-ratings", src, tmp_path / "out")
    fields = np.array([[int(x) for x in line.split("::")] for line in lines])
    stats = dataset_stats(tmp_path / "out")
    days = {str(np.datetime64(int(t), "s").astype("datetime64[D]")) for t in fields[:, 3]}
    assert stats["events"] == stats["impressions"] == 3000
    assert stats["users"] == len(set(fields[:, 0])) and stats["items"] == len(set(fields[:, 1]))
    assert stats["positive_labels"] == int((fields[:, 2] >= 4).sum()) and stats["days"] == len(days)


def test_real_ml_100k_slice(tmp_path):
    src = tmp_path / "data" / "ml-100k"
    src.mkdir(parents=True)
    data = pq.read_table(_shared("ml-100k", "MovieLens100k_data.parquet.brotli")).slice(0, 4000)
    pq.write_table(data, src / "MovieLens100k_data.parquet.brotli")
    for name in ("MovieLens100k_items.parquet.brotli", "MovieLens100k_users.parquet.brotli"):
        (src / name).symlink_to(_shared("ml-100k", name))
    meta = run_import("ml-100k", src, tmp_path / "out", movies=_shared("ml-1m", "movies.dat"))
    stats = dataset_stats(tmp_path / "out")
    assert stats["events"] == 4000 and stats["users"] == len(np.unique(data.column("user_id").to_numpy()))
    assert stats["positive_labels"] == int((data.column("rating").to_numpy() >= 4).sum())
    counts = meta.extra["genre_match"]
    assert counts["exact_title"] + counts["normalised_title"] >= 1640 and counts["none"] <= 2


def test_real_amazon_slice(tmp_path):
    lines = _shared("amazon-beauty", "Beauty.txt").read_text().splitlines()[:300]
    src = _write_lines(tmp_path / "Beauty.txt", lines, "utf-8")
    (tmp_path / "Beauty_item2attributes.json").symlink_to(_shared("amazon-beauty", "Beauty_item2attributes.json"))
    meta = run_import("amazon", src, tmp_path / "out")
    stats = dataset_stats(tmp_path / "out")
    items = {tok for line in lines for tok in line.split()[1:]}
    assert stats["events"] == sum(len(line.split()) - 1 for line in lines)
    assert stats["users"] == 300 and stats["items"] == len(items) == meta.vocab_sizes["item_id"] - 1
    assert 0 not in _behaviours(tmp_path / "out").column("category_id").to_pylist()


def test_write_events_splits_big_days_into_parts(tmp_path):
    from lumrec.data.importers._common import Events, write_events

    n = 5
    ev = Events(
        user_id=np.array([2, 1, 1, 2, 1]), ts=BASE + np.array([0, 3, 1, 2, 86400]), item_id=np.arange(1, n + 1),
        category_id=np.zeros(n, np.int64), action=ACTION_RATE, scenario=SCENARIO_FEED, order=np.arange(n),
        label=np.ones(n, np.float32),
    )  # fmt: skip
    ds = Dataset(tmp_path)
    assert write_events(ds, ev, max_rows_per_part=2) == ["2000-01-01", "2000-01-02"]
    assert [p.name for p in ds.day_files("behaviours", "2000-01-01")] == ["part-00000.parquet", "part-00001.parquet"]
    assert len(ds.day_files("impressions", "2000-01-01")) == 2
    beh = ds.read_days("behaviours")
    assert beh.column("item_id").to_pylist() == [3, 2, 1, 4, 5]  # (user, ts) order across parts
