"""Configs of the ranking job (``lumrec rank``), shared with the jobs built on it (retrieve, daily).

A rank config in YAML (every section optional; ``sizes.backbones`` holds each backbone's own keys)::

    data: out/demo/data
    model: sim                       # a registered backbone: mlp, din, sim, hstu, ...
    samples: {protocol: impressions, first_day: "2026-01-08"}
    sizes: {embedding_dim: 16, mlp: [64, 32], backbones: {sim: {max_search_len: 50, short_len: 10}}}
    lum: {store: out/demo/knowledge, conditions: ["scenario=1"], features: [sim, missing]}
    train: {seed: 0, epochs: 2, batch_size: 256, lr: 0.002}

Example::

    >>> cfg = RankConfig(model="din", train=RankTrainConfig(epochs=1))
    >>> check_train_config(cfg.train)
    >>> RankTrainConfig(batch_size=0)
    Traceback (most recent call last):
    lumrec.config.ConfigValueError: train.batch_size must be >= 1, got 0
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lumrec.config import check_above, check_at_least
from lumrec.data.ranking.config import RankingSampleConfig
from lumrec.device import check_device_setting, check_precision
from lumrec.modules.lum_join import RankLUMConfig
from lumrec.modules.ranking.builder import RankModelConfig
from lumrec.modules.warm_start_config import WarmStartConfig

__all__ = ["RankConfig", "RankModelConfig", "RankTrainConfig", "check_train_config"]


@dataclass
class RankTrainConfig:
    """Optimisation, evaluation, budget and checkpoints."""

    seed: int = 0
    epochs: int = 3
    batch_size: int = 256
    eval_batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_history: int | None = 100  # most recent behaviours per sample given to the model
    threads: int = 0  # torch threads (0 = torch's default)
    checkpoint_every_steps: int = 0  # 0: checkpoints at epoch boundaries only
    keep_checkpoints: int = 2
    patience: int = 0  # evaluations without a better validation AUC before stopping (0 = never stop early)
    max_minutes: float = 0.0  # training-time budget (0 = none); evaluation is not counted
    log_every_steps: int = 50
    progress: bool = True
    # Where the model runs (lumrec.device): "cpu", "cuda" (this rank's GPU: cuda:LOCAL_RANK) or "auto" (cuda when
    # this torch sees a GPU, else cpu). Samples, knowledge and statistics joins stay on the CPU; each batch is copied.
    device: str = "cpu"
    # The forward's precision: "fp32", or "bf16" (bfloat16 autocast; weights and optimizer state stay float32).
    precision: str = "fp32"
    # Recompute each HSTU layer's activations in the backward instead of keeping them (the hstu ranker).
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_train_config(self)


def check_train_config(t: RankTrainConfig) -> None:
    """Raise a ConfigValueError (a ValueError) naming the `train.` key whose value cannot work (also after edits in place)."""
    check_at_least(t, 1, "batch_size", "eval_batch_size", "epochs", section="train")
    check_at_least(t, 0, "max_history", "threads", "checkpoint_every_steps", "keep_checkpoints", "patience", "max_minutes",
                   "log_every_steps", "weight_decay", section="train")
    check_above(t, 0, "lr", section="train")
    check_device_setting(t.device, "train.device")
    check_precision(t.precision, "train.precision")


@dataclass
class RankConfig:
    """A whole ranking run: data, samples, model, optional LUM features, training."""

    data: str = "out/data"  # a lumrec dataset folder
    out: str = "runs/rank"  # results.json, checkpoints/ and best/ go here
    samples: RankingSampleConfig = field(default_factory=RankingSampleConfig)
    # A registered ranking backbone (lumrec.modules.ranking.registry): mlp | din | sim | hstu (HSTU end
    # to end: the candidate appended to the behaviour sequence) | any backbone a file in modules/ registers.
    model: str = "sim"
    sizes: RankModelConfig = field(default_factory=RankModelConfig)
    lum: RankLUMConfig | None = None  # None: the base model without LUM features
    train: RankTrainConfig = field(default_factory=RankTrainConfig)
    # Start a fresh run from an existing DLRM's weights (ours or a torchrec model's, via name_map);
    # LUM inputs it lacks start at zero, so the first predictions equal the old model's. Ignored
    # when the run resumes from its own checkpoints.
    warm_start: WarmStartConfig | None = None
