"""Grouped knowledge query: one pass with a query mask == N plain passes, queries never see each other."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

import lumrec.modules.retrieval.grouped_query as gq_mod
from lumrec.data.batches import make_jagged_batch
from lumrec.data.packing import PackPlan, pack_sequences
from lumrec.data.sequences import UserSequences, offsets_from_lengths
from lumrec.data.tokens import CONDITION, ITEM, TokenConfig, build_lum_tokens, drop_condition_ids
from lumrec.modules.retrieval.grouped_query import (
    GroupedQuery,
    build_grouped_query_layout,
    condition_query_embeddings,
    grouped_query,
    query_encode,
    separate_queries,
)
from lumrec.modules.layers.hstu import HSTUAttentionConfig
from lumrec.modules.retrieval.lum import LUM, LUMConfig
from lumrec.modules.layers.token_encoder import ItemFeatureLookup, token_encoder_config_from_tokens

MAX_LEN = 24
BACKBONES = ["transformer", "hstu"]
VOCAB = {"item_id": 30, "category_id": 6, "scenario": 3, "query_id": 9}
CONDITIONS = [("category_id", 2), ("scenario", 1), ("none", 0), ("category_id", 5), ("scenario", 2)]


def test_doctests():
    assert doctest.testmod(gq_mod, raise_on_error=True).attempted > 0


def _tokens(events_per_user, condition_features=("scenario", "category_id"), seed=0):
    """LUM tokens of random users with the given numbers of events (0 allowed)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(events_per_user, dtype=np.int64)
    n = int(lengths.sum())
    seqs = UserSequences(
        user_ids=np.arange(len(lengths), dtype=np.int64) + 100, offsets=offsets_from_lengths(lengths),
        item_id=rng.integers(1, VOCAB["item_id"], n), ts=np.sort(rng.integers(0, 10**6, n)) if n else np.zeros(0, np.int64),
        action=np.ones(n, np.int32), scenario=rng.integers(1, 3, n).astype(np.int32),
        query_id=rng.integers(0, 9, n), category_id=rng.integers(1, 6, n),
    )
    # Timestamps must rise inside each user; a global sort does that.
    return build_lum_tokens(seqs, TokenConfig(condition_features=list(condition_features), item_features=["item_id", "category_id"]))


def _lum(tokens, backbone, **overrides):
    torch.manual_seed(0)
    cfg = dict(d_model=16, num_layers=2, num_heads=2, ffn_dim=32, max_len=MAX_LEN, backbone=backbone)
    cfg.update(overrides)
    enc = token_encoder_config_from_tokens(tokens, VOCAB, dim=8, d_model=16)
    lum = LUM(LUMConfig(**cfg), enc, ItemFeatureLookup(VOCAB["item_id"])).eval()
    # Random (not near-zero) HSTU biases, so that wrong positions / timestamps would show.
    with torch.no_grad():
        for name, p in lum.named_parameters():
            if "relative_bias" in name:
                p.normal_(0, 0.5)
    return lum


def _batch(tokens, packed: bool):
    """All non-empty users in one batch: several per row when packed, one per row otherwise."""
    plan = pack_sequences(tokens.offsets, tokens.token_type, 64)
    if not packed:
        plan = PackPlan(plan.max_len, plan.seq_index, plan.starts, plan.lengths, np.arange(plan.num_segments + 1))
    return make_jagged_batch(tokens, plan)


def _kept_span(token_type: torch.Tensor, start: int, end: int, max_history: int) -> tuple[int, int]:
    """Plain truncation rule: the most recent max_history tokens, dropping an item cut from its condition."""
    a = max(end - max_history, start)
    if a > start and token_type[a] == ITEM and token_type[a - 1] == CONDITION:
        a += 1
    return a, end


def _reference(lum, x, offsets, token_type, ts, query_x, as_of):
    """Every (user, query) alone: encode [kept history, that one condition token] as one plain sequence."""
    num_segments, n, _ = query_x.shape
    out = torch.zeros(num_segments, n, x.shape[1], dtype=x.dtype)
    for s in range(num_segments):
        a, b = _kept_span(token_type, int(offsets[s]), int(offsets[s + 1]), lum.config.max_len - 1)
        k = b - a
        for j in range(n):
            seq = torch.cat([x[a:b], query_x[s, j : j + 1]])
            seq_ts = torch.cat([ts[a:b], torch.tensor([int(as_of[s])])]) if ts is not None else None
            h = lum.encode(seq, torch.tensor([0, k + 1]), positions=torch.arange(k + 1), timestamps=seq_ts)
            out[s, j] = h[-1]
    return out


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("packed", [True, False])
def test_grouped_equals_plain_passes_on_batches(backbone, packed):
    # 12 events = 24 tokens = max_len (cut to 23, then to 22 so it starts on a condition); 15 and 30: longer.
    tokens = _tokens([1, 2, 12, 5, 15, 3, 30, 1, 8])
    lum = _lum(tokens, backbone)
    batch = _batch(tokens, packed)
    assert (batch.num_rows < batch.num_segments) == packed
    assert int(batch.lengths().max()) > MAX_LEN  # some histories must be cut
    as_of = torch.full((batch.num_segments,), int(batch.ts.max()) + 3600)
    as_of[0] += 10**5  # per-user as-of times
    with torch.no_grad():
        grouped = grouped_query(lum, batch, CONDITIONS, as_of_ts=as_of)
        separate = separate_queries(lum, batch, CONDITIONS, as_of_ts=as_of)
        query_x = condition_query_embeddings(lum, CONDITIONS)[None].expand(batch.num_segments, -1, -1)
        ref = _reference(lum, lum.embed(batch), batch.offsets, batch.token_type, batch.ts, query_x, as_of)
    assert grouped.shape == (batch.num_segments, len(CONDITIONS), 16)
    torch.testing.assert_close(grouped, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(separate, ref, rtol=1e-5, atol=1e-5)
    # Packing does not change an answer: the same users, one per row, give the same vectors.
    if packed:
        with torch.no_grad():
            alone = grouped_query(lum, _batch(tokens, packed=False), CONDITIONS, as_of_ts=as_of)
        torch.testing.assert_close(grouped, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_query_encode_random_lengths_per_user_queries(backbone):
    """Low level, float64: history lengths 0, 1, max_len-1, max_len, longer; different queries per user; default as-of."""
    tokens = _tokens([3])
    lum = _lum(tokens, backbone).double()
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([0, 1, 2, MAX_LEN - 1, MAX_LEN, 0, 31, 7])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    total = int(offsets[-1])
    token_type = torch.randint(0, 2, (total,), generator=gen)
    x = torch.randn(total, 16, generator=gen, dtype=torch.float64)
    ts = torch.cumsum(torch.randint(0, 5000, (total,), generator=gen), 0)
    n = 5
    query_x = torch.randn(len(lengths), n, 16, generator=gen, dtype=torch.float64)
    for segment_offsets in (torch.tensor([0, 3, 5, 8]), None):  # packed rows, then one user per row
        layout = build_grouped_query_layout(offsets, n, MAX_LEN - 1, token_type=token_type, segment_offsets=segment_offsets)
        with torch.no_grad():
            grouped = query_encode(lum, x, layout, query_x, history_ts=ts)
            # Default query time: the user's last kept event; 0 with no history.
            last = torch.tensor([int(ts[int(offsets[s + 1]) - 1]) if lengths[s] else 0 for s in range(len(lengths))])
            ref = _reference(lum, x, offsets, token_type, ts, query_x, last)
        torch.testing.assert_close(grouped, ref, rtol=1e-9, atol=1e-9)
    spans = [_kept_span(token_type, int(offsets[s]), int(offsets[s + 1]), MAX_LEN - 1) for s in range(len(lengths))]
    assert layout.history_lengths.tolist() == [b - a for a, b in spans]
    assert layout.history_lengths.tolist()[:4] == [0, 1, 2, 23] and layout.history_lengths[6] in (22, 23)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_one_query_never_changes_another(backbone):
    tokens = _tokens([4, 9, 14, 2])
    lum = _lum(tokens, backbone)
    batch = _batch(tokens, packed=True)
    conds = [("category_id", 1), ("category_id", 2), ("scenario", 1), ("category_id", 4)]
    with torch.no_grad():
        base = grouped_query(lum, batch, conds, as_of_ts=10**7)
        for j, replacement in ((0, ("category_id", 5)), (2, ("scenario", 2)), (3, ("scenario", 1))):
            changed = list(conds)
            changed[j] = replacement
            out = grouped_query(lum, batch, changed, as_of_ts=10**7)
            others = [i for i in range(len(conds)) if i != j]
            # Masked pairs weigh exactly 0, so the other answers are bit-identical.
            assert torch.equal(out[:, others], base[:, others]), (j, replacement)
            assert not torch.allclose(out[:, j], base[:, j])
        # More queries do not change the answers either (history kept = max_len - 1, whatever N).
        more = grouped_query(lum, batch, conds + [("category_id", 3), ("scenario", 2)], as_of_ts=10**7)
        torch.testing.assert_close(more[:, : len(conds)], base, rtol=1e-5, atol=1e-5)


def test_condition_tokens_and_constant_condition():
    tokens = _tokens([3, 6])
    lum = _lum(tokens, "transformer")
    with torch.no_grad():
        emb = condition_query_embeddings(lum, [("scenario", 2), "category_id=4"])
        # A query sets only its own feature: the other condition feature pools to zero.
        one = lum.condition_embeddings(
            {"cond_scenario": (torch.tensor([1], dtype=torch.int32), torch.tensor([2])),
             "cond_category_id": (torch.tensor([0], dtype=torch.int32), torch.zeros(0, dtype=torch.int64))}
        )
        torch.testing.assert_close(emb[:1], one)
    # A LUM trained with a constant condition is queried with ("const", 0): the trained id-1 token.
    const_tokens = _tokens([3, 6, 13], condition_features=())
    const_lum = _lum(const_tokens, "hstu")
    batch = _batch(const_tokens, packed=True)
    with torch.no_grad():
        grouped = grouped_query(const_lum, batch, [("const", 0)], as_of_ts=10**7)
        first_condition = const_lum.embed(batch)[0]
        torch.testing.assert_close(condition_query_embeddings(const_lum, [("const", 0)])[0], first_condition)
        torch.testing.assert_close(grouped, separate_queries(const_lum, batch, [("const", 0)], as_of_ts=10**7))


def test_unconditioned_query_is_the_dropped_training_token():
    """`none=0` asks with the token that condition dropout puts into training sequences: every feature empty."""
    tokens = drop_condition_ids(_tokens([6, 9, 14]), 0.5, seed=1)
    lum = _lum(tokens, "hstu")
    batch = _batch(tokens, packed=True)
    empty = (batch.token_type == CONDITION).clone()
    for key in tokens.condition_keys:
        empty &= batch.kjt[key].lengths() == 0
    assert empty.any()
    with torch.no_grad():
        none = condition_query_embeddings(lum, ["none=0"])[0]
        x = lum.embed(batch)
        for t in torch.nonzero(empty).flatten().tolist():
            torch.testing.assert_close(x[t], none)
        # Distinct from every real condition.
        others = condition_query_embeddings(lum, [("scenario", 1), ("category_id", 2)])
        assert not torch.allclose(others, none.expand_as(others))


def test_errors_name_the_problem():
    tokens = _tokens([3, 6])
    lum = _lum(tokens, "transformer")
    batch = _batch(tokens, packed=True)
    with pytest.raises(ValueError, match=r"'query_id'.*condition keys are \['cond_scenario', 'cond_category_id'\]"):
        grouped_query(lum, batch, [("query_id", 3)])
    with pytest.raises(ValueError, match="'const'"):
        GroupedQuery(lum, [("const", 0)])
    with pytest.raises(ValueError, match="feature=value"):
        grouped_query(lum, batch, ["category_id:3"])
    with pytest.raises(ValueError, match="no conditions"):
        grouped_query(lum, batch, [])
    with pytest.raises(ValueError, match=r"as_of_ts must be a scalar or \[2\]"):
        grouped_query(lum, batch, CONDITIONS, as_of_ts=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="'cond_category_id' has ids in \\[9, 9\\]"):
        grouped_query(lum, batch, [("category_id", 9)])
    length_norm = _lum(tokens, "hstu", hstu=HSTUAttentionConfig(normaliser="length"))
    with pytest.raises(ValueError, match="separate_queries"):
        grouped_query(length_norm, batch, CONDITIONS, as_of_ts=0)
    # One query is exact even there, and separate passes always are.
    with torch.no_grad():
        torch.testing.assert_close(
            grouped_query(length_norm, batch, CONDITIONS[:1], as_of_ts=0), separate_queries(length_norm, batch, CONDITIONS[:1], as_of_ts=0)
        )
