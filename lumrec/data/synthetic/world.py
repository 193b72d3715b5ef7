"""The hidden world behind a synthetic log: user interests, item vectors, queries; and its daily drift.

Row 0 of every per-user / per-item / per-category array is padding (id 0 = missing), so arrays
are indexed by id directly. See docs/synthetic.md for the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lumrec.data.synthetic.config import SynthConfig

# Independent random streams, so that e.g. adding a user feature does not reshuffle the events.
STREAM_WORLD = 1
STREAM_DRIFT = 2
STREAM_EVENTS = 3


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """A generator for one stream (and day, chunk): independent of every other key."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, key)]))


@dataclass
class World:
    """What experiments should recover; everything the generator samples events from."""

    # categories
    cat_centre: np.ndarray  # (C+1, h) float32, unit vectors m_c
    # items
    item_cat: np.ndarray  # (N+1,) int64 primary category
    item_extra_cat: np.ndarray  # (N+1,) int64 second category, 0 = none
    item_vec: np.ndarray  # (N+1, h) float32 hidden vector v
    item_quality: np.ndarray  # (N+1,) float32 quality q ~ N(0, 1)
    item_content: np.ndarray  # (N+1, d) float32 content vector
    items_by_cat: np.ndarray  # (N,) item ids sorted by category
    cat_start: np.ndarray  # (C+2,) offsets of each category's run in items_by_cat
    pop_cum_by_cat: np.ndarray  # (N,) cumulative popularity along items_by_cat
    pop_cum: np.ndarray  # (N,) cumulative popularity of items 1..N
    # queries
    query_cat: np.ndarray  # (Q+1,) category of each query
    queries_by_cat: np.ndarray  # (Q,) query ids sorted by category
    query_cat_start: np.ndarray  # (C+2,)
    # users
    user_region: np.ndarray  # (U+1,) int64
    user_age: np.ndarray  # (U+1,) int64
    user_pref_cat: np.ndarray  # (U+1, K) long-term preferred categories
    user_pref_cum: np.ndarray  # (U+1, K) cumulative preference weights (last = 1)
    user_feed_cat: np.ndarray  # (U+1, F) feed-mode categories
    user_activity: np.ndarray  # (U+1,) expected impressions per day
    user_search_share: np.ndarray  # (U+1,) probability a request is a search
    user_vec0: np.ndarray  # (U+1, h) float32 interests on the first day


def _runs(keys: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids 1..len(keys) sorted by key (stable) and the start offset of each key's run."""
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys, minlength=num_keys + 1)
    start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return (order + 1).astype(np.int64), start


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def build_world(cfg: SynthConfig) -> World:
    """Sample the hidden world of `cfg` (deterministic in cfg.seed)."""
    cfg.validate()
    rng = rng_for(cfg.seed, STREAM_WORLD)
    C, N, Q, U, h, d = cfg.num_categories, cfg.num_items, cfg.num_queries, cfg.num_users, cfg.hidden_dim, cfg.content_dim

    centre = np.zeros((C + 1, h), np.float32)
    centre[1:] = _unit_rows(rng.standard_normal((C, h)))

    # Category sizes are skewed (a few big categories); every category has at least one item.
    cat_weight = 1.0 / np.sqrt(np.arange(1, C + 1))
    cats = np.concatenate([np.arange(1, C + 1), 1 + rng.choice(C, size=N - C, p=cat_weight / cat_weight.sum())])
    item_cat = np.concatenate([[0], rng.permutation(cats)]).astype(np.int64)
    extra = 1 + rng.integers(0, C, size=N)
    extra = np.where((rng.random(N) < cfg.extra_category_prob) & (extra != item_cat[1:]), extra, 0)
    item_extra_cat = np.concatenate([[0], extra]).astype(np.int64)

    a = cfg.category_tie
    noise = rng.standard_normal((N, h)) / np.sqrt(h)
    item_vec = np.zeros((N + 1, h), np.float32)
    item_vec[1:] = a * centre[item_cat[1:]] + np.sqrt(1 - a * a) * noise
    quality = np.zeros(N + 1, np.float32)
    quality[1:] = rng.standard_normal(N)

    # content = P[c] + v W + noise: a linear probe recovers the category and the hidden vector.
    proj_cat = rng.standard_normal((C + 1, d)) / np.sqrt(d)
    proj_vec = rng.standard_normal((h, d)) / np.sqrt(d)
    content = np.zeros((N + 1, d), np.float32)
    content[1:] = (proj_cat[item_cat[1:]] + item_vec[1:] @ proj_vec
                   + cfg.content_noise * rng.standard_normal((N, d)) / np.sqrt(d))

    # Popularity is log-normal and leans towards quality, like real exposure does.
    pop = np.exp(cfg.popularity_skew * rng.standard_normal(N) + 0.5 * quality[1:])
    items_by_cat, cat_start = _runs(item_cat[1:], C)
    pop_cum_by_cat = np.cumsum(pop[items_by_cat - 1])
    pop_cum = np.cumsum(pop)

    # Each category gets one query first, the rest are spread with the category skew.
    qcats = np.concatenate([np.arange(1, C + 1), 1 + rng.choice(C, size=Q - C, p=cat_weight / cat_weight.sum())])
    query_cat = np.concatenate([[0], rng.permutation(qcats)]).astype(np.int64)
    queries_by_cat, query_cat_start = _runs(query_cat[1:], C)

    R, A, K, F = cfg.num_regions, cfg.num_age_buckets, cfg.prefs_per_user, cfg.feed_mode_size
    region = np.concatenate([[0], 1 + rng.integers(0, R, size=U)]).astype(np.int64)
    age = np.concatenate([[0], 1 + rng.integers(0, A, size=U)]).astype(np.int64)
    # Regions differ in taste: each has its own prior over categories.
    region_prior = rng.dirichlet(np.full(C, 0.5), size=R)
    pref = np.zeros((U + 1, K), np.int64)
    for r in range(1, R + 1):
        members = np.flatnonzero(region == r)
        if members.size:
            pref[members] = 1 + rng.choice(C, size=(members.size, K), p=region_prior[r - 1])
    pref_w = np.zeros((U + 1, K))
    pref_w[1:] = rng.dirichlet(np.ones(K), size=U)
    pref_cum = np.cumsum(pref_w, axis=1)
    pref_cum[:, -1] = 1.0
    # Feed-mode categories are independent of long-term taste: what the feed "wants" differs.
    feed_cat = np.zeros((U + 1, F), np.int64)
    feed_cat[1:] = 1 + rng.integers(0, C, size=(U, F))

    # Activity: heavy-tailed per user, younger age buckets more active; mean = the config's rate.
    act = np.exp(0.6 * rng.standard_normal(U) - 0.18)
    age_mult = np.linspace(1.4, 0.6, A)[age[1:] - 1]
    act = act * age_mult
    activity = np.zeros(U + 1)
    activity[1:] = cfg.impressions_per_user_day * act / act.mean()
    s, kappa = cfg.search_share, 6.0
    share = np.zeros(U + 1)
    share[1:] = s if s in (0.0, 1.0) else rng.beta(kappa * s, kappa * (1 - s), size=U)

    b = cfg.interest_tie
    centroid = np.zeros((U, h), np.float32)
    for k in range(K):
        centroid += pref_w[1:, k, None].astype(np.float32) * centre[pref[1:, k]]
    user_vec0 = np.zeros((U + 1, h), np.float32)
    user_vec0[1:] = _unit_rows(centroid) * np.float32(b)
    user_vec0[1:] += rng.standard_normal((U, h), dtype=np.float32) * np.float32(np.sqrt(1 - b * b) / np.sqrt(h))

    return World(
        cat_centre=centre, item_cat=item_cat, item_extra_cat=item_extra_cat, item_vec=item_vec,
        item_quality=quality, item_content=content, items_by_cat=items_by_cat, cat_start=cat_start,
        pop_cum_by_cat=pop_cum_by_cat, pop_cum=pop_cum, query_cat=query_cat, queries_by_cat=queries_by_cat,
        query_cat_start=query_cat_start, user_region=region, user_age=age, user_pref_cat=pref,
        user_pref_cum=pref_cum, user_feed_cat=feed_cat, user_activity=activity, user_search_share=share,
        user_vec0=user_vec0,
    )


def user_chunks(cfg: SynthConfig) -> list[tuple[int, int]]:
    """[lo, hi) user-id ranges generated together (one part file each)."""
    step = cfg.users_per_chunk
    return [(lo, min(lo + step, cfg.num_users + 1)) for lo in range(1, cfg.num_users + 1, step)]


def drift_interests(user_vec: np.ndarray, cfg: SynthConfig, day: int) -> None:
    """Move interests one day forward in place: u <- sqrt(1-d^2) u + d z, z ~ N(0, I/h)."""
    keep = np.float32(np.sqrt(1.0 - cfg.drift**2))
    step = np.float32(cfg.drift / np.sqrt(cfg.hidden_dim))
    for chunk, (lo, hi) in enumerate(user_chunks(cfg)):
        z = rng_for(cfg.seed, STREAM_DRIFT, day, chunk).standard_normal((hi - lo, cfg.hidden_dim), dtype=np.float32)
        user_vec[lo:hi] = keep * user_vec[lo:hi] + step * z


def interests_on(world: World, cfg: SynthConfig, day: int) -> np.ndarray:
    """The users' interest vectors on day index `day` (0 = first day), replaying the drift."""
    vec = world.user_vec0.copy()
    for d in range(1, day + 1):
        drift_interests(vec, cfg, d)
    return vec
