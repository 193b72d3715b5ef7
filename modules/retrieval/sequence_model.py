"""The contract shared by SASRec, HSTU and LUM: encode jagged token batches, embed candidate items.

Every sequential recommender here reads a ``lumrec.data.batches.JaggedBatch`` and returns one
hidden vector per token. A token of type ``predicts_from`` predicts the item token right after
it in the same sequence: for SASRec/HSTU (plain item sequences) every item token predicts the
next item; for LUM every condition token predicts the item it conditions (next-condition-item).
``RetrievalTrain`` owns the loss, so the model itself stays usable for inference (as torchrec's
``DLRMTrain`` does for ``DLRM``).
"""

from __future__ import annotations

import torch
from torch import nn

from lumrec.data.batches import JaggedBatch
from lumrec.data.tokens import CONDITION, ITEM
from lumrec.modules.layers.losses import InfoNCELoss

__all__ = ["CONDITION", "ITEM", "SequentialRecommender", "next_item_queries", "seen_item_pairs", "last_token_index", "RetrievalTrain"]


class SequentialRecommender(nn.Module):
    """Base class: `forward(batch) -> [T, d]` hidden states and `item_embeddings(ids) -> [n, d]`."""

    predicts_from: int = ITEM

    def forward(self, batch: JaggedBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_items(self) -> int:  # pragma: no cover - abstract
        """Size of the item vocabulary (ids 0..num_items-1, 0 = padding)."""
        raise NotImplementedError


def next_item_queries(batch: JaggedBatch, predicts_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices that predict the next token's item, and those target item ids.

    A query is a token of type `predicts_from` whose next token lies in the same sequence and
    is an item token.
    """
    n = batch.num_tokens
    if n < 2:
        empty = torch.zeros(0, dtype=torch.long, device=batch.token_type.device)
        return empty, empty
    seq_of = torch.repeat_interleave(torch.arange(batch.num_segments, device=batch.offsets.device), batch.lengths())
    same_seq = seq_of[:-1] == seq_of[1:]
    is_query = (batch.token_type[:-1] == predicts_from) & (batch.token_type[1:] == ITEM) & same_seq
    index = torch.nonzero(is_query).squeeze(1)
    return index, batch.item_id[index + 1]


def seen_item_pairs(batch: JaggedBatch, index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[2, P] (query, item id): the items of each query token's sequence up to and including it, less its target.

    These are the items an `exclude_seen` evaluation never ranks for that position. A repeat of
    the target stays out of the pairs: the target is always in its own softmax.
    """
    seq_of = torch.repeat_interleave(torch.arange(batch.num_segments, device=batch.offsets.device), batch.lengths())
    starts = batch.offsets[seq_of[index]]
    counts = index - starts + 1  # tokens from the sequence's start to the query, both included
    query = torch.repeat_interleave(torch.arange(index.numel(), device=index.device), counts)
    first = torch.cumsum(counts, 0) - counts
    token = starts[query] + torch.arange(int(counts.sum()), device=index.device) - first[query]
    item = batch.item_id[token]
    keep = (batch.token_type[token] == ITEM) & (item > 0) & (item != targets[query])
    return torch.stack([query[keep], item[keep]])


def last_token_index(batch: JaggedBatch) -> torch.Tensor:
    """Index of the last token of every non-empty sequence (the user's state for retrieval)."""
    return batch.offsets[1:] - 1


class RetrievalTrain(nn.Module):
    """Wraps a SequentialRecommender with its InfoNCE next-item loss."""

    def __init__(self, model: SequentialRecommender, loss: InfoNCELoss, min_target_ts: int | None = None):
        super().__init__()
        self.model = model
        self.loss = loss
        # Continued training on new days: older targets are context only (their loss was taken before).
        self.min_target_ts = min_target_ts

    def forward(
        self,
        batch: JaggedBatch,
        generator: torch.Generator | None = None,
        negatives_generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, int]:
        """(mean loss, number of queries) of one batch.

        `generator` drives the batch transform and, unless `negatives_generator` is given, the
        sampled negatives. Data-parallel ranks pass a shared `negatives_generator` (same
        negatives everywhere) and their own `generator`. With a collective loss
        (`InfoNCELoss.process_group`), a batch without queries still runs the loss, whose
        candidate lookups are collectives on sharded tables.
        """
        if negatives_generator is None:
            negatives_generator = generator
        # Models with a training-time batch transform (HSTU's stochastic length) apply it here,
        # so targets follow the subsampled sequences.
        prepare = getattr(self.model, "prepare_batch", None)
        if prepare is not None:
            batch = prepare(batch, generator)
        hidden = self.model(batch)
        index, targets = next_item_queries(batch, self.model.predicts_from)
        if self.min_target_ts is not None:
            if batch.ts is None:
                raise ValueError("RetrievalTrain.min_target_ts needs batches with timestamps (ts)")
            recent = batch.ts[index + 1] >= self.min_target_ts
            index, targets = index[recent], targets[recent]
        if index.numel() == 0 and not getattr(self.loss, "collective", False):
            # No target in this batch: a zero loss that still reaches every parameter (optimizers skip nothing oddly).
            return hidden.sum() * 0.0, 0
        seen = seen_item_pairs(batch, index, targets) if getattr(self.loss.config, "exclude_seen", False) else None
        loss = self.loss(hidden[index], targets, self.model.item_embeddings, negatives_generator, seen=seen)
        if index.numel() == 0:
            loss = loss + hidden.sum() * 0.0
        return loss, int(index.numel())
