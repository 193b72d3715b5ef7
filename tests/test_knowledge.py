"""Knowledge store (write, point-in-time read, vectorised lookup, bad files) and the `lumrec query` pipeline."""

from __future__ import annotations

import argparse
import doctest
import importlib
import json
import logging
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lumrec.knowledge as knowledge_pkg
from lumrec.data.dataset import Dataset, day_bounds, shift_ds
from lumrec.knowledge import (
    KNOWLEDGE_MANIFEST,
    Condition,
    KnowledgeLookup,
    KnowledgeWriter,
    format_condition,
    knowledge_days,
    latest_as_of,
    load_knowledge,
    parse_condition,
    partition_dir,
    write_knowledge,
)
from lumrec.data.packing import pack_sequences
from lumrec.data.batches import make_jagged_batch
from lumrec.data.sequences import build_user_sequences
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.data.tokens import build_lum_tokens
from lumrec.data.validate import DataValidationError
from lumrec.modules.retrieval.grouped_query import as_conditions, default_max_history, grouped_query
from lumrec.modules.lum_features import LUMFeatureConfig
from lumrec.pipelines.pretrain import Pretrainer
from lumrec.pipelines.pretrain_config import DataConfig, PretrainConfig, TrainConfig
from lumrec.pipelines.pretrained_lum import load_pretrained_lum
from lumrec.pipelines.query import ConditionSpec, QueryConfig, register_query, run_query

DAY = "2026-01-02"
CONDS = ["category_id=1", "category_id=3", "scenario=2"]


@pytest.mark.parametrize("name", ["", ".conditions", ".partitions", ".store", ".reading", ".lookup", ".join"])
def test_doctests(name):
    module = importlib.import_module(knowledge_pkg.__name__ + name)
    assert doctest.testmod(module, raise_on_error=True).attempted > 0


def _random_knowledge(seed=0, users=50, dim=4, items=30):
    gen = torch.Generator().manual_seed(seed)
    user_ids = torch.randperm(10 * users, generator=gen)[:users] + 1  # unsorted, sparse ids
    vectors = torch.randn(users, len(CONDS), dim, generator=gen)
    item_ids = torch.randperm(3 * items, generator=gen)[:items]
    item_vectors = torch.randn(items, dim, generator=gen)
    return user_ids, vectors, item_ids, item_vectors


# -- the store --------------------------------------------------------------------------------


def test_roundtrip_and_lookup_matches_plain_dict(tmp_path):
    user_ids, vectors, item_ids, item_vectors = _random_knowledge()
    folder = write_knowledge(tmp_path, DAY, "v7", user_ids, CONDS, vectors, item_ids, item_vectors, extra={"note": 1})
    assert folder == partition_dir(tmp_path, DAY) and (folder / KNOWLEDGE_MANIFEST).exists()
    rows = pq.read_table(folder / "users.parquet")
    assert rows.num_rows == len(user_ids) * len(CONDS) and rows.schema.field("vector").type == pa.list_(pa.float32())
    assert set(rows.column("condition").to_pylist()) == set(CONDS) and set(rows.column("model_version").to_pylist()) == {"v7"}
    loaded = load_knowledge(tmp_path, DAY)
    direct = KnowledgeLookup.from_tensors(user_ids, CONDS, vectors, item_ids, item_vectors, DAY, "v7")
    assert (loaded.dim, loaded.as_of_ds, loaded.model_version) == (4, DAY, "v7")

    # Plain reference: a Python dict per (user, condition string).
    ref = {(int(u), c): vectors[i, j] for i, u in enumerate(user_ids) for j, c in enumerate(CONDS)}
    gen = torch.Generator().manual_seed(1)
    queried = torch.cat([user_ids[torch.randint(0, len(user_ids), (40,), generator=gen)], torch.tensor([0, 10**9, -5])])
    for feature, pool in (("category_id", [0, 1, 2, 3, 4]), ("scenario", [1, 2, 7])):
        values = torch.tensor(pool)[torch.randint(0, len(pool), (len(queried), 6), generator=gen)]
        for lookup in (loaded, direct):
            vecs, missing = lookup.user_vectors(queried, feature, values)
            assert vecs.shape == (len(queried), 6, 4) and vecs.dtype == torch.float32 and missing.dtype == torch.bool
            for b in range(len(queried)):
                for n in range(6):
                    key = (int(queried[b]), f"{feature}={int(values[b, n])}")
                    assert bool(missing[b, n]) == (key not in ref)
                    assert torch.equal(vecs[b, n], ref.get(key, torch.zeros(4)))
    ask = torch.cat([item_ids[:7], torch.tensor([10**6, -1])]).view(3, 3)
    for lookup in (loaded, direct):
        vecs, missing = lookup.item_vectors(ask)
        assert vecs.shape == (3, 3, 4) and missing.view(-1).tolist() == [False] * 7 + [True, True]
        torch.testing.assert_close(vecs.view(9, 4)[:7], item_vectors[:7], rtol=0, atol=0)
        assert not vecs.view(9, 4)[7:].any()
    with pytest.raises(KeyError, match="'query_id' is not in the store.*\\['category_id', 'scenario'\\]"):
        loaded.user_vectors(queried, "query_id", values)
    with pytest.raises(ValueError, match=r"need user_ids \[B\] and values \[B, N\]"):
        loaded.user_vectors(queried, "scenario", values[:3])


def test_streaming_writer_and_point_in_time_days(tmp_path):
    user_ids, vectors, item_ids, item_vectors = _random_knowledge(users=10)
    for day in ("2026-01-01", "2026-01-03"):
        with KnowledgeWriter(tmp_path, day, f"v-{day}", CONDS, dim=4) as writer:
            writer.write_users(user_ids[:6], vectors[:6])  # two batches of users
            writer.write_users(user_ids[6:], vectors[6:])
            writer.write_items(item_ids, item_vectors)
    # A partition being written (temp folder) or killed half-way (no manifest) does not count.
    (tmp_path / ".tmp-as_of_ds=2026-01-04-abcd").mkdir()
    partition_dir(tmp_path, "2026-01-05").mkdir()
    assert knowledge_days(tmp_path) == ["2026-01-01", "2026-01-03"]
    # Knowledge used on day D is as of D-1 or earlier, never D itself.
    assert latest_as_of(tmp_path, "2026-01-03") == "2026-01-01"
    assert latest_as_of(tmp_path, "2026-01-04") == "2026-01-03"
    assert latest_as_of(tmp_path, "2026-01-09") == "2026-01-03"
    assert latest_as_of(tmp_path, "2026-01-01") is None
    assert latest_as_of(tmp_path / "nowhere", "2026-01-09") is None
    got, _ = load_knowledge(tmp_path, "2026-01-03").user_vectors(user_ids, "scenario", torch.full((10, 1), 2))
    torch.testing.assert_close(got[:, 0], vectors[:, 2], rtol=0, atol=0)

    # Rewriting a day replaces it whole and leaves no temporary folders behind.
    write_knowledge(tmp_path, "2026-01-03", "v-new", user_ids[:2], CONDS, vectors[:2] + 1, item_ids[:1], item_vectors[:1])
    again = load_knowledge(tmp_path, "2026-01-03")
    assert again.model_version == "v-new" and again.num_users == 2 and again.num_items == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-as_of_ds=2026-01-03", ".old-"))]

    # An error while writing leaves nothing that looks like knowledge.
    with pytest.raises(RuntimeError, match="boom"):
        with KnowledgeWriter(tmp_path, "2026-01-06", "v", CONDS, dim=4) as writer:
            writer.write_users(user_ids, vectors)
            raise RuntimeError("boom")
    assert "2026-01-06" not in knowledge_days(tmp_path) and not list(tmp_path.glob(".tmp-as_of_ds=2026-01-06*"))


def test_writer_rejects_bad_input(tmp_path):
    user_ids, vectors, item_ids, item_vectors = _random_knowledge(users=5)
    with pytest.raises(ValueError, match=r"\['scenario=2'\] listed more than once"):
        KnowledgeWriter(tmp_path, DAY, "v", CONDS + ["scenario=2"], dim=4)
    with pytest.raises(ValueError, match="must look like feature=value"):
        KnowledgeWriter(tmp_path, DAY, "v", ["scenario:2"], dim=4)
    with pytest.raises(ValueError, match="bad day"):
        KnowledgeWriter(tmp_path, "2026-13-01", "v", CONDS, dim=4)
    writer = KnowledgeWriter(tmp_path, DAY, "v", CONDS, dim=4)
    with pytest.raises(ValueError, match=r"shape \(5, 3, 3\), expected \(5, 3, 4\)"):
        writer.write_users(user_ids, vectors[..., :3])
    bad = vectors.clone()
    bad[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="1 vector\\(s\\) hold NaN"):
        writer.write_users(user_ids, bad)
    writer.write_users(user_ids, vectors)
    writer.write_users(user_ids[:1], vectors[:1])
    with pytest.raises(ValueError, match=f"user id\\(s\\) written more than once, e.g. \\[{int(user_ids[0])}\\]"):
        writer.commit()
    writer.abort()
    assert knowledge_days(tmp_path) == [] and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="listed more than once"):
        KnowledgeLookup.from_tensors(user_ids, ["a=1", "a=1", "b=2"], vectors, item_ids, item_vectors)
    with pytest.raises(ValueError, match=r"user_vectors must be \[5, 3, dim\]"):
        KnowledgeLookup.from_tensors(user_ids, CONDS, vectors[:, :2], item_ids, item_vectors)
    with pytest.raises(DataValidationError, match=r"duplicate \(user_id, condition\) rows"):
        KnowledgeLookup.from_tensors(torch.tensor([1, 2, 1, 4, 5]), CONDS, vectors, item_ids, item_vectors)


def _rewrite(path, table):
    pq.write_table(table, path)


def test_reader_names_the_bad_file_and_column(tmp_path):
    user_ids, vectors, item_ids, item_vectors = _random_knowledge(users=5)
    with pytest.raises(FileNotFoundError, match=r"as_of_ds=2026-01-02/_knowledge.json: no knowledge for as_of_ds=2026-01-02.*\[\]"):
        load_knowledge(tmp_path, DAY)
    folder = write_knowledge(tmp_path, DAY, "v", user_ids, CONDS, vectors, item_ids, item_vectors)
    users_path, items_path = folder / "users.parquet", folder / "items.parquet"
    good_users, good_items = pq.read_table(users_path), pq.read_table(items_path)
    manifest = json.loads((folder / KNOWLEDGE_MANIFEST).read_text())

    def expect(match, users=None, items=None, manifest_changes=None):
        _rewrite(users_path, users if users is not None else good_users)
        _rewrite(items_path, items if items is not None else good_items)
        (folder / KNOWLEDGE_MANIFEST).write_text(json.dumps({**manifest, **(manifest_changes or {})}))
        with pytest.raises(DataValidationError, match=match):
            load_knowledge(tmp_path, DAY)

    # A corrupt Parquet file.
    users_path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataValidationError, match=r"users.parquet: unreadable Parquet file"):
        load_knowledge(tmp_path, DAY)
    # A vector of the wrong length (one row of 3 floats in a dim-4 store).
    short = good_users.column("vector").to_pylist()
    short[4] = short[4][:3]
    expect(r"users.parquet: column 'vector': vector length 3 != dim 4 of the manifest \(1 row\)",
           users=good_users.set_column(2, "vector", pa.array(short, pa.list_(pa.float32()))))
    # Duplicate (user, condition) rows.
    dup = pa.concat_tables([good_users, good_users.slice(0, 2)])
    expect(r"users.parquet: column 'user_id, condition': duplicate \(user_id, condition\) rows, e.g. "
           rf"\({int(user_ids[0])}, 'category_id=1'\) \(2 rows\)", users=dup, manifest_changes={"num_user_rows": dup.num_rows})
    dup_items = pa.concat_tables([good_items, good_items.slice(3, 1)])
    expect(r"items.parquet: column 'item_id': duplicate item_id rows", items=dup_items, manifest_changes={"num_items": dup_items.num_rows})
    # Rows the manifest does not account for, a missing column, a wrong type, a foreign model version.
    expect(r"users.parquet: has 14 rows but the manifest says 15", users=good_users.slice(1))
    expect(r"items.parquet: column 'vector': missing column", items=good_items.drop_columns(["vector"]))
    expect(r"users.parquet: column 'user_id': wrong type string",
           users=good_users.set_column(0, "user_id", good_users.column("user_id").cast(pa.string())))
    expect(r"users.parquet: column 'model_version': values differ from the manifest's 'v' \(15 rows\)",
           users=good_users.set_column(4, "model_version", pa.array(["w"] * good_users.num_rows)))
    expect(r"users.parquet: column 'condition'.*must look like feature=value",
           users=good_users.set_column(1, "condition", pa.array(["oops"] * good_users.num_rows)))
    (folder / KNOWLEDGE_MANIFEST).write_text("{not json")
    with pytest.raises(DataValidationError, match=r"_knowledge.json: corrupt knowledge manifest"):
        load_knowledge(tmp_path, DAY)
    assert parse_condition("query_id=17") == ("query_id", 17) and str(parse_condition("const=0")) == "const=0"


# -- the query pipeline ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny synthetic logs (4 days) and a LUM pre-trained for a few steps on days up to AS_OF."""
    root = tmp_path_factory.mktemp("query")
    data = root / "data"
    generate(data, SynthConfig(seed=1, num_users=40, num_items=40, num_categories=4, num_queries=8, num_days=4))
    cfg = PretrainConfig(
        model="lum", out=str(root / "run"),
        data=DataConfig(path=str(data), end=DAY, max_len=16, condition_features=["scenario", "category_id"], item_features=["item_id"],
                        condition_dropout=0.3),  # so the unconditioned `none=0` query is one it was trained on
        train=TrainConfig(epochs=1, rows_per_batch=4, num_negatives=8, checkpoint_every_steps=100, log_every_steps=100),
        model_config={"d_model": 16, "num_layers": 2, "num_heads": 2, "ffn_dim": 32},
    )
    Pretrainer(cfg).run(max_steps=3)
    return root, data


def _query_config(root, data, store, **kw) -> QueryConfig:
    base = dict(
        checkpoint=str(root / "run"), data=str(data), as_of_ds=DAY, store=str(store), rows_per_batch=3, progress=False,
        conditions=[ConditionSpec("category_id", "all"), ConditionSpec("scenario", [1, 2])],
    )
    base.update(kw)
    return QueryConfig(**base)


def _all_vectors(lookup: KnowledgeLookup, users: np.ndarray) -> torch.Tensor:
    ids = torch.from_numpy(users)
    cat, cat_missing = lookup.user_vectors(ids, "category_id", torch.arange(1, 5).expand(len(ids), 4))
    scen, scen_missing = lookup.user_vectors(ids, "scenario", torch.tensor([1, 2]).expand(len(ids), 2))
    assert not cat_missing.any() and not scen_missing.any()
    return torch.cat([cat, scen], dim=1)


def test_query_pipeline_writes_what_a_direct_grouped_query_gives(pretrained, tmp_path):
    root, data = pretrained
    result = run_query(_query_config(root, data, tmp_path / "store"))
    ds = Dataset(data)
    active = np.unique(ds.read_days("behaviours", DAY, DAY).column("user_id").to_numpy())
    assert result["users"] == len(active) > 5 and result["conditions"] == 6 and result["rows"] == 6 * len(active)
    assert result["grouped"] and "run/checkpoints/step-00000003@" in result["model_version"]
    lookup = load_knowledge(tmp_path / "store", DAY)
    assert lookup.num_users == len(active) and lookup.conditions == [f"category_id={v}" for v in (1, 2, 3, 4)] + ["scenario=1", "scenario=2"]
    assert pq.read_table(partition_dir(tmp_path / "store", DAY) / "users.parquet").num_rows == 6 * len(active)
    assert latest_as_of(tmp_path / "store", shift_ds(DAY, 1)) == DAY

    # Direct call: histories read independently (days <= DAY), all users in one batch, plain grouped query.
    loaded = load_pretrained_lum(root / "run")
    lum = loaded.model
    seqs = build_user_sequences(ds.read_days("behaviours", None, DAY)).select_users(active)
    tokens = build_lum_tokens(seqs, loaded.token_config)
    batch = make_jagged_batch(tokens, pack_sequences(tokens.offsets, tokens.token_type, default_max_history(lum)))
    conds = [("category_id", v) for v in (1, 2, 3, 4)] + [("scenario", 1), ("scenario", 2)]
    with torch.no_grad():
        direct = grouped_query(lum, batch, conds, as_of_ts=day_bounds(DAY)[1])
        order = torch.argsort(batch.user_ids)
        torch.testing.assert_close(_all_vectors(lookup, active), direct[order], rtol=1e-5, atol=1e-5)
        # items="seen" (default): e_i only for items in the histories read (days <= DAY); the rest (never
        # trained on) and 0 (padding) are missing.
        seen = np.unique(ds.read_days("behaviours", None, DAY).column("item_id").to_numpy())
        assert 0 < len(seen) < lum.num_items - 1, "the fixture should leave some items unseen"
        items, missing = lookup.item_vectors(torch.arange(lum.num_items))
        assert missing.tolist() == [i not in set(seen.tolist()) for i in range(lum.num_items)]
        torch.testing.assert_close(items[seen], lum.item_embeddings(torch.from_numpy(seen)), rtol=1e-6, atol=1e-6)
        # items="all": the whole vocabulary.
        run_query(_query_config(root, data, tmp_path / "all_items", items="all"))
        items_all, missing_all = load_knowledge(tmp_path / "all_items", DAY).item_vectors(torch.arange(lum.num_items))
        assert missing_all.tolist() == [True] + [False] * (lum.num_items - 1)  # 0 is padding, not stored
        torch.testing.assert_close(items_all[1:], lum.item_embeddings(torch.arange(1, lum.num_items)), rtol=1e-6, atol=1e-6)
        # The unconditioned question (`none=0`, every condition feature empty) is stored like any other.
        run_query(_query_config(root, data, tmp_path / "none", conditions=[ConditionSpec("none", "all"), ConditionSpec("scenario", [1])]))
        none_lookup = load_knowledge(tmp_path / "none", DAY)
        assert none_lookup.conditions == ["none=0", "scenario=1"]
        vecs, missing = none_lookup.user_vectors(torch.from_numpy(active), "none", torch.zeros(len(active), 1, dtype=torch.int64))
        assert not missing.any()
        torch.testing.assert_close(vecs[:, 0], grouped_query(lum, batch, [("none", 0)], as_of_ts=day_bounds(DAY)[1])[order, 0],
                                   rtol=1e-5, atol=1e-5)


def test_planted_future_events_cannot_leak(pretrained, tmp_path):
    root, data = pretrained
    run_query(_query_config(root, data, tmp_path / "clean"))
    clean = load_knowledge(tmp_path / "clean", DAY)
    users = clean._user_ids.numpy()

    def planted_copy(name: str, day: str, ts: int):
        """The dataset plus one extra behaviour for every active user on `day` at time `ts`."""
        copy = tmp_path / name
        shutil.copytree(data, copy)
        n = len(users)
        table = pa.table({
            "user_id": pa.array(users, pa.int64()), "ts": pa.array(np.full(n, ts), pa.int64()),
            "item_id": pa.array((users % 39) + 1, pa.int64()), "scenario": pa.array(np.full(n, 2), pa.int32()),
            "query_id": pa.array(np.zeros(n), pa.int64()), "category_id": pa.array(np.full(n, 3), pa.int64()),
            "action": pa.array(np.ones(n), pa.int32()),
        })
        Dataset(copy).write_day("behaviours", day, table, part=7)
        return copy

    future = planted_copy("future", shift_ds(DAY, 1), day_bounds(shift_ds(DAY, 1))[0] + 5)
    run_query(_query_config(root, future, tmp_path / "future_store"))
    leaked = load_knowledge(tmp_path / "future_store", DAY)
    assert torch.equal(_all_vectors(leaked, users), _all_vectors(clean, users))
    # Control: the same events on the as-of day itself do change the answers (the check has power).
    same_day = planted_copy("same_day", DAY, day_bounds(DAY)[1] - 1)
    run_query(_query_config(root, same_day, tmp_path / "same_day_store"))
    changed = load_knowledge(tmp_path / "same_day_store", DAY)
    assert not torch.allclose(_all_vectors(changed, users), _all_vectors(clean, users))


def test_all_users_cli_and_errors(pretrained, tmp_path):
    root, data = pretrained
    config = tmp_path / "query.yaml"
    config.write_text(
        f"checkpoint: {root / 'run'}\ndata: {data}\nstore: {tmp_path / 'store'}\nprogress: false\n"
        "conditions:\n  - feature: scenario\n    values: all\n"
    )
    parser = argparse.ArgumentParser()
    register_query(parser.add_subparsers())
    # Quoted: YAML would read a bare 2026-01-02 as a date (lumrec.config wants a string here).
    args = parser.parse_args(["query", str(config), f"as_of_ds='{DAY}'", "users=all"])
    assert args.func(args) == 0
    lookup = load_knowledge(tmp_path / "store", DAY)
    all_users = np.unique(Dataset(data).read_table("users").column("user_id").to_numpy())
    assert lookup.num_users == len(all_users) and lookup.conditions == ["scenario=1", "scenario=2"]
    with_history = set(build_user_sequences(Dataset(data).read_days("behaviours", None, DAY)).user_ids.tolist())
    newcomers = torch.tensor([u for u in all_users.tolist() if u not in with_history])
    assert len(newcomers) > 0  # users without history all get the condition-only answer
    vecs, missing = lookup.user_vectors(newcomers, "scenario", torch.tensor([[1, 2]]).expand(len(newcomers), 2))
    assert not missing.any() and torch.equal(vecs, vecs[:1].expand_as(vecs))

    with pytest.raises(ValueError, match=r"'query_id' is not a condition of this LUM; it has \['scenario', 'category_id', 'none'\]"):
        run_query(_query_config(root, data, tmp_path / "x", conditions=[ConditionSpec("query_id", [1])]))
    with pytest.raises(ValueError, match=r"conditions\[none\].values must be \[0\]"):
        run_query(_query_config(root, data, tmp_path / "x", conditions=[ConditionSpec("none", [2])]))
    with pytest.raises(ValueError, match="values must be a list of ids or 'all'"):
        run_query(_query_config(root, data, tmp_path / "x", conditions=[ConditionSpec("scenario", "some")]))
    with pytest.raises(ValueError, match=r"\['scenario=1'\] asked more than once"):
        run_query(_query_config(root, data, tmp_path / "x", conditions=[ConditionSpec("scenario", [1, 1])]))
    with pytest.raises(ValueError, match="no partition ds=2027-01-01"):
        run_query(_query_config(root, data, tmp_path / "x", as_of_ds="2027-01-01"))
    with pytest.raises(FileNotFoundError, match="no complete best checkpoint"):
        run_query(_query_config(root, data, tmp_path / "x", checkpoint_kind="best"))
    assert not (tmp_path / "x").exists() or knowledge_days(tmp_path / "x") == []
    with pytest.raises(ValueError, match=r"query: conditions\[scenario\]: condition \('scenario', 'x'\): value of 'scenario' must be an integer"):
        run_query(_query_config(root, data, tmp_path / "x", conditions=[ConditionSpec("scenario", ["x"])]))


def test_query_writes_tensorboard_scalars_and_a_job_start_line(pretrained, tmp_path, caplog):
    root, data = pretrained
    with caplog.at_level(logging.INFO, logger="lumrec"):
        result = run_query(_query_config(root, data, tmp_path / "store"))
    start = [r.getMessage() for r in caplog.records if r.getMessage().startswith("query: ")]
    assert len(start) == 1 and f"{result['users']:,} users" in start[0] and "6 conditions" in start[0]
    assert re.search(r"[\d,]+ parameters, device cpu, \d+ threads?, as of " + DAY, start[0]), start[0]
    events = EventAccumulator(str(tmp_path / "store" / "tb"))
    events.Reload()
    step = day_bounds(DAY)[0] // 86400
    for tag, value in (("query/users", result["users"]), ("query/conditions", 6), ("query/carried_over", 0)):
        (scalar,) = events.Scalars(tag)
        assert (scalar.step, scalar.value) == (step, value), tag
    (speed,) = events.Scalars("query/users_per_second")
    assert speed.value > 0 and events.Scalars("query/seconds")[0].value == pytest.approx(result["seconds"])
    assert knowledge_days(tmp_path / "store") == [DAY]  # tb/ next to the partitions is not one


# -- the one condition parser -----------------------------------------------------------------


@pytest.mark.parametrize("entry, expected", [
    ("category_id=5", ("category_id", 5)),
    ("scenario=-1", ("scenario", -1)),
    ("_x9=0", ("_x9", 0)),
    (("scenario", 2), ("scenario", 2)),
    (["scenario", "2"], ("scenario", 2)),  # YAML [feature, value], value quoted
    (("scenario", np.int64(3)), ("scenario", 3)),
    (Condition("const", 0), ("const", 0)),
])
def test_condition_parser_accepts_the_documented_forms(entry, expected):
    parsed = parse_condition(entry)
    assert parsed == expected and isinstance(parsed, Condition) and type(parsed.value) is int
    assert str(parsed) == f"{expected[0]}={expected[1]}" and parse_condition(str(parsed)) == parsed


@pytest.mark.parametrize("entry, message", [
    ("scenario", r"lum.conditions: condition 'scenario' must look like feature=value with an integer value, e.g. 'category_id=5' \(no '='\)"),
    ("scenario:2", r"condition 'scenario:2' must look like feature=value .*\(no '='\)"),
    ("scenario = 2", r"condition 'scenario = 2' .*\(feature 'scenario ' is not an identifier"),
    ("2cat=1", r"condition '2cat=1' .*\(feature '2cat' is not an identifier: letters, digits and _, not starting with a digit\)"),
    ("=1", r"condition '=1' .*\(feature '' is not an identifier"),
    ("scenario=feed", r"condition 'scenario=feed' .*\(value 'feed' is not an integer\)"),
    ("scenario=1.5", r"\(value '1.5' is not an integer\)"),
    ("scenario=1=2", r"\(value '1=2' is not an integer\)"),
    ("scenario=", r"\(value '' is not an integer\)"),
    (("scenario", "feed"), r"lum.conditions: condition \('scenario', 'feed'\): value of 'scenario' must be an integer id, got 'feed'"),
    (("scenario", 1.0), r"value of 'scenario' must be an integer id, got 1.0"),
    (("scenario", True), r"value of 'scenario' must be an integer id, got True"),
    (("scenario", None), r"value of 'scenario' must be an integer id, got None"),
    (("cat id", 1), r"condition \('cat id', 1\): feature 'cat id' must be an identifier \(letters, digits and _, not starting with a digit\)"),
    ((3, 1), r"condition \(3, 1\): feature 3 must be an identifier"),
    (("scenario", 1, 2), r"condition \('scenario', 1, 2\) must be 'feature=value' or a \(feature, value\) pair, e.g. 'category_id=5'"),
    (5, r"lum.conditions: condition 5 must be 'feature=value' or a \(feature, value\) pair"),
    (None, r"condition None must be 'feature=value' or a \(feature, value\) pair"),
])
def test_condition_parser_errors_quote_the_entry_and_its_source(entry, message):
    with pytest.raises(ValueError, match=message):
        parse_condition(entry, source="lum.conditions")


def test_every_condition_site_uses_the_one_parser(tmp_path):
    """The store writer, the lookup, LUMFeatureConfig, the grouped query and the rank join read conditions alike."""
    bad = "scenario:2"
    sites = [
        ("KnowledgeWriter", lambda: KnowledgeWriter(tmp_path, DAY, "v", [bad], dim=2)),
        ("KnowledgeLookup.from_tensors", lambda: KnowledgeLookup.from_tensors(
            torch.tensor([1]), [bad], torch.zeros(1, 1, 2), torch.tensor([1]), torch.zeros(1, 2))),
        ("LUMFeatureConfig.conditions", lambda: LUMFeatureConfig(conditions=[bad])),
        ("grouped query", lambda: as_conditions([bad])),
    ]
    for source, make in sites:
        with pytest.raises(ValueError, match=rf"^{re.escape(source)}: condition 'scenario:2' must look like feature=value"):
            make()
    # The same valid forms everywhere, stored in the canonical "feature=value" text.
    forms = ["scenario=1", ("scenario", 2), ["category_id", "3"]]
    assert as_conditions(forms) == [("scenario", 1), ("scenario", 2), ("category_id", 3)]
    assert LUMFeatureConfig(conditions=forms).conditions == [("scenario", 1), ("scenario", 2), ("category_id", 3)]
    path = write_knowledge(tmp_path, DAY, "v", [1], forms, np.zeros((1, 3, 2), np.float32), [1], np.zeros((1, 2), np.float32))
    assert load_knowledge(tmp_path, DAY).conditions == ["scenario=1", "scenario=2", "category_id=3"]
    assert path.name == f"as_of_ds={DAY}"
    with pytest.raises(ValueError, match=r"KnowledgeWriter: expected a list of conditions, got the string 'scenario=1'"):
        KnowledgeWriter(tmp_path, DAY, "v", "scenario=1", dim=2)
    assert format_condition("scenario", 2) == "scenario=2"
    with pytest.raises(ValueError, match="feature 'a b' must be an identifier"):
        format_condition("a b", 2)
