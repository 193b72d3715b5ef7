"""Pre-LN causal softmax transformer on jagged (optionally packed) sequences: LUM's and SASRec's backbone.

Per block: `x = x + drop(W_o attn(LN(x)))`, `x = x + drop(FFN(LN(x)))`, with attention from
``jagged_causal_attention(kind="softmax")`` (causal inside each segment, query tokens visible
only to themselves). The stack adds learned absolute position embeddings first and, when
`final_norm`, a closing LayerNorm (a pre-LN stack's output is otherwise un-normalised).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from lumrec.modules.ops import JaggedAttentionLayout, build_attention_layout, jagged_causal_attention, segment_positions

__all__ = ["TransformerConfig", "TransformerBlock", "TransformerStack"]


@dataclass
class TransformerConfig:
    """Sizes of a pre-LN transformer block; `max_len` bounds the learned position table."""

    d_model: int = 64
    num_heads: int = 2
    ffn_dim: int = 256
    dropout: float = 0.0
    max_len: int = 256
    learned_positions: bool = True  # add a learned absolute position embedding before the blocks
    final_norm: bool = True  # LayerNorm after the last block

    def __post_init__(self) -> None:
        for name in ("d_model", "num_heads", "ffn_dim", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransformerConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"TransformerConfig: d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig: dropout must be in [0, 1), got {self.dropout}")


class TransformerBlock(nn.Module):
    """One pre-LN block (multi-head causal softmax attention + GELU FFN) on jagged `x [T, d_model]`.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> block = TransformerBlock(TransformerConfig(d_model=8, num_heads=2, ffn_dim=16))
        >>> x = torch.randn(5, 8)
        >>> layout = build_attention_layout(torch.tensor([0, 3, 5]))   # two sequences: 3 and 2 tokens
        >>> block(x, layout).shape
        torch.Size([5, 8])
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.attn_norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn_in = nn.Linear(d, config.ffn_dim)
        self.ffn_out = nn.Linear(config.ffn_dim, d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, layout: JaggedAttentionLayout) -> torch.Tensor:
        """Apply the block under a prebuilt attention layout (segments, causality, query flags)."""
        cfg = self.config
        num_tokens, heads = x.shape[0], cfg.num_heads
        with record_function("transformer/attention"):
            q, k, v = self.qkv(self.attn_norm(x)).view(num_tokens, 3, heads, cfg.d_model // heads).unbind(1)
            attn = jagged_causal_attention(q, k, v, kind="softmax", layout=layout)
            x = x + self.dropout(self.out(attn.reshape(num_tokens, cfg.d_model)))
        with record_function("transformer/ffn"):
            hidden = self.dropout(F.gelu(self.ffn_in(self.ffn_norm(x))))
            return x + self.dropout(self.ffn_out(hidden))


class TransformerStack(nn.Module):
    """Position embedding + `num_layers` pre-LN blocks (+ final LayerNorm) over jagged, packed sequences.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> stack = TransformerStack(TransformerConfig(d_model=8, num_heads=2, ffn_dim=16, max_len=8), num_layers=2)
        >>> x = torch.randn(6, 8)
        >>> offsets = torch.tensor([0, 4, 6])                  # row 0 packs two users
        >>> segment_ids = torch.tensor([0, 0, 1, 1, 0, 0])
        >>> stack(x, offsets, segment_ids=segment_ids).shape
        torch.Size([6, 8])
    """

    def __init__(self, config: TransformerConfig, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"TransformerStack: num_layers must be >= 1, got {num_layers}")
        self.config = config
        self.position_embedding = nn.Embedding(config.max_len, config.d_model) if config.learned_positions else None
        self.input_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(config.d_model) if config.final_norm else None
        # True: in training each block's activations are recomputed in the backward instead of kept
        # (gradients identical). Set by `train.activation_checkpointing`.
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2-style init: N(0, 0.02) weights, residual projections further scaled by 1/sqrt(2 * num_layers).

        Why: with PyTorch's default Linear init the blocks' outputs start several times larger than
        the token embeddings, so the residual stream begins as a blur of the history and the token's
        own identity must be re-learned (measured: a planted next-item task learns ~5x slower).
        """
        residual_std = 0.02 / (2 * len(self.layers)) ** 0.5
        for layer in self.layers:
            for linear, std in ((layer.qkv, 0.02), (layer.ffn_in, 0.02), (layer.out, residual_std), (layer.ffn_out, residual_std)):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
            layer.attn_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        if self.position_embedding is not None:
            nn.init.normal_(self.position_embedding.weight, std=0.02)
        if self.final_norm is not None:
            self.final_norm.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        query_flags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode `x [T, d_model]` (rows by `offsets`, segments by `segment_ids`); `positions` default to index in segment."""
        cfg = self.config
        if x.dim() != 2 or x.shape[1] != cfg.d_model:
            raise ValueError(f"TransformerStack: x must be [T, {cfg.d_model}], got {tuple(x.shape)}")
        if int(offsets[-1]) != x.shape[0]:
            raise ValueError(f"TransformerStack: offsets describe {int(offsets[-1])} tokens but x has {x.shape[0]}")
        if self.position_embedding is not None:
            if positions is None:
                positions = segment_positions(offsets, segment_ids)
            if positions.shape != (x.shape[0],):
                raise ValueError(f"TransformerStack: positions must be [{x.shape[0]}], got {tuple(positions.shape)}")
            if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= cfg.max_len):
                raise ValueError(
                    f"TransformerStack: positions must be in [0, {cfg.max_len}) (max_len), got up to {int(positions.max())}"
                )
            x = x + self.position_embedding(positions)
        x = self.input_dropout(x)
        layout = build_attention_layout(offsets, segment_ids=segment_ids, query_flags=query_flags, positions=positions)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            with record_function(f"transformer/layer_{i}"):
                # Non-reentrant checkpointing restores the RNG state, so dropout masks match the kept-activation run.
                x = checkpoint(layer, x, layout, use_reentrant=False) if recompute else layer(x, layout)
        return self.final_norm(x) if self.final_norm is not None else x
