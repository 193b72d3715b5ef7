"""The configuration of a pre-training run (`lumrec pretrain CONFIG`): data, optimisation, budget, checkpoints.

    >>> from lumrec.pipelines.pretrain_config import PretrainConfig
    >>> cfg = PretrainConfig(model="lum")
    >>> cfg.train.epochs, cfg.data.max_len, cfg.data.train_excludes_last, split_protocol(cfg.data)
    (100, 200, 2, 'strict')
    >>> DataConfig(protocol="published-ml1m").train_excludes_last
    1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lumrec.config import ConfigValueError, check_above, check_at_least, check_days
from lumrec.device import check_device_setting, check_precision
from lumrec.modules.warm_start_config import WarmStartConfig
from lumrec.optim import RowwiseAdamW

__all__ = ["DataConfig", "LONG_HISTORY", "PROTOCOLS", "PretrainConfig", "RESUMABLE_CHANGES", "TABLE_OPTIMIZERS",
           "TrainConfig", "protocol_mismatch", "split_protocol"]

# data.protocol -> data.train_excludes_last: the events at the end of each history training never sees.
# strict: validation and test held out, the best model on validation HR@10 is tested (SASRec/S3Rec-style
# Amazon papers). published-ml1m: only the test event held out, the model at the end is tested (the
# HSTU paper's ML-1M protocol; Meta's code has no validation split). all: nothing held out, no test
# (continued daily pre-training: the next day tests it).
PROTOCOLS: dict[str, int] = {"strict": 2, "published-ml1m": 1, "all": 0}


@dataclass
class DataConfig:
    """Which events to train on and how they become tokens."""

    path: str = "out/ml-1m"  # a lumrec dataset folder (`lumrec import` / `lumrec synth`)
    start: str | None = None  # first day (YYYY-MM-DD) of behaviours to use; None = all
    end: str | None = None
    max_len: int = 200  # tokens per sequence; the most recent are kept
    # Histories longer than max_len in training. "last": only the most recent max_len tokens (the
    # published protocol; the rest is never seen). "windows": the whole history, cut from its end
    # into windows of max_len tokens that train as separate sequences (every transition once).
    # Evaluation always reads the most recent max_len tokens.
    long_history: str = "last"
    condition_features: list[str] = field(default_factory=list)  # LUM: [] = one constant condition
    # LUM: each condition feature of a training event is left empty with this probability (seeded,
    # the same every epoch and on resume), so the model also answers a `none=0` query (no
    # condition) and any subset of its conditions. Evaluation and queries use full conditions.
    condition_dropout: float = 0.0
    item_features: list[str] = field(default_factory=lambda: ["item_id"])
    min_history: int = 1  # users need min_history + 2 events (train + valid + test targets)
    # The split protocol by name (a key of PROTOCOLS); it sets train_excludes_last. None = named by
    # train_excludes_last. Setting both is allowed only when they agree.
    protocol: str | None = None
    # Events at the end of each history that training never sees. 2: validation and test are
    # held out and early stopping uses validation (strict). 1: only the test event is held out,
    # as in the published ML-1M protocol (Meta's code has no validation split); there is then no
    # validation metric, so the model at the end of the budget is the one tested. 0: nothing is
    # held out and there is no test (continued daily pre-training: the next day tests it).
    # None (not set) = data.protocol's value, else 2.
    train_excludes_last: int | None = None
    # Streaming continuation: only items on or after this day (YYYY-MM-DD) are training targets;
    # earlier events are context. Users without events on or after it are skipped. None = all.
    target_start: str | None = None

    def __post_init__(self) -> None:
        check_at_least(self, 1, "max_len", section="data")
        check_at_least(self, 0, "min_history", "condition_dropout", section="data")
        check_days(self, "start", "end", "target_start", section="data")
        if self.protocol is not None:
            if self.protocol not in PROTOCOLS:
                raise ConfigValueError("protocol", f"must be one of {tuple(PROTOCOLS)}, got {self.protocol!r}", "data")
            if self.train_excludes_last is None:
                self.train_excludes_last = PROTOCOLS[self.protocol]
        if self.train_excludes_last is None:
            self.train_excludes_last = PROTOCOLS["strict"]
        split_protocol(self)


def split_protocol(data: DataConfig) -> str:
    """The protocol name of `data`'s split; refuses a train_excludes_last outside 0-2 or one that contradicts data.protocol."""
    names = {n: k for k, n in PROTOCOLS.items()}
    if data.train_excludes_last not in names:
        choices = ", ".join(f"{k} = {n}" for k, n in PROTOCOLS.items())
        raise ConfigValueError("train_excludes_last", f"must be 0, 1 or 2 (data.protocol: {choices}), "
                               f"got {data.train_excludes_last!r}", "data")
    name = names[data.train_excludes_last]
    if data.protocol is not None and data.protocol != name:
        raise ConfigValueError("protocol", f"is {data.protocol!r} (data.train_excludes_last {PROTOCOLS[data.protocol]}), but "
                               f"data.train_excludes_last is {data.train_excludes_last} ({name!r}); set one of the two keys only", "data")
    return name


def protocol_mismatch(ours: str, published: str, what: str) -> str | None:
    """Why a result of protocol `ours` and a published figure (`what`) of protocol `published` do not compare; None when they agree.

        >>> protocol_mismatch("published-ml1m", "published-ml1m", "HSTU paper") is None
        True
        >>> print(protocol_mismatch("strict", "published-ml1m", "HSTU paper, Table 2"))
        this run uses split protocol 'strict' but HSTU paper, Table 2 uses 'published-ml1m': the numbers are not comparable
    """
    if ours == published:
        return None
    return f"this run uses split protocol {ours!r} but {what} uses {published!r}: the numbers are not comparable"


# data.long_history choices: the most recent max_len tokens only, or the whole history in windows.
LONG_HISTORY = ("last", "windows")

# train.embedding_optimizer -> the optimizer class of the embedding tables (one process).
TABLE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"rowwise_adamw": RowwiseAdamW, "adamw": torch.optim.AdamW}


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
    # Optimizer of the embedding tables: "rowwise_adamw" (one second moment per row: fbgemm's
    # PARTIAL_ROWWISE_ADAM, the memory a large table needs) or "adamw" (one per element, as
    # Meta's research trainer uses on ML-1M; one process only, and 2x the table's memory).
    embedding_optimizer: str = "rowwise_adamw"
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    temperature: float = 0.05
    num_negatives: int = 128  # shared uniform negatives per step; -1 = every item (full softmax)
    in_batch_negatives: bool = True  # other queries' targets are negatives too
    # A position's earlier items of its own sequence are not its negatives, whether full-softmax,
    # in-batch or sampled (the candidates an exclude_seen evaluation ranks); the target always is its positive.
    loss_excludes_seen: bool = False
    eval_every_epochs: int = 1
    patience: int = 5  # evaluations without a better validation HR@10 before stopping
    max_minutes: float = 0.0  # training-time budget (0 = none); evaluation time is not counted
    # Step budget (0 = none): stop after this many steps as the time budget stops (evaluated, best kept);
    # unlike max_minutes it buys the same training on every machine and under any load.
    max_steps: int = 0
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 2
    threads: int = 0  # torch threads (0 = torch's default)
    keep_freed_host_memory: bool = True  # glibc: reuse freed large buffers (see lumrec.allocator)
    eval_rows_per_batch: int = 64
    exclude_seen: bool = True  # rank only items outside the user's visible history (published protocol)
    log_every_steps: int = 20
    # A checkpoint (a run's checkpoints/ folder, or one step-NNNNNNNN in it) whose model and
    # optimizer state a fresh run starts from: continued pre-training (daily: D-1's LUM). Ignored
    # when the run has checkpoints of its own (it resumes from them).
    init_from: str | None = None
    # Feature warm-up: a fresh run (no checkpoints, no init_from) copies the embedding tables of an
    # existing DLRM into the token encoder (names mapped by `name_map`; only same-shape tensors are
    # copied, the rest is reported). Declare the LUM's tables like the DLRM's (model_config.embedding_dim).
    table_init: WarmStartConfig | None = None
    # Warmup-stable-decay: the lr stays constant, then falls linearly to lr * lr_final_ratio over
    # the last `lr_decay_fraction` of the run. The run's length is the time budget when one is set
    # (progress = training seconds / budget), else epochs x batches (at most max_steps). 0 = constant lr.
    lr_decay_fraction: float = 0.0
    lr_final_ratio: float = 0.0
    # Where the step runs (lumrec.device): "cpu", "cuda" (this rank's GPU: cuda:LOCAL_RANK) or "auto" (cuda when
    # this torch sees a GPU, else cpu). The loader stays on the CPU; batches are copied with pinned memory.
    device: str = "cpu"
    # The forward's precision: "fp32", or "bf16" (bfloat16 autocast; weights and optimizer state stay float32).
    precision: str = "fp32"
    # Recompute each HSTU / transformer layer's activations in the backward instead of keeping them:
    # less memory per token for longer sequences and deeper stacks, one more forward per step; same gradients.
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        # Sizes and counts that cannot be zero or negative (0 means "off" for the ones checked against 0).
        check_at_least(self, 1, "epochs", "rows_per_batch", "eval_rows_per_batch", "eval_every_epochs", section="train")
        check_at_least(self, 0, "patience", "checkpoint_every_steps", "keep_checkpoints", "threads", "log_every_steps",
                       "max_minutes", "max_steps", "weight_decay", "embedding_weight_decay", "lr_decay_fraction", "lr_final_ratio",
                       section="train")
        check_above(self, 0, "lr", "embedding_lr", "temperature", section="train")
        if self.num_negatives == 0 or self.num_negatives < -1:
            raise ConfigValueError("num_negatives", f"must be >= 1, or -1 for every item, got {self.num_negatives!r}", "train")
        check_device_setting(self.device, "train.device")
        check_precision(self.precision, "train.precision")


@dataclass
class PretrainConfig:
    """A whole pre-training run."""

    model: str = "sasrec"  # sasrec | hstu | hstu-large | lum
    out: str = "runs/pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model_config: dict[str, Any] = field(default_factory=dict)  # keys of the model's own config dataclass


# Keys a resumed run may change: they do not alter what its checkpoints mean (budget, logging,
# threads, device; init_from and table_init only act on a fresh run). Any other change is refused.
RESUMABLE_CHANGES = ("out", "train.epochs", "train.max_minutes", "train.max_steps", "train.patience", "train.eval_every_epochs",
                     "train.eval_rows_per_batch", "train.threads", "train.keep_freed_host_memory", "train.log_every_steps",
                     "train.checkpoint_every_steps", "train.keep_checkpoints", "train.init_from", "train.table_init",
                     # Where a step runs and whether activations are recomputed: a checkpoint resumes on any device.
                     "train.device", "train.activation_checkpointing")
