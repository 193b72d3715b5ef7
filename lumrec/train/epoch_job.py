"""The epoch loop shared by ranking and retrieval jobs (resume, budget, patience, best checkpoint, results)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from lumrec.config import check_same_run

if TYPE_CHECKING:
    import torch

    from lumrec.data.ranking_samples import RankingSampleBatch
    from lumrec.distributed import DistContext

log = logging.getLogger("lumrec.rank")

__all__ = ["EpochJob", "RankState", "seed_everything"]


@dataclass
class RankState:
    """Progress a checkpoint carries besides tensors."""

    step: int = 0
    epoch: int = 0  # loader position: epoch and next batch
    batch: int = 0
    best_auc: float = -1.0
    best_epoch: int = -1
    bad_evals: int = 0
    train_seconds: float = 0.0
    loss_sum: float = 0.0  # training loss of the current epoch so far (a mid-epoch resume continues it)
    loss_count: int = 0
    history: list[dict] = field(default_factory=list)
    done: bool = False


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class EpochJob:
    """The training loop shared by ranking and retrieval: epochs over a resumable loader, evaluation after each,
    best-validation model kept, checkpoints with the loader position, results.json at the end.

    A subclass sets `model`, `optimizer`, `samples`, `loader`, `train` (a RankTrainConfig) and `out`, then calls
    `_init_job()`; it implements `step_loss(batch)`, `evaluate(split)` and `result_extras()`.

    On several ranks a subclass also sets `ctx` (a DistContext) and overrides `reduce_loss` (the global
    mean loss) and the checkpoint hooks `_tensors` / `_load_tensors`; every rank then runs this same
    loop in lockstep (same batches, same decisions), and rank 0 alone writes the job's own files.
    """

    job = "job"
    metric = "auc"  # the validation metric that picks the best epoch (higher is better)
    ctx: "DistContext | None" = None  # set when this process is one of several ranks

    @property
    def is_main(self) -> bool:
        """True where single-writer files are written and progress is shown: rank 0, or the only process."""
        from lumrec.distributed import is_main

        return is_main(self.ctx)

    def _barrier(self) -> None:
        from lumrec.distributed import barrier

        barrier(self.ctx)

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any (ranks must stop at the same step)."""
        from lumrec.distributed import any_rank

        return any_rank(self.ctx, flag)

    def _init_job(self) -> None:
        from lumrec.checkpoint import CheckpointManager

        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = CheckpointManager(self.out / "checkpoints", keep=self.train.keep_checkpoints)
        self.best = CheckpointManager(self.out / "best", keep=1)
        self.state = RankState()
        self.validates = self.counts["valid"]["samples"] > 0
        self.tests = self.counts["test"]["samples"] > 0

    def step_loss(self, batch: "RankingSampleBatch") -> "torch.Tensor":
        raise NotImplementedError

    def reduce_loss(self, loss: "torch.Tensor") -> float:
        """The step's loss as reported (the global mean over ranks where a subclass trains on several)."""
        return float(loss.detach())

    def train_step(self, batch: "RankingSampleBatch") -> float:
        """One optimizer step on `batch`; returns the reported loss."""
        loss = self.step_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return self.reduce_loss(loss)

    def evaluate(self, split: str) -> dict[str, float]:
        raise NotImplementedError

    def result_extras(self) -> dict[str, Any]:
        return {}

    def config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- checkpoints ----------------------------------------------------------------------
    def _tensors(self, for_load: bool = False) -> dict[str, Any]:
        """The tensors a checkpoint holds; `for_load`: to be loaded into in place (state created first)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, [self.optimizer])
        return {"model": model_sd, "optim": optim_sd}

    def _load_tensors(self, state: dict[str, Any]) -> None:
        """Put a loaded `_tensors(for_load=True)` dict into the model and optimizer."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, [self.optimizer], model_state_dict=state["model"], optim_state_dict=state["optim"])

    def model_state(self) -> dict[str, Any]:
        """The model's tensors under the unsharded model's names (what best/ holds)."""
        return self.model.state_dict()

    def save(self) -> None:
        """Checkpoint weights, optimizer and run state (loader position included)."""
        self.state.epoch, self.state.batch = self.loader.epoch, self.loader.batch
        self.ckpt.save(self.state.step, self._tensors(), extra=asdict(self.state))

    def maybe_resume(self) -> bool:
        """Continue from the latest complete checkpoint of this run folder, if any."""
        if self.ckpt.latest() is None:
            return False
        # Checkpoints written under another config are refused: they would silently mix two experiments.
        check_same_run(self.out / "config.json", self.config_dict(), self.RESUMABLE_CHANGES)
        state = self._tensors(for_load=True)
        info = self.ckpt.load(state)
        self._load_tensors(state)
        self.state = RankState(**info.extra)
        self.loader.load_state_dict({"epoch": self.state.epoch, "batch": self.state.batch})
        log.info("resumed %s from step %d (epoch %d, batch %d)", self.out, self.state.step, self.state.epoch, self.state.batch)
        return True

    # Keys a resumed run may change: they do not alter what the checkpoints mean.
    RESUMABLE_CHANGES = ("train.epochs", "train.progress", "train.threads", "train.max_minutes", "train.patience",
                         "train.log_every_steps", "train.checkpoint_every_steps", "train.keep_checkpoints", "out")

    # -- the loop ---------------------------------------------------------------------------
    def run(self, max_epochs: int | None = None, max_steps: int | None = None) -> dict[str, Any]:
        """Train until epochs / patience / budget (or `max_epochs` / `max_steps`: a simulated kill); then report the best epoch."""
        from tqdm import tqdm

        from lumrec.faults import failpoint

        t = self.train
        if self.counts["train"]["samples"] == 0:
            raise ValueError(f"{self.job}: no training samples (counts {self.counts}); check samples.first_day / last_day / split_mode")
        self.maybe_resume()
        self._barrier()  # every rank has compared config.json before rank 0 rewrites it
        if self.is_main:
            from lumrec.data.dataset import write_text_atomic

            write_text_atomic(self.out / "config.json", json.dumps(self.config_dict(), indent=2))
        budget = t.max_minutes * 60 if t.max_minutes > 0 else math.inf
        self.model.train()
        while not self.state.done and self.loader.epoch < t.epochs:
            if max_epochs is not None and self.loader.epoch >= max_epochs:
                return {"stopped": "max_epochs", "epoch": self.loader.epoch, "step": self.state.step}
            epoch = self.loader.epoch
            if self.loader.batch == 0:
                self.state.loss_sum, self.state.loss_count = 0.0, 0
            bar = tqdm(total=len(self.loader), initial=self.loader.batch, desc=f"{self.job} epoch {epoch}",
                       unit="batch", mininterval=2.0, dynamic_ncols=True, disable=not (t.progress and self.is_main))
            t0 = time.perf_counter()
            for batch in self.loader:
                loss = self.train_step(batch)
                self.state.step += 1
                failpoint(f"{self.job}.step")
                self.state.loss_sum += loss
                self.state.loss_count += 1
                bar.update(1)
                if self.state.step % t.log_every_steps == 0:
                    bar.set_postfix(loss=f"{self.state.loss_sum / self.state.loss_count:.4f}")
                if t.checkpoint_every_steps and self.state.step % t.checkpoint_every_steps == 0:
                    self.state.train_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save()
                if max_steps is not None and self.state.step >= max_steps:
                    break
                # Each rank measures its own time; they stop together or the collectives would hang.
                if budget < math.inf and self._any_rank(self.state.train_seconds + (time.perf_counter() - t0) > budget):
                    log.info("time budget of %.1f min reached", t.max_minutes)
                    self.state.done = True
                    break
            bar.close()
            self.state.train_seconds += time.perf_counter() - t0
            # The loader moves to the next epoch only when the epoch's last batch was consumed.
            if self.loader.epoch == epoch + 1 or self.state.done:
                self._end_of_epoch(epoch, self.state.loss_sum / max(self.state.loss_count, 1))
            self.save()
            if max_steps is not None and self.state.step >= max_steps:
                return {"stopped": "max_steps", "epoch": self.loader.epoch, "step": self.state.step}
        return self._final()

    def _end_of_epoch(self, epoch: int, train_loss: float) -> None:
        """Validation and test metrics, best-model bookkeeping, early stopping."""
        valid = self.evaluate("valid") if self.validates else None
        test = self.evaluate("test") if self.tests else None
        self.state.history.append({"epoch": epoch, "step": self.state.step, "train_loss": train_loss, "valid": valid, "test": test})
        key = self.metric
        parts = [f"{name} {key} {m[key]:.4f}" for name, m in (("valid", valid), ("test", test)) if m is not None]
        log.info("%s epoch %d: train loss %.4f, %s", self.job, epoch, train_loss, ", ".join(parts) or "no validation or test split")
        # Without a validation split the last epoch is the one reported (the test set never picks a model).
        score = valid[key] if valid is not None else float(epoch)
        if score > self.state.best_auc:
            self.state.best_auc, self.state.best_epoch, self.state.bad_evals = score, epoch, 0
            self.best.save(self.state.step, {"model": self.model_state()}, extra={"epoch": epoch})
        else:
            self.state.bad_evals += 1
            if self.train.patience and self.state.bad_evals >= self.train.patience:
                log.info("early stopping: no better validation %s for %d epochs", key, self.train.patience)
                self.state.done = True

    def _final(self) -> dict[str, Any]:
        """Test metrics of the best-validation epoch; written to results.json."""
        best = next((h for h in self.state.history if h["epoch"] == self.state.best_epoch), None)
        if best is None:
            raise RuntimeError(f"{self.out}: no epoch was evaluated (train.epochs={self.train.epochs})")
        secs = self.state.train_seconds
        result = {
            **self.result_extras(),
            "test": best["test"],
            "valid": best["valid"],
            "best_epoch": self.state.best_epoch,
            "epochs_run": len(self.state.history),
            "steps": self.state.step,
            "samples": self.counts,
            "train_minutes": round(secs / 60, 3),
            "history": self.state.history,
        }
        if self.is_main:
            (self.out / "results.json").write_text(json.dumps(result, indent=2))
        if best["test"] is not None:
            log.info("%s test (best epoch %d): %s", self.job, self.state.best_epoch,
                     " ".join(f"{k}={v:.4f}" for k, v in best["test"].items() if k != "count"))
        return result
