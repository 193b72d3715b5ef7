"""The progress a training checkpoint carries besides tensors.

    >>> from lumrec.train.state import TrainState
    >>> state = TrainState.from_extra({"step": 7, "epoch": 0, "batch": 7, "best_auc": 0.61})
    >>> state.step, state.best_metric, TrainState.from_extra(state.to_extra()) == state
    (7, 0.61, True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["TrainState"]

# Checkpoint `extra` keys that name a TrainState field otherwise: ranking and retrieval runs call
# their best validation score best_auc.
_ALIASES = {"best_auc": "best_metric"}


@dataclass
class TrainState:
    """Where a run stands: step, loader position, best evaluation, patience, time, tokens, history, thread counts."""

    step: int = 0
    epoch: int = 0  # loader position: epoch and next batch
    batch: int = 0
    best_metric: float = -1.0  # the evaluation policy's score of the best evaluation (higher is better)
    best_epoch: int = -1
    bad_evals: int = 0  # evaluations since the best one
    train_seconds: float = 0.0  # training time (evaluation and checkpoints excluded)
    tokens: int = 0  # tokens trained on (jobs that count them)
    loss_sum: float = 0.0  # training loss of the current epoch so far (a mid-epoch resume continues it)
    loss_count: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    done: bool = False  # patience or the time budget ran out
    # torch thread counts the run trained with, in order (one entry unless a resume changed it): float
    # sums run in another order with another count, so such a run is not bit-identical to an uninterrupted one.
    threads: list[int] = field(default_factory=list)

    @property
    def epoch_loss(self) -> float:
        """Mean training loss of the current epoch so far (0 before its first step)."""
        return self.loss_sum / max(self.loss_count, 1)

    def to_extra(self) -> dict[str, Any]:
        """The JSON-able dict a checkpoint stores."""
        return asdict(self)

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> "TrainState":
        """The state a checkpoint stored (unknown keys are an error: they would be silently lost)."""
        return cls(**{_ALIASES.get(key, key): value for key, value in extra.items()})
