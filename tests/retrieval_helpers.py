"""Helpers shared by the SASRec and HSTU retrieval tests: planted-rule data, HR@1, a training loop, DMP copies."""

from __future__ import annotations

import numpy as np
import torch
from lumrec.data.batches import JaggedBatch, iter_packed_batches
from lumrec.data.tokens import TokenSequences
from lumrec.metrics import target_ranks
from lumrec.modules.layers.losses import InfoNCEConfig, InfoNCELoss
from lumrec.modules.retrieval.sequence_model import RetrievalTrain, next_item_queries

NUM_ITEMS = 40
MAX_LEN = 16


def random_rows(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, NUM_ITEMS, n).tolist() for n in lengths]


def one_batch(tokens: TokenSequences, max_len: int = MAX_LEN) -> JaggedBatch:
    batches = list(iter_packed_batches(tokens, max_len, rows_per_batch=10_000))
    assert len(batches) == 1
    return batches[0]


def successor_rows(rng: np.random.Generator, users: int, length: int, n_items: int) -> list[list[int]]:
    """Planted rule needing only the current item: item t+1 = item t + 1, wrapping within ids 1..n_items-1."""
    starts = rng.integers(1, n_items, users)
    return [[(s - 1 + k) % (n_items - 1) + 1 for k in range(length)] for s in starts]


def alternating_rows(rng: np.random.Generator, users: int, length: int, n_items: int) -> list[list[int]]:
    """Planted rule needing attention: a user alternates two random items, so item t+1 = item t-1."""
    rows = []
    for _ in range(users):
        a, b = rng.choice(np.arange(1, n_items), 2, replace=False)
        rows.append([int(a) if k % 2 == 0 else int(b) for k in range(length)])
    return rows


def hit_rate_at_1(model, tokens: TokenSequences, min_position: int = 0) -> float:
    """HR@1 of the next-item queries at positions >= min_position, ranking all items (padding id 0 excluded)."""
    model.eval()
    with torch.no_grad():
        batch = one_batch(tokens)
        index, targets = next_item_queries(batch, model.predicts_from)
        keep = batch.position[index] >= min_position
        index, targets = index[keep], targets[keep]
        queries = torch.nn.functional.normalize(model(batch)[index], dim=-1)
        items = torch.nn.functional.normalize(model.item_embeddings(torch.arange(model.num_items)), dim=-1)
        exclude = torch.zeros(len(index), model.num_items, dtype=torch.bool)
        exclude[:, 0] = True
        ranks = target_ranks(queries @ items.T, targets, exclude)
    return float((ranks < 1).double().mean())


def train_on_planted_rule(
    model, rule, make_tokens, min_position: int = 0, steps: int = 80, lr: float = 1e-2, seed: int = 0
) -> tuple[float, float]:
    """Train through RetrievalTrain on sequences from `rule` (tokenised by `make_tokens`); (HR@1 before, after) on held-out users."""
    rng = np.random.default_rng(seed)
    n = model.num_items
    train_tokens = make_tokens(rule(rng, 64, 12, n))
    test_tokens = make_tokens(rule(rng, 32, 12, n))
    before = hit_rate_at_1(model, test_tokens, min_position)
    trainer = RetrievalTrain(model, InfoNCELoss(InfoNCEConfig(temperature=0.1, num_sampled_negatives=16), n))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    batches = list(iter_packed_batches(train_tokens, MAX_LEN, rows_per_batch=16, shuffle_seed=seed))
    model.train()
    for step in range(steps):
        loss, _ = trainer(batches[step % len(batches)], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, hit_rate_at_1(model, test_tokens, min_position)


def shard_like_training(model, tmp_path):
    """Wrap a meta-built model in a 1-rank DMP with the project's dense-kernel RowwiseAdamW sharder; returns (dmp, cleanup)."""
    import torch.distributed as dist
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingPlan

    from lumrec.optim.rowwise_adamw import RowwiseAdamW
    from lumrec.optim.sharding import dense_kernel_sharding_plan, rowwise_adamw_sharder_for

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg_init'}", rank=0, world_size=1)
    ebc = model.input.item_table
    _apply_optimizer_in_backward(RowwiseAdamW, ebc.parameters(), {"lr": 1e-3})
    sharder = rowwise_adamw_sharder_for(ebc)
    plan = dense_kernel_sharding_plan(ebc, world_size=1, sharder=sharder)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=ShardingPlan({"input.item_table": plan}), sharders=[sharder])
    return dmp, dist.destroy_process_group


def unsharded_copy(dmp, fresh):
    """`fresh` (an unsharded model of the same config) loaded with the sharded model's weights (1 rank: one shard)."""
    fresh.load_state_dict({k: v for k, v in dmp.module.state_dict().items() if "item_table" not in k}, strict=False)
    weight = dmp.module.input.item_table.state_dict()["embedding_bags.item_id.weight"]
    with torch.no_grad():
        fresh.input.item_table.embedding_bags["item_id"].weight.copy_(weight.local_shards()[0].tensor)
    return fresh
