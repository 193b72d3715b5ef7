"""The one resumable training loop of lumrec's jobs, and the hooks in which the jobs differ.

`TrainLoop` (lumrec.train.loop) runs a job; `lumrec.train.hooks` holds the strategy objects a job
passes to it (step function, evaluation, clock, budget, epoch-end saves); `EpochJob` is the
ranking and retrieval jobs' shared set of hooks.
"""

from lumrec.train.checkpoints import RunCheckpoints, RunConfig
from lumrec.train.epoch_job import EpochJob, seed_everything
from lumrec.train.hooks import (
    AnyRankClock,
    Budget,
    Clock,
    EvalResult,
    Evaluation,
    GradNormProbe,
    Rank0Clock,
    SavePolicy,
    StepFn,
    StepResult,
    dense_parameters,
    grad_norm,
)
from lumrec.train.loop import ResumableLoader, TrainLoop
from lumrec.train.state import TrainState

__all__ = [
    "AnyRankClock",
    "Budget",
    "Clock",
    "EpochJob",
    "EvalResult",
    "Evaluation",
    "GradNormProbe",
    "Rank0Clock",
    "ResumableLoader",
    "RunCheckpoints",
    "RunConfig",
    "SavePolicy",
    "StepFn",
    "StepResult",
    "TrainLoop",
    "TrainState",
    "dense_parameters",
    "grad_norm",
    "seed_everything",
]
