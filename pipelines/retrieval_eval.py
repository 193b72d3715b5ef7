"""Leave-one-out retrieval evaluation: rank each user's held-out item against all items.

Protocol (SASRec / HSTU papers on ML-1M): the last event of each user is the test target, the
second last the validation target; which of them training also sees is `data.protocol`
(pipelines/pretrain_config.py). Metrics: HR@K and NDCG@K at K = 5, 10, 20, 50, 200, and MRR
(lumrec/metrics.py). A user's sequence is fed *with* its target, and the user state is the
hidden vector of the token right before the target item token: the last history item for
SASRec/HSTU, the target's condition token for LUM. Attention is causal, so the target item
cannot leak into that state, and one code path serves every model.

`exclude_seen` follows the published protocol's evaluation code (Meta's generative-recommenders
filters the items of the visible history out of the candidates, as SASRec does): a user's own
history items within the `max_len` window cannot be retrieved. On ML-1M, where nobody rates a
movie twice, this only removes impossible candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lumrec.data.batches import iter_packed_batches
from lumrec.data.sequences import UserSequences
from lumrec.data.tokens import ITEM, TokenConfig, TokenSequences, build_item_sequences, build_lum_tokens
from lumrec.device import move_to_device
from lumrec.metrics import RetrievalMetrics, target_ranks
from lumrec.modules.retrieval.sequence_model import SequentialRecommender


@dataclass
class LeaveOneOutSplit:
    """Train histories plus validation and test sequences (each ends with its target event)."""

    train: UserSequences  # events before the validation target
    valid: UserSequences  # train + the validation target as the last event
    test: UserSequences  # valid + the test target as the last event


def leave_one_out(seqs: UserSequences, min_history: int = 1) -> LeaveOneOutSplit:
    """Split every user with at least `min_history + 2` events into train / valid / test."""
    seqs = seqs.filter_min_length(min_history + 2)
    valid, _ = seqs.split_last(1, min_history)
    train, _ = seqs.split_last(2, min_history)
    return LeaveOneOutSplit(train=train, valid=valid, test=seqs)


def build_tokens(seqs: UserSequences, token_config: TokenConfig, lum: bool) -> TokenSequences:
    """LUM `[c, i]` tokens or plain item tokens of `seqs`."""
    return build_lum_tokens(seqs, token_config) if lum else build_item_sequences(seqs, token_config)


def seen_item_mask(item_id: torch.Tensor, offsets: torch.Tensor, num_items: int) -> torch.Tensor:
    """[S, num_items] bool: the items of each segment's tokens before its last one (its target)."""
    num_segments = len(offsets) - 1
    lengths = offsets[1:] - offsets[:-1]
    device = item_id.device
    segment = torch.repeat_interleave(torch.arange(num_segments, device=device), lengths)
    history = torch.ones(len(item_id), dtype=torch.bool, device=device)
    history[offsets[1:][lengths > 0] - 1] = False
    mask = torch.zeros(num_segments, num_items, dtype=torch.bool, device=device)
    mask[segment[history], item_id[history]] = True
    mask[:, 0] = False  # condition tokens carry item id 0; padding is excluded separately
    return mask


@torch.no_grad()
def evaluate_retrieval(
    model: SequentialRecommender,
    seqs_with_target: UserSequences,
    token_config: TokenConfig,
    max_len: int,
    rows_per_batch: int = 64,
    item_chunk: int = 65536,
    exclude_seen: bool = False,
    device: torch.device | None = None,
) -> dict[str, float]:
    """HR@K / NDCG@K of each user's last event, ranked against every item id 1..num_items-1.

    `device`: where the model is (None: the CPU); batches go there, the ranks come back to the CPU.
    """
    device = torch.device("cpu") if device is None else device
    was_training = model.training
    model.eval()
    lum = model.predicts_from != ITEM
    tokens = build_tokens(seqs_with_target, token_config, lum)
    all_ids = torch.arange(model.num_items, device=device)
    item_table = torch.cat([model.item_embeddings(all_ids[i : i + item_chunk]) for i in range(0, len(all_ids), item_chunk)])
    item_table = torch.nn.functional.normalize(item_table, dim=-1)
    exclude = torch.zeros(1, model.num_items, dtype=torch.bool, device=device)
    exclude[0, 0] = True  # padding id
    metrics = RetrievalMetrics()
    for batch in iter_packed_batches(tokens, max_len, rows_per_batch, shuffle_seed=None):
        batch = move_to_device(batch, device)
        hidden = model(batch)
        ends = batch.offsets[1:]
        if bool((batch.token_type[ends - 1] != ITEM).any()) or bool((batch.lengths() < 2).any()):
            raise ValueError("every evaluation sequence must end with its target item and have a token before it")
        users = torch.nn.functional.normalize(hidden[ends - 2], dim=-1)
        targets = batch.item_id[ends - 1]
        mask = exclude.expand(len(targets), -1)
        if exclude_seen:
            mask = mask | seen_item_mask(batch.item_id, batch.offsets, model.num_items)
            mask[torch.arange(len(targets), device=device), targets] = False  # a re-consumed target stays a candidate
        ranks = target_ranks(users @ item_table.T, targets, mask)
        metrics.update(ranks.cpu())
    model.train(was_training)
    return metrics.compute()
