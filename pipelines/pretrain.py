"""Step 1: generative pre-training of SASRec, HSTU or LUM on a lumrec dataset, with exact resume.

Determinism: batches come from a packing plan fixed by (seed, epoch); dropout and negative
sampling are seeded by (seed, global step). A run resumed from any checkpoint therefore
continues with the same batches and the same loss curve as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm import tqdm

from lumrec.allocator import keep_freed_host_memory
from lumrec.checkpoint import CheckpointManager
from lumrec.config import load_config, to_dict
from lumrec.data.batches import PackedBatchLoader
from lumrec.data.dataset import Dataset
from lumrec.data.sequences import sequences_from_dataset
from lumrec.data.tokens import TokenConfig
from lumrec.modules.losses import InfoNCEConfig, InfoNCELoss
from lumrec.modules.sequence_model import RetrievalTrain, SequentialRecommender
from lumrec.pipelines.model_factory import build_model, split_parameters
from lumrec.pipelines.retrieval_eval import build_tokens, evaluate_retrieval, leave_one_out

log = logging.getLogger("lumrec.pretrain")


@dataclass
class DataConfig:
    """Which events to train on and how they become tokens."""

    path: str = "out/ml-1m"  # a lumrec dataset folder (`lumrec import` / `lumrec synth`)
    start: str | None = None  # first day (YYYY-MM-DD) of behaviours to use; None = all
    end: str | None = None
    max_len: int = 200  # tokens per sequence; the most recent are kept
    condition_features: list[str] = field(default_factory=list)  # LUM: [] = one constant condition
    item_features: list[str] = field(default_factory=lambda: ["item_id"])
    min_history: int = 1  # users need min_history + 2 events (train + valid + test targets)
    # Events at the end of each history that training never sees. 2: validation and test are
    # held out and early stopping uses validation (strict). 1: only the test event is held out,
    # as in the published ML-1M protocol (Meta's code has no validation split); there is then no
    # validation metric, so the model at the end of the budget is the one tested.
    train_excludes_last: int = 2


@dataclass
class TrainConfig:
    """Optimisation, evaluation, checkpoints and budget."""

    seed: int = 0
    epochs: int = 100
    rows_per_batch: int = 128  # packed rows of max_len tokens per step
    lr: float = 1e-3
    embedding_lr: float | None = None  # None = lr
    weight_decay: float = 0.0
    embedding_weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    temperature: float = 0.05
    num_negatives: int = 128  # shared uniform negatives per step; -1 = every item (full softmax)
    in_batch_negatives: bool = True  # other queries' targets are negatives too
    eval_every_epochs: int = 1
    patience: int = 5  # evaluations without a better validation HR@10 before stopping
    max_minutes: float = 0.0  # training-time budget (0 = none); evaluation time is not counted
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 2
    threads: int = 0  # torch threads (0 = torch's default)
    keep_freed_host_memory: bool = True  # glibc: reuse freed large buffers (see lumrec.allocator)
    eval_rows_per_batch: int = 64
    exclude_seen: bool = True  # rank only items outside the user's visible history (published protocol)
    log_every_steps: int = 20
    # Warmup-stable-decay: the lr stays constant, then falls linearly to lr * lr_final_ratio over
    # the last `lr_decay_fraction` of the run. The run's length is the time budget when one is set
    # (progress = training seconds / budget), else epochs x batches. 0 = constant lr.
    lr_decay_fraction: float = 0.0
    lr_final_ratio: float = 0.0


@dataclass
class PretrainConfig:
    """A whole pre-training run."""

    model: str = "sasrec"  # sasrec | hstu | hstu-large | lum
    out: str = "runs/pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model_config: dict[str, Any] = field(default_factory=dict)  # keys of the model's own config dataclass


@dataclass
class RunState:
    """Progress that a checkpoint carries besides tensors."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # next batch of `epoch`
    best_metric: float = -1.0
    best_epoch: int = -1
    bad_evals: int = 0
    train_seconds: float = 0.0
    tokens: int = 0
    history: list[dict] = field(default_factory=list)
    done: bool = False


def _step_seed(seed: int, step: int) -> int:
    """A per-step seed, so that a resumed run draws the same dropout masks and negatives."""
    return (seed * 1_000_003 + step * 7919) % (2**63 - 1)


class Pretrainer:
    """Owns the model, optimizers, data and checkpoints of one run."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.keep_freed_host_memory:
            keep_freed_host_memory()
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        data = Dataset(cfg.data.path)
        self.meta = data.read_meta()
        seqs = sequences_from_dataset(data, cfg.data.start, cfg.data.end)
        self.split = leave_one_out(seqs, cfg.data.min_history)
        if cfg.data.train_excludes_last not in (1, 2):
            raise ValueError(f"data.train_excludes_last must be 1 or 2, got {cfg.data.train_excludes_last}")
        self.validates = cfg.data.train_excludes_last == 2
        self.token_config = TokenConfig(
            condition_features=list(cfg.data.condition_features), item_features=list(cfg.data.item_features)
        )
        torch.manual_seed(cfg.train.seed)
        self.model: SequentialRecommender = build_model(cfg.model, cfg.model_config, self.meta, data, self.token_config, cfg.data.max_len)
        self.lum = self.model.predicts_from != 1
        train_seqs = self.split.train if self.validates else self.split.valid
        tokens = build_tokens(train_seqs, self.token_config, self.lum)
        self.loader = PackedBatchLoader(tokens, cfg.data.max_len, cfg.train.rows_per_batch, shuffle_seed=cfg.train.seed)
        t = cfg.train
        loss = InfoNCELoss(InfoNCEConfig(
            temperature=t.temperature, num_sampled_negatives=t.num_negatives, in_batch_negatives=t.in_batch_negatives
        ), self.model.num_items)
        self.trainer = RetrievalTrain(self.model, loss)
        self.optimizers = self._build_optimizers()
        self.ckpt = CheckpointManager(self.out / "checkpoints", keep=t.keep_checkpoints)
        self.best = CheckpointManager(self.out / "best", keep=1)
        self.state = RunState()
        self.writer = None

    def _build_optimizers(self) -> list[torch.optim.Optimizer]:
        """Rowwise AdamW for embedding tables (when available), AdamW for dense parameters."""
        t = self.cfg.train
        tables, dense = split_parameters(self.model)
        opts: list[torch.optim.Optimizer] = []
        if dense:
            opts.append(torch.optim.AdamW(dense, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay))
        if tables:
            emb_lr = t.embedding_lr or t.lr
            try:
                from lumrec.optim import RowwiseAdamW
            except ImportError:  # pragma: no cover - the optimizer package ships with lumrec
                RowwiseAdamW = None
            if RowwiseAdamW is not None:
                opts.append(RowwiseAdamW(tables, lr=emb_lr, betas=t.betas, eps=t.eps, weight_decay=t.embedding_weight_decay))
            else:
                opts.append(torch.optim.AdamW(tables, lr=emb_lr, betas=t.betas, eps=t.eps, weight_decay=t.embedding_weight_decay))
        return opts

    # -- checkpoints ------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizers)
        return {"model": model_sd, "optim": optim_sd}

    def save(self) -> None:
        """Checkpoint tensors plus run state (data position, best metric, history)."""
        self.state.epoch, self.state.batch = self.loader.epoch, self.loader.batch
        self.ckpt.save(self.state.step, self._state(), extra=asdict(self.state))

    def maybe_resume(self) -> bool:
        """Load the latest complete checkpoint of this run, if any."""
        if self.ckpt.latest() is None:
            return False
        state = self._state()
        info = self.ckpt.load(state)
        set_state_dict(self.model, self.optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.state = RunState(**info.extra)
        self.loader.epoch, self.loader.batch = self.state.epoch, self.state.batch
        log.info("resumed from step %d (epoch %d, batch %d)", self.state.step, self.state.epoch, self.state.batch)
        return True

    # -- training ---------------------------------------------------------------------------
    def _log_scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"))
        self.writer.add_scalar(name, value, step)

    def lr_multiplier(self, progress: float) -> float:
        """Factor on the base lr at `progress` in [0, 1] of the run (warmup-stable-decay)."""
        t = self.cfg.train
        if t.lr_decay_fraction <= 0:
            return 1.0
        left = 1.0 - min(max(progress, 0.0), 1.0)
        if left >= t.lr_decay_fraction:
            return 1.0
        return t.lr_final_ratio + (1.0 - t.lr_final_ratio) * left / t.lr_decay_fraction

    def _set_lr(self, progress: float) -> float:
        """Scale every optimizer group's lr from its base value; returns the multiplier."""
        factor = self.lr_multiplier(progress)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])
                group["lr"] = group["base_lr"] * factor
        return factor

    def train_step(self, batch) -> tuple[float, int]:
        """One optimisation step on a packed batch; returns (loss, queries)."""
        seed = _step_seed(self.cfg.train.seed, self.state.step)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        loss, queries = self.trainer(batch, generator)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        return float(loss.detach()), queries

    def evaluate(self, which: str = "valid") -> dict[str, float]:
        """Leave-one-out metrics on the validation or test targets."""
        seqs = self.split.valid if which == "valid" else self.split.test
        return evaluate_retrieval(self.model, seqs, self.token_config, self.cfg.data.max_len,
                                  self.cfg.train.eval_rows_per_batch, exclude_seen=self.cfg.train.exclude_seen)

    def run(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train until epochs, patience, time budget or `max_steps` run out; then test the best model."""
        t = self.cfg.train
        self.maybe_resume()
        (self.out / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2))
        budget = t.max_minutes * 60 if t.max_minutes > 0 else math.inf
        total_steps = max(1, t.epochs * len(self.loader))
        self.model.train()
        while not self.state.done and self.loader.epoch < t.epochs:
            epoch = self.loader.epoch
            bar = tqdm(total=len(self.loader), initial=self.loader.batch, desc=f"epoch {epoch}", unit="batch",
                       mininterval=2.0, dynamic_ncols=True)
            t0, tok0 = time.perf_counter(), self.state.tokens
            for batch in self.loader:
                if t.lr_decay_fraction > 0:
                    seconds = self.state.train_seconds + (time.perf_counter() - t0)
                    progress = seconds / budget if budget < math.inf else self.state.step / total_steps
                    factor = self._set_lr(progress)
                loss, _ = self.train_step(batch)
                self.state.step += 1
                self.state.tokens += batch.num_tokens
                elapsed = time.perf_counter() - t0
                bar.update(1)
                if self.state.step % t.log_every_steps == 0:
                    tps = (self.state.tokens - tok0) / max(elapsed, 1e-9)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
                    self._log_scalar("train/loss", loss, self.state.step)
                    self._log_scalar("train/tokens_per_s", tps, self.state.step)
                    if t.lr_decay_fraction > 0:
                        self._log_scalar("train/lr_factor", factor, self.state.step)
                if self.state.step % t.checkpoint_every_steps == 0:
                    self.state.train_seconds += time.perf_counter() - t0
                    t0, tok0 = time.perf_counter(), self.state.tokens
                    self.save()
                if max_steps is not None and self.state.step >= max_steps:
                    break
                if self.state.train_seconds + (time.perf_counter() - t0) > budget:
                    log.info("time budget of %.1f min reached", t.max_minutes)
                    self.state.done = True
                    break
            bar.close()
            self.state.train_seconds += time.perf_counter() - t0
            if max_steps is not None and self.state.step >= max_steps:
                self.save()
                return {"step": self.state.step, "stopped": "max_steps"}
            finished_epoch = self.loader.batch == 0 and self.loader.epoch == epoch + 1
            if self.validates and (finished_epoch and (epoch + 1) % t.eval_every_epochs == 0 or self.state.done):
                self._end_of_epoch_eval(epoch)
            self.save()
        return self._final()

    def _end_of_epoch_eval(self, epoch: int) -> None:
        """Validation metrics, best-model bookkeeping and early stopping."""
        t = self.cfg.train
        metrics = self.evaluate("valid")
        self.state.history.append({"epoch": epoch, "step": self.state.step, **metrics})
        for name, value in metrics.items():
            self._log_scalar(f"valid/{name}", value, self.state.step)
        log.info("epoch %d valid %s", epoch, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if metrics["hr@10"] > self.state.best_metric:
            self.state.best_metric, self.state.best_epoch, self.state.bad_evals = metrics["hr@10"], epoch, 0
            self.best.save(self.state.step, {"model": self.model.state_dict()}, extra={"epoch": epoch, **metrics})
        else:
            self.state.bad_evals += 1
            if self.state.bad_evals >= t.patience:
                log.info("early stopping: no better validation HR@10 for %d evaluations", t.patience)
                self.state.done = True

    def _final(self) -> dict[str, Any]:
        """Test metrics of the best validation model; written to results.json."""
        if self.best.latest() is not None:
            state = {"model": self.model.state_dict()}
            self.best.load(state)
            self.model.load_state_dict(state["model"])
        test = self.evaluate("test")
        secs = self.state.train_seconds
        result = {
            "model": self.cfg.model,
            "test": test,
            "best_valid_hr@10": self.state.best_metric,
            "best_epoch": self.state.best_epoch,
            "epochs_run": self.loader.epoch,
            "steps": self.state.step,
            "train_minutes": round(secs / 60, 2),
            "tokens_per_s": round(self.state.tokens / secs, 1) if secs > 0 else None,
            "history": self.state.history,
        }
        (self.out / "results.json").write_text(json.dumps(result, indent=2))
        log.info("test %s", " ".join(f"{k}={v:.4f}" for k, v in test.items()))
        if self.writer is not None:
            self.writer.close()
        return result


def main(args: argparse.Namespace) -> int:
    """`lumrec pretrain CONFIG [key=value ...]`."""
    cfg = load_config(PretrainConfig, args.config, overrides=args.overrides)
    result = Pretrainer(cfg).run()
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return 0
