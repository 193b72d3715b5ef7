"""SASRec (Kang & McAuley, ICDM'18) on jagged, packed item sequences, as reproduced in the HSTU paper's tables.

Architecture (ML-1M setting of the HSTU paper's SASRec baseline, trained with sampled softmax):
    x_0 = dropout(sqrt(d) * E[item] + P[position])        E shared with the output side
    per block ("sasrec" style, the reference implementation's layout):
        q = LN_1(x);  h = LN_2(q + MHA(query=q, key=x, value=x));  x = h + FFN(h)
    out = LN_final(x)                                       (or an L2 norm / nothing)

``ItemInputArch`` (item table + absolute positions + dropout) is shared with the HSTU retrieval
model in ``hstu_retrieval.py``.

Positions are counted from the **oldest kept token** (the batch's ``position``: 0 = oldest), not
from the most recent one as in the original TF code (which left-pads to max_len). Why: counted
from the oldest, the hidden state at token t is a function of tokens <= t only, so it is the same
in training (where t is in the middle of a sequence) and at serving time (where t is the last
token), a state can be cached and extended by later events (M-FALCON-style reuse), and packed
segments need no knowledge of their own length. Counted from the newest, every state would move
whenever the user acts again. Generative-recommenders' reproduction also counts from the oldest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.data.batches import JaggedBatch
from lumrec.data.tokens import ITEM
from lumrec.modules.layers.equal_lookups import equal_stride_lookup
from lumrec.modules.ops import JaggedAttentionLayout, build_attention_layout, jagged_causal_attention
from lumrec.modules.retrieval.sequence_model import SequentialRecommender

__all__ = [
    "ItemInputArch",
    "OutputNorm",
    "PositionEmbedding",
    "SASRec",
    "SASRecBlock",
    "SASRecConfig",
    "XavierLinear",
    "apply_output_norm",
    "init_item_table",
]

ITEM_FEATURE = "item_id"
OutputNorm = Literal["layer_norm", "l2", "none"]


def init_item_table(weight: torch.Tensor) -> None:
    """Truncated normal (std 0.02, cut at 2 std): the item-table init of the reference reproduction."""
    with torch.no_grad():
        nn.init.trunc_normal_(weight, mean=0.0, std=0.02, a=-0.04, b=0.04)


def check_dropout(owner: str, name: str, value: float) -> None:
    """Raise a ValueError naming `owner.name` unless 0 <= value < 1."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}: {name} must be in [0, 1), got {value}")


def apply_output_norm(x: torch.Tensor, kind: str, layer_norm: nn.LayerNorm | None) -> torch.Tensor:
    """The model's final normalisation of hidden states: LayerNorm, L2 (eps 1e-6) or none."""
    if kind == "layer_norm":
        assert layer_norm is not None
        return layer_norm(x)
    if kind == "l2":
        return F.normalize(x, dim=-1, eps=1e-6)
    return x


class XavierLinear(nn.Linear):
    """nn.Linear initialised Xavier-normal with zero bias (the reference SASRec init).

    The init lives in the module's own `reset_parameters` because DistributedModelParallel
    materialises meta modules by calling `reset_parameters` on each module that owns a meta
    parameter, never on their parents.
    """

    def reset_parameters(self) -> None:
        """Xavier-normal weight, zero bias."""
        nn.init.xavier_normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class PositionEmbedding(nn.Embedding):
    """Learned absolute position table, truncated-normal init with std sqrt(1/d) (cut at 2 std)."""

    def reset_parameters(self) -> None:
        """Truncated normal, std sqrt(1/embedding_dim)."""
        std = math.sqrt(1.0 / self.embedding_dim)
        with torch.no_grad():
            nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


class ItemInputArch(nn.Module):
    """Item-id table (a one-table torchrec EBC, shared by inputs and candidates) + absolute positions + dropout.

    Input of token t: `dropout(scale * E[item_t] + P[position_t])`, `scale = sqrt(d)` by default
    (as in SASRec and its reproduction: the table is initialised small, std 0.02).
    `lookup_group`: None (one process) or the process group whose ranks pad every table lookup to
    one stride (`lumrec.modules.layers.equal_lookups.set_lookup_group`, for row-wise sharded tables).

    Example::

        >>> import torch
        >>> arch = ItemInputArch(num_items=10, d_model=8, max_len=4, dropout=0.0)
        >>> arch.item_embeddings(torch.tensor([3, 0, 3])).shape
        torch.Size([3, 8])
    """

    lookup_group: Any = None

    def __init__(
        self,
        num_items: int,
        d_model: int,
        max_len: int,
        dropout: float,
        use_position_embedding: bool = True,
        scale_embeddings: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_items < 2:
            raise ValueError(f"ItemInputArch: num_items must be >= 2 (id 0 is padding), got {num_items}")
        self.num_items, self.d_model, self.max_len = num_items, d_model, max_len
        self.scale = math.sqrt(d_model) if scale_embeddings else 1.0
        # SUM pooling over exactly one id per row makes the bag a plain lookup, while keeping the
        # table an EBC that DistributedModelParallel can shard and that can be created on meta.
        self.item_table = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=ITEM_FEATURE,
                    embedding_dim=d_model,
                    num_embeddings=num_items,
                    feature_names=[ITEM_FEATURE],
                    pooling=PoolingType.SUM,
                    init_fn=init_item_table,
                )
            ],
            device=torch.device(device) if device is not None else torch.device("cpu"),
        )
        self.position = PositionEmbedding(max_len, d_model, device=device) if use_position_embedding else None
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Item table: truncated normal std 0.02; positions: truncated normal std sqrt(1/d)."""
        # EBC.reset_parameters is a no-op for a table created on meta even after to_empty (it
        # checks the device it was built with), so the init is applied to the weights directly.
        # A table sharded by DMP is no plain EBC any more and was initialised by DMP (init_fn).
        if type(self.item_table) is EmbeddingBagCollection:
            for config in self.item_table.embedding_bag_configs():
                init_item_table(self.item_table.embedding_bags[config.name].weight)
        if self.position is not None:
            self.position.reset_parameters()

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the item table for any ids: `[*ids.shape, d]` (the output side of the model)."""
        flat = item_ids.reshape(-1).to(torch.int64)
        kjt = KeyedJaggedTensor(
            keys=[ITEM_FEATURE],
            values=flat,
            lengths=torch.ones(flat.numel(), dtype=torch.int32, device=flat.device),
            stride=flat.numel(),
        )
        return self._lookup(kjt).reshape(*item_ids.shape, self.d_model)

    def _lookup(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled rows `[stride, d]` of the item table; on N ranks padded to one stride (`lookup_group`)."""
        if self.lookup_group is not None:
            return equal_stride_lookup(self.item_table, kjt, self.lookup_group)[ITEM_FEATURE]
        return self.item_table(kjt)[ITEM_FEATURE]

    def token_embeddings(self, batch: JaggedBatch) -> torch.Tensor:
        """Item-table rows of the batch's tokens `[T, d]`, looked up through the batch's KJT (key `item_id`)."""
        kjt = batch.kjt
        keys = kjt.keys()
        if ITEM_FEATURE not in keys:
            raise ValueError(f"batch.kjt has no key {ITEM_FEATURE!r}; keys: {keys}")
        if keys != [ITEM_FEATURE]:
            kjt = kjt.permute([keys.index(ITEM_FEATURE)])
        lengths = kjt.lengths()
        if lengths.numel() != batch.num_tokens or bool((lengths != 1).any()):
            raise ValueError(
                f"batch.kjt key {ITEM_FEATURE!r} must hold exactly one id per token "
                f"({batch.num_tokens} tokens, lengths {lengths.unique().tolist()})"
            )
        return self._lookup(kjt)

    def forward(self, batch: JaggedBatch) -> torch.Tensor:
        """Input vectors `[T, d]` of every token of a jagged batch."""
        if batch.max_len > self.max_len and self.position is not None:
            raise ValueError(
                f"batch max_len {batch.max_len} exceeds the model's max_len {self.max_len} (position table size)"
            )
        x = self.token_embeddings(batch)
        if self.scale != 1.0:
            x = x * self.scale
        if self.position is not None:
            x = x + self.position(batch.position)
        return self.dropout(x)


@dataclass
class SASRecConfig:
    """SASRec sizes; defaults are the ML-1M setting (d 50, 2 blocks, 1 head, dropout 0.2, length 200).

    `block_style`: "sasrec" = the reference layout (queries from LN(x), keys/values from x,
    post-attention LN, FFN with its own residual); "pre_ln" = standard pre-LN transformer block.
    `ffn_dim`: None = d_model (the ML-1M reference uses a 50-wide FFN).
    """

    d_model: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    max_len: int = 200
    ffn_dim: int | None = None
    block_style: Literal["sasrec", "pre_ln"] = "sasrec"
    scale_embeddings: bool = True
    output_norm: OutputNorm = "layer_norm"

    def __post_init__(self) -> None:
        for name in ("d_model", "num_blocks", "num_heads", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"SASRecConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"SASRecConfig: d_model {self.d_model} must be divisible by num_heads {self.num_heads}")
        if self.ffn_dim is not None and self.ffn_dim < 1:
            raise ValueError(f"SASRecConfig: ffn_dim must be >= 1 or null, got {self.ffn_dim}")
        check_dropout("SASRecConfig", "dropout", self.dropout)

    @property
    def resolved_ffn_dim(self) -> int:
        """Hidden width of the point-wise FFN."""
        return self.ffn_dim if self.ffn_dim is not None else self.d_model


class SASRecBlock(nn.Module):
    """One SASRec block on jagged `x [T, d]`: causal softmax self-attention + point-wise FFN.

    Example::

        >>> import torch
        >>> from lumrec.modules.ops import build_attention_layout
        >>> block = SASRecBlock(SASRecConfig(d_model=8, num_heads=2, dropout=0.0))
        >>> layout = build_attention_layout(torch.tensor([0, 3, 5]))   # two sequences
        >>> block(torch.randn(5, 8), layout).shape
        torch.Size([5, 8])
    """

    def __init__(self, config: SASRecConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        d, ffn = config.d_model, config.resolved_ffn_dim
        self.config = config
        self.num_heads = config.num_heads
        # eps 1e-8 as in SASRec's reference code.
        self.attn_norm = nn.LayerNorm(d, eps=1e-8, device=device)
        self.q_proj = XavierLinear(d, d, device=device)
        self.kv_proj = XavierLinear(d, 2 * d, device=device)
        self.out_proj = XavierLinear(d, d, device=device)
        # The reference drops attention *weights*; the jagged kernel has no hook there, so the
        # attention output is dropped instead (same rate).
        self.attn_dropout = nn.Dropout(config.dropout)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-8, device=device)
        self.ffn = nn.Sequential(
            XavierLinear(d, ffn, device=device),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            XavierLinear(ffn, d, device=device),
            nn.Dropout(config.dropout),
        )

    def reset_parameters(self) -> None:
        """LayerNorms to identity, projection weights Xavier-normal (the reference init), biases zero."""
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, XavierLinear)):
                module.reset_parameters()

    def _attend(self, q_in: torch.Tensor, kv_in: torch.Tensor, layout: JaggedAttentionLayout) -> torch.Tensor:
        t, d = q_in.shape
        h = self.num_heads
        q = self.q_proj(q_in).view(t, h, d // h)
        k, v = self.kv_proj(kv_in).view(t, 2, h, d // h).unbind(1)
        out = jagged_causal_attention(q, k, v, kind="softmax", layout=layout)
        return self.attn_dropout(self.out_proj(out.reshape(t, d)))

    def forward(self, x: torch.Tensor, layout: JaggedAttentionLayout) -> torch.Tensor:
        """Apply the block; `layout` comes from `build_attention_layout` and is shared by all blocks."""
        if self.config.block_style == "sasrec":
            q_in = self.attn_norm(x)
            h = self.ffn_norm(q_in + self._attend(q_in, x, layout))
            return h + self.ffn(h)
        normed = self.attn_norm(x)
        h = x + self._attend(normed, normed, layout)
        return h + self.ffn(self.ffn_norm(h))


class SASRec(SequentialRecommender):
    """SASRec on jagged item sequences: `forward(batch) -> [T, d]`, `item_embeddings(ids) -> [n, d]`.

    Every item token predicts the next item (`predicts_from = ITEM`); packed segments never
    attend to each other. Create on `device="meta"` and materialise with
    `model.to_empty(device=...)` + `model.reset_parameters()` (or let DMP do it).

    Example::

        >>> import numpy as np, torch
        >>> from lumrec.data.batches import iter_packed_batches
        >>> from lumrec.data.sequences import UserSequences
        >>> from lumrec.data.tokens import TokenConfig, build_item_sequences
        >>> z = np.zeros(5, dtype=np.int64)
        >>> seqs = UserSequences(np.array([7, 8]), np.array([0, 3, 5]), np.array([1, 2, 3, 4, 5]),
        ...                      np.arange(5), z.astype(np.int32), z.astype(np.int32), z, z)
        >>> tokens = build_item_sequences(seqs, TokenConfig(item_features=["item_id"]))
        >>> batch = next(iter_packed_batches(tokens, max_len=8, rows_per_batch=4))
        >>> model = SASRec(SASRecConfig(d_model=8, max_len=8), num_items=6)
        >>> model(batch).shape, model.item_embeddings(torch.tensor([1, 2])).shape
        (torch.Size([5, 8]), torch.Size([2, 8]))
    """

    predicts_from = ITEM

    def __init__(self, config: SASRecConfig, num_items: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        self._num_items = num_items
        self.input = ItemInputArch(
            num_items,
            config.d_model,
            config.max_len,
            config.dropout,
            use_position_embedding=True,
            scale_embeddings=config.scale_embeddings,
            device=device,
        )
        self.blocks = nn.ModuleList(SASRecBlock(config, device=device) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(config.d_model, eps=1e-8, device=device) if config.output_norm == "layer_norm" else None

    @property
    def num_items(self) -> int:
        """Size of the item vocabulary (ids 0..num_items-1, 0 = padding)."""
        return self._num_items

    def reset_parameters(self) -> None:
        """Re-initialise every parameter (after `to_empty` from meta)."""
        self.input.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()
        if self.final_norm is not None:
            self.final_norm.reset_parameters()

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Candidate item vectors: rows of the same table that embeds the input tokens."""
        return self.input.item_embeddings(item_ids)

    def forward(self, batch: JaggedBatch) -> torch.Tensor:
        """Hidden state `[T, d]` of every token; token t sees only earlier tokens of its own sequence."""
        with record_function("sasrec/input"):
            x = self.input(batch)
            # Segment offsets as rows: attention inside a row is then exactly attention inside a sequence.
            layout = build_attention_layout(batch.offsets)
        for i, block in enumerate(self.blocks):
            with record_function(f"sasrec/block_{i}"):
                x = block(x, layout)
        return apply_output_norm(x, self.config.output_norm, self.final_norm)
