"""Training batches as torch tensors: packed jagged batches (the fast path) and padded batches (the plain reference).

A ``JaggedBatch`` keeps all its tokens flattened in one dimension. Every sequence is a
*segment* with ``offsets`` (int64, as fbgemm's jagged ops expect); segments are also
grouped into packed rows of at most ``max_len`` tokens (``row_offsets``), with
``segment_ids`` saying which segment of its row each token belongs to, so that a dense
kernel working on rows can keep attention inside a sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.data.packing import PackPlan, epoch_plan, epoch_rng, truncate_rows
from lumrec.data.sequences import offsets_from_lengths, ragged_arange
from lumrec.data.tokens import TokenSequences, attach_dense, kjt_at


def _t(x: np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A torch tensor of `dtype` from a numpy array (no copy when the dtype already matches)."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


@dataclass
class JaggedBatch:
    """Packed tokens of several sequences, flattened: T tokens, S segments (sequences), R packed rows."""

    offsets: torch.Tensor  # int64 (S+1,): segment s is tokens [offsets[s], offsets[s+1])
    row_offsets: torch.Tensor  # int64 (R+1,): packed row r is tokens [row_offsets[r], row_offsets[r+1])
    segment_offsets: torch.Tensor  # int64 (R+1,): row r holds segments [segment_offsets[r], segment_offsets[r+1])
    segment_ids: torch.Tensor  # int64 (T,): index of the token's segment inside its row
    token_type: torch.Tensor  # int64 (T,): 0 condition, 1 item
    position: torch.Tensor  # int64 (T,): position inside its segment (0 = oldest kept token)
    item_id: torch.Tensor  # int64 (T,): target item of item tokens, 0 on condition tokens
    kjt: KeyedJaggedTensor  # sparse features, stride T
    user_ids: torch.Tensor  # int64 (S,)
    seq_index: torch.Tensor  # int64 (S,): row of each segment in the source TokenSequences
    token_index: torch.Tensor  # int64 (T,): flat index of each token in the source TokenSequences
    max_len: int
    ts: torch.Tensor | None = None  # int64 (T,)
    action: torch.Tensor | None = None  # int64 (T,)
    dense: torch.Tensor | None = None  # float32 (T, d): item features, zeros on condition tokens
    # A stand-in for a rank's empty slice of a global batch (`iter_packed_batches(part=...)`): one
    # token, hence no query; it runs only so that the rank takes part in the collectives.
    padding: bool = False

    @property
    def num_tokens(self) -> int:
        """T."""
        return int(self.token_type.numel())

    @property
    def num_segments(self) -> int:
        """S."""
        return int(self.user_ids.numel())

    @property
    def num_rows(self) -> int:
        """R."""
        return int(self.row_offsets.numel()) - 1

    def lengths(self) -> torch.Tensor:
        """Tokens per segment."""
        return self.offsets[1:] - self.offsets[:-1]

    def max_seq_len(self) -> int:
        """Longest segment (what fbgemm's jagged kernels take as max_seq_len)."""
        return int(self.lengths().max()) if self.num_segments else 0

    def row_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of every token in the `R x max_len` packed-row layout."""
        row_len = self.row_offsets[1:] - self.row_offsets[:-1]
        row = torch.repeat_interleave(torch.arange(self.num_rows), row_len)
        col = torch.arange(self.num_tokens) - self.row_offsets[:-1][row]
        return row, col

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "JaggedBatch":
        """The same batch with every tensor on `device`."""
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, KeyedJaggedTensor)):
                moved[f.name] = value.to(device, non_blocking=non_blocking)
        return replace(self, **moved)


def make_jagged_batch(tokens: TokenSequences, plan: PackPlan, dense_table: np.ndarray | None = None) -> JaggedBatch:
    """Materialise the packed rows of `plan` as a JaggedBatch (KJT, jagged metadata, optional dense features)."""
    idx = plan.token_index()
    seg_first_pos = tokens.position[plan.starts]
    # Positions restart at 0 in each segment, so a truncated sequence still fits a max_len position table.
    position = tokens.position[idx] - np.repeat(seg_first_pos, plan.lengths)
    seg_tok = offsets_from_lengths(plan.lengths)
    return JaggedBatch(
        offsets=_t(seg_tok),
        row_offsets=_t(seg_tok[plan.row_offsets]),
        segment_offsets=_t(plan.row_offsets),
        segment_ids=_t(plan.segment_ids()),
        token_type=_t(tokens.token_type[idx]),
        position=_t(position),
        item_id=_t(tokens.item_id[idx]),
        kjt=kjt_at(tokens, idx),
        user_ids=_t(tokens.user_ids[plan.seq_index]),
        seq_index=_t(plan.seq_index),
        token_index=_t(idx),
        max_len=plan.max_len,
        ts=None if tokens.ts is None else _t(tokens.ts[idx]),
        action=None if tokens.action is None else _t(tokens.action[idx]),
        dense=None if dense_table is None else torch.from_numpy(attach_dense(tokens, dense_table, idx)),
    )


@dataclass
class PaddedBatch:
    """One sequence per row, right-padded to `L` slots: the plain reference layout (`B x L` + mask)."""

    mask: torch.Tensor  # bool (B, L): True on real tokens
    token_index: torch.Tensor  # int64 (B, L): flat token index in the source TokenSequences, -1 on padding
    token_type: torch.Tensor  # int64 (B, L); padding -1
    position: torch.Tensor  # int64 (B, L); padding 0
    item_id: torch.Tensor  # int64 (B, L); padding 0
    ids: dict[str, torch.Tensor]  # KJT key -> int64 (B, L): the token's (first) id, 0 on padding / tokens without it
    kjt: KeyedJaggedTensor  # the real tokens, row-major, stride = number of real tokens
    user_ids: torch.Tensor  # int64 (B,)
    seq_index: torch.Tensor  # int64 (B,)
    ts: torch.Tensor | None = None  # int64 (B, L)
    action: torch.Tensor | None = None  # int64 (B, L)
    dense: torch.Tensor | None = None  # float32 (B, L, d)

    def lengths(self) -> torch.Tensor:
        """Real tokens per row."""
        return self.mask.sum(dim=1)


def make_padded_batch(
    tokens: TokenSequences,
    rows: Sequence[int] | np.ndarray,
    max_len: int,
    dense_table: np.ndarray | None = None,
    pad_to_longest: bool = False,
) -> PaddedBatch:
    """Sequences `rows` (truncated like packing does), one per row, padded to max_len (or to the longest one)."""
    rows = np.asarray(rows, dtype=np.int64)
    starts, lengths = truncate_rows(tokens.offsets[rows], tokens.offsets[rows + 1], tokens.token_type, max_len)
    width = int(lengths.max()) if (pad_to_longest and len(rows)) else max_len
    idx = ragged_arange(starts, lengths)
    b = np.repeat(np.arange(len(rows)), lengths)
    col = np.arange(len(idx)) - np.repeat(offsets_from_lengths(lengths)[:-1], lengths)

    def grid(values: np.ndarray, fill: int | float, dtype: Any = np.int64) -> torch.Tensor:
        out = np.full((len(rows), width), fill, dtype=dtype)
        out[b, col] = values
        return torch.from_numpy(out)

    position = tokens.position[idx] - np.repeat(tokens.position[starts], lengths)
    dense = None
    if dense_table is not None:
        per_token = attach_dense(tokens, dense_table, idx)
        out = np.zeros((len(rows), width, per_token.shape[1]), dtype=np.float32)
        out[b, col] = per_token
        dense = torch.from_numpy(out)
    return PaddedBatch(
        mask=grid(np.ones(len(idx), bool), False, bool),
        token_index=grid(idx, -1),
        token_type=grid(tokens.token_type[idx], -1),
        position=grid(position, 0),
        item_id=grid(tokens.item_id[idx], 0),
        ids={k: grid(tokens.dense_ids(k, idx), 0) for k in tokens.keys},
        kjt=kjt_at(tokens, idx),
        user_ids=_t(tokens.user_ids[rows]),
        seq_index=_t(rows),
        ts=None if tokens.ts is None else grid(tokens.ts[idx], 0),
        action=None if tokens.action is None else grid(tokens.action[idx], 0),
        dense=dense,
    )


def num_packed_batches(plan: PackPlan, rows_per_batch: int, drop_last: bool = False) -> int:
    """How many batches of `rows_per_batch` rows a plan makes."""
    full, rest = divmod(plan.num_rows, rows_per_batch)
    return full + (1 if rest and not drop_last else 0)


def check_part(part: tuple[int, int] | None) -> None:
    """`part` must be None or (rank, world_size) with 0 <= rank < world_size."""
    if part is None:
        return
    rank, world = part
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"part must be (rank, world_size) with 0 <= rank < world_size, got {part}")


def part_rows(lo: int, hi: int, part: tuple[int, int] | None) -> tuple[int, int]:
    """This rank's contiguous share of the global rows [lo, hi); shares differ by at most one row.

    A rank gets no row when the global batch has fewer rows than there are ranks (an epoch's
    last, short batch, or rows_per_batch < world size): its share is then the empty range.
    """
    if part is None:
        return lo, hi
    rank, world = part
    n = hi - lo
    return lo + n * rank // world, lo + n * (rank + 1) // world


def _stand_in(plan: PackPlan, row: int) -> PackPlan:
    """The first token of packed row `row` as a one-row plan: a batch with no query (a query needs a next token)."""
    first = int(plan.row_offsets[row])
    return PackPlan(plan.max_len, plan.seq_index[first : first + 1], plan.starts[first : first + 1],
                    np.ones(1, dtype=np.int64), np.array([0, 1], dtype=np.int64))


def iter_packed_batches(
    tokens: TokenSequences,
    max_len: int,
    rows_per_batch: int,
    shuffle_seed: int | None = None,
    epoch: int = 0,
    start_batch: int = 0,
    window: int | None = 4096,
    dense_table: np.ndarray | None = None,
    drop_last: bool = False,
    part: tuple[int, int] | None = None,
) -> Iterator[JaggedBatch]:
    """Packed batches of one epoch, deterministic per (shuffle_seed, epoch); starts at batch `start_batch` (exact resume).

    The whole epoch's plan is recomputed (cheap: index arithmetic and one bin-packing pass),
    so batch k is the same whether the epoch started at 0 or resumed at k. `part` =
    (rank, world_size): each global batch of `rows_per_batch` rows is cut into world_size
    contiguous slices and only this rank's is materialised (`part_rows`); every rank yields
    the same number of batches. A rank whose slice is empty gets a one-token stand-in with
    `padding=True` (no query), so that it still runs the step's collectives.
    """
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    check_part(part)
    plan = epoch_plan(tokens.offsets, tokens.token_type, max_len, shuffle_seed, epoch, window)
    n_batches = num_packed_batches(plan, rows_per_batch, drop_last)
    if not 0 <= start_batch <= n_batches:
        raise ValueError(f"start_batch {start_batch} outside [0, {n_batches}] for this epoch")
    for k in range(start_batch, n_batches):
        first = k * rows_per_batch
        lo, hi = part_rows(first, min(first + rows_per_batch, plan.num_rows), part)
        if lo == hi:
            batch = make_jagged_batch(tokens, _stand_in(plan, first), dense_table)
            batch.padding = True
            yield batch
        else:
            yield make_jagged_batch(tokens, plan.rows(lo, hi), dense_table)


def iter_padded_batches(
    tokens: TokenSequences,
    max_len: int,
    batch_size: int,
    shuffle_seed: int | None = None,
    epoch: int = 0,
    start_batch: int = 0,
    dense_table: np.ndarray | None = None,
    pad_to_longest: bool = False,
) -> Iterator[PaddedBatch]:
    """Padded batches of `batch_size` sequences (empty ones skipped), deterministic per (shuffle_seed, epoch)."""
    rng = epoch_rng(shuffle_seed, epoch)
    order = rng.permutation(len(tokens)) if rng is not None else np.arange(len(tokens))
    order = order[tokens.lengths()[order] > 0]
    for k in range(start_batch, -(-len(order) // batch_size)):
        yield make_padded_batch(tokens, order[k * batch_size : (k + 1) * batch_size], max_len, dense_table, pad_to_longest)


class PackedBatchLoader:
    """Iterates packed batches epoch after epoch and remembers (epoch, next batch) for checkpoints.

    `rows_per_batch` is the global batch; with `part` = (rank, world_size) each rank yields its
    slice of every global batch (see `iter_packed_batches`), and (epoch, batch) count global
    batches, so every rank's loader stands at the same place.
    """

    def __init__(
        self,
        tokens: TokenSequences,
        max_len: int,
        rows_per_batch: int,
        shuffle_seed: int | None = 0,
        window: int | None = 4096,
        dense_table: np.ndarray | None = None,
        drop_last: bool = False,
        part: tuple[int, int] | None = None,
    ):
        check_part(part)
        self.tokens, self.max_len, self.rows_per_batch = tokens, max_len, rows_per_batch
        self.shuffle_seed, self.window, self.dense_table, self.drop_last = shuffle_seed, window, dense_table, drop_last
        self.part = part
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        """Batches in the current epoch."""
        plan = epoch_plan(self.tokens.offsets, self.tokens.token_type, self.max_len, self.shuffle_seed, self.epoch, self.window)
        return num_packed_batches(plan, self.rows_per_batch, self.drop_last)

    def __iter__(self) -> Iterator[JaggedBatch]:
        """The rest of the current epoch; afterwards the loader points at the next epoch's first batch."""
        for batch in iter_packed_batches(
            self.tokens, self.max_len, self.rows_per_batch, self.shuffle_seed, self.epoch, self.batch, self.window,
            self.dense_table, self.drop_last, self.part,
        ):
            self.batch += 1
            yield batch
        self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """Where the loader stands: the epoch and the index of the next batch."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved (epoch, batch)."""
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


__all__ = [
    "JaggedBatch",
    "PackedBatchLoader",
    "PaddedBatch",
    "iter_packed_batches",
    "iter_padded_batches",
    "make_jagged_batch",
    "make_padded_batch",
    "num_packed_batches",
    "part_rows",
]
