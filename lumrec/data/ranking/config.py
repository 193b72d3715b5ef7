"""RankingSampleConfig: which protocol turns a dataset into ranking samples, and its split / sampling knobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lumrec.data.dataset import day_bounds

Protocol = Literal["explicit_ratings", "implicit_next_item", "impressions"]
PROTOCOLS = ("explicit_ratings", "implicit_next_item", "impressions")
TRAIN, VALID, TEST = 0, 1, 2
SPLITS = {"train": TRAIN, "valid": VALID, "test": TEST}
SPLIT_MODES = ("days", "quantile", "all_train", "all_test")


def split_code(split: str) -> int:
    """TRAIN / VALID / TEST of a split name, with an error listing the names."""
    try:
        return SPLITS[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}") from None


@dataclass
class RankingSampleConfig:
    """Which protocol turns a dataset into samples, and its split / sampling knobs."""

    protocol: Protocol = "implicit_next_item"
    seed: int = 0
    # Drop samples whose point-in-time history has fewer events (None: 1 for implicit_next_item, else 0).
    min_history: int | None = None
    # -- explicit_ratings -------------------------------------------------------------------
    positive_threshold: float = 4.0  # label = rating >= this
    # -- time split (explicit_ratings, impressions) -----------------------------------------
    # "days": the last ceil(test_fraction * n) of the n days that have samples are test, the
    # ceil(valid_fraction * n) days before them validation. "quantile": the same on timestamps
    # (test = ts >= the (1 - test_fraction) quantile of sample timestamps).
    # "all_train" / "all_test": every sample in one split (daily jobs: train on day D, test on day D+1).
    split_mode: Literal["days", "quantile", "all_train", "all_test"] = "days"
    test_fraction: float = 0.1
    valid_fraction: float = 0.1
    test_start: str | None = None  # YYYY-MM-DD: test = days >= test_start (overrides test_fraction)
    valid_start: str | None = None  # YYYY-MM-DD: validation = [valid_start, test_start) (overrides valid_fraction)
    first_day: str | None = None  # only samples of days in [first_day, last_day] (histories still use earlier days)
    last_day: str | None = None
    # -- impressions ------------------------------------------------------------------------
    label_column: str = "label"
    # -- implicit_next_item -----------------------------------------------------------------
    num_negatives: int = 1  # sampled negatives per true next item
    negative_sampling: Literal["uniform", "popularity"] = "uniform"
    max_train_per_user: int | None = None  # keep each user's most recent N training targets

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"RankingSampleConfig.protocol must be one of {list(PROTOCOLS)}, got {self.protocol!r}")
        if self.split_mode not in SPLIT_MODES:
            raise ValueError(f"RankingSampleConfig.split_mode must be one of {list(SPLIT_MODES)}, got {self.split_mode!r}")
        if self.negative_sampling not in ("uniform", "popularity"):
            raise ValueError(f"RankingSampleConfig.negative_sampling must be 'uniform' or 'popularity', got {self.negative_sampling!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"RankingSampleConfig.test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if not 0.0 <= self.valid_fraction < 1.0 or self.test_fraction + self.valid_fraction >= 1.0:
            raise ValueError(
                f"RankingSampleConfig.valid_fraction must be in [0, 1) with test_fraction + valid_fraction < 1, got {self.valid_fraction!r}"
            )
        if self.min_history is not None and self.min_history < 0:
            raise ValueError(f"RankingSampleConfig.min_history must be >= 0 or None, got {self.min_history!r}")
        if self.num_negatives < 1:
            raise ValueError(f"RankingSampleConfig.num_negatives must be >= 1, got {self.num_negatives!r}")
        if self.max_train_per_user is not None and self.max_train_per_user < 1:
            raise ValueError(f"RankingSampleConfig.max_train_per_user must be >= 1 or None, got {self.max_train_per_user!r}")
        for name in ("test_start", "valid_start", "first_day", "last_day"):
            value = getattr(self, name)
            if value is not None:
                try:
                    day_bounds(value)
                except ValueError:
                    raise ValueError(f"RankingSampleConfig.{name}: bad day {value!r}, expected YYYY-MM-DD") from None
        if self.test_start and self.valid_start and self.valid_start > self.test_start:
            raise ValueError(f"RankingSampleConfig: valid_start {self.valid_start} is after test_start {self.test_start}")

    def effective_min_history(self) -> int:
        """min_history with the protocol's default filled in."""
        if self.min_history is not None:
            return self.min_history
        return 1 if self.protocol == "implicit_next_item" else 0
