"""lumrec.train.TrainLoop on a toy job: exact resume, patience, max_steps / max_epochs, the time budget,
the best checkpoint by the evaluation's score, epoch-end saves, gradient norms and TensorBoard scalars."""

from __future__ import annotations

import doctest
import importlib
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lumrec.checkpoint import CheckpointManager
from lumrec.config import ConfigError
from lumrec.train import (
    AnyRankClock,
    Budget,
    Clock,
    EvalResult,
    Evaluation,
    GradNormProbe,
    Rank0Clock,
    RunCheckpoints,
    RunConfig,
    SavePolicy,
    StepResult,
    TrainLoop,
    TrainState,
    grad_norm,
)

BATCHES = 5  # per epoch


class ToyLoader:
    """A resumable loader: batch b of epoch e is a fixed function of (e, b), so any position replays alike."""

    def __init__(self) -> None:
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        return BATCHES

    def __iter__(self) -> Iterator[torch.Tensor]:
        while self.batch < BATCHES:
            g = torch.Generator().manual_seed(1000 * self.epoch + self.batch)
            self.batch += 1
            yield torch.randn(8, 3, generator=g)
        self.epoch, self.batch = self.epoch + 1, 0

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]


class ToyJob:
    """A linear model trained with Adam on a noisy target; the noise is seeded by the step, like dropout in the real jobs."""

    def __init__(self, out: Path, scores: list[float] | None = None, config: dict[str, Any] | None = None,
                 saves: SavePolicy | None = None, clock: Clock | None = None, **budget: Any) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.05)
        self.grad_norm = GradNormProbe(self.model.parameters())
        self.scores = scores  # the evaluation's score per epoch; None: minus the validation loss
        self.evaluated: list[int] = []
        budget = {"epochs": 3, "checkpoint_every_steps": 3, "log_every_steps": 2, **budget}
        self.loop = TrainLoop(
            "toy", out, ToyLoader(), self.step, Evaluation("score", self.evaluate),
            RunCheckpoints(out, keep=10, tensors=self.tensors, apply=self.apply, best_tensors=lambda: {"model": self.model.state_dict()}),
            RunConfig(config or {"lr": 0.05}, resumable=("epochs",)), Budget(**budget), self.results,
            clock=clock, saves=saves, progress=False, train_mode=self.model.train,
        )

    def step(self, x: torch.Tensor, log: bool) -> StepResult:
        noise = torch.randn(len(x), 1, generator=torch.Generator().manual_seed(self.loop.state.step))
        loss = ((self.model(x) - (x.sum(1, keepdim=True) + 0.1 * noise)) ** 2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.grad_norm.armed = log
        self.grad_norm()
        self.optimizer.step()
        return StepResult(float(loss.detach()), tokens=len(x), scalars={"grad_norm": self.grad_norm.take()})

    def evaluate(self, epoch: int, state: TrainState) -> EvalResult:
        self.evaluated.append(epoch)
        with torch.no_grad():
            x = torch.randn(16, 3, generator=torch.Generator().manual_seed(7))
            valid_loss = float(((self.model(x) - x.sum(1, keepdim=True)) ** 2).mean())
        score = self.scores[epoch] if self.scores is not None else -valid_loss
        return EvalResult({"epoch": epoch, "step": state.step, "valid_loss": valid_loss}, score, {"epoch": epoch},
                          scalars={"valid": {"loss": valid_loss}})

    def tensors(self, for_load: bool) -> dict[str, Any]:
        if for_load and not self.optimizer.state:
            for p in self.model.parameters():  # Adam's lazy state must exist to be loaded into in place
                p.grad = torch.zeros_like(p)
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.param_groups[0]["lr"] = 0.0
            self.optimizer.step()
            self.optimizer.param_groups[0]["lr"] = lr
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def apply(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])

    def results(self, state: TrainState) -> dict[str, Any]:
        return {"best_epoch": state.best_epoch, "best": state.best_metric, "steps": state.step, "history": state.history}


def _weights(job: ToyJob) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in job.model.state_dict().items()}


def _same_state(a: TrainState, b: TrainState) -> None:
    """Equal apart from the training time (each process's own clock)."""
    assert {**a.to_extra(), "train_seconds": 0} == {**b.to_extra(), "train_seconds": 0}


@pytest.mark.parametrize("kill_at", [4, 5, 7])  # mid-epoch between checkpoints, an epoch's last step, after a checkpoint
def test_resume_from_a_kill_equals_an_uninterrupted_run(tmp_path, kill_at):
    straight = ToyJob(tmp_path / "a")
    result = straight.loop.run()
    assert result["steps"] == 3 * BATCHES and json.loads((tmp_path / "a" / "results.json").read_text()) == result

    first = ToyJob(tmp_path / "b")
    stopped = first.loop.run(max_steps=kill_at)
    assert stopped == {"stopped": "max_steps", "epoch": first.loop.loader.epoch, "step": kill_at}
    assert CheckpointManager(tmp_path / "b" / "checkpoints").latest() == kill_at  # the kill point is checkpointed
    assert not (tmp_path / "b" / "results.json").exists()
    resumed = ToyJob(tmp_path / "b")
    assert resumed.loop.run() == result
    assert resumed.loop.resumed_from_step == kill_at and straight.loop.resumed_from_step is None
    _same_state(resumed.loop.state, straight.loop.state)
    for name, tensor in _weights(straight).items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    # Each epoch was evaluated exactly once over the two processes.
    assert sorted(first.evaluated + resumed.evaluated) == straight.evaluated == [0, 1, 2]


def test_max_epochs_stops_at_an_epoch_boundary_and_resumes(tmp_path):
    straight = ToyJob(tmp_path / "a")
    straight.loop.run()
    first = ToyJob(tmp_path / "b")
    assert first.loop.run(max_epochs=1) == {"stopped": "max_epochs", "epoch": 1, "step": BATCHES}
    resumed = ToyJob(tmp_path / "b")
    resumed.loop.run()
    _same_state(resumed.loop.state, straight.loop.state)


def test_best_checkpoint_is_the_best_score_and_patience_stops(tmp_path):
    # Scores 0.1, 0.5, 0.3, 0.2, 0.6: the best is epoch 1 until patience 2 stops the run after epoch 3.
    job = ToyJob(tmp_path / "p", scores=[0.1, 0.5, 0.3, 0.2, 0.6], epochs=5, patience=2)
    weights_at = {}
    real = job.evaluate

    def remember(epoch: int, state: TrainState) -> EvalResult:
        weights_at[epoch] = _weights(job)
        return real(epoch, state)

    job.loop.evaluation.evaluate = remember
    result = job.loop.run()
    assert job.evaluated == [0, 1, 2, 3] and job.loop.state.done
    assert (result["best_epoch"], result["best"]) == (1, 0.5) and job.loop.state.bad_evals == 2
    best = CheckpointManager(tmp_path / "p" / "best", keep=0)
    assert best.steps() == [2 * BATCHES] and best.verify(2 * BATCHES).extra == {"epoch": 1}
    saved = {"model": {k: torch.zeros_like(v) for k, v in job.model.state_dict().items()}}
    best.load(saved)
    for name, tensor in weights_at[1].items():
        assert torch.equal(saved["model"][name], tensor), name
    # Patience 0: never stops early.
    never = ToyJob(tmp_path / "n", scores=[0.5, 0.4, 0.3, 0.2, 0.1], epochs=5, patience=0)
    never.loop.run()
    assert never.evaluated == [0, 1, 2, 3, 4] and never.loop.state.best_epoch == 0


def test_time_budget_stops_every_clock_and_evaluates_where_it_stops(tmp_path):
    for i, clock in enumerate([None, Rank0Clock(), AnyRankClock()]):
        job = ToyJob(tmp_path / str(i), clock=clock, max_minutes=1e-9)
        result = job.loop.run()
        assert job.loop.state.done and result["steps"] == 1 and job.evaluated == [0]
        assert job.loop.state.train_seconds > 0
    assert Rank0Clock().seconds(2.5) == AnyRankClock().seconds(2.5) == 2.5  # one process: its own clock
    assert AnyRankClock().over(2.0, 1.0) and not Rank0Clock().over(1.0, 2.0)


@pytest.mark.parametrize("budget", [1, 7, 10, 11])  # first step, mid-epoch, an epoch's last step, past it
def test_step_budget_ends_the_run_where_it_stops_evaluated_and_a_kill_resumes_to_the_same(tmp_path, budget):
    straight = ToyJob(tmp_path / "a", max_steps=budget, checkpoint_every_steps=budget)
    result = straight.loop.run()
    epoch_of_last_step = (budget - 1) // BATCHES
    assert straight.loop.state.done and result["steps"] == budget
    assert straight.evaluated == list(range(epoch_of_last_step + 1))  # ended epochs, and the one it stops in
    assert json.loads((tmp_path / "a" / "results.json").read_text()) == result
    # Killed right after the checkpoint at the budget's step, before the run's end was recorded: the
    # resumed run takes no further step and ends as the uninterrupted one did.
    first = ToyJob(tmp_path / "b", max_steps=budget, checkpoint_every_steps=budget)
    first.loop.run(max_steps=budget)
    resumed = ToyJob(tmp_path / "b", max_steps=budget, checkpoint_every_steps=budget)
    assert resumed.loop.run() == result
    _same_state(resumed.loop.state, straight.loop.state)
    for name, tensor in _weights(straight).items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_epoch_end_saves_follow_the_save_policy(tmp_path):
    def saved_steps(out: Path, **kw: Any) -> list[int]:
        ToyJob(out, **kw).loop.run()
        return CheckpointManager(out / "checkpoints").steps()

    # No step checkpoints; evaluation every 2nd epoch: only the evaluated epoch end and the last one are saved.
    sparse = dict(checkpoint_every_steps=0, epochs=3)
    assert saved_steps(tmp_path / "every", **sparse) == [5, 10, 15]
    only_needed = ToyJob(tmp_path / "needed", saves=SavePolicy(every_epoch=False), **sparse)
    only_needed.loop.evaluation.every_epochs = 2
    only_needed.loop.run()
    assert CheckpointManager(tmp_path / "needed" / "checkpoints").steps() == [10, 15]
    assert only_needed.evaluated == [1]


def test_evaluation_schedule():
    never = Evaluation("m", lambda e, s: EvalResult({}, 0.0), enabled=False)
    assert not never.due(0, finished=True, done=True)
    every = Evaluation("m", lambda e, s: EvalResult({}, 0.0))
    assert every.due(0, finished=True, done=False) and not every.due(0, finished=False, done=False)


def test_resume_checks_the_config(tmp_path):
    ToyJob(tmp_path / "r").loop.run(max_steps=4)
    with pytest.raises(ConfigError, match=r"another config \(lr: 0\.05 -> 0\.1\)"):
        ToyJob(tmp_path / "r", config={"lr": 0.1}).loop.run()
    # A resumable key may change: the run goes on from its checkpoint.
    job = ToyJob(tmp_path / "r", config={"lr": 0.05, "epochs": 4}, epochs=4)
    assert job.loop.resume() and job.loop.state.step == 4


def test_grad_norm_is_measured_at_log_steps_only_and_never_changes_the_update(tmp_path):
    logged, quiet = ToyJob(tmp_path / "l", log_every_steps=1), ToyJob(tmp_path / "q", log_every_steps=0)
    logged.loop.run()
    quiet.loop.run()
    for name, tensor in _weights(logged).items():
        assert torch.equal(tensor, quiet.model.state_dict()[name]), name
    events = EventAccumulator(str(tmp_path / "l" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "train/tokens_per_s", "valid/loss"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 3 * BATCHES + 1))
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))
    assert "train/loss" not in _tags(tmp_path / "q" / "tb")
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert grad_norm([p, torch.nn.Parameter(torch.ones(1))]) == pytest.approx(5.0)


def _tags(folder: Path) -> set[str]:
    if not folder.exists():
        return set()
    events = EventAccumulator(str(folder))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_train_state_reads_checkpoints_of_every_job():
    assert TrainState.from_extra({"step": 3, "best_auc": 0.7}).best_metric == 0.7  # ranking checkpoints' name
    state = TrainState(step=5, loss_sum=3.0, loss_count=2, history=[{"epoch": 0}])
    assert TrainState.from_extra(state.to_extra()) == state and state.epoch_loss == 1.5
    with pytest.raises(TypeError):
        TrainState.from_extra({"stepz": 1})


@pytest.mark.parametrize("module", ["lumrec.train.loop", "lumrec.train.hooks", "lumrec.train.state", "lumrec.train.checkpoints"])
def test_module_examples_run(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
