"""Argument types and checks shared by the attention implementations (fast paths and reference)."""

from __future__ import annotations

import math
from typing import Literal, Protocol

import torch

__all__ = ["AttentionKind", "Normaliser", "RelativeBias", "check_kind", "check_qkv", "default_scale"]

AttentionKind = Literal["softmax", "hstu"]
# "length": divide each segment's HSTU scores by that segment's length; a number: by that constant.
Normaliser = float | Literal["length"]


class RelativeBias(Protocol):
    """What attention needs of a relative bias (``lumrec.modules.layers.relative_bias.RelativeAttentionBias``).

    Called on padded blocks `positions, timestamps, query_timestamps [N, L]` it returns
    `[N, heads or 1, L, L]`; the fast path splits that call into pair indices, which depend
    only on the layout and are cached on it, and the gather of learned values.
    """

    def __call__(
        self, positions: torch.Tensor | None, timestamps: torch.Tensor | None, query_timestamps: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def index_key(self) -> tuple: ...

    def pair_indices(
        self, positions: torch.Tensor | None, timestamps: torch.Tensor | None, query_timestamps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...

    def bias_from_indices(self, pos_index: torch.Tensor | None, time_index: torch.Tensor | None) -> torch.Tensor | None: ...


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise unless q, k are `[T, H, Dqk]` and v is `[T, H, Dv]`."""
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            "jagged attention: expected q, k [T, H, Dqk] and v [T, H, Dv]; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def check_kind(kind: str, normaliser: Normaliser | None) -> None:
    """Raise unless `kind` is known and, for "hstu", `normaliser` is positive or "length"."""
    if kind not in ("softmax", "hstu"):
        raise ValueError(f"jagged attention: kind must be 'softmax' or 'hstu', got {kind!r}")
    if kind == "hstu":
        if isinstance(normaliser, str) and normaliser != "length":
            raise ValueError(f"jagged attention: normaliser must be a number or 'length', got {normaliser!r}")
        if normaliser is None or (not isinstance(normaliser, str) and normaliser <= 0):
            raise ValueError(f"jagged attention: hstu needs a positive normaliser or 'length', got {normaliser!r}")


def default_scale(kind: AttentionKind, dqk: int) -> float:
    """The score scale when none is given: 1/sqrt(Dqk) for softmax, 1 for HSTU."""
    return 1.0 / math.sqrt(dqk) if kind == "softmax" else 1.0
