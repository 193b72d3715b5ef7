"""The training-loop hooks shared by ranking and retrieval jobs: sample batches, an evaluation of the
validation and test splits after every epoch, the best epoch by a validation metric.

A subclass sets `model`, `optimizer`, `samples`, `counts`, `loader`, `train` (a RankTrainConfig)
and `out`, then calls `_init_job()`; it implements `step_loss(batch)`, `evaluate(split)`,
`config_dict()` and `result_extras()`. `run()` hands these to `lumrec.train.TrainLoop`.

On several ranks a subclass also sets `ctx` (a DistContext) and overrides `reduce_loss` (the global
mean loss) and the checkpoint hooks `_tensors` / `_load_tensors`; every rank then runs the loop in
lockstep (same batches, same decisions), and rank 0 alone writes the job's own files.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lumrec.config import default_values

from lumrec.distributed import is_main
from lumrec.tracking import count_parameters, log_job_start
from lumrec.train.checkpoints import RunCheckpoints, RunConfig
from lumrec.train.hooks import AnyRankClock, Budget, EvalResult, Evaluation, GradNormProbe, StepResult, dense_parameters
from lumrec.train.loop import TrainLoop
from lumrec.train.state import TrainState

if TYPE_CHECKING:
    from lumrec.data.ranking_samples import RankingSampleBatch
    from lumrec.distributed import DistContext

log = logging.getLogger("lumrec.rank")

__all__ = ["EpochJob", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (model initialisation draws from them)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class EpochJob:
    """A ranking or retrieval job as `TrainLoop` runs it: every epoch evaluated on the validation and test
    splits, the best validation `metric` kept, patience and a time budget agreed by all ranks (any rank's
    clock), a checkpoint at every epoch end."""

    job = "job"
    metric = "auc"  # the validation metric that picks the best epoch (higher is better)
    ctx: "DistContext | None" = None  # set when this process is one of several ranks
    num_parameters: int | None = None  # the unsharded model's size (counted before sharding); None: counted at run()

    # Keys a resumed run may change: they do not alter what the checkpoints mean.
    RESUMABLE_CHANGES = ("train.epochs", "train.progress", "train.threads", "train.device", "train.max_minutes", "train.patience",
                         "train.log_every_steps", "train.checkpoint_every_steps", "train.keep_checkpoints", "out")

    @property
    def is_main(self) -> bool:
        """True where single-writer files are written and progress is shown: rank 0, or the only process."""
        return is_main(self.ctx)

    @property
    def state(self) -> TrainState:
        return self.loop.state

    def _init_job(self) -> None:
        t = self.train
        self.out.mkdir(parents=True, exist_ok=True)
        self.validates = self.counts["valid"]["samples"] > 0
        self.tests = self.counts["test"]["samples"] > 0
        self.grad_norm = GradNormProbe(self._dense_parameters())
        self.loop = TrainLoop(
            self.job, self.out, self.loader, self._loop_step,
            # Every epoch is evaluated; without a validation split the last one is reported (the test set never picks a model).
            Evaluation(self.metric, self._evaluate_epoch),
            RunCheckpoints(self.out, t.keep_checkpoints, self._tensors, self._load_tensors, lambda: {"model": self.model_state()}),
            RunConfig(self.config_dict(), self.RESUMABLE_CHANGES, self.config_defaults()),
            Budget(t.epochs, max_minutes=t.max_minutes, patience=t.patience, checkpoint_every_steps=t.checkpoint_every_steps,
                   log_every_steps=t.log_every_steps),
            self._results, clock=AnyRankClock(self.ctx), ctx=self.ctx, progress=t.progress, train_mode=lambda: self.model.train(),
        )

    # -- what a subclass implements ----------------------------------------------------------
    def step_loss(self, batch: "RankingSampleBatch") -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, split: str) -> dict[str, float]:
        raise NotImplementedError

    def result_extras(self) -> dict[str, Any]:
        return {}

    def config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def config_defaults(self) -> dict[str, Any] | None:
        """The config's default values, so that a run folder written before a key existed resumes with it at its
        default (None: every key must match)."""
        return default_values(getattr(self, "cfg", None))

    def _dense_parameters(self) -> list[torch.Tensor]:
        """The parameters whose gradient norm is logged: the keyed optimizer's dense part (tables excluded)."""
        return dense_parameters(self.optimizer)

    def reduce_loss(self, loss: torch.Tensor) -> float:
        """The step's loss as reported (the global mean over ranks where a subclass trains on several)."""
        return float(loss.detach())

    # -- the step ----------------------------------------------------------------------------
    def train_step(self, batch: "RankingSampleBatch") -> float:
        """One optimizer step on `batch`; returns the reported loss."""
        loss = self.step_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.grad_norm()  # the dense gradients' norm at log steps (read only)
        self.optimizer.step()
        return self.reduce_loss(loss)

    def _loop_step(self, batch: "RankingSampleBatch", log_step: bool) -> StepResult:
        self.grad_norm.armed = log_step
        loss = self.train_step(batch)
        return StepResult(loss, scalars={"lr": self.train.lr, "grad_norm": self.grad_norm.take()})

    # -- checkpoints ----------------------------------------------------------------------
    def _tensors(self, for_load: bool = False) -> dict[str, Any]:
        """The tensors a checkpoint holds; `for_load`: to be loaded into in place (state created first)."""
        model_sd, optim_sd = get_state_dict(self.model, [self.optimizer])
        return {"model": model_sd, "optim": optim_sd}

    def _load_tensors(self, state: dict[str, Any]) -> None:
        """Put a loaded `_tensors(for_load=True)` dict into the model and optimizer."""
        set_state_dict(self.model, [self.optimizer], model_state_dict=state["model"], optim_state_dict=state["optim"])

    def model_state(self) -> dict[str, Any]:
        """The model's tensors under the unsharded model's names (what best/ holds)."""
        return self.model.state_dict()

    def save(self) -> None:
        """Checkpoint weights, optimizer and run state (loader position included)."""
        self.loop.save()

    def maybe_resume(self) -> bool:
        """Continue from the latest complete checkpoint of this run folder, if any."""
        return self.loop.resume()

    # -- the loop ---------------------------------------------------------------------------
    def run(self, max_epochs: int | None = None, max_steps: int | None = None) -> dict[str, Any]:
        """Train until epochs / patience / budget (or `max_epochs` / `max_steps`: a simulated kill); then report the best epoch."""
        if self.counts["train"]["samples"] == 0:
            raise ValueError(f"{self.job}: no training samples (counts {self.counts}); check samples.first_day / last_day / split_mode")
        if self.is_main:
            log_job_start(self.job, data=f"{self.counts['train']['samples']:,} train samples",
                          parameters=self.num_parameters if self.num_parameters is not None else count_parameters(self.model),
                          device=str(getattr(self, "device", "cpu")), threads=torch.get_num_threads(),
                          **({"ranks": self.ctx.world_size} if self.ctx is not None else {}))
        return self.loop.run(max_epochs=max_epochs, max_steps=max_steps)

    def _evaluate_epoch(self, epoch: int, state: TrainState) -> EvalResult:
        """Validation and test metrics of the current model; the score is the validation `metric` (else the epoch)."""
        train_loss = state.epoch_loss
        valid = self.evaluate("valid") if self.validates else None
        test = self.evaluate("test") if self.tests else None
        key = self.metric
        parts = [f"{name} {key} {m[key]:.4f}" for name, m in (("valid", valid), ("test", test)) if m is not None]
        log.info("%s epoch %d: train loss %.4f, %s", self.job, epoch, train_loss, ", ".join(parts) or "no validation or test split")
        return EvalResult({"epoch": epoch, "step": state.step, "train_loss": train_loss, "valid": valid, "test": test},
                          score=valid[key] if valid is not None else float(epoch), best_extra={"epoch": epoch},
                          scalars={"valid": valid, "test": test})

    def _results(self, state: TrainState) -> dict[str, Any]:
        """Test metrics of the best-validation epoch (results.json)."""
        best = next((h for h in state.history if h["epoch"] == state.best_epoch), None)
        if best is None:
            raise RuntimeError(f"{self.out}: no epoch was evaluated (train.epochs={self.train.epochs})")
        secs = state.train_seconds
        result = {
            **self.result_extras(),
            "test": best["test"],
            "valid": best["valid"],
            "best_epoch": state.best_epoch,
            "epochs_run": len(state.history),
            "steps": state.step,
            "samples": self.counts,
            "train_minutes": round(secs / 60, 3),
            "history": state.history,
        }
        if best["test"] is not None:
            log.info("%s test (best epoch %d): %s", self.job, state.best_epoch,
                     " ".join(f"{k}={v:.4f}" for k, v in best["test"].items() if k != "count"))
        return result
