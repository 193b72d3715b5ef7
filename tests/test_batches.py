"""Tests of packing and batches: truncation at pair boundaries, bin packing, packed == padded, deterministic resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lumrec.data.batches import (
    PackedBatchLoader,
    iter_packed_batches,
    iter_padded_batches,
    make_jagged_batch,
    make_padded_batch,
)
from lumrec.data.packing import best_fit_decreasing, epoch_plan, history_windows, pack_sequences, padding_waste, truncate_spans
from lumrec.data.sequences import UserSequences, offsets_from_lengths
from lumrec.data.tokens import CONDITION, ITEM, TokenConfig, build_item_sequences, build_lum_tokens


def sequences_with_lengths(lengths: list[int] | np.ndarray, seed: int = 0) -> UserSequences:
    """UserSequences with the given events per user (0 allowed), random ids, increasing timestamps."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    n = int(lengths.sum())
    cols = {
        "item_id": rng.integers(1, 1000, n),
        "ts": np.arange(n, dtype=np.int64) * 10,
        "action": rng.integers(1, 4, n).astype(np.int32),
        "scenario": rng.integers(1, 3, n).astype(np.int32),
        "query_id": rng.integers(0, 50, n),
        "category_id": rng.integers(1, 20, n),
    }
    return UserSequences(user_ids=np.arange(len(lengths), dtype=np.int64) * 3 + 1, offsets=offsets_from_lengths(lengths), **cols)


def random_lengths(rng: np.random.Generator, n: int, max_len: int) -> np.ndarray:
    """Event counts with the edge cases forced in: 0, 1, max_len (in tokens for LUM: max_len/2 events), > max_len."""
    lengths = rng.integers(0, max_len + 8, n)
    lengths[:5] = [0, 1, max_len // 2, max_len, max_len + 3]
    return rng.permutation(lengths)


def lum_tokens(lengths, seed=0, **cfg):
    """LUM tokens of users with the given event counts."""
    return build_lum_tokens(sequences_with_lengths(lengths, seed), TokenConfig(condition_features=["scenario", "query_id"], include_actions=True, **cfg))


# -- truncation and bin packing -----------------------------------------------------------


def test_truncate_spans_never_orphans_an_item():
    tok = lum_tokens([3, 1, 5, 0])  # tokens 6, 2, 10, 0
    starts, lengths = truncate_spans(tok.offsets, tok.token_type, 5)
    # user 0: 6 tokens -> last 5 would start on an item, so keep 4; user 2: same
    assert lengths.tolist() == [4, 2, 4, 0]
    assert starts.tolist() == [2, 6, 14, 18]
    assert (tok.token_type[starts[lengths > 0]] == CONDITION).all()
    starts, lengths = truncate_spans(tok.offsets, tok.token_type, 6)
    assert lengths.tolist() == [6, 2, 6, 0] and starts.tolist() == [0, 6, 12, 18]
    # plain item sequences have no pairs: exactly the last max_len tokens
    items = build_item_sequences(sequences_with_lengths([3, 1, 5]), TokenConfig())
    starts, lengths = truncate_spans(items.offsets, items.token_type, 2)
    assert lengths.tolist() == [2, 1, 2] and starts.tolist() == [1, 3, 7]


def reference_windows(begin: int, end: int, token_type, max_len: int, lum: bool) -> list[tuple[int, int]]:
    """History windows of one sequence by a plain loop: [start, end) pairs, newest first."""
    windows = []
    while end - begin >= (1 if not windows else 2):
        start = max(end - max_len, begin)
        if lum and start > begin and token_type[start] == ITEM:
            start += 1  # never keep an item without its condition
        windows.append((start, end))
        end = start if lum else start + 1
    return windows


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["lum", "items"])
def test_history_windows_match_reference_and_cover_every_target_once(seed, kind):
    rng = np.random.default_rng(seed)
    max_len = int(rng.integers(2, 9))
    lengths = np.concatenate([[0, 1, max_len, max_len + 1], rng.integers(0, 5 * max_len, 20)])
    seqs = sequences_with_lengths(lengths, seed)
    tok = build_lum_tokens(seqs, TokenConfig()) if kind == "lum" else build_item_sequences(seqs, TokenConfig())
    rows, starts, lens = history_windows(tok.offsets, tok.token_type, max_len)
    expected = [(r, s, e - s) for r in range(len(tok)) for s, e in
                reference_windows(int(tok.offsets[r]), int(tok.offsets[r + 1]), tok.token_type, max_len, kind == "lum")]
    assert list(zip(rows.tolist(), starts.tolist(), lens.tolist())) == expected
    assert (lens <= max_len).all() and (lens >= 1).all()
    # The newest window of every non-empty sequence is the one "last" keeps.
    last_start, last_len = truncate_spans(tok.offsets, tok.token_type, max_len)
    newest = np.r_[True, rows[1:] != rows[:-1]]
    assert starts[newest].tolist() == last_start[last_len > 0].tolist()
    # Every target (an item token with a token before it in its sequence) is a target in exactly one window.
    hits = np.zeros(tok.num_tokens, dtype=np.int64)
    for s, n in zip(starts, lens):
        hits[s + 1 : s + n] += 1
    target = (tok.token_type == ITEM) & (tok.position > 0)
    assert (hits[target] == 1).all()
    if kind == "lum":  # pairs are never cut, and windows do not overlap
        assert (tok.token_type[starts] == CONDITION).all() and (lens % 2 == 0).all()
        assert lens.sum() == tok.num_tokens


def test_take_spans_copies_the_span_tokens_and_rejects_spans_outside_their_row():
    tok = lum_tokens([3, 0, 5])
    rows, starts, lens = history_windows(tok.offsets, tok.token_type, 4)
    windows = tok.take_spans(rows, starts, lens)
    assert windows.user_ids.tolist() == tok.user_ids[rows].tolist()
    assert windows.lengths().tolist() == lens.tolist()
    idx = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens)])
    assert windows.item_id.tolist() == tok.item_id[idx].tolist()
    assert windows.position.tolist() == tok.position[idx].tolist()
    for key in tok.keys:
        assert windows.dense_ids(key).tolist() == tok.dense_ids(key, idx).tolist()
    assert tok.take([2, 0]).item_id.tolist() == tok.item_id[np.r_[6:16, 0:6]].tolist()
    with pytest.raises(ValueError, match="span 0 .* outside row 1"):
        tok.take_spans(np.array([1]), np.array([0]), np.array([2]))


def test_best_fit_decreasing_fills_bins_and_is_deterministic():
    rng = np.random.default_rng(1)
    for cap in (7, 64, 256):
        lengths = rng.integers(1, cap + 1, 300)
        bins, n_bins = best_fit_decreasing(lengths, cap)
        load = np.bincount(bins, weights=lengths, minlength=n_bins)
        assert load.max() <= cap and (load > 0).all()
        assert n_bins <= np.ceil(lengths.sum() / cap) * 11 / 9 + 1  # FFD/BFD bound
        again, _ = best_fit_decreasing(lengths, cap)
        assert np.array_equal(bins, again)
    assert best_fit_decreasing(np.array([4, 3, 3, 2]), 6)[1] == 2  # 4+2, 3+3
    with pytest.raises(ValueError, match="lengths must be in"):
        best_fit_decreasing(np.array([7]), 6)


# -- packed batches vs the padded reference ----------------------------------------------


def per_user_tokens_packed(batches, tokens) -> dict[int, dict[str, list]]:
    """user id -> its tokens (features as seen by the model) from packed batches."""
    out: dict[int, dict[str, list]] = {}
    for b in batches:
        kjt = {k: v.to_dense() for k, v in b.kjt.to_dict().items()}
        off = b.offsets.tolist()
        for s, uid in enumerate(b.user_ids.tolist()):
            lo, hi = off[s], off[s + 1]
            assert uid not in out, "a sequence appears twice"
            out[uid] = {
                "token_index": b.token_index[lo:hi].tolist(),
                "token_type": b.token_type[lo:hi].tolist(),
                "position": b.position[lo:hi].tolist(),
                "item_id": b.item_id[lo:hi].tolist(),
                "ts": b.ts[lo:hi].tolist(),
                "action": b.action[lo:hi].tolist(),
                **{k: [t.tolist() for t in kjt[k][lo:hi]] for k in tokens.keys},
            }
    return out


def per_user_tokens_padded(batches, tokens) -> dict[int, dict[str, list]]:
    """user id -> its tokens from padded batches (same fields)."""
    out: dict[int, dict[str, list]] = {}
    for p in batches:
        kjt = {k: v.to_dense() for k, v in p.kjt.to_dict().items()}
        cursor = 0
        for r, uid in enumerate(p.user_ids.tolist()):
            m = p.mask[r]
            n = int(m.sum())
            assert m[:n].all() and not m[n:].any(), "padding must be on the right"
            out[uid] = {
                "token_index": p.token_index[r, :n].tolist(),
                "token_type": p.token_type[r, :n].tolist(),
                "position": p.position[r, :n].tolist(),
                "item_id": p.item_id[r, :n].tolist(),
                "ts": p.ts[r, :n].tolist(),
                "action": p.action[r, :n].tolist(),
                **{k: [t.tolist() for t in kjt[k][cursor : cursor + n]] for k in tokens.keys},
            }
            # the dense id grids agree with the KJT
            for k in tokens.keys:
                assert p.ids[k][r, :n].tolist() == [v[0] if v else 0 for v in out[uid][k]]
            cursor += n
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["lum", "items"])
def test_packed_and_padded_carry_the_same_tokens(seed, kind):
    rng = np.random.default_rng(seed)
    max_len = int(rng.choice([16, 21, 32]))  # an odd max_len exercises the pair boundary
    lengths = random_lengths(rng, 60, max_len)
    if kind == "lum":
        tokens = lum_tokens(lengths, seed)
    else:
        tokens = build_item_sequences(sequences_with_lengths(lengths, seed), TokenConfig(include_actions=True))
    packed = list(iter_packed_batches(tokens, max_len, rows_per_batch=4, shuffle_seed=seed, window=17))
    padded = list(iter_padded_batches(tokens, max_len, batch_size=5, shuffle_seed=seed))
    a, b = per_user_tokens_packed(packed, tokens), per_user_tokens_padded(padded, tokens)
    assert a == b
    # every kept token exactly once; empty users nowhere; the kept tokens are the most recent ones
    starts, kept = truncate_spans(tokens.offsets, tokens.token_type, max_len)
    expected = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, kept)])
    got = np.concatenate([bt.token_index.numpy() for bt in packed])
    assert np.array_equal(np.sort(got), expected)
    assert set(a) == set(tokens.user_ids[kept > 0].tolist())
    ends = tokens.offsets[1:]
    assert all(a[int(u)]["token_index"][-1] == ends[i] - 1 for i, u in enumerate(tokens.user_ids) if kept[i] > 0)
    for uid, t in a.items():
        assert t["position"] == list(range(len(t["position"])))
        if kind == "lum":
            assert t["token_type"][0] == CONDITION and t["token_type"][-1] == ITEM


@pytest.mark.parametrize("seed", [0, 3])
def test_packed_batch_metadata_is_consistent(seed):
    rng = np.random.default_rng(seed)
    max_len = 24
    tokens = lum_tokens(random_lengths(rng, 80, max_len), seed)
    plan = epoch_plan(tokens.offsets, tokens.token_type, max_len, shuffle_seed=seed, epoch=0, window=32)
    assert plan.row_lengths().max() <= max_len
    for batch in iter_packed_batches(tokens, max_len, rows_per_batch=3, shuffle_seed=seed, window=32):
        T, S, R = batch.num_tokens, batch.num_segments, batch.num_rows
        for t in (batch.offsets, batch.row_offsets, batch.segment_offsets):
            assert t.dtype == torch.int64 and t[0] == 0
        assert batch.offsets[-1] == T and batch.row_offsets[-1] == T and batch.segment_offsets[-1] == S
        row_len = batch.row_offsets.diff()
        assert (row_len <= max_len).all() and (row_len > 0).all()
        # row boundaries are segment boundaries
        assert torch.equal(batch.row_offsets, batch.offsets[batch.segment_offsets])
        # segment ids: within a row they count segments 0, 1, ... and change exactly at segment starts
        seg_of_token = torch.repeat_interleave(torch.arange(S), batch.lengths())
        row_of_seg = torch.repeat_interleave(torch.arange(R), batch.segment_offsets.diff())
        assert torch.equal(batch.segment_ids, seg_of_token - batch.segment_offsets[row_of_seg[seg_of_token]])
        row, col = batch.row_slots()
        assert (col < max_len).all() and torch.equal(row, row_of_seg[seg_of_token])
        assert batch.kjt.stride() == T and batch.max_seq_len() <= max_len
        assert batch.to("cpu").num_tokens == T


def test_dense_features_follow_tokens():
    tokens = lum_tokens([2, 5, 1])
    table = np.random.default_rng(0).standard_normal((1000, 3)).astype(np.float32)
    plan = pack_sequences(tokens.offsets, tokens.token_type, 8)
    batch = make_jagged_batch(tokens, plan, dense_table=table)
    items = batch.token_type == ITEM
    assert torch.equal(batch.dense[items], torch.from_numpy(table[batch.item_id[items].numpy()]))
    assert (batch.dense[~items] == 0).all()
    padded = make_padded_batch(tokens, [1], 8, dense_table=table)
    assert padded.dense.shape == (1, 8, 3) and (padded.dense[0][~padded.mask[0]] == 0).all()
    seg = batch.user_ids.tolist().index(int(tokens.user_ids[1]))
    lo, hi = batch.offsets[seg], batch.offsets[seg + 1]
    assert torch.equal(padded.dense[0][padded.mask[0]], batch.dense[lo:hi])


# -- determinism and resume -----------------------------------------------------------------


def batch_signature(batch) -> tuple:
    """What identifies a batch's content."""
    return (batch.token_index.tolist(), batch.offsets.tolist(), batch.row_offsets.tolist(), batch.kjt.values().tolist())


def test_iteration_is_deterministic_and_resumable():
    rng = np.random.default_rng(7)
    tokens = lum_tokens(random_lengths(rng, 120, 32), 7)
    run = lambda **kw: [batch_signature(b) for b in iter_packed_batches(tokens, 32, 5, shuffle_seed=11, window=40, **kw)]
    first, again = run(epoch=0), run(epoch=0)
    assert first == again and len(first) > 4
    assert run(epoch=1) != first  # a new epoch reshuffles
    for k in (0, 1, len(first) - 1, len(first)):
        assert run(epoch=0, start_batch=k) == first[k:]
    with pytest.raises(ValueError, match="start_batch"):
        run(epoch=0, start_batch=len(first) + 1)
    unshuffled = [batch_signature(b) for b in iter_packed_batches(tokens, 32, 5, shuffle_seed=None)]
    assert unshuffled == [batch_signature(b) for b in iter_packed_batches(tokens, 32, 5, shuffle_seed=None)]


def test_loader_state_dict_resumes_exactly():
    tokens = lum_tokens(random_lengths(np.random.default_rng(5), 90, 20), 5)
    loader = PackedBatchLoader(tokens, 20, 4, shuffle_seed=3, window=25)
    n = len(loader)
    full = [batch_signature(b) for b in loader] + [batch_signature(b) for b in loader]  # epochs 0 and 1
    assert loader.state_dict() == {"epoch": 2, "batch": 0}
    fresh = PackedBatchLoader(tokens, 20, 4, shuffle_seed=3, window=25)
    it = iter(fresh)
    head = [batch_signature(next(it)) for _ in range(3)]
    state = fresh.state_dict()
    assert state == {"epoch": 0, "batch": 3}
    resumed = PackedBatchLoader(tokens, 20, 4, shuffle_seed=3, window=25)
    resumed.load_state_dict(state)
    rest = [batch_signature(b) for b in resumed] + [batch_signature(b) for b in resumed]
    assert head + rest == full and len(full) == 2 * n


def test_packing_beats_padding():
    rng = np.random.default_rng(0)
    tokens = lum_tokens(rng.integers(1, 200, 300), 0)
    plan = epoch_plan(tokens.offsets, tokens.token_type, 256, shuffle_seed=0, window=None)
    _, kept = truncate_spans(tokens.offsets, tokens.token_type, 256)
    packed = padding_waste(plan.row_lengths(), 256)
    padded = padding_waste(kept, 256)
    assert packed < 0.05 < padded
    assert plan.num_tokens == kept.sum()


@pytest.mark.parametrize("extra", [0, 5, 40])
def test_pack_with_extra_per_sequence_keeps_history_plus_queries_in_budget(extra):
    rng = np.random.default_rng(extra)
    lengths = rng.integers(0, 30, size=200)
    offsets = offsets_from_lengths(lengths)
    plan = pack_sequences(offsets, None, 32, extra_per_sequence=extra)
    assert sorted(plan.seq_index.tolist()) == np.flatnonzero(lengths > 0).tolist()  # every non-empty sequence once
    per_row = np.diff(plan.row_offsets)  # sequences per row
    row = np.repeat(np.arange(len(per_row)), per_row)
    merged = np.bincount(row, weights=plan.lengths + extra, minlength=len(per_row))
    assert merged.max() <= 32 + extra and np.bincount(row, weights=plan.lengths).max() <= 32
    if extra >= 32:  # the queries dominate: one user per row, no row holds several users' queries
        assert per_row.max() == 1
