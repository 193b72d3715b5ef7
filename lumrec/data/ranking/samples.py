"""RankingSamples: one row per sample over a shared per-user history store; batches as tensors + KJTs; a resumable loader."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from lumrec.data.dataset import SECONDS_PER_DAY
from lumrec.data.packing import epoch_rng
from lumrec.data.ranking.config import SPLITS, split_code
from lumrec.data.sequences import UserSequences, ragged_arange
from lumrec.data.tokens import JaggedIds

# Per-sample id features a batch can put in its KJT (one id per sample) and history features (one per event).
CANDIDATE_KEYS = ("user_id", "item_id", "category_id", "scenario", "query_id")
HISTORY_KEYS = {
    "hist_item_id": "item_id",
    "hist_category_id": "category_id",
    "hist_action": "action",
    "hist_scenario": "scenario",
    "hist_query_id": "query_id",
}
DEFAULT_HISTORY_KEYS = ("hist_item_id", "hist_category_id")
# List keys read an item-level list column X (e.g. category_ids) from `RankingSamples.item_lists`:
# key X = the candidate's ids, key hist_X = the bag of the kept behaviours' ids (a multi-hot user profile).
HISTORY_BAG_PREFIX = "hist_"


@dataclass
class RankingSamples:
    """One row per sample plus every user's behaviours stored once; sample i's history is
    ``history`` events ``[offsets[user_row[i]], offsets[user_row[i]] + history_length[i])`` (oldest first)."""

    protocol: str
    user_id: np.ndarray  # int64 (N,)
    item_id: np.ndarray  # int64 (N,)
    label: np.ndarray  # float32 (N,)
    ts: np.ndarray  # int64 (N,) unix seconds
    category_id: np.ndarray  # int64 (N,) the candidate item's (primary) category, 0 = unknown
    scenario: np.ndarray  # int32 (N,)
    query_id: np.ndarray  # int64 (N,) 0 = no query
    split: np.ndarray  # int8 (N,) TRAIN / VALID / TEST
    user_row: np.ndarray  # int64 (N,) row of the user in `history`
    history_length: np.ndarray  # int64 (N,) events of that user strictly before ts
    history: UserSequences  # every user's behaviours, time-ordered
    history_rating: np.ndarray | None = None  # float32 (E,) rating of each history event, NaN where none
    info: dict[str, Any] = field(default_factory=dict)  # how the split was cut, sampler facts
    item_lists: dict[str, JaggedIds] = field(default_factory=dict)  # item list column -> ids per item_id (for list keys)

    def __post_init__(self) -> None:
        n = len(self.user_id)
        for f in ("item_id", "label", "ts", "category_id", "scenario", "query_id", "split", "user_row", "history_length"):
            if len(getattr(self, f)) != n:
                raise ValueError(f"RankingSamples: column {f!r} has {len(getattr(self, f))} rows, user_id has {n}")
        if self.history_rating is not None and len(self.history_rating) != self.history.num_events:
            raise ValueError(f"RankingSamples: history_rating has {len(self.history_rating)} values for {self.history.num_events} events")
        top = max(int(self.item_id.max(initial=0)), int(self.history.item_id.max(initial=0))) if self.item_lists else 0
        for name, lists in self.item_lists.items():
            if name.startswith(HISTORY_BAG_PREFIX):
                raise ValueError(f"RankingSamples: item list name {name!r} starts with {HISTORY_BAG_PREFIX!r}, reserved for history bags")
            if len(lists) <= top:
                raise ValueError(f"RankingSamples: item list {name!r} covers item ids < {len(lists)}, the samples reach {top}")
        if n == 0:
            return
        if self.user_row.min() < 0 or self.user_row.max() >= len(self.history):
            raise ValueError(f"RankingSamples: user_row outside [0, {len(self.history)})")
        if not np.array_equal(self.history.user_ids[self.user_row], self.user_id):
            raise ValueError("RankingSamples: user_row does not point at each sample's user in `history`")
        lengths = self.history.lengths()[self.user_row]
        if (self.history_length < 0).any() or (self.history_length > lengths).any():
            raise ValueError("RankingSamples: history_length outside [0, the user's number of events]")
        # The point-in-time rule, checked once for every sample: its newest history event precedes it.
        has = self.history_length > 0
        last = self.history.offsets[self.user_row[has]] + self.history_length[has] - 1
        late = np.flatnonzero(self.history.ts[last] >= self.ts[has])
        if late.size:
            i = int(np.flatnonzero(has)[late[0]])
            raise ValueError(f"RankingSamples: sample {i} (user {int(self.user_id[i])}, ts {int(self.ts[i])}) has a history event at or after its ts")

    # -- sizes and selections -------------------------------------------------------------
    def __len__(self) -> int:
        """Number of samples."""
        return len(self.user_id)

    @property
    def day(self) -> np.ndarray:
        """int64 (N,) day of each sample, counted from 1970-01-01 (UTC)."""
        return self.ts // SECONDS_PER_DAY

    @property
    def ds(self) -> np.ndarray:
        """(N,) the YYYY-MM-DD day of each sample (join day-level knowledge as of ds - 1)."""
        return np.datetime_as_string(self.day.astype("datetime64[D]"))

    def indices(self, split: str) -> np.ndarray:
        """Sample rows of split 'train', 'valid' or 'test', in storage order."""
        return np.flatnonzero(self.split == split_code(split))

    def counts(self) -> dict[str, dict[str, int]]:
        """Per split: samples, positives (label > 0) and distinct users."""
        out = {}
        for name, code in SPLITS.items():
            sel = self.split == code
            out[name] = {
                "samples": int(sel.sum()),
                "positives": int((self.label[sel] > 0).sum()),
                "users": int(np.unique(self.user_id[sel]).size),
            }
        return out

    def history_of(self, i: int) -> dict[str, np.ndarray]:
        """The full (untruncated) history of sample `i` as event column arrays, oldest first."""
        lo = int(self.history.offsets[self.user_row[i]])
        hi = lo + int(self.history_length[i])
        out = {name: arr[lo:hi] for name, arr in self.history.columns().items()}
        if self.history_rating is not None:
            out["rating"] = self.history_rating[lo:hi]
        return out

    def take(self, rows: Sequence[int] | np.ndarray) -> "RankingSamples":
        """The samples `rows` (in that order) over the same shared history store."""
        rows = np.asarray(rows, dtype=np.int64)
        per_sample = ("user_id", "item_id", "label", "ts", "category_id", "scenario", "query_id", "split", "user_row", "history_length")
        return replace(self, **{f: getattr(self, f)[rows] for f in per_sample})

    # -- batches --------------------------------------------------------------------------
    def batch(
        self,
        indices: Sequence[int] | np.ndarray,
        max_history: int | None = None,
        history_keys: Sequence[str] = DEFAULT_HISTORY_KEYS,
        candidate_keys: Sequence[str] = CANDIDATE_KEYS,
        list_keys: Sequence[str] = (),
    ) -> "RankingSampleBatch":
        """Samples `indices` as torch tensors, each history cut to its `max_history` most recent events (None: all)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)})")
        if max_history is not None and max_history < 0:
            raise ValueError(f"max_history must be >= 0 or None, got {max_history}")
        _check_keys("history", history_keys, HISTORY_KEYS)
        _check_keys("candidate", candidate_keys, CANDIDATE_KEYS)
        _check_keys("list", list_keys, self.list_keys())
        full = self.history_length[idx]
        kept = full if max_history is None else np.minimum(full, max_history)
        # The kept events are the last `kept` of the user's prefix: no per-sample copy until here.
        starts = self.history.offsets[self.user_row[idx]] + full - kept
        ev = ragged_arange(starts, kept)
        b = len(idx)
        per_sample = {
            "user_id": self.user_id[idx],
            "item_id": self.item_id[idx],
            "category_id": self.category_id[idx],
            "scenario": self.scenario[idx].astype(np.int64),
            "query_id": self.query_id[idx],
        }
        cand_kjt = _kjt(list(candidate_keys), [per_sample[k] for k in candidate_keys], [np.ones(b, np.int32)] * len(candidate_keys), b)
        hist_values = [getattr(self.history, HISTORY_KEYS[k])[ev].astype(np.int64) for k in history_keys]
        hist_kjt = _kjt(list(history_keys), hist_values, [kept.astype(np.int32)] * len(history_keys), b)
        lists_kjt = self._list_kjt(list_keys, per_sample["item_id"], self.history.item_id[ev], kept) if list_keys else None
        return RankingSampleBatch(
            sample_index=_t(idx),
            user_id=_t(per_sample["user_id"]),
            item_id=_t(per_sample["item_id"]),
            category_id=_t(per_sample["category_id"]),
            scenario=_t(per_sample["scenario"]),
            query_id=_t(per_sample["query_id"]),
            label=torch.from_numpy(np.ascontiguousarray(self.label[idx], dtype=np.float32)),
            ts=_t(self.ts[idx]),
            day=_t(self.ts[idx] // SECONDS_PER_DAY),
            candidates=cand_kjt,
            history=hist_kjt,
            lists=lists_kjt,
            hist_lengths=_t(kept),
            hist_ts=_t(self.history.ts[ev]),
            hist_action=_t(self.history.action[ev]),
            hist_rating=None if self.history_rating is None else torch.from_numpy(self.history_rating[ev].astype(np.float32)),
        )

    def list_keys(self) -> list[str]:
        """The list keys batches can carry: X and hist_X for every item list column X."""
        return [k for name in self.item_lists for k in (name, HISTORY_BAG_PREFIX + name)]

    def _list_kjt(self, keys: Sequence[str], item_id: np.ndarray, hist_item_id: np.ndarray, kept: np.ndarray) -> KeyedJaggedTensor:
        """KJT of stride B: per key X the candidate's list, per key hist_X the concatenated lists of its kept behaviours."""
        b = len(item_id)
        sample_of_event = np.repeat(np.arange(b), kept)
        values, lengths = [], []
        for key in keys:
            is_bag = key.startswith(HISTORY_BAG_PREFIX) and key not in self.item_lists
            per_item = self.item_lists[key[len(HISTORY_BAG_PREFIX):] if is_bag else key]
            rows = per_item.take(hist_item_id if is_bag else item_id)
            # Behaviours are sample-major, so the taken values are already grouped per sample.
            lens = np.bincount(sample_of_event, weights=rows.lengths, minlength=b) if is_bag else rows.lengths
            values.append(rows.values)
            lengths.append(lens.astype(np.int32))
        return _kjt(list(keys), values, lengths, b)

    def num_batches(self, split: str, batch_size: int, drop_last: bool = False) -> int:
        """Batches of `batch_size` one epoch over `split` makes."""
        full, rest = divmod(len(self.indices(split)), batch_size)
        return full + (1 if rest and not drop_last else 0)

    def epoch_order(self, split: str, shuffle_seed: int | None, epoch: int = 0) -> np.ndarray:
        """Sample rows of `split` in the order of one epoch: a function of (shuffle_seed, epoch) only."""
        idx = self.indices(split)
        rng = epoch_rng(shuffle_seed, epoch)
        return idx if rng is None else idx[rng.permutation(len(idx))]

    def iter_batches(
        self,
        split: str,
        batch_size: int,
        shuffle_seed: int | None = None,
        max_history: int | None = None,
        epoch: int = 0,
        start_batch: int = 0,
        drop_last: bool = False,
        history_keys: Sequence[str] = DEFAULT_HISTORY_KEYS,
        candidate_keys: Sequence[str] = CANDIDATE_KEYS,
        part: tuple[int, int] | None = None,
        list_keys: Sequence[str] = (),
        equal_parts: bool = False,
    ) -> Iterator["RankingSampleBatch"]:
        """Batches of one epoch over `split`, deterministic per (shuffle_seed, epoch), from batch `start_batch` on.

        `part=(rank, world)`: of every batch of `batch_size` samples (the global batch) only the
        contiguous slice `rank_slice(n, rank, world)` is materialised; the slices of the ranks in
        order make up the global batch. Each batch records `global_batch_size`. A rank whose slice
        is empty (a last batch smaller than the world) gets the global batch's first sample with
        `padding=True`, so that it still joins the collectives of a sharded model; it must carry no
        weight (no loss, no metric). `equal_parts`: every rank's batch has `padded_part_size(n,
        world)` samples, its slice followed by `pad` copies of the global batch's first sample
        (torchrec's row-wise pooled tables exchange equal local batches); the `pad` trailing
        samples must carry no weight.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if part is not None:
            _check_part(part)
        order = self.epoch_order(split, shuffle_seed, epoch)
        n_batches = self.num_batches(split, batch_size, drop_last)
        if not 0 <= start_batch <= n_batches:
            raise ValueError(f"start_batch {start_batch} outside [0, {n_batches}] for split {split!r}")
        for k in range(start_batch, n_batches):
            rows = order[k * batch_size : (k + 1) * batch_size]
            if part is None:
                yield self.batch(rows, max_history, history_keys, candidate_keys, list_keys)
                continue
            lo, hi = rank_slice(len(rows), *part)
            size = padded_part_size(len(rows), part[1]) if equal_parts else max(hi - lo, 1)
            # Padding repeats a sample of this global batch: every model takes it (one candidate id
            # per sample, as DIN/SIM check), and it looks up only rows the global batch looks up.
            local = np.concatenate([rows[lo:hi], np.repeat(rows[:1], size - (hi - lo))])
            yield replace(self.batch(local, max_history, history_keys, candidate_keys, list_keys),
                          global_batch_size=len(rows), pad=size - (hi - lo))


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of the `rank`-th of `world` contiguous, near-equal slices of n items (sizes differ by at most 1)."""
    return rank * n // world, (rank + 1) * n // world


def padded_part_size(n: int, world: int) -> int:
    """Samples of every rank's batch when the `world` slices of n samples are padded to one size: ceil(n / world)."""
    return -(-n // world)


def _check_part(part: tuple[int, int]) -> None:
    rank, world = part
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"part must be (rank, world) with 0 <= rank < world, got {tuple(part)}")


@dataclass
class RankingSampleBatch:
    """B samples as tensors; histories oldest first, at most `max_history` events each.

    Field names `sparse_features`, `labels`, `dense_features`, `lum_features` match
    `lumrec.modules.ranking.base.RankingBatch`, so a batch can be handed to a `RankingTrain` as it is.
    """

    sample_index: torch.Tensor  # int64 [B] row in the RankingSamples
    user_id: torch.Tensor  # int64 [B]
    item_id: torch.Tensor  # int64 [B]
    category_id: torch.Tensor  # int64 [B]
    scenario: torch.Tensor  # int64 [B]
    query_id: torch.Tensor  # int64 [B]
    label: torch.Tensor  # float32 [B]
    ts: torch.Tensor  # int64 [B]
    day: torch.Tensor  # int64 [B] days since 1970-01-01 (UTC)
    candidates: KeyedJaggedTensor  # stride B, one id per sample per key (user_id, item_id, ...)
    history: KeyedJaggedTensor  # stride B, keys hist_item_id, hist_category_id, ...: hist_lengths[b] ids each
    lists: KeyedJaggedTensor | None  # stride B, item list keys (category_ids, hist_category_ids, ...), or None
    hist_lengths: torch.Tensor  # int64 [B]
    hist_ts: torch.Tensor  # int64 [sum(hist_lengths)], aligned with the history KJT's values of every key
    hist_action: torch.Tensor  # int64 [sum(hist_lengths)]
    hist_rating: torch.Tensor | None = None  # float32 [sum(hist_lengths)], NaN where the event has no rating
    dense_features: torch.Tensor | None = None  # filled by the caller (e.g. item statistics)
    lum_features: torch.Tensor | KeyedTensor | None = None  # filled by the caller (LUMFeatureModule output)
    global_batch_size: int | None = None  # samples of the global batch this is one rank's slice of (None: not sliced)
    pad: int = 0  # trailing samples that pad a rank's slice (copies of a sample of the global batch): no weight

    def __len__(self) -> int:
        """B (padding samples included)."""
        return int(self.user_id.numel())

    @property
    def real(self) -> int:
        """Samples that carry weight: the first `len(self) - pad`."""
        return len(self) - self.pad

    @property
    def padding(self) -> bool:
        """True when every sample is padding: a stand-in for a rank's empty slice, run for the collectives only."""
        return self.pad > 0 and self.pad == len(self)

    @property
    def labels(self) -> torch.Tensor:
        """The labels (the name `RankingTrain` reads)."""
        return self.label

    @property
    def sparse_features(self) -> KeyedJaggedTensor:
        """One KJT of stride B: the candidate keys, the history keys, then the list keys."""
        parts = [self.candidates, self.history] + ([self.lists] if self.lists is not None else [])
        return KeyedJaggedTensor.concat(parts)

    @property
    def hist_offsets(self) -> torch.Tensor:
        """int64 [B+1] offsets of each sample's history in the flat hist_* tensors."""
        return torch.cat([self.hist_lengths.new_zeros(1), torch.cumsum(self.hist_lengths, 0)])

    @property
    def ds(self) -> list[str]:
        """The YYYY-MM-DD day of each sample."""
        return [str(d) for d in np.datetime_as_string(self.day.cpu().numpy().astype("datetime64[D]"))]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "RankingSampleBatch":
        """The same batch with every tensor on `device`."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, KeyedJaggedTensor, KeyedTensor)):
                moved[f.name] = value.to(device, non_blocking=non_blocking)
        return replace(self, **moved)


class RankingBatchLoader:
    """Iterates one split's batches epoch after epoch and remembers (epoch, next batch) for checkpoints.

    `batch_size` is the global batch size; with `part=(rank, world)` this rank gets its slice of
    every batch (see `RankingSamples.iter_batches`, also for `equal_parts`), so every rank counts
    the same batches.
    """

    def __init__(
        self,
        samples: RankingSamples,
        split: str,
        batch_size: int,
        max_history: int | None = None,
        shuffle_seed: int | None = 0,
        drop_last: bool = False,
        history_keys: Sequence[str] = DEFAULT_HISTORY_KEYS,
        candidate_keys: Sequence[str] = CANDIDATE_KEYS,
        part: tuple[int, int] | None = None,
        list_keys: Sequence[str] = (),
        equal_parts: bool = False,
    ):
        split_code(split)
        if part is not None:
            _check_part(part)
        self.samples, self.split, self.batch_size, self.max_history = samples, split, batch_size, max_history
        self.shuffle_seed, self.drop_last = shuffle_seed, drop_last
        self.history_keys, self.candidate_keys, self.list_keys = tuple(history_keys), tuple(candidate_keys), tuple(list_keys)
        self.part = None if part is None else (int(part[0]), int(part[1]))  # (rank, world): this rank's slice of each batch
        self.equal_parts = equal_parts  # every rank's batch padded to one size (see `RankingSamples.iter_batches`)
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.samples.num_batches(self.split, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[RankingSampleBatch]:
        """The rest of the current epoch; afterwards the loader points at the next epoch's first batch."""
        for batch in self.samples.iter_batches(
            self.split, self.batch_size, self.shuffle_seed, self.max_history, self.epoch, self.batch,
            self.drop_last, self.history_keys, self.candidate_keys, self.part, self.list_keys, self.equal_parts,
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


def _t(x: np.ndarray) -> torch.Tensor:
    """An int64 tensor from a numpy array."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))


def _kjt(keys: list[str], values: list[np.ndarray], lengths: list[np.ndarray], stride: int) -> KeyedJaggedTensor:
    """A KJT from per-key values and lengths (key-major, as torchrec lays them out)."""
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate(values).astype(np.int64) if values else np.zeros(0, np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32) if lengths else np.zeros(0, np.int32)),
        stride=stride,
    )


def _check_keys(kind: str, keys: Sequence[str], known: Sequence[str] | dict) -> None:
    """Raise a ValueError naming an unknown or repeated key."""
    for key in keys:
        if key not in known:
            raise ValueError(f"unknown {kind} key {key!r}; known: {list(known)}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{kind} keys repeat: {list(keys)}")
