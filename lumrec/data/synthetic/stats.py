"""Point-in-time item statistics and a streaming AUC, both in memory that does not grow with days."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

STATS_WINDOW_DAYS = 7


def item_stats_table(imps_7d: np.ndarray, clicks_7d: np.ndarray, clicks_before: np.ndarray,
                     prior_ctr: float, prior_weight: float) -> pa.Table:
    """The item_stats rows of one day from counts over the 7 days before it (index = item id, row 0 skipped).

    f_ctr_7d = (clicks + w*prior) / (impressions + w), finite for items never shown;
    f_log_impressions_7d = log1p(impressions); f_popularity = log1p(all clicks before the day).
    """
    imps, clicks = imps_7d[1:].astype(np.float64), clicks_7d[1:].astype(np.float64)
    ctr = (clicks + prior_weight * prior_ctr) / (imps + prior_weight)
    return pa.table({
        "item_id": pa.array(np.arange(1, len(imps_7d), dtype=np.int64)),
        "f_ctr_7d": pa.array(ctr.astype(np.float32)),
        "f_log_impressions_7d": pa.array(np.log1p(imps).astype(np.float32)),
        "f_popularity": pa.array(np.log1p(clicks_before[1:].astype(np.float64)).astype(np.float32)),
    })


class ItemCounter:
    """Per-item impression / click counts of the last 7 days and all clicks so far."""

    def __init__(self, num_items: int, window: int = STATS_WINDOW_DAYS):
        self.imps = np.zeros((window, num_items + 1), np.int64)
        self.clicks = np.zeros((window, num_items + 1), np.int64)
        self.clicks_all = np.zeros(num_items + 1, np.int64)
        self.today_imps = np.zeros(num_items + 1, np.int64)
        self.today_clicks = np.zeros(num_items + 1, np.int64)
        self.day = 0

    def add(self, items: np.ndarray, labels: np.ndarray) -> None:
        """Count one chunk of today's impressions."""
        n = len(self.today_imps)
        self.today_imps += np.bincount(items, minlength=n)
        self.today_clicks += np.bincount(items, weights=labels, minlength=n).astype(np.int64)

    def close_day(self) -> None:
        """Move today's counts into the window (the oldest day drops out)."""
        slot = self.day % len(self.imps)
        self.imps[slot], self.clicks[slot] = self.today_imps, self.today_clicks
        self.clicks_all += self.today_clicks
        self.today_imps = np.zeros_like(self.today_imps)
        self.today_clicks = np.zeros_like(self.today_clicks)
        self.day += 1

    def table(self, prior_ctr: float, prior_weight: float) -> pa.Table:
        """item_stats for the coming day: only closed days count."""
        return item_stats_table(self.imps.sum(0), self.clicks.sum(0), self.clicks_all, prior_ctr, prior_weight)


class AucHistogram:
    """ROC AUC of scores against 0/1 labels, streamed through a fine histogram of the scores."""

    def __init__(self, lo: float = -20.0, hi: float = 20.0, bins: int = 40000):
        self.lo, self.width = lo, (hi - lo) / bins
        self.pos = np.zeros(bins, np.float64)
        self.neg = np.zeros(bins, np.float64)

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        """Add a batch of scores and labels."""
        idx = np.clip(((scores.astype(np.float64) - self.lo) / self.width).astype(np.int64), 0, len(self.pos) - 1)
        pos = np.bincount(idx, weights=labels.astype(np.float64), minlength=len(self.pos))
        self.pos += pos
        self.neg += np.bincount(idx, minlength=len(self.pos)) - pos

    def auc(self) -> float:
        """P(score of a random positive > score of a random negative); ties (same bin) count half."""
        total = self.pos.sum() * self.neg.sum()
        if total == 0:
            return float("nan")
        neg_below = np.cumsum(self.neg) - self.neg
        return float((self.pos * (neg_below + 0.5 * self.neg)).sum() / total)
