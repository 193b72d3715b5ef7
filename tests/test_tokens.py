"""Tests of condition/item tokens: interleaving, KJT contents, multi/empty conditions, list features, dense features."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from lumrec.data.sequences import build_user_sequences
from lumrec.data.tokens import (
    CONDITION,
    ITEM,
    TokenConfig,
    attach_dense,
    build_item_sequences,
    build_lum_tokens,
    drop_condition_ids,
    item_dense_matrix,
    item_lists_from_table,
    to_kjt,
)
from lumrec.data.validate import DataValidationError


def tiny_sequences():
    """User 1: (ts 10, item 5, scenario 1, query 0, cat 2, click), (ts 20, item 6, scenario 2, query 9, cat 3, buy); user 4: (ts 7, item 8, ...)."""
    table = pa.table(
        {
            "user_id": pa.array([4, 1, 1], pa.int64()),
            "ts": pa.array([7, 20, 10], pa.int64()),
            "item_id": pa.array([8, 6, 5], pa.int64()),
            "scenario": pa.array([1, 2, 1], pa.int32()),
            "query_id": pa.array([3, 9, None], pa.int64()),
            "category_id": pa.array([4, 3, 2], pa.int64()),
            "action": pa.array([1, 3, 1], pa.int32()),
        }
    )
    return build_user_sequences(table)


def kjt_dict(kjt) -> dict[str, tuple[list[int], list[int]]]:
    """KJT as key -> (lengths, values) lists."""
    return {k: (jt.lengths().tolist(), jt.values().tolist()) for k, jt in kjt.to_dict().items()}


def test_lum_tokens_interleave_conditions_and_items():
    tok = build_lum_tokens(tiny_sequences(), TokenConfig(condition_features=["scenario"], include_actions=True))
    assert tok.user_ids.tolist() == [1, 4]
    assert tok.offsets.tolist() == [0, 4, 6]
    assert tok.token_type.tolist() == [CONDITION, ITEM, CONDITION, ITEM, CONDITION, ITEM]
    assert tok.position.tolist() == [0, 1, 2, 3, 0, 1]
    assert tok.ts.tolist() == [10, 10, 20, 20, 7, 7]
    assert tok.item_id.tolist() == [0, 5, 0, 6, 0, 8]
    assert tok.action.tolist() == [0, 1, 0, 3, 0, 1]
    assert tok.keys == ["cond_scenario", "item_id", "category_id"]
    assert tok.key_sources == {"cond_scenario": "scenario", "item_id": "item_id", "category_id": "category_id"}
    assert tok.dense_ids("cond_scenario").tolist() == [1, 0, 2, 0, 1, 0]


def test_kjt_contents_exact():
    tok = build_lum_tokens(tiny_sequences(), TokenConfig(condition_features=["scenario", "query_id"]))
    kjt = to_kjt(tok)
    assert kjt.keys() == ["cond_scenario", "cond_query_id", "item_id", "category_id"]
    assert kjt.stride() == 6
    got = kjt_dict(kjt)
    assert got["cond_scenario"] == ([1, 0, 1, 0, 1, 0], [1, 2, 1])
    assert got["cond_query_id"] == ([1, 0, 1, 0, 1, 0], [0, 9, 3])  # a missing query is id 0, still length 1
    assert got["item_id"] == ([0, 1, 0, 1, 0, 1], [5, 6, 8])
    assert got["category_id"] == ([0, 1, 0, 1, 0, 1], [2, 3, 4])
    # rows subset, in the order given
    sub = to_kjt(tok, rows=[1])
    assert sub.stride() == 2
    assert kjt_dict(sub)["item_id"] == ([0, 1], [8])
    assert kjt_dict(sub)["cond_query_id"] == ([1, 0], [3])


def test_multi_condition_same_feature_on_both_token_kinds():
    tok = build_lum_tokens(tiny_sequences(), TokenConfig(condition_features=["scenario", "category_id"]))
    got = kjt_dict(to_kjt(tok))
    # category of event k describes condition k and item k: same ids, on different tokens under different keys
    assert got["cond_category_id"] == ([1, 0, 1, 0, 1, 0], [2, 3, 4])
    assert got["category_id"] == ([0, 1, 0, 1, 0, 1], [2, 3, 4])


def test_empty_condition_list_gives_constant_condition():
    tok = build_lum_tokens(tiny_sequences(), TokenConfig(condition_features=[]))
    assert tok.condition_keys == ("cond_const",)
    got = kjt_dict(to_kjt(tok))
    assert got["cond_const"] == ([1, 0, 1, 0, 1, 0], [1, 1, 1])
    assert tok.num_tokens == 6


def test_bad_feature_names_are_named_with_the_alternatives():
    seqs = tiny_sequences()
    with pytest.raises(ValueError, match=r"unknown condition feature 'genre'.*available condition features: \['category_id', 'query_id', 'scenario'\]"):
        build_lum_tokens(seqs, TokenConfig(condition_features=["genre"]))
    with pytest.raises(ValueError, match=r"unknown item feature 'category_ids'.*available item features"):
        build_lum_tokens(seqs, TokenConfig(item_features=["item_id", "category_ids"]))
    with pytest.raises(ValueError, match="more than once"):
        build_lum_tokens(seqs, TokenConfig(condition_features=["scenario", "scenario"]))
    with pytest.raises(ValueError, match="unknown item feature 'scenario'"):
        build_item_sequences(seqs, TokenConfig(item_features=["scenario"]))
    tok = build_lum_tokens(seqs, TokenConfig())
    with pytest.raises(KeyError, match="unknown token feature 'nope'.*available"):
        tok.dense_ids("nope")


def test_max_events_keeps_most_recent():
    tok = build_lum_tokens(tiny_sequences(), TokenConfig(max_events=1))
    assert tok.offsets.tolist() == [0, 2, 4]
    assert tok.item_id.tolist() == [0, 6, 0, 8]
    assert tok.position.tolist() == [0, 1, 0, 1]


def test_item_sequences_for_hstu():
    cfg = TokenConfig(item_features=["item_id", "action"], include_actions=True, include_timestamps=True)
    tok = build_item_sequences(tiny_sequences(), cfg)
    assert tok.offsets.tolist() == [0, 2, 3]
    assert tok.token_type.tolist() == [ITEM] * 3
    assert tok.item_id.tolist() == [5, 6, 8] and tok.ts.tolist() == [10, 20, 7] and tok.action.tolist() == [1, 3, 1]
    assert tok.position.tolist() == [0, 1, 0]
    got = kjt_dict(to_kjt(tok))
    assert list(got) == ["item_id", "action"]
    assert got["action"] == ([1, 1, 1], [1, 3, 1])
    bare = build_item_sequences(tiny_sequences(), TokenConfig(include_timestamps=False))
    assert bare.ts is None and bare.action is None


def test_list_valued_item_feature():
    items = pa.table(
        {
            "item_id": pa.array([8, 5, 6], pa.int64()),
            "category_ids": pa.array([[4, 1, 7], [2], []], pa.list_(pa.int64())),
        }
    )
    lists = item_lists_from_table(items, "category_ids", num_items=10)
    assert lists.lengths.tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 3, 0]
    tok = build_lum_tokens(tiny_sequences(), TokenConfig(item_features=["item_id", "category_ids"]), item_lists={"category_ids": lists})
    got = kjt_dict(to_kjt(tok))
    assert got["category_ids"] == ([0, 1, 0, 0, 0, 3], [2, 4, 1, 7])
    with pytest.raises(DataValidationError, match="item ids up to 8 do not fit num_items=7"):
        item_lists_from_table(items, num_items=7)
    short = item_lists_from_table(items.slice(1), num_items=7)  # items 5 and 6 only
    with pytest.raises(ValueError, match=r"'category_ids' covers item ids \[0, 7\) but the events have item id 8"):
        build_lum_tokens(tiny_sequences(), TokenConfig(item_features=["category_ids"]), item_lists={"category_ids": short})


def test_dense_item_features():
    items = pa.table(
        {
            "item_id": pa.array([5, 6, 8], pa.int64()),
            "f_pop": pa.array([0.5, 1.5, None], pa.float32()),
            "content": pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float32())),
            "title": pa.array(["a", "b", "c"]),
        }
    )
    matrix, names = item_dense_matrix(items, num_items=9)
    assert names == ["f_pop", "content[0]", "content[1]"]
    assert matrix.shape == (9, 3) and matrix[6].tolist() == [1.5, 3.0, 4.0] and matrix[8].tolist() == [0.0, 5.0, 6.0]
    assert not matrix[0].any()
    tok = build_lum_tokens(tiny_sequences(), TokenConfig())
    dense = attach_dense(tok, matrix)
    assert dense.dtype == np.float32 and dense.shape == (6, 3)
    assert dense.tolist() == [[0] * 3, [0.5, 1, 2], [0] * 3, [1.5, 3, 4], [0] * 3, [0, 5, 6]]
    both = attach_dense(tok, {"pop": matrix[:, 0], "content": matrix[:, 1:]})
    assert np.array_equal(both, dense)
    with pytest.raises(DataValidationError, match=r"items.*unknown dense item feature 'f_nope'.*available: \['f_pop', 'content'\]"):
        item_dense_matrix(items, columns=["f_nope"])
    with pytest.raises(ValueError, match="rows but the tokens have item id 8"):
        attach_dense(tok, matrix[:7])


def test_take_selects_token_sequences():
    tok = build_lum_tokens(tiny_sequences(), TokenConfig(condition_features=["scenario"]))
    sub = tok.take([1, 0])
    assert sub.user_ids.tolist() == [4, 1]
    assert sub.item_id.tolist() == [0, 8, 0, 5, 0, 6]
    assert kjt_dict(to_kjt(sub))["cond_scenario"] == ([1, 0, 1, 0, 1, 0], [1, 1, 2])


def _random_lum_tokens(num_events: int, seed: int = 0, condition_features=("scenario", "query_id")):
    """LUM tokens of a few users with random conditions (no missing ids)."""
    rng = np.random.default_rng(seed)
    table = pa.table(
        {
            "user_id": pa.array(rng.integers(0, 7, num_events), pa.int64()),
            "ts": pa.array(rng.integers(0, 10**6, num_events), pa.int64()),
            "item_id": pa.array(rng.integers(1, 50, num_events), pa.int64()),
            "scenario": pa.array(rng.integers(1, 4, num_events), pa.int32()),
            "query_id": pa.array(rng.integers(1, 9, num_events), pa.int64()),
            "category_id": pa.array(rng.integers(1, 6, num_events), pa.int64()),
            "action": pa.array(np.ones(num_events), pa.int32()),
        }
    )
    return build_lum_tokens(build_user_sequences(table), TokenConfig(condition_features=list(condition_features)))


def test_condition_dropout_empties_only_condition_features_seeded():
    tokens = _random_lum_tokens(4000)
    assert drop_condition_ids(tokens, 0.0, seed=3) is tokens
    dropped = drop_condition_ids(tokens, 0.3, seed=3)
    again = drop_condition_ids(tokens, 0.3, seed=3)
    is_cond = tokens.token_type == CONDITION
    masks = []
    for key in tokens.condition_keys:
        before, after = tokens.features[key], dropped.features[key]
        assert np.array_equal(after.lengths, again.features[key].lengths)  # seeded
        emptied = (before.lengths == 1) & (after.lengths == 0)
        assert not emptied[~is_cond].any()
        assert abs(emptied[is_cond].mean() - 0.3) < 0.03
        # Kept tokens keep their ids, in order.
        kept = after.lengths == 1
        assert np.array_equal(after.values, before.first_or_zero()[kept])
        masks.append(emptied[is_cond])
    # Keys are dropped independently: both empty on about 0.3^2 of the condition tokens.
    assert abs((masks[0] & masks[1]).mean() - 0.09) < 0.02
    for key in tokens.item_keys:
        assert np.array_equal(dropped.features[key].values, tokens.features[key].values)
    assert np.array_equal(dropped.item_id, tokens.item_id) and np.array_equal(dropped.offsets, tokens.offsets)


def test_condition_dropout_keeps_constant_condition_and_checks_rate():
    const = _random_lum_tokens(200, condition_features=())
    same = drop_condition_ids(const, 0.5, seed=0)
    assert np.array_equal(same.features["cond_const"].lengths, const.features["cond_const"].lengths)
    for rate in (-0.1, 1.0):
        with pytest.raises(ValueError, match="condition_dropout must be in"):
            drop_condition_ids(const, rate, seed=0)
