"""SASRec: packed == per-user runs (forward and backward), causality, shared item table, meta init, and it learns."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

import lumrec.modules.sasrec as sasrec_mod
from lumrec.data.batches import JaggedBatch, iter_packed_batches
from lumrec.data.sequences import UserSequences, offsets_from_lengths
from lumrec.data.tokens import TokenConfig, TokenSequences, build_item_sequences
from lumrec.metrics import target_ranks
from lumrec.modules.losses import InfoNCEConfig, InfoNCELoss
from lumrec.modules.sasrec import SASRec, SASRecConfig
from lumrec.modules.sequence_model import RetrievalTrain, next_item_queries

NUM_ITEMS = 40
MAX_LEN = 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops gain nothing from intra-op threads, and on a busy 2-core box they spin-wait (seen 40x slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_tokens(item_rows: list[list[int]], ts_rows: list[list[int]] | None = None, with_category: bool = False) -> TokenSequences:
    """Item-sequence tokens of the given per-user item ids (and timestamps; default 10 apart)."""
    lengths = np.array([len(r) for r in item_rows], dtype=np.int64)
    n = int(lengths.sum())
    items = np.array([i for r in item_rows for i in r], dtype=np.int64)
    ts = np.array([t for r in ts_rows for t in r], dtype=np.int64) if ts_rows else np.arange(n, dtype=np.int64) * 10
    zeros = np.zeros(n, dtype=np.int64)
    seqs = UserSequences(
        user_ids=np.arange(len(item_rows), dtype=np.int64) + 100,
        offsets=offsets_from_lengths(lengths),
        item_id=items,
        ts=ts,
        action=zeros.astype(np.int32),
        scenario=zeros.astype(np.int32),
        query_id=zeros,
        category_id=items % 5 + 1,
    )
    features = ["item_id", "category_id"] if with_category else ["item_id"]
    return build_item_sequences(seqs, TokenConfig(item_features=features))


def random_rows(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, NUM_ITEMS, n).tolist() for n in lengths]


def one_batch(tokens: TokenSequences, max_len: int = MAX_LEN) -> JaggedBatch:
    batches = list(iter_packed_batches(tokens, max_len, rows_per_batch=10_000))
    assert len(batches) == 1
    return batches[0]


def small_config(**overrides) -> SASRecConfig:
    base = dict(d_model=16, num_blocks=2, num_heads=2, dropout=0.0, max_len=MAX_LEN)
    base.update(overrides)
    return SASRecConfig(**base)


def test_doctests():
    assert doctest.testmod(sasrec_mod).failed == 0


@pytest.mark.parametrize("block_style", ["sasrec", "pre_ln"])
def test_packed_batch_equals_per_user_runs_forward_and_backward(block_style):
    torch.manual_seed(0)
    model = SASRec(small_config(block_style=block_style), NUM_ITEMS).eval()
    # 20 > MAX_LEN: truncated to the newest 16 in both paths.
    rows = random_rows(1, [5, 1, 9, 3, 7, 12, 2, 20, 4])
    tokens = make_tokens(rows, with_category=True)  # an extra KJT key the model must ignore
    packed = one_batch(tokens)
    assert packed.num_rows < packed.num_segments  # several users really share rows
    weights = torch.randn(tokens.num_tokens, 16, generator=torch.Generator().manual_seed(2))

    out = model(packed)
    (out * weights[packed.token_index]).sum().backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    got = torch.zeros(tokens.num_tokens, 16)
    for u in range(len(rows)):
        single = one_batch(tokens.take([u]))
        idx = torch.from_numpy(tokens.token_index(np.array([u])))[single.token_index]
        out_u = model(single)
        got[idx] = out_u.detach()
        (out_u * weights[idx]).sum().backward()
    torch.testing.assert_close(out.detach(), got[packed.token_index], atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads_packed[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_output_at_a_token_does_not_depend_on_later_tokens():
    torch.manual_seed(0)
    model = SASRec(small_config(), NUM_ITEMS).eval()
    rows = random_rows(3, [10, 6])
    base = model(one_batch(make_tokens(rows)))
    changed = [list(rows[0]), list(rows[1])]
    changed[0][6] = (changed[0][6] % (NUM_ITEMS - 1)) + 1  # another item at position 6 of user 0
    out = model(one_batch(make_tokens(changed)))
    torch.testing.assert_close(out[:6], base[:6])  # earlier tokens of user 0
    torch.testing.assert_close(out[10:], base[10:])  # the other user
    assert (out[6:10] - base[6:10]).abs().amax(dim=1).min() > 1e-4  # later tokens do see it


def test_item_embeddings_are_the_input_table_rows():
    torch.manual_seed(0)
    model = SASRec(small_config(), NUM_ITEMS).eval()
    table = model.input.item_table.embedding_bags["item_id"].weight
    ids = torch.tensor([[3, 1], [39, 3]])
    torch.testing.assert_close(model.item_embeddings(ids), table[ids])
    batch = one_batch(make_tokens(random_rows(4, [5, 3])))
    expected = table[batch.item_id] * 4.0 + model.input.position.weight[batch.position]  # sqrt(16) = 4
    torch.testing.assert_close(model.input(batch), expected)


def test_meta_device_then_materialise_matches_a_cpu_model():
    torch.manual_seed(0)
    cpu = SASRec(small_config(), NUM_ITEMS).eval()
    meta = SASRec(small_config(), NUM_ITEMS, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    table = meta.input.item_table.embedding_bags["item_id"].weight
    assert torch.isfinite(table).all() and 0.01 < float(table.detach().std()) < 0.03  # std 0.02 init, not empty memory
    meta.eval()
    batch = one_batch(make_tokens(random_rows(5, [6, 4])))
    assert torch.isfinite(meta(batch)).all()
    meta.load_state_dict(cpu.state_dict())
    torch.testing.assert_close(meta(batch), cpu(batch))


def test_bad_inputs_are_rejected_with_the_key_named():
    model = SASRec(small_config(), NUM_ITEMS)
    batch = one_batch(make_tokens(random_rows(6, [5, 3])))
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    renamed = KeyedJaggedTensor(keys=["other"], values=batch.kjt.values(), lengths=batch.kjt.lengths(), stride=batch.num_tokens)
    with pytest.raises(ValueError, match="item_id"):
        model(JaggedBatch(**{**batch.__dict__, "kjt": renamed}))
    too_long = one_batch(make_tokens(random_rows(6, [20])), max_len=32)
    with pytest.raises(ValueError, match="max_len"):
        model(too_long)
    with pytest.raises(ValueError, match="num_heads"):
        SASRecConfig(d_model=10, num_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        SASRecConfig(dropout=1.0)


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


def train_on_planted_rule(model, rule, min_position: int = 0, steps: int = 80, lr: float = 1e-2, seed: int = 0) -> tuple[float, float]:
    """Train through RetrievalTrain on sequences from `rule`; (HR@1 before, after) on held-out users."""
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


@pytest.mark.parametrize("block_style", ["sasrec", "pre_ln"])
def test_learns_a_planted_successor_rule(block_style):
    torch.manual_seed(0)
    model = SASRec(small_config(d_model=32, dropout=0.1, block_style=block_style), num_items=30)
    before, after = train_on_planted_rule(model, successor_rows)
    assert before < 0.2
    assert after > 0.9, (before, after)


def test_learns_a_rule_that_needs_attention():
    torch.manual_seed(0)
    model = SASRec(small_config(d_model=32, dropout=0.1), num_items=30)
    # From position 1 on, the next item is the one before the current one: only attention can tell.
    before, after = train_on_planted_rule(model, alternating_rows, min_position=1)
    assert before < 0.2
    assert after > 0.8, (before, after)


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


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_meta_model_is_sharded_by_dmp_and_matches_unsharded(tmp_path):
    # d_model 50 (the paper's, not a multiple of 4) needs the dense kernel: fbgemm's fused one refuses it.
    config = small_config(d_model=50, num_heads=1)
    dmp, cleanup = shard_like_training(SASRec(config, NUM_ITEMS, device="meta"), tmp_path)
    try:
        # DMP materialised the dense layers through their own reset_parameters: the reference init, not torch's default.
        block = dmp.module.blocks[0]
        assert not block.q_proj.bias.any() and not block.ffn[0].bias.any()
        assert 0.1 < float(block.q_proj.weight.detach().std()) < 0.18  # Xavier-normal: sqrt(2 / 100) = 0.141
        batch = one_batch(make_tokens(random_rows(7, [6, 4, 9]), with_category=True))
        ref = unsharded_copy(dmp, SASRec(config, NUM_ITEMS)).eval()
        dmp.eval()
        torch.testing.assert_close(dmp(batch), ref(batch))
        ids = torch.tensor([1, 5, 39])
        torch.testing.assert_close(dmp.module.item_embeddings(ids), ref.item_embeddings(ids))
    finally:
        cleanup()
