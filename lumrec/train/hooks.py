"""The parts of a training loop that differ per job: step, evaluation, clock, budget and epoch-end saves.

A job gives `lumrec.train.TrainLoop` one of each; the loop owns everything they share (resume,
patience, best checkpoint, results.json, TensorBoard, progress bar).

    >>> from lumrec.train.hooks import Budget, EvalResult, Evaluation, SavePolicy
    >>> every_2 = Evaluation("hr@10", lambda epoch, state: EvalResult({"epoch": epoch}, 0.5), every_epochs=2)
    >>> [every_2.due(epoch, finished=True, done=False) for epoch in range(4)]
    [False, True, False, True]
    >>> every_2.due(0, finished=False, done=True)  # a run that stops is evaluated where it stands
    True
    >>> Budget(epochs=3).max_seconds, Budget(epochs=3, max_minutes=0.5).max_seconds
    (inf, 30.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol

import torch
import torch.distributed as dist

from lumrec.distributed import any_rank

if TYPE_CHECKING:
    from lumrec.distributed import DistContext
    from lumrec.train.state import TrainState

__all__ = [
    "AnyRankClock",
    "Budget",
    "Clock",
    "EvalResult",
    "Evaluation",
    "GradNormProbe",
    "Rank0Clock",
    "SavePolicy",
    "StepFn",
    "StepResult",
    "dense_parameters",
    "grad_norm",
]


# -- the step --------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What one optimisation step reports: the global batch's mean loss, tokens trained, extra train/ scalars."""

    loss: float
    tokens: int = 0
    scalars: Mapping[str, float | None] = field(default_factory=dict)  # e.g. lr, grad_norm; written at log steps


class StepFn(Protocol):
    """One optimisation step on `batch`; `log` is true at the steps whose scalars are written (measure extras then)."""

    def __call__(self, batch: Any, log: bool) -> StepResult: ...


def grad_norm(params: Iterable[torch.Tensor]) -> float:
    """L2 norm over the `.grad` of `params` (parameters without a gradient count as zero). Reads only."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class GradNormProbe:
    """The gradient norm of some parameters, taken between backward and the optimizer step when armed.

    A job calls the probe right after `loss.backward()`; the loop's step function arms it at log
    steps only, so other steps pay nothing, and the update never changes (no clipping).
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params = list(params)
        self.armed = False
        self.value: float | None = None

    def __call__(self) -> None:
        if self.armed:
            self.value = grad_norm(self.params)

    def take(self) -> float | None:
        """The measured norm (None when not armed), and disarm."""
        value, self.value, self.armed = self.value, None, False
        return value


def dense_parameters(optimizer: Any, part: str = "dense") -> list[torch.Tensor]:
    """The parameters of the `part` optimizer inside a (nested) torchrec CombinedOptimizer.

    The dense part is what a gradient norm can read after backward: sharded tables are updated
    inside backward and keep no `.grad`.
    """
    found: list[torch.Tensor] = []
    for name, inner in getattr(optimizer, "optimizers", []):
        if name == part or name.endswith(f".{part}"):
            found += list(inner.params.values())
        else:
            found += dense_parameters(inner, part)
    return found


# -- evaluation ------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """One evaluation: its history entry, the score that picks the best checkpoint, and what the loop writes."""

    record: dict[str, Any]  # appended to TrainState.history
    score: float  # higher is better; compared with TrainState.best_metric
    best_extra: dict[str, Any] = field(default_factory=dict)  # the best/ checkpoint's extra
    scalars: Mapping[str, Mapping[str, Any] | None] = field(default_factory=dict)  # TensorBoard prefix -> metrics


@dataclass
class Evaluation:
    """When a run is evaluated (every `every_epochs` finished epochs, and where it stops early) and how.

    `evaluate(epoch, state)` runs the job's metrics; `metric` names the score in logs.
    `enabled=False` (no validation split) never evaluates.
    """

    metric: str
    evaluate: Callable[[int, "TrainState"], EvalResult]
    every_epochs: int = 1
    enabled: bool = True

    def due(self, epoch: int, finished: bool, done: bool) -> bool:
        """After epoch `epoch` (`finished`: its last batch ran; `done`: the run stops here)."""
        return self.enabled and (finished and (epoch + 1) % self.every_epochs == 0 or done)

    def __call__(self, epoch: int, state: "TrainState") -> EvalResult:
        return self.evaluate(epoch, state)


# -- time and budget -------------------------------------------------------------------------


class Clock:
    """Training seconds as every rank agrees on them, and the time budget test. One process: its own clock."""

    def __init__(self, ctx: "DistContext | None" = None) -> None:
        self.ctx = ctx

    def seconds(self, local: float) -> float:
        return local

    def over(self, local: float, budget: float) -> bool:
        return self.seconds(local) > budget


class Rank0Clock(Clock):
    """Rank 0's clock on every rank (broadcast), so a time-based lr schedule and the budget agree everywhere."""

    def seconds(self, local: float) -> float:
        if self.ctx is None:
            return local
        box = torch.tensor([local], dtype=torch.float64)
        dist.broadcast(box, src=0)
        return float(box)


class AnyRankClock(Clock):
    """Each rank its own clock; the budget is over on every rank when it is over on any (ranks stop together)."""

    def over(self, local: float, budget: float) -> bool:
        return any_rank(self.ctx, local > budget)


@dataclass
class Budget:
    """How long a run trains and how often it checkpoints and logs."""

    epochs: int
    max_minutes: float = 0.0  # training-time budget (0 = none); evaluation time is not counted
    # A step budget (0 = none): the run ends after that many optimizer steps as it ends when the time
    # budget runs out (evaluated, best model kept, results written), but the same on every machine.
    max_steps: int = 0
    patience: int = 0  # evaluations without a better score before stopping (0 = never stop early)
    checkpoint_every_steps: int = 0  # 0: checkpoints at epoch ends only
    log_every_steps: int = 50  # train/ scalars and the progress bar's postfix (0 = never)

    @property
    def max_seconds(self) -> float:
        return self.max_minutes * 60 if self.max_minutes > 0 else math.inf


@dataclass
class SavePolicy:
    """Which epoch ends are checkpointed: every one, or only where the state beyond the step checkpoints
    changed (an evaluation, the run's end), for jobs whose short epochs make a save cost more than training."""

    every_epoch: bool = True

    def at_epoch_end(self, evaluated: bool, last: bool) -> bool:
        return self.every_epoch or evaluated or last
