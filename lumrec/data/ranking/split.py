"""Time splits of samples: train < validation start <= validation < test start <= test, by days or timestamp quantiles."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lumrec.data.dataset import SECONDS_PER_DAY, day_bounds, ds_of
from lumrec.data.ranking.config import TEST, TRAIN, VALID, RankingSampleConfig
from lumrec.data.validate import DataValidationError


def time_split(ts: np.ndarray, cfg: RankingSampleConfig, source: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Split codes of samples at times `ts` (train < valid cut <= valid < test cut <= test) and the cuts used."""
    if len(ts) == 0:
        raise DataValidationError(source, "no samples to split")
    days = ts // SECONDS_PER_DAY
    first, last = ds_of(ts.min()), ds_of(ts.max())
    if cfg.split_mode in ("all_train", "all_test"):
        code = TRAIN if cfg.split_mode == "all_train" else TEST
        return np.full(len(ts), code, np.int8), {"split_mode": cfg.split_mode, "first_day": first, "last_day": last}
    if cfg.split_mode == "days" or cfg.test_start:
        uniq = np.unique(days)
        n = len(uniq)
        test_cut = _given_cut(cfg.test_start, "test_start", first, last, source)
        if test_cut is None:
            n_test = _frac_count(cfg.test_fraction, n)
            if n_test >= n:
                raise DataValidationError(source, f"only {n} day(s) with samples ({first}..{last}): cannot hold out the last {n_test} as test")
            test_cut = int(uniq[n - n_test]) * SECONDS_PER_DAY
    else:
        sorted_ts = np.sort(ts)
        test_cut = int(sorted_ts[len(ts) - _frac_count(cfg.test_fraction, len(ts))])
    valid_cut = _given_cut(cfg.valid_start, "valid_start", first, last, source)
    if valid_cut is None:
        if cfg.valid_fraction == 0:
            valid_cut = test_cut
        elif cfg.split_mode == "days" or cfg.test_start:
            before = np.unique(days[ts < test_cut])
            n_valid = _frac_count(cfg.valid_fraction, len(np.unique(days)))
            valid_cut = int(before[max(len(before) - n_valid, 0)]) * SECONDS_PER_DAY if len(before) else test_cut
        else:
            sorted_ts = np.sort(ts)
            n_test = int((ts >= test_cut).sum())
            valid_cut = min(int(sorted_ts[max(len(ts) - n_test - _frac_count(cfg.valid_fraction, len(ts)), 0)]), test_cut)
    if valid_cut > test_cut:
        raise DataValidationError(source, f"validation start {ds_of(valid_cut)} is after test start {ds_of(test_cut)}")
    split = np.full(len(ts), TRAIN, np.int8)
    split[ts >= valid_cut] = VALID
    split[ts >= test_cut] = TEST
    info = {"valid_cut_ts": valid_cut, "test_cut_ts": test_cut, "valid_start": ds_of(valid_cut), "test_start": ds_of(test_cut),
            "first_day": first, "last_day": last}
    if not (split == TEST).any():
        raise DataValidationError(source, f"empty test split: no samples at or after test start {ds_of(test_cut)} (ts {test_cut}); samples span {first}..{last}")
    if not (split == TRAIN).any():
        raise DataValidationError(source, f"empty train split: no samples before {ds_of(valid_cut)} (ts {valid_cut}); samples span {first}..{last}")
    return split, info


def _frac_count(fraction: float, n: int) -> int:
    """ceil(fraction * n), robust to float error (0.1 * 30 is 3, not 4), at least 1 for fraction > 0."""
    return max(1, math.ceil(fraction * n - 1e-9)) if fraction > 0 else 0


def _given_cut(day: str | None, name: str, first: str, last: str, source: str) -> int | None:
    """The start ts of a configured split day, checked to lie inside the samples' days (after the first)."""
    if day is None:
        return None
    if not first < day <= last:
        raise DataValidationError(source, f"unknown split day {name}={day}: samples span {first}..{last}, so it must be after {first} and at most {last}")
    return day_bounds(day)[0]
