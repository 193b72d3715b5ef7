"""Two-tower retrieval (embedding-based retrieval) that can take LUM knowledge on either side.

    user tower: pooled user features (user_id, region, mean-pooled history, ...) ++ user dense
                ++ LUM user vectors (o_q under fixed conditions)  -> MLP -> d
    item tower: pooled item features (item_id, category_id, ...) ++ item dense ++ LUM item vector -> MLP -> d
    score(u, i) = <unit(user), unit(item)> / temperature

Trained with in-batch softmax (``InfoNCELoss`` with in-batch negatives only: every other target
of the batch is a negative, a repeated item counts once). The towers have separate tables so the
item tower can embed the whole catalog on its own; ``recall_at_k`` scores users against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.modules.layers.losses import InfoNCEConfig, InfoNCELoss
from lumrec.modules.ranking.base import Dense, PooledSparseArch, TableConfig, check_sizes, dense_part, tables_from

__all__ = ["TwoTowerConfig", "TowerArch", "TwoTower", "TwoTowerBatch", "TwoTowerTrain", "recall_at_k"]


@dataclass
class TwoTowerConfig:
    """Tables and dense / LUM widths of each tower, the towers' MLPs, output width and softmax temperature."""

    user_tables: list[TableConfig]
    item_tables: list[TableConfig]
    user_dense_dim: int = 0
    item_dense_dim: int = 0
    lum_user_dim: int = 0  # LUM user vectors (e.g. LUMFeatureModule.user_features) appended to the user tower input
    lum_item_dim: int = 0  # LUM item vector (e.g. LUMFeatureModule.item_features) appended to the item tower input
    user_mlp: list[int] = field(default_factory=lambda: [64])
    item_mlp: list[int] = field(default_factory=lambda: [64])
    embedding_dim: int = 32
    temperature: float = 0.05
    l2_normalize: bool = True

    def __post_init__(self) -> None:
        self.user_tables = tables_from("TwoTowerConfig.user_tables", self.user_tables)
        self.item_tables = tables_from("TwoTowerConfig.item_tables", self.item_tables)
        self.user_mlp, self.item_mlp = list(self.user_mlp), list(self.item_mlp)
        check_sizes(
            "TwoTowerConfig", user_dense_dim=self.user_dense_dim, item_dense_dim=self.item_dense_dim,
            lum_user_dim=self.lum_user_dim, lum_item_dim=self.lum_item_dim,
        )
        for name in ("user_mlp", "item_mlp"):
            if any(int(v) < 1 for v in getattr(self, name)):
                raise ValueError(f"TwoTowerConfig: {name} sizes must be >= 1, got {getattr(self, name)}")
        if self.embedding_dim < 1:
            raise ValueError(f"TwoTowerConfig: embedding_dim must be >= 1, got {self.embedding_dim}")
        if not self.temperature > 0:
            raise ValueError(f"TwoTowerConfig: temperature must be > 0, got {self.temperature}")
        if not self.user_tables and self.user_dense_dim + self.lum_user_dim == 0:
            raise ValueError("TwoTowerConfig: the user tower has no input (no user_tables, dense or LUM features)")
        if not self.item_tables and self.item_dense_dim + self.lum_item_dim == 0:
            raise ValueError("TwoTowerConfig: the item tower has no input (no item_tables, dense or LUM features)")
        shared = sorted({k for t in self.user_tables for k in t.feature_names} & {k for t in self.item_tables for k in t.feature_names})
        if shared:
            raise ValueError(f"TwoTowerConfig: key(s) {shared} are in both towers' tables; each tower owns its keys")


class TowerArch(nn.Module):
    """One tower: pooled embeddings ++ dense ++ LUM -> MLP (ReLU) -> linear -> [n, embedding_dim] (unit length if asked).

    Example::

        >>> tower = TowerArch("item", [TableConfig("t_item", 10, 4, ["item_id"])], 0, 2, [8], 6, True)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["item_id"], torch.tensor([1, 2, 3]), torch.ones(3, dtype=torch.int32))
        >>> tower(kjt, lum=torch.rand(3, 2)).shape
        torch.Size([3, 6])
    """

    def __init__(
        self, name: str, tables: list[TableConfig], dense_dim: int, lum_dim: int, hidden: list[int], out_dim: int, l2_normalize: bool,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.name, self.dense_dim, self.lum_dim, self.l2_normalize = name, dense_dim, lum_dim, l2_normalize
        self.sparse_arch = (
            PooledSparseArch(EmbeddingBagCollection(tables=[t.to_torchrec() for t in tables], device=device)) if tables else None
        )
        self.in_features = (self.sparse_arch.out_features if self.sparse_arch else 0) + dense_dim + lum_dim
        self.mlp: nn.Module = MLP(self.in_features, hidden, activation="relu", device=device) if hidden else nn.Identity()
        self.out = nn.Linear(hidden[-1] if hidden else self.in_features, out_dim, device=device)

    def forward(self, features: KeyedJaggedTensor | None, dense: Dense = None, lum: Dense = None) -> torch.Tensor:
        """Tower output [n, out_dim]; `features` may be None only for a tower without tables."""
        owner = f"{self.name} tower"
        parts = []
        if self.sparse_arch is not None:
            if features is None:
                raise ValueError(f"{owner}: sparse features are required")
            parts.append(self.sparse_arch(features))
            n = features.stride()
        else:
            given = next((x for x in (dense, lum) if x is not None), None)
            if given is None:
                raise ValueError(f"{owner}: no input given")
            n = (given if isinstance(given, torch.Tensor) else given.values()).shape[0]
        for x, width, what in ((dense, self.dense_dim, f"{self.name} dense features"), (lum, self.lum_dim, f"{self.name} LUM features")):
            part = dense_part(x, width, what, n, owner)
            if part is not None:
                parts.append(part)
        out = self.out(self.mlp(torch.cat(parts, dim=1)))
        return F.normalize(out, dim=-1) if self.l2_normalize else out


@dataclass
class TwoTowerBatch:
    """(user, positive item) pairs: each side's id features as a KJT, `item_ids` [B] (duplicates share a column), optional dense/LUM."""

    user_features: KeyedJaggedTensor | None
    item_features: KeyedJaggedTensor | None
    item_ids: torch.Tensor
    user_dense: Dense = None
    item_dense: Dense = None
    lum_user: Dense = None
    lum_item: Dense = None


class TwoTower(nn.Module):
    """User and item towers: `user_embeddings(...)` [B, d], `item_embeddings(...)` [N, d], `forward(batch)` both.

    Example::

        >>> cfg = TwoTowerConfig([TableConfig("t_user", 5, 4, ["user_id"])], [TableConfig("t_item", 10, 4, ["item_id"])],
        ...                      lum_user_dim=3, user_mlp=[8], item_mlp=[8], embedding_dim=6)
        >>> model = TwoTower(cfg)
        >>> users = KeyedJaggedTensor.from_lengths_sync(["user_id"], torch.tensor([1, 2]), torch.ones(2, dtype=torch.int32))
        >>> model.user_embeddings(users, lum=torch.rand(2, 3)).shape
        torch.Size([2, 6])
    """

    def __init__(self, config: TwoTowerConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        self.user_tower = TowerArch(
            "user", c.user_tables, c.user_dense_dim, c.lum_user_dim, c.user_mlp, c.embedding_dim, c.l2_normalize, device
        )
        self.item_tower = TowerArch(
            "item", c.item_tables, c.item_dense_dim, c.lum_item_dim, c.item_mlp, c.embedding_dim, c.l2_normalize, device
        )

    def user_embeddings(self, features: KeyedJaggedTensor | None, dense: Dense = None, lum: Dense = None) -> torch.Tensor:
        """User vectors [B, embedding_dim]."""
        with record_function("user_tower"):
            return self.user_tower(features, dense, lum)

    def item_embeddings(self, features: KeyedJaggedTensor | None, dense: Dense = None, lum: Dense = None) -> torch.Tensor:
        """Item vectors [N, embedding_dim]."""
        with record_function("item_tower"):
            return self.item_tower(features, dense, lum)

    def forward(self, batch: TwoTowerBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(user vectors [B, d], positive item vectors [B, d])."""
        users = self.user_embeddings(batch.user_features, batch.user_dense, batch.lum_user)
        items = self.item_embeddings(batch.item_features, batch.item_dense, batch.lum_item)
        if users.shape[0] != items.shape[0] or batch.item_ids.numel() != users.shape[0]:
            raise ValueError(
                f"TwoTower: {users.shape[0]} users, {items.shape[0]} items and {batch.item_ids.numel()} item_ids in one batch"
            )
        return users, items


class TwoTowerTrain(nn.Module):
    """Owns the in-batch softmax loss (temperature from the config): batch -> (loss, (user vectors, item vectors) detached).

    Example::

        >>> cfg = TwoTowerConfig([TableConfig("t_user", 5, 4, ["user_id"])], [TableConfig("t_item", 10, 4, ["item_id"])])
        >>> ids = torch.tensor([1, 2, 2])
        >>> one = torch.ones(3, dtype=torch.int32)
        >>> batch = TwoTowerBatch(KeyedJaggedTensor.from_lengths_sync(["user_id"], torch.tensor([1, 2, 3]), one),
        ...                       KeyedJaggedTensor.from_lengths_sync(["item_id"], ids, one), ids)
        >>> loss, (users, items) = TwoTowerTrain(TwoTower(cfg))(batch)
        >>> loss.dim(), users.shape
        (0, torch.Size([3, 32]))
    """

    def __init__(self, model: TwoTower) -> None:
        super().__init__()
        self.model = model
        c = model.config
        # In-batch negatives only; the unique-id candidate set makes a repeated item one column, not a false negative.
        self.loss_fn = InfoNCELoss(
            InfoNCEConfig(temperature=c.temperature, num_sampled_negatives=0, in_batch_negatives=True, l2_normalize=c.l2_normalize),
            num_items=2,  # unused without sampled negatives
        )

    def forward(self, batch: TwoTowerBatch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(mean in-batch softmax loss, (user vectors, item vectors))."""
        users, items = self.model(batch)
        ids = batch.item_ids.reshape(-1).to(torch.int64)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        # One batch row per unique id (the first): the vector InfoNCELoss sees for that column.
        rows = torch.full((uniq.numel(),), ids.numel(), dtype=torch.int64, device=ids.device)
        rows = rows.scatter_reduce(0, inverse, torch.arange(ids.numel(), device=ids.device), reduce="amin")

        def embed_items(query_ids: torch.Tensor) -> torch.Tensor:
            if not torch.equal(query_ids, uniq):
                raise RuntimeError("TwoTowerTrain: the loss asked for items outside the batch")
            return items[rows]

        loss = self.loss_fn(users, ids, embed_items)
        return loss, (users.detach(), items.detach())


def recall_at_k(
    user_vectors: torch.Tensor,
    item_vectors: torch.Tensor,
    targets: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    ks: tuple[int, ...] = (10, 50),
    exclude: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Mean over users of |top-K ∩ targets| / |targets|, scoring every item by the dot product.

    `targets`: one row index of `item_vectors` per user [U], or jagged `(lengths [U], indices)`;
    users without targets are skipped. `exclude` [N] bool: items never ranked (e.g. padding id 0;
    an excluded target counts as a miss).
    Ties count against the target (an item scoring equal to it ranks above it), so a constant
    model gets chance-level recall, not 1.
    """
    num_users, num_items = user_vectors.shape[0], item_vectors.shape[0]
    if isinstance(targets, tuple):
        lengths, indices = targets
    else:
        if targets.numel() != num_users:
            raise ValueError(f"recall_at_k: {targets.numel()} targets for {num_users} users")
        lengths, indices = torch.ones(num_users, dtype=torch.int64), targets.reshape(-1)
    lengths, indices = lengths.to(torch.int64).cpu(), indices.to(torch.int64).cpu()
    if lengths.numel() != num_users or int(lengths.sum()) != indices.numel():
        raise ValueError(
            f"recall_at_k: target lengths ({lengths.numel()}, sum {int(lengths.sum())}) do not match "
            f"{num_users} users / {indices.numel()} targets"
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_items):
        raise ValueError(f"recall_at_k: target indices must be in [0, {num_items}), got [{int(indices.min())}, {int(indices.max())}]")
    if int((lengths > 0).sum()) == 0:
        raise ValueError("recall_at_k: no user has a target")
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    hits = {k: torch.zeros(num_users, dtype=torch.float64) for k in ks}
    with torch.no_grad():
        for lo in range(0, num_users, chunk_size):
            hi = min(lo + chunk_size, num_users)
            scores = (user_vectors[lo:hi] @ item_vectors.T).float().cpu()  # [u, N]
            if exclude is not None:
                scores = scores.masked_fill(exclude.cpu().view(1, -1), float("-inf"))
            chunk_lengths = lengths[lo:hi]
            pair_user = torch.repeat_interleave(torch.arange(hi - lo), chunk_lengths)
            pair_item = indices[offsets[lo] : offsets[hi]]
            target_scores = scores[pair_user, pair_item]
            # Rank = every other item scoring >= the target (pessimistic ties).
            ranks = (scores[pair_user] >= target_scores[:, None]).sum(dim=1) - 1
            for k in ks:
                per_user = torch.zeros(hi - lo, dtype=torch.float64).index_add(0, pair_user, (ranks < k).double())
                hits[k][lo:hi] = per_user
    has = lengths > 0
    return {f"recall@{k}": float((hits[k][has] / lengths[has]).mean()) for k in ks}
