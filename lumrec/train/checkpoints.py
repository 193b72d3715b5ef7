"""A run folder's checkpoints: step checkpoints (tensors + TrainState) in OUT/checkpoints, the best model in OUT/best.

The job says what its tensors are (one process or sharded, the names are the unsharded model's);
`RunCheckpoints` saves them with the run state and loads them back in place (DCP).

    >>> import tempfile, torch
    >>> from lumrec.train.checkpoints import RunCheckpoints
    >>> from lumrec.train.state import TrainState
    >>> model = torch.nn.Linear(2, 1)
    >>> ckpt = RunCheckpoints(tempfile.mkdtemp(), keep=2, tensors=lambda for_load: {"model": model.state_dict()},
    ...                       apply=lambda state: model.load_state_dict(state["model"]))
    >>> _ = ckpt.save(TrainState(step=3))
    >>> ckpt.latest(), ckpt.load().step
    (3, 3)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from lumrec.checkpoint import CheckpointManager
from lumrec.train.state import TrainState

__all__ = ["RunCheckpoints", "RunConfig"]


@dataclass
class RunConfig:
    """A run's config as written to OUT/config.json, and what a resumed run may change in it.

    Resuming checkpoints written under another config is refused (`lumrec.config.check_same_run`):
    it would silently mix two experiments. `defaults`: the config's default values, so a run
    folder written before a key existed resumes with the key at its default.
    """

    values: dict[str, Any]
    resumable: Sequence[str] = ()
    defaults: dict[str, Any] | None = None


class RunCheckpoints:
    """Step checkpoints and the best model of one run folder.

    `tensors(for_load)`: the tensors a checkpoint holds (`for_load`: state created first, to be
    loaded into in place); `apply(tensors)`: put loaded tensors into the model and optimizers;
    `best_tensors()`: what best/ holds (the model alone).
    """

    def __init__(self, out: str | os.PathLike, keep: int, tensors: Callable[[bool], dict[str, Any]],
                 apply: Callable[[dict[str, Any]], None], best_tensors: Callable[[], dict[str, Any]] | None = None) -> None:
        self.steps = CheckpointManager(Path(out) / "checkpoints", keep=keep)
        self.best = CheckpointManager(Path(out) / "best", keep=1)
        self.tensors, self.apply, self.best_tensors = tensors, apply, best_tensors

    def latest(self) -> int | None:
        """The newest complete step checkpoint, or None."""
        return self.steps.latest()

    def has_any(self) -> bool:
        """Whether the run folder holds a step checkpoint, complete or damaged (then the run resumes, or says why not)."""
        return bool(self.steps.candidates())

    def save(self, state: TrainState) -> Path:
        """Checkpoint the tensors with `state` (its loader position set by the caller)."""
        return self.steps.save(state.step, self.tensors(False), extra=state.to_extra())

    def load(self) -> TrainState:
        """Load the newest step checkpoint that verifies into the model and optimizers; returns its run state.

        Newer ones that do not verify are logged and set aside (`CheckpointManager.resume`).
        """
        tensors = self.tensors(True)
        info = self.steps.resume(tensors)
        self.apply(tensors)
        return TrainState.from_extra(info.extra)

    def save_best(self, step: int, extra: dict[str, Any]) -> None:
        if self.best_tensors is None:
            raise RuntimeError("RunCheckpoints: no best_tensors given, so no best model can be saved")
        self.best.save(step, self.best_tensors(), extra=extra)
