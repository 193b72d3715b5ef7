"""SynthConfig: the size, seed and planted structure of a synthetic industrial log."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields


@dataclass
class SynthConfig:
    """Everything that determines a synthetic dataset; same config (seed included) -> same bytes.

    The hidden model these knobs drive is documented with its formulas in docs/synthetic.md.
    """

    seed: int = 0
    # -- size ---------------------------------------------------------------------------------
    num_users: int = 2000
    num_items: int = 1000
    num_categories: int = 20
    num_queries: int = 100  # each query belongs to one category; needs >= num_categories
    num_days: int = 7
    start_day: str = "2026-01-01"
    impressions_per_user_day: float = 15.0  # mean over users; per-user activity is heavy-tailed
    slate_size: int = 5  # impressions shown per request (one feed refresh or one search)
    search_share: float = 0.3  # mean share of requests that are searches
    num_regions: int = 8  # user feature `region`, codes 1..num_regions
    num_age_buckets: int = 6  # user feature `age_bucket`, codes 1..num_age_buckets
    content_dim: int = 16  # length of the items' `content` vector
    hidden_dim: int = 16  # length of the hidden user / item vectors u, v
    # -- planted strengths of the click model ------------------------------------------------
    # logit = bias + interest_strength*<u,v> + condition_strength*match + quality_strength*q
    bias: float = -4.5
    interest_strength: float = 3.0
    condition_strength: float = 1.5  # 0: the condition (scenario, query) says nothing about clicks
    quality_strength: float = 0.5
    drift: float = 0.1  # daily step of the interest random walk: u' = sqrt(1-d^2) u + d z
    # -- hidden structure ----------------------------------------------------------------------
    prefs_per_user: int = 4  # categories of a user's long-term preference distribution
    feed_mode_size: int = 3  # categories of a user's feed-mode set (match in feed)
    category_tie: float = 0.8  # share of an item's vector v that is its category centre
    interest_tie: float = 0.8  # share of a user's vector u that is the centroid of preferred categories
    popularity_skew: float = 1.0  # log-normal sigma of item popularity (higher = heavier head)
    extra_category_prob: float = 0.3  # chance an item has a second category in `category_ids`
    content_noise: float = 0.5  # noise in the content vector relative to its signal
    # -- candidate generation (what gets shown) -----------------------------------------------
    feed_pref_share: float = 0.6  # feed slot drawn from the user's preferred categories
    feed_popular_share: float = 0.25  # feed slot drawn by global popularity (rest: uniform)
    search_precision: float = 0.8  # search slot drawn from the query's category (rest: as feed)
    query_pref_share: float = 0.8  # search query's category drawn from user prefs (rest: uniform)
    # -- behaviours beyond clicks ---------------------------------------------------------------
    purchase_bias: float = -2.0  # P(purchase | click) = sigmoid(purchase_bias + q)
    # -- point-in-time item statistics --------------------------------------------------------
    stats_prior_ctr: float = 0.1  # smoothed CTR of an item with no history
    stats_prior_weight: float = 20.0  # pseudo-impressions behind the prior
    # -- memory bound --------------------------------------------------------------------------
    users_per_chunk: int = 50000  # users generated (and written as one part file) at a time

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is out of range."""
        positive = ("num_users", "num_items", "num_categories", "num_queries", "num_days", "slate_size",
                    "num_regions", "num_age_buckets", "content_dim", "hidden_dim", "prefs_per_user",
                    "feed_mode_size", "users_per_chunk")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SynthConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        unit = ("search_share", "drift", "category_tie", "interest_tie", "extra_category_prob",
                "feed_pref_share", "feed_popular_share", "search_precision", "query_pref_share")
        for name in unit:
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SynthConfig.{name} must be in [0, 1], got {value!r}")
        if self.feed_pref_share + self.feed_popular_share > 1.0:
            raise ValueError("SynthConfig.feed_pref_share + feed_popular_share must be <= 1")
        for name in ("impressions_per_user_day", "popularity_skew", "content_noise", "stats_prior_weight"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"SynthConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.stats_prior_weight <= 0 or not 0 < self.stats_prior_ctr < 1:
            raise ValueError("SynthConfig.stats_prior_weight must be > 0 and stats_prior_ctr in (0, 1)")
        if self.num_queries < self.num_categories:
            raise ValueError(
                f"SynthConfig.num_queries ({self.num_queries}) must be >= num_categories ({self.num_categories}): "
                "every category needs a query"
            )
        if self.num_items < self.num_categories:
            raise ValueError(
                f"SynthConfig.num_items ({self.num_items}) must be >= num_categories ({self.num_categories})"
            )
        if self.slate_size >= 3600:
            raise ValueError(f"SynthConfig.slate_size must be < 3600, got {self.slate_size}")
        try:
            dt.datetime.strptime(self.start_day, "%Y-%m-%d")
        except (TypeError, ValueError):
            raise ValueError(f"SynthConfig.start_day must be YYYY-MM-DD, got {self.start_day!r}") from None
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and value != value:
                raise ValueError(f"SynthConfig.{f.name} is NaN")
