"""The resumable training loop every lumrec training job runs (pretrain, rank, retrieve).

What the loop owns: the run folder's lock while it runs (`lumrec.locks`: one job per folder, the
leftovers of killed writers removed at start), epochs over a resumable loader, step checkpoints
with the loader position, exact resume (the config checked against OUT/config.json), budgets
(epochs, `max_steps`, `max_epochs`, patience, an optional wall-clock `max_minutes`), evaluation with the best model
kept in OUT/best, results.json, TensorBoard scalars in OUT/tb (train/loss, train/<step scalars>,
train/tokens_per_s, and each evaluation's metrics) and a progress bar per epoch (rank 0, on a
terminal). What a job gives it: a step function, an `Evaluation`, a `Clock`, a `SavePolicy` and
a `results` function (see `lumrec.train.hooks`).

On N ranks every rank runs the loop in lockstep (same batches, same decisions); rank 0 alone
writes config.json, results.json and TensorBoard.

    >>> import tempfile, torch
    >>> from lumrec.train import Budget, EvalResult, Evaluation, RunCheckpoints, RunConfig, StepResult, TrainLoop
    >>> w = torch.nn.Parameter(torch.zeros(1))
    >>> opt = torch.optim.SGD([w], lr=0.1)
    >>> class Batches:  # a resumable loader: `epoch`, `batch`, len(), iteration from `batch` on
    ...     epoch = batch = 0
    ...     def __len__(self): return 4
    ...     def __iter__(self):
    ...         while self.batch < 4:
    ...             self.batch += 1
    ...             yield torch.tensor([1.0])
    ...         self.epoch, self.batch = self.epoch + 1, 0
    ...     def load_state_dict(self, s): self.epoch, self.batch = s["epoch"], s["batch"]
    >>> def step(x, log):
    ...     loss = ((w - x) ** 2).sum(); opt.zero_grad(); loss.backward(); opt.step()
    ...     return StepResult(float(loss.detach()))
    >>> out = tempfile.mkdtemp()
    >>> loop = TrainLoop("toy", out, Batches(), step,
    ...     Evaluation("neg_loss", lambda epoch, state: EvalResult({"epoch": epoch}, -float((w.detach() - 1) ** 2))),
    ...     RunCheckpoints(out, keep=2, tensors=lambda for_load: {"w": w}, apply=lambda s: None, best_tensors=lambda: {"w": w}),
    ...     RunConfig({"lr": 0.1}), Budget(epochs=2), results=lambda state: {"steps": state.step}, progress=False)
    >>> loop.run()
    {'steps': 8}
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from lumrec.config import check_same_run
from lumrec.data.dataset import write_text_atomic
from lumrec.distributed import barrier, is_main
from lumrec.faults import failpoint
from lumrec.locks import RunLock, under_lock
from lumrec.tracking import ScalarLog, progress_bar
from lumrec.train.checkpoints import RunCheckpoints, RunConfig
from lumrec.train.hooks import Budget, Clock, Evaluation, SavePolicy, StepFn, StepResult
from lumrec.train.state import TrainState

if TYPE_CHECKING:
    from lumrec.distributed import DistContext

log = logging.getLogger("lumrec.train")

__all__ = ["ResumableLoader", "TrainLoop"]


class ResumableLoader(Protocol):
    """Batches of one epoch from position (`epoch`, `batch`) on; the position advances as batches are taken."""

    epoch: int
    batch: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Any: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...


class TrainLoop:
    """One run's training: `run()` resumes, trains to the budget, evaluates, checkpoints and returns results.json's content.

    `name` prefixes the progress bar and the failpoint hit after every step (`NAME.step`);
    `train_mode()` puts the model in training mode before the first step; `on_fresh_start()` runs
    when the run folder holds no checkpoint (e.g. initialise from another run's weights).
    """

    def __init__(self, name: str, out: str | os.PathLike, loader: ResumableLoader, step: StepFn, evaluation: Evaluation,
                 checkpoints: RunCheckpoints, config: RunConfig, budget: Budget, results: Callable[[TrainState], dict[str, Any]],
                 *, clock: Clock | None = None, saves: SavePolicy | None = None, ctx: "DistContext | None" = None,
                 progress: bool = True, train_mode: Callable[[], Any] | None = None,
                 on_fresh_start: Callable[[], Any] | None = None) -> None:
        self.name, self.out, self.loader, self.step = name, Path(out), loader, step
        self.evaluation, self.checkpoints, self.config, self.budget = evaluation, checkpoints, config, budget
        self.results = results
        self.clock = clock if clock is not None else Clock(ctx)
        self.saves = saves if saves is not None else SavePolicy()
        self.ctx, self.progress = ctx, progress
        self.train_mode, self.on_fresh_start = train_mode, on_fresh_start
        self.is_main = is_main(ctx)
        self.state = TrainState()
        self.resumed_from_step: int | None = None  # set when run() continues an earlier process's checkpoint
        self.scalars = ScalarLog(self.out, enabled=self.is_main)
        self._t0 = time.perf_counter()

    # -- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint tensors and run state, the loader position included."""
        self.state.epoch, self.state.batch = self.loader.epoch, self.loader.batch
        self.checkpoints.save(self.state)

    def resume(self) -> bool:
        """Continue from the newest checkpoint of the run folder that verifies, if it holds any (else `on_fresh_start`).

        A folder whose checkpoints are all damaged is no fresh start: loading raises a CheckpointError naming each.
        """
        if not self.checkpoints.has_any():
            if self.on_fresh_start is not None:
                self.on_fresh_start()
            return False
        check_same_run(self.out / "config.json", self.config.values, tuple(self.config.resumable), self.config.defaults)
        self.state = self.checkpoints.load()
        self.loader.load_state_dict({"epoch": self.state.epoch, "batch": self.state.batch})
        self.resumed_from_step = self.state.step
        log.info("resumed %s from step %d (epoch %d, batch %d)", self.out, self.state.step, self.state.epoch, self.state.batch)
        return True

    # -- time -------------------------------------------------------------------------------
    def train_seconds(self) -> float:
        """Training seconds so far, as the clock has every rank agree on them."""
        return self.clock.seconds(self._local_seconds())

    def _local_seconds(self) -> float:
        return self.state.train_seconds + (time.perf_counter() - self._t0)

    def _bank_time(self) -> None:
        """Move the time since the last mark into the state (before a checkpoint or at an epoch's end)."""
        self.state.train_seconds += time.perf_counter() - self._t0
        self._t0 = time.perf_counter()

    # -- the loop ---------------------------------------------------------------------------
    @under_lock(lambda self, *args, **kwargs: RunLock(self.out, self.name, self.ctx))  # one job per run folder
    def run(self, max_epochs: int | None = None, max_steps: int | None = None) -> dict[str, Any]:
        """Train until epochs / patience / time budget run out, then return (and write) the job's results.

        `max_epochs` / `max_steps` stop as a kill would, after a checkpoint, and return
        {"stopped": "max_epochs" | "max_steps", "epoch": ..., "step": ...}.
        """
        self.resume()
        self._record_threads()
        barrier(self.ctx)  # every rank has compared config.json before rank 0 rewrites it
        if self.is_main:
            write_text_atomic(self.out / "config.json", json.dumps(self.config.values, indent=2))
        b, state, loader = self.budget, self.state, self.loader
        if self.train_mode is not None:
            self.train_mode()
        while not state.done and loader.epoch < b.epochs:
            if max_epochs is not None and loader.epoch >= max_epochs:
                return self._stopped("max_epochs")
            epoch = loader.epoch
            if b.max_steps and state.step >= b.max_steps:
                # Resumed from a checkpoint taken at the step budget before the run's end was recorded:
                # end it as it would have ended, without another step.
                state.done = True
                if self.evaluation.due(epoch, finished=False, done=True):
                    self._evaluate(epoch)
                self.save()
                break
            if loader.batch == 0:
                state.loss_sum, state.loss_count = 0.0, 0
            bar = progress_bar(total=len(loader), desc=f"{self.name} epoch {epoch}", main_process=self.is_main and self.progress,
                               initial=loader.batch, unit="batch", mininterval=2.0,
                               leave=False)  # the epoch's log line is the record; the bar only shows it moving
            self._t0, tokens0 = time.perf_counter(), state.tokens
            for batch in loader:
                logs = b.log_every_steps > 0 and (state.step + 1) % b.log_every_steps == 0
                out = self.step(batch, logs)
                state.step += 1
                state.tokens += out.tokens
                failpoint(f"{self.name}.step")
                state.loss_sum += out.loss
                state.loss_count += 1
                bar.update(1)
                if logs:
                    self._log_step(bar, out, (state.tokens - tokens0) / max(time.perf_counter() - self._t0, 1e-9))
                if b.checkpoint_every_steps and state.step % b.checkpoint_every_steps == 0:
                    self._bank_time()
                    tokens0 = state.tokens
                    self.save()
                if max_steps is not None and state.step >= max_steps:
                    break
                if b.max_steps and state.step >= b.max_steps:
                    log.info("%s: step budget of %d steps reached", self.name, b.max_steps)
                    state.done = True
                    break
                if b.max_seconds < math.inf and self.clock.over(self._local_seconds(), b.max_seconds):
                    log.info("%s: time budget of %.1f min reached", self.name, b.max_minutes)
                    state.done = True
                    break
            bar.close()
            self._bank_time()
            # The loader moves to the next epoch only when the epoch's last batch was consumed.
            evaluated = self.evaluation.due(epoch, finished=loader.epoch == epoch + 1, done=state.done)
            if evaluated:
                self._evaluate(epoch)
            stopping = max_steps is not None and state.step >= max_steps
            if self.saves.at_epoch_end(evaluated, last=state.done or loader.epoch >= b.epochs) or stopping:
                self.save()
            if stopping:
                return self._stopped("max_steps")
        return self._finish()

    def _log_step(self, bar: Any, out: StepResult, tokens_per_s: float) -> None:
        step = self.state.step
        postfix = {"loss": f"{self.state.epoch_loss:.4f}"}
        self.scalars.scalar("train/loss", out.loss, step)
        if out.tokens:
            postfix["tok_s"] = f"{tokens_per_s:,.0f}"
            self.scalars.scalar("train/tokens_per_s", tokens_per_s, step)
        for name, value in out.scalars.items():
            self.scalars.scalar(f"train/{name}", value, step)
        bar.set_postfix(postfix)

    def _evaluate(self, epoch: int) -> None:
        """The evaluation's metrics into the history and TensorBoard; best-model bookkeeping and patience."""
        state = self.state
        result = self.evaluation(epoch, state)
        state.history.append(result.record)
        for prefix, metrics in result.scalars.items():
            if metrics:
                self.scalars.scalars(prefix, metrics, state.step)
        if result.score > state.best_metric:
            state.best_metric, state.best_epoch, state.bad_evals = result.score, epoch, 0
            self.checkpoints.save_best(state.step, result.best_extra)
        else:
            state.bad_evals += 1
            if self.budget.patience and state.bad_evals >= self.budget.patience:
                log.info("%s: early stopping, no better validation %s for %d evaluations", self.name, self.evaluation.metric,
                         self.budget.patience)
                state.done = True

    def _stopped(self, reason: str) -> dict[str, Any]:
        self.scalars.flush()
        return {"stopped": reason, "epoch": self.loader.epoch, "step": self.state.step}

    def _record_threads(self) -> None:
        """Note this process's torch thread count in the run state; a resume with another count is declared, not refused.

        Another count sums floats in another order, so the weights drift from an uninterrupted run's
        (a resume on a machine with more cores should still run): a WARNING now, and results.json
        says `"bit_identical_resume": false` with the counts.
        """
        threads, used = torch.get_num_threads(), self.state.threads
        if used and used[-1] != threads:
            log.warning("%s: resumed with %d torch threads, its checkpoint was trained with %d: the weights will not be "
                        "bit-identical to an uninterrupted run's (set the job's train.threads=%d to keep them identical)",
                        self.out, threads, used[-1], used[-1])
        if not used or used[-1] != threads:
            used.append(threads)

    def _finish(self) -> dict[str, Any]:
        result = self.results(self.state)
        if len(set(self.state.threads)) > 1:
            result = {**result, "bit_identical_resume": False, "threads": list(self.state.threads)}
        if self.is_main:
            write_text_atomic(self.out / "results.json", json.dumps(result, indent=2))  # a full disk names the file
        self.scalars.close()
        return result
