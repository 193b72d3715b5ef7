"""LUM step 2, grouped knowledge query: N query condition tokens after each user's history, in ONE pass.

For every user (segment) the merged sequence is

    [h_1, ..., h_k, c_q1, c_q2, ..., c_qN]

with `query_flags=True` on the `c_q` tokens, so each query attends to the history and to itself,
never to another query, and no history token sees a query (``lumrec.modules.ops``). The
history's hidden states are therefore computed once and are exactly those of a plain pass, and
query j's output equals a separate pass over `[h_1..h_k, c_qj]` when every query also takes

- position `k` (the history length): the slot a single appended condition token would have;
- timestamp `as_of` (the as-of time): HSTU's relative bias sees every query as "the next event".

History truncation: a history keeps its most recent `max_len - 1` tokens (`max_history`), never
starting on an item whose condition token was cut. One slot is enough for the queries because
they share position `k`, so the answers do not depend on how many conditions were asked (a
knowledge vector for `category_id=5` is the same in a run with 4 conditions and one with 40),
and each equals the model's output on a legal `max_len`-token sequence. The merged segment
has `k + N` tokens; only positions (all `< max_len`) bound the model, not the segment length.

Exactness caveat: an HSTU backbone with `hstu.normaliser="length"` divides by the segment
length, which counts the other queries; grouped then differs from separate passes, so
``grouped_query`` refuses N > 1 there (use ``separate_queries``). The softmax transformer and
HSTU with a constant normaliser (the default, `max_len`) are exact.

Why a mask and no KV cache: with the mask, the extra work over one plain pass is each query
row attending to `k` keys (`O(N k)` per layer) plus `N^2` masked pairs in the padded block, versus
`N` full passes (`O(N k^2)`) without grouping; a KV cache would save only the masked query-query
block and the history's recomputation inside the same pass, which the mask already avoids
(``benchmarks/grouped_query.py`` measures the ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.profiler import record_function

from lumrec.data.batches import JaggedBatch
from lumrec.data.tokens import CONDITION, CONSTANT_CONDITION_KEY, ITEM, condition_key
from lumrec.knowledge.conditions import Condition, ConditionLike, parse_conditions
from lumrec.modules.ops import lengths_to_offsets, ranges_to_indices
from lumrec.modules.retrieval.lum import LUM

__all__ = [
    "CONSTANT_FEATURE",
    "UNCONDITIONED_FEATURE",
    "GroupedQuery",
    "GroupedQueryLayout",
    "as_conditions",
    "build_grouped_query_layout",
    "condition_features",
    "condition_query_embeddings",
    "default_max_history",
    "grouped_query",
    "grouped_query_supported",
    "query_encode",
    "separate_queries",
]

# The feature name of LUM's constant condition (`cond_const`, trained with id 1).
CONSTANT_FEATURE = "const"
# `none=0`: a condition token with every condition feature left empty, the unconditional question
# "what next, whatever the context". In distribution for a LUM trained with
# `data.condition_dropout > 0`, which empties condition features of random training events.
UNCONDITIONED_FEATURE = "none"


def as_conditions(conditions: Iterable[ConditionLike]) -> list[Condition]:
    """Normalise `[("category_id", 5), "scenario=2", Condition(...)]` to a list of `Condition` (``parse_conditions``' rules)."""
    out = parse_conditions(conditions, source="grouped query")
    if not out:
        raise ValueError("grouped query: no conditions given")
    return out


def _condition_key_of(lum: LUM, feature: str) -> str | None:
    """The KJT key of condition feature `feature` in `lum` (None for `none`); unknown features raise naming the model's keys."""
    if feature == UNCONDITIONED_FEATURE:
        return None
    key = CONSTANT_CONDITION_KEY if feature == CONSTANT_FEATURE else condition_key(feature)
    keys = list(lum.encoder.config.condition_keys)
    if key not in keys:
        raise ValueError(
            f"grouped query: condition feature {feature!r} (key {key!r}) is not a condition of this LUM; "
            f"its condition keys are {keys} (feature = key without 'cond_'; 'const' for cond_const; 'none' for no condition)"
        )
    return key


def condition_features(lum: LUM) -> list[str]:
    """The condition features `lum` can be queried with (its condition keys without `cond_`; `const` for `cond_const`; `none`)."""
    return [
        CONSTANT_FEATURE if key == CONSTANT_CONDITION_KEY else key.removeprefix("cond_")
        for key in lum.encoder.config.condition_keys
    ] + [UNCONDITIONED_FEATURE]


def condition_query_embeddings(lum: LUM, conditions: Sequence[ConditionLike]) -> torch.Tensor:
    """Condition-token embeddings `[N, d_model]`: one token per (feature, value), other condition features left empty.

    A query sets only its own feature (the others pool to zero); `("const", v)` is the constant
    condition token, id 1 as in training, whatever `v`; `("none", 0)` sets no feature at all
    (on a constant-condition LUM it is the constant token).
    """
    conds = as_conditions(conditions)
    n = len(conds)
    keys = [_condition_key_of(lum, c.feature) for c in conds]
    device = lum.final_norm.weight.device
    values = torch.tensor([c.value for c in conds], dtype=torch.int64, device=device)
    given: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in lum.encoder.config.condition_keys:
        if key == CONSTANT_CONDITION_KEY:
            continue  # the encoder fills in id 1 for every token
        mine = torch.tensor([k == key for k in keys], dtype=torch.bool, device=device)
        given[key] = (mine.to(torch.int32), values[mine])
    return lum.condition_embeddings(given, num_tokens=n)


def default_max_history(lum: LUM) -> int:
    """History tokens kept before the queries: `max_len - 1`, so the shared query position `k` fits the model."""
    return lum.config.max_len - 1


def grouped_query_supported(lum: LUM) -> bool:
    """False when grouped answers would differ from separate passes (HSTU with a per-length normaliser)."""
    return not (lum.config.backbone == "hstu" and lum.config.hstu.normaliser == "length")


@dataclass
class GroupedQueryLayout:
    """Where each kept history token and each query token goes in the merged `[history, queries]` sequences.

    Example::

        >>> layout = build_grouped_query_layout(torch.tensor([0, 3, 3, 4]), num_queries=2, max_history=8)
        >>> layout.offsets.tolist(), layout.query_slots.tolist()
        ([0, 5, 7, 10], [[3, 4], [5, 6], [8, 9]])
        >>> layout.positions.tolist()       # queries share position k (the history length)
        [0, 1, 2, 3, 3, 0, 0, 0, 1, 1]
    """

    offsets: torch.Tensor  # [S+1] merged segment offsets (kept history + N queries)
    row_offsets: torch.Tensor  # [R+1] merged row offsets (rows keep the source packing)
    segment_ids: torch.Tensor  # [T'] index of each token's segment inside its row
    positions: torch.Tensor  # [T'] index inside the segment; queries: the kept history length
    query_flags: torch.Tensor  # [T'] bool, True on query tokens
    history_index: torch.Tensor  # [H] source token index of every kept history token
    history_slots: torch.Tensor  # [H] its slot in the merged sequence
    query_slots: torch.Tensor  # [S, N] slot of every query token
    history_lengths: torch.Tensor  # [S] kept history tokens per segment

    @property
    def num_tokens(self) -> int:
        """T', tokens of the merged batch."""
        return int(self.offsets[-1])


def build_grouped_query_layout(
    offsets: torch.Tensor,
    num_queries: int,
    max_history: int,
    token_type: torch.Tensor | None = None,
    segment_offsets: torch.Tensor | None = None,
) -> GroupedQueryLayout:
    """Plan the merged batch: per segment of `offsets` (may be empty) its last `max_history` tokens, then `num_queries` query slots.

    `token_type` (0 condition / 1 item) keeps a cut history from starting on an item whose
    condition was dropped; `segment_offsets [R+1]` groups segments into packed rows (default: one per row).
    """
    if num_queries < 1:
        raise ValueError(f"grouped query: num_queries must be >= 1, got {num_queries}")
    if max_history < 0:
        raise ValueError(f"grouped query: max_history must be >= 0, got {max_history}")
    offsets = offsets.to(torch.int64)
    device = offsets.device
    lengths = offsets[1:] - offsets[:-1]
    num_segments = lengths.numel()
    keep = lengths.clamp(max=max_history)
    start = offsets[1:] - keep
    if token_type is not None and token_type.numel():
        cut = (keep < lengths) & (keep > 0)
        probe = start.clamp(min=1, max=max(token_type.numel() - 1, 1))
        orphan = cut & (token_type[probe] == ITEM) & (token_type[probe - 1] == CONDITION)
        start = start + orphan.to(torch.int64)
        keep = keep - orphan.to(torch.int64)
    merged_lengths = keep + num_queries
    merged_offsets = lengths_to_offsets(merged_lengths)
    total = int(merged_offsets[-1])
    seg_start = merged_offsets[:-1]
    history_index = ranges_to_indices(start, keep)
    history_slots = ranges_to_indices(seg_start, keep)
    query_slots = (seg_start + keep)[:, None] + torch.arange(num_queries, device=device)[None, :]
    positions = torch.arange(total, device=device) - torch.repeat_interleave(seg_start, merged_lengths, output_size=total)
    positions[query_slots.reshape(-1)] = keep.repeat_interleave(num_queries)
    query_flags = torch.zeros(total, dtype=torch.bool, device=device)
    query_flags[query_slots.reshape(-1)] = True
    if segment_offsets is None:
        segment_offsets = torch.arange(num_segments + 1, device=device)
    segment_offsets = segment_offsets.to(torch.int64)
    if int(segment_offsets[-1]) != num_segments:
        raise ValueError(f"grouped query: segment_offsets cover {int(segment_offsets[-1])} segments, offsets have {num_segments}")
    per_row = segment_offsets[1:] - segment_offsets[:-1]
    seg_in_row = torch.arange(num_segments, device=device) - torch.repeat_interleave(segment_offsets[:-1], per_row, output_size=num_segments)
    return GroupedQueryLayout(
        offsets=merged_offsets,
        row_offsets=merged_offsets[segment_offsets],
        segment_ids=torch.repeat_interleave(seg_in_row, merged_lengths, output_size=total),
        positions=positions,
        query_flags=query_flags,
        history_index=history_index,
        history_slots=history_slots,
        query_slots=query_slots,
        history_lengths=keep,
    )


def _query_timestamps(
    as_of_ts: torch.Tensor | int | None, history_ts: torch.Tensor | None, layout: GroupedQueryLayout, device: torch.device
) -> torch.Tensor:
    """`[S]` timestamp of each segment's queries: `as_of_ts`, else the last kept history event's (0 when empty)."""
    num_segments = layout.history_lengths.numel()
    if as_of_ts is not None:
        ts = torch.as_tensor(as_of_ts, dtype=torch.int64, device=device)
        if ts.dim() == 0:
            return ts.expand(num_segments)
        if ts.shape != (num_segments,):
            raise ValueError(f"grouped query: as_of_ts must be a scalar or [{num_segments}] (one per user), got {tuple(ts.shape)}")
        return ts
    last = layout.history_slots.new_zeros(num_segments)
    if history_ts is None or layout.history_index.numel() == 0:
        return last
    has = layout.history_lengths > 0
    ends = layout.offsets[:-1] + layout.history_lengths - 1  # merged slot of the last history token
    merged = torch.zeros(layout.num_tokens, dtype=torch.int64, device=device)
    merged[layout.history_slots] = history_ts[layout.history_index].to(torch.int64)
    return torch.where(has, merged[ends.clamp(min=0)], last)


def query_encode(
    lum: LUM,
    history_x: torch.Tensor,
    layout: GroupedQueryLayout,
    query_x: torch.Tensor,
    history_ts: torch.Tensor | None = None,
    as_of_ts: torch.Tensor | int | None = None,
    use_query_flags: bool = True,
) -> torch.Tensor:
    """Run `lum` over the merged sequences of `layout`; returns the hidden state of every query token `[S, N, d_model]`.

    `history_x [T, d]`: source token embeddings; `query_x`: `[N, d]` (same queries for all) or
    `[S, N, d]`; `history_ts [T]` and `as_of_ts` (scalar or `[S]`) feed HSTU's time bias.
    """
    num_segments, n = layout.query_slots.shape
    d = history_x.shape[1]
    if query_x.dim() == 2:
        query_x = query_x[None].expand(num_segments, n, d)
    if query_x.shape != (num_segments, n, d):
        raise ValueError(f"grouped query: query embeddings must be [{n}, {d}] or [{num_segments}, {n}, {d}], got {tuple(query_x.shape)}")
    device = history_x.device
    with record_function("grouped_query/merge"):
        x = history_x.new_zeros(layout.num_tokens, d)
        x = x.index_copy(0, layout.history_slots, history_x[layout.history_index])
        x = x.index_copy(0, layout.query_slots.reshape(-1), query_x.reshape(-1, d).to(x.dtype))
        timestamps = None
        if history_ts is not None or as_of_ts is not None:
            timestamps = torch.zeros(layout.num_tokens, dtype=torch.int64, device=device)
            if history_ts is not None:
                timestamps[layout.history_slots] = history_ts[layout.history_index].to(torch.int64)
            q_ts = _query_timestamps(as_of_ts, history_ts, layout, device)
            timestamps[layout.query_slots.reshape(-1)] = q_ts.repeat_interleave(n)
    with record_function("grouped_query/encode"):
        hidden = lum.encode(
            x, layout.row_offsets, segment_ids=layout.segment_ids, positions=layout.positions,
            timestamps=timestamps, query_flags=layout.query_flags if use_query_flags else None,
        )
    return hidden[layout.query_slots]


def _batch_history(lum: LUM, batch: JaggedBatch) -> torch.Tensor:
    with record_function("grouped_query/embed_history"):
        return lum.embed(batch)


def grouped_query(
    lum: LUM,
    batch: JaggedBatch,
    conditions: Sequence[ConditionLike],
    as_of_ts: torch.Tensor | int | None = None,
    max_history: int | None = None,
) -> torch.Tensor:
    """Answers `o_q [S, N, d_model]` of every user (segment) of `batch` under every condition, in one pass.

    `batch`: packed or unpacked `JaggedBatch` of histories; `as_of_ts`: the queries' timestamp
    (scalar or per user; default each user's last event time); `max_history`: default `max_len - 1`.
    """
    conds = as_conditions(conditions)
    if len(conds) > 1 and not grouped_query_supported(lum):
        raise ValueError(
            "grouped query: this LUM's HSTU backbone uses hstu.normaliser='length', which scales each query by "
            "the whole segment's length (history + all queries); use separate_queries for exact answers"
        )
    layout = build_grouped_query_layout(
        batch.offsets, len(conds), default_max_history(lum) if max_history is None else max_history,
        token_type=batch.token_type, segment_offsets=batch.segment_offsets,
    )
    query_x = condition_query_embeddings(lum, conds)
    return query_encode(lum, _batch_history(lum, batch), layout, query_x, batch.ts, as_of_ts)


def separate_queries(
    lum: LUM,
    batch: JaggedBatch,
    conditions: Sequence[ConditionLike],
    as_of_ts: torch.Tensor | int | None = None,
    max_history: int | None = None,
) -> torch.Tensor:
    """The plain reference of ``grouped_query``: N passes, pass j = each history + condition j alone (no query mask)."""
    conds = as_conditions(conditions)
    layout = build_grouped_query_layout(
        batch.offsets, 1, default_max_history(lum) if max_history is None else max_history,
        token_type=batch.token_type, segment_offsets=batch.segment_offsets,
    )
    query_x = condition_query_embeddings(lum, conds)
    outs = []
    for j in range(len(conds)):
        # The history is embedded again in every pass, as N independent requests would.
        history_x = _batch_history(lum, batch)
        outs.append(query_encode(lum, history_x, layout, query_x[j : j + 1], batch.ts, as_of_ts, use_query_flags=False))
    return torch.cat(outs, dim=1)


class GroupedQuery(nn.Module):
    """Knowledge querying of a LUM under fixed conditions: `forward(batch, as_of_ts) -> o_q [S, N, d_model]`.

    Example::

        >>> from lumrec.modules.retrieval.lum import LUMConfig
        >>> from lumrec.modules.layers.token_encoder import FeatureTableConfig, ItemFeatureLookup, TokenEncoderConfig
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> _ = torch.manual_seed(0)
        >>> enc = TokenEncoderConfig([FeatureTableConfig("t_scenario", 3, 4, ["cond_scenario"]),
        ...                           FeatureTableConfig("t_item", 10, 4, ["item_id"])],
        ...                          ["cond_scenario"], ["item_id"], d_model=8)
        >>> lum = LUM(LUMConfig(d_model=8, num_layers=1, num_heads=2, ffn_dim=16, max_len=8), enc, ItemFeatureLookup(10)).eval()
        >>> kjt = KeyedJaggedTensor(keys=enc.keys, values=torch.tensor([1, 2, 5, 7]),   # two users: [c, i] each
        ...                         lengths=torch.tensor([1, 0, 1, 0, 0, 1, 0, 1], dtype=torch.int32), stride=4)
        >>> batch = JaggedBatch(offsets=torch.tensor([0, 2, 4]), row_offsets=torch.tensor([0, 4]),
        ...     segment_offsets=torch.tensor([0, 2]), segment_ids=torch.tensor([0, 0, 1, 1]),
        ...     token_type=torch.tensor([0, 1, 0, 1]), position=torch.tensor([0, 1, 0, 1]), item_id=torch.tensor([0, 5, 0, 7]),
        ...     kjt=kjt, user_ids=torch.tensor([3, 4]), seq_index=torch.tensor([0, 1]), token_index=torch.arange(4), max_len=8)
        >>> query = GroupedQuery(lum, [("scenario", 1), ("scenario", 2)])
        >>> with torch.no_grad():
        ...     o_q = query(batch)
        >>> o_q.shape, bool(torch.allclose(o_q, query.reference(batch), atol=1e-6))
        (torch.Size([2, 2, 8]), True)
    """

    def __init__(
        self, lum: LUM, conditions: Sequence[ConditionLike], max_history: int | None = None
    ) -> None:
        super().__init__()
        self.lum = lum
        self.conditions = as_conditions(conditions)
        for c in self.conditions:
            _condition_key_of(lum, c.feature)  # fail at construction on unknown features
        self.max_history = max_history

    def forward(self, batch: JaggedBatch, as_of_ts: torch.Tensor | int | None = None) -> torch.Tensor:
        """`o_q [S, N, d_model]` in one pass (query tokens masked from each other)."""
        return grouped_query(self.lum, batch, self.conditions, as_of_ts, self.max_history)

    def reference(self, batch: JaggedBatch, as_of_ts: torch.Tensor | int | None = None) -> torch.Tensor:
        """The same answers by N separate passes (for tests and benchmarks)."""
        return separate_queries(self.lum, batch, self.conditions, as_of_ts, self.max_history)
