"""Two-tower retrieval: in-batch loss vs a plain reference, recall helper vs a per-user loop, learning a planted rule."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from lumrec.modules.ranking.base import TableConfig
from lumrec.modules.retrieval.two_tower import TwoTower, TwoTowerBatch, TwoTowerConfig, TwoTowerTrain, recall_at_k

NUM_USERS, NUM_ITEMS, NUM_CATS, D = 60, 61, 6, 8  # items 1..60, 10 per category


def category_of(items: torch.Tensor) -> torch.Tensor:
    return items % NUM_CATS + 1


def items_kjt(items: torch.Tensor) -> KeyedJaggedTensor:
    n = items.numel()
    return KeyedJaggedTensor.from_lengths_sync(
        ["item_id", "category_id"], torch.cat([items, category_of(items)]), torch.ones(2 * n, dtype=torch.int32)
    )


def planted_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Users u like exactly the items of category u % 6 + 1; a positive pair is (u, a random such item)."""
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(1, NUM_USERS, (n,), generator=g)
    k = torch.randint(0, NUM_ITEMS // NUM_CATS, (n,), generator=g)
    items = (users % NUM_CATS) + NUM_CATS * k  # category_of(items) == users % 6 + 1
    items = torch.where(items == 0, torch.full_like(items, NUM_CATS), items)  # id 0 is padding; 6 has the same category
    return users, items


def users_kjt(users: torch.Tensor) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(["user_id"], users, torch.ones(users.numel(), dtype=torch.int32))


def make_config(**kw) -> TwoTowerConfig:
    base = dict(
        user_tables=[TableConfig("t_user", NUM_USERS, D, ["user_id"])],
        item_tables=[TableConfig("t_item", NUM_ITEMS, D, ["item_id"]), TableConfig("t_cat", NUM_CATS + 1, D, ["category_id"])],
        user_mlp=[16], item_mlp=[16], embedding_dim=8, temperature=0.1,
    )
    base.update(kw)
    return TwoTowerConfig(**base)


def test_in_batch_loss_matches_reference_with_repeated_items():
    torch.manual_seed(0)
    train = TwoTowerTrain(TwoTower(make_config()))
    users = torch.tensor([1, 2, 3, 4, 5])
    items = torch.tensor([7, 8, 7, 9, 10])  # item 7 twice: one column, not a false negative for user 3
    batch = TwoTowerBatch(users_kjt(users), items_kjt(items), items)
    loss, (u, v) = train(batch)
    # Reference: logits against the unique in-batch items, each row's own item is the positive.
    uniq = [7, 8, 9, 10]
    cols = torch.stack([v[items.tolist().index(i)] for i in uniq])
    logits = F.normalize(u, dim=-1) @ F.normalize(cols, dim=-1).T / 0.1
    ref = F.cross_entropy(logits, torch.tensor([uniq.index(i) for i in items.tolist()]))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert all(p.grad is not None for p in train.parameters())


def _recall_reference(scores: torch.Tensor, targets: list[list[int]], k: int, exclude: set[int]) -> float:
    total, users = 0.0, 0
    for u, tgt in enumerate(targets):
        if not tgt:
            continue
        hits = 0
        for t in tgt:
            rank = sum(1 for j in range(scores.shape[1]) if j != t and j not in exclude and scores[u, j] >= scores[u, t])
            hits += rank < k
        total += hits / len(tgt)
        users += 1
    return total / users


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    users, items = 9, 30
    u = torch.randint(-2, 3, (users, 2), generator=g).float()  # integer vectors: many tied scores
    v = torch.randint(-2, 3, (items, 2), generator=g).float()
    lengths = torch.randint(0, 4, (users,), generator=g)
    lengths[0] = 0
    indices = torch.randint(1, items, (int(lengths.sum()),), generator=g)
    exclude = torch.zeros(items, dtype=torch.bool)
    exclude[0] = True
    out = recall_at_k(u, v, (lengths, indices), ks=(1, 5, 10), exclude=exclude, chunk_size=4)
    targets, start = [], 0
    for n in lengths.tolist():
        targets.append(indices[start : start + n].tolist())
        start += n
    for k in (1, 5, 10):
        assert out[f"recall@{k}"] == pytest.approx(_recall_reference(u @ v.T, targets, k, {0})), k
    single = torch.randint(0, items, (users,), generator=g)
    expected = _recall_reference(u @ v.T, [[t] for t in single.tolist()], 5, set())
    assert recall_at_k(u, v, single, ks=(5,))["recall@5"] == pytest.approx(expected)
    assert recall_at_k(torch.zeros(4, 2), v, torch.tensor([1, 2, 3, 4]), ks=(10,))["recall@10"] == 0.0  # constant model: no lucky ties
    with pytest.raises(ValueError, match="no user has a target"):
        recall_at_k(u, v, (torch.zeros(users, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)))
    with pytest.raises(ValueError, match=r"target indices must be in \[0, 30\)"):
        recall_at_k(u, v, torch.full((users,), 30))


def _train(config: TwoTowerConfig, lum_user=None, steps: int = 150) -> tuple[TwoTower, float]:
    torch.manual_seed(0)
    model = TwoTower(config)
    train = TwoTowerTrain(model)
    opt = torch.optim.Adam(train.parameters(), lr=0.02)
    for step in range(steps):
        users, items = planted_pairs(64, seed=step)
        batch = TwoTowerBatch(users_kjt(users) if config.user_tables else None, items_kjt(items), items,
                              lum_user=None if lum_user is None else lum_user(users))
        loss, _ = train(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Every user against all items; the targets are all 10 items of the user's category.
    all_users = torch.arange(1, NUM_USERS)
    all_items = torch.arange(NUM_ITEMS)
    with torch.no_grad():
        lum = None if lum_user is None else lum_user(all_users)
        u = model.user_embeddings(users_kjt(all_users) if config.user_tables else None, lum=lum)
        v = model.item_embeddings(items_kjt(all_items))
    targets = [torch.nonzero(category_of(torch.arange(1, NUM_ITEMS)) == (x % NUM_CATS + 1)).flatten() + 1 for x in all_users.tolist()]
    lengths = torch.tensor([len(t) for t in targets])
    exclude = torch.zeros(NUM_ITEMS, dtype=torch.bool)
    exclude[0] = True
    return model, recall_at_k(u, v, (lengths, torch.cat(targets)), ks=(10,), exclude=exclude)["recall@10"]


def test_learns_planted_rule():
    _, recall = _train(make_config())
    assert recall > 0.6, recall  # chance: 10 / 60


def test_lum_user_vectors_alone_carry_the_rule():
    # A LUM-like user vector (noisy one-hot of the liked category) as the user tower's only input.
    def lum(users: torch.Tensor) -> KeyedTensor:
        onehot = F.one_hot(users % NUM_CATS, NUM_CATS).float()
        return KeyedTensor.from_tensor_list(["lum_oq_scenario=1", "lum_missing"], [onehot, torch.zeros(users.numel(), 1)])

    config = make_config(user_tables=[], lum_user_dim=NUM_CATS + 1)
    model, recall = _train(config, lum_user=lum, steps=100)
    assert model.user_tower.in_features == NUM_CATS + 1
    assert recall > 0.6, recall
    assert make_config(lum_user_dim=4).lum_user_dim == 4
    assert TwoTower(make_config(lum_user_dim=4)).user_tower.in_features == TwoTower(make_config()).user_tower.in_features + 4


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="the user tower has no input"):
        make_config(user_tables=[])
    with pytest.raises(ValueError, match=r"key\(s\) \['item_id'\] are in both towers"):
        make_config(user_tables=[TableConfig("t_hist", NUM_ITEMS, D, ["item_id"])])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        make_config(temperature=0.0)
    model = TwoTower(make_config(lum_item_dim=3))
    with pytest.raises(ValueError, match="item tower: item LUM features of width 3 are required"):
        model.item_embeddings(items_kjt(torch.tensor([1, 2])))
    with pytest.raises(ValueError, match=r"sparse features have no key\(s\) \['user_id'\]"):
        model.user_embeddings(items_kjt(torch.tensor([1, 2])))
