"""GPT-style packing: several users' token sequences share rows of `max_len` tokens, attention kept per sequence.

Algorithm: **best-fit decreasing within a window**. The (shuffled) stream of sequences is
cut into windows of `window` sequences; each window is sorted by length (longest first,
stable) and every sequence goes into the open row whose free space is the smallest that
still fits it, else into a new row. Why this choice:

- Decreasing first-fit and best-fit have the same worst-case bound (at most 11/9 OPT + 6/9
  rows) and both fill rows to within a few percent on recommendation length distributions.
- Best-fit is cheap here because free space is an integer in [0, max_len]: a sorted list of
  the distinct free sizes in use answers "smallest hole >= n" by bisection, O(log max_len)
  per sequence, where first-fit needs a tree over rows for the same cost. Best-fit also
  keeps the big holes open for the long sequences that come later.
- Packing per window rather than the whole epoch keeps batches a random mix of users (a
  global length sort would batch all the heavy users together), bounds the memory of the
  plan, and makes every window depend only on (seed, epoch, window index), so an epoch can
  be replayed exactly from any batch.
The rows of a window are shuffled with the same seeded generator, so row order does not
follow length either. Everything is deterministic: stable sorts, a seeded numpy Generator.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from lumrec.data.sequences import offsets_from_lengths, ragged_arange
from lumrec.data.tokens import CONDITION, ITEM


def truncate_spans(offsets: np.ndarray, token_type: np.ndarray | None, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each sequence's most recent <= max_len tokens, never starting on an item cut from its condition."""
    offsets = np.asarray(offsets, dtype=np.int64)
    return truncate_rows(offsets[:-1], offsets[1:], token_type, max_len)


def truncate_rows(begin: np.ndarray, end: np.ndarray, token_type: np.ndarray | None, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`truncate_spans` for sequences given by their [begin, end) token ranges (any subset, any order)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    begin, end = np.asarray(begin, dtype=np.int64), np.asarray(end, dtype=np.int64)
    start = np.maximum(end - max_len, begin)
    if token_type is not None and len(token_type):
        cut = np.flatnonzero(start > begin)
        # A cut sequence always has start >= 1 and start < end, so both lookups are in range.
        orphan = cut[(token_type[start[cut]] == ITEM) & (token_type[start[cut] - 1] == CONDITION)]
        start[orphan] += 1
    return start, end - start


def history_windows(
    offsets: np.ndarray, token_type: np.ndarray | None, max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut every sequence into windows of <= max_len tokens from its end: (sequence, start, length) per window.

    The newest window is `truncate_spans`'s. Each older window ends where the newer one starts,
    plus one token for item-only sequences: a window's last token has no target inside it, so
    the overlap makes every next-item transition a target exactly once. LUM sequences need no
    overlap (a condition's target is the item beside it) and are never cut inside a [c, i] pair.
    An older remnant of fewer than two tokens is dropped (nothing to predict). Windows are listed per
    sequence, newest first; sequences in order.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 to cut histories into windows, got {max_len}")
    overlap = 0 if token_type is not None and bool(np.any(token_type == CONDITION)) else 1
    seqs = np.flatnonzero(np.diff(offsets) > 0)
    begin, end = offsets[seqs], offsets[seqs + 1]
    found: list[tuple[np.ndarray, ...]] = []  # (sequence, start, length, age rank) per round
    rank = 0
    while len(seqs):
        start, length = truncate_rows(begin, end, token_type, max_len)
        found.append((seqs, start, length, np.full(len(seqs), rank)))
        end = start + overlap
        more = end - begin >= 2
        seqs, begin, end = seqs[more], begin[more], end[more]
        rank += 1
    if not found:
        empty = np.zeros(0, np.int64)
        return empty, empty.copy(), empty.copy()
    seq, start, length, newest_first = (np.concatenate(parts) for parts in zip(*found))
    order = np.lexsort((newest_first, seq))
    return seq[order], start[order], length[order]


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Assign items of `lengths` (each 1..capacity) to bins of `capacity`: (bin of each item, number of bins).

    Bins are numbered in the order they are opened; ties are broken deterministically.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"item lengths must be in [1, {capacity}], got [{int(lengths.min())}, {int(lengths.max())}]")
    bin_of = np.empty(len(lengths), dtype=np.int64)
    free_sizes: list[int] = []  # sorted distinct free sizes > 0 that some open bin has
    bins_with: dict[int, list[int]] = {}  # free size -> bins having exactly that much room
    free: list[int] = []  # free room of every bin
    # A per-sequence loop is unavoidable for bin packing; each step is O(log capacity).
    for i in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[i])
        k = bisect.bisect_left(free_sizes, need)
        if k < len(free_sizes):
            room = free_sizes[k]
            stack = bins_with[room]
            b = stack.pop()
            if not stack:
                del bins_with[room]
                free_sizes.pop(k)
        else:
            b, room = len(free), capacity
            free.append(capacity)
        bin_of[i] = b
        left = room - need
        free[b] = left
        if left > 0:
            if left not in bins_with:
                bins_with[left] = []
                bisect.insort(free_sizes, left)
            bins_with[left].append(b)
    return bin_of, len(free)


@dataclass
class PackPlan:
    """Where tokens go: segments (kept spans of sequences) grouped into rows of at most `max_len` tokens.

    Segments are listed row by row; row r holds segments `[row_offsets[r], row_offsets[r+1])`.
    """

    max_len: int
    seq_index: np.ndarray  # int64 (S,): the sequence (row of TokenSequences) of each segment
    starts: np.ndarray  # int64 (S,): flat index of the segment's first token
    lengths: np.ndarray  # int64 (S,): tokens in the segment (>= 1)
    row_offsets: np.ndarray  # int64 (R+1,): segment offsets of the rows

    @property
    def num_rows(self) -> int:
        """Number of packed rows."""
        return len(self.row_offsets) - 1

    @property
    def num_segments(self) -> int:
        """Number of segments (sequences placed)."""
        return len(self.seq_index)

    @property
    def num_tokens(self) -> int:
        """Number of tokens placed."""
        return int(self.lengths.sum())

    def row_lengths(self) -> np.ndarray:
        """Tokens per row."""
        seg_tok = offsets_from_lengths(self.lengths)
        return seg_tok[self.row_offsets[1:]] - seg_tok[self.row_offsets[:-1]]

    def token_index(self) -> np.ndarray:
        """Flat indices (into the token arrays) of every placed token, in packed order."""
        return ragged_arange(self.starts, self.lengths)

    def segment_ids(self) -> np.ndarray:
        """Per token: index of its segment inside its row (0 for the row's first sequence)."""
        seg_in_row = np.arange(self.num_segments, dtype=np.int64) - np.repeat(self.row_offsets[:-1], np.diff(self.row_offsets))
        return np.repeat(seg_in_row, self.lengths)

    def rows(self, lo: int, hi: int) -> "PackPlan":
        """The sub-plan of rows [lo, hi)."""
        a, b = int(self.row_offsets[lo]), int(self.row_offsets[hi])
        return PackPlan(
            max_len=self.max_len,
            seq_index=self.seq_index[a:b],
            starts=self.starts[a:b],
            lengths=self.lengths[a:b],
            row_offsets=self.row_offsets[lo : hi + 1] - a,
        )


def pack_sequences(
    offsets: np.ndarray,
    token_type: np.ndarray | None,
    max_len: int,
    order: np.ndarray | None = None,
    window: int | None = None,
    rng: np.random.Generator | None = None,
    extra_per_sequence: int = 0,
) -> PackPlan:
    """Pack sequences (jagged by `offsets`) into rows of `max_len` tokens by best-fit decreasing per window.

    `order`: the sequences to pack, in stream order (default all, in order); `window`:
    sequences per packing window (None: one window); `rng`: shuffles the rows of each window.
    Sequences longer than max_len keep their most recent tokens; empty ones are skipped.
    `extra_per_sequence`: tokens a later stage appends to every sequence (a grouped query's N
    condition tokens); rows are packed so that `sum(length + extra) <= max_len + extra`, which
    keeps the merged row, not only the history, within one sequence's budget.
    """
    starts, lengths = truncate_spans(offsets, token_type, max_len)
    order = np.arange(len(lengths), dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
    order = order[lengths[order] > 0]
    window = len(order) if not window else int(window)
    seg_parts, row_len_parts = [], []
    for w0 in range(0, len(order), max(window, 1)):
        seqs = order[w0 : w0 + window]
        bin_of, n_rows = best_fit_decreasing(lengths[seqs] + extra_per_sequence, max_len + extra_per_sequence)
        row_order = rng.permutation(n_rows) if rng is not None else np.arange(n_rows)
        rank = np.empty(n_rows, dtype=np.int64)
        rank[row_order] = np.arange(n_rows)
        # Segments sorted by their row's rank; inside a row, in stream order (stable sort).
        by_row = np.argsort(rank[bin_of], kind="stable")
        seg_parts.append(seqs[by_row])
        row_len_parts.append(np.bincount(rank[bin_of], minlength=n_rows))
    if not seg_parts:
        return PackPlan(max_len, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(1, np.int64))
    seq_index = np.concatenate(seg_parts)
    return PackPlan(
        max_len=max_len,
        seq_index=seq_index,
        starts=starts[seq_index],
        lengths=lengths[seq_index],
        row_offsets=offsets_from_lengths(np.concatenate(row_len_parts)),
    )


def epoch_rng(seed: int | None, epoch: int) -> np.random.Generator | None:
    """The generator of one epoch: a function of (seed, epoch) only; None when not shuffling."""
    return None if seed is None else np.random.default_rng([int(seed), int(epoch)])


def epoch_plan(
    offsets: np.ndarray, token_type: np.ndarray | None, max_len: int, shuffle_seed: int | None, epoch: int = 0, window: int | None = 4096
) -> PackPlan:
    """The packing of one epoch: sequences shuffled by (seed, epoch), then packed window by window."""
    rng = epoch_rng(shuffle_seed, epoch)
    n = len(offsets) - 1
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return pack_sequences(offsets, token_type, max_len, order=order, window=window, rng=rng)


def padding_waste(row_lengths: np.ndarray, slots_per_row: int | np.ndarray) -> float:
    """Fraction of token slots that hold padding, for rows with `row_lengths` tokens in `slots_per_row` slots."""
    slots = np.broadcast_to(np.asarray(slots_per_row, dtype=np.int64), np.shape(row_lengths)).sum()
    return float(1.0 - np.sum(row_lengths) / slots) if slots else 0.0


__all__ = ["PackPlan", "best_fit_decreasing", "epoch_plan", "epoch_rng", "history_windows", "pack_sequences", "padding_waste", "truncate_rows", "truncate_spans"]
