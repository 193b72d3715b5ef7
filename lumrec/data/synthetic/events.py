"""One day of one user chunk: requests, shown items, clicks and purchases, all vectorised."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lumrec.data.dataset import SECONDS_PER_DAY
from lumrec.data.schema import ACTION_CLICK, ACTION_PURCHASE, SCENARIO_FEED, SCENARIO_SEARCH
from lumrec.data.synthetic.config import SynthConfig
from lumrec.data.synthetic.world import World

# Rows per block when gathering hidden vectors, so a chunk's transient memory stays small.
_DOT_BLOCK = 1 << 17
PURCHASE_MAX_DELAY_S = 1800


@dataclass
class ChunkEvents:
    """Impressions and behaviours of one chunk (sorted by user, ts) plus the oracle's logits."""

    impressions: dict[str, np.ndarray]
    behaviours: dict[str, np.ndarray]
    logit: np.ndarray  # full click logit of each impression
    match: np.ndarray  # the condition match (0/1) of each impression; its logit term is condition_strength * match


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _rowdot(a: np.ndarray, ia: np.ndarray, b: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """<a[ia[j]], b[ib[j]]> for every j, gathered block by block."""
    out = np.empty(len(ia), np.float32)
    for lo in range(0, len(ia), _DOT_BLOCK):
        hi = lo + _DOT_BLOCK
        out[lo:hi] = np.einsum("ij,ij->i", a[ia[lo:hi]], b[ib[lo:hi]])
    return out


def _in_category(world: World, cats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One item per entry of `cats`, popularity-weighted within that category."""
    start, end = world.cat_start[cats], world.cat_start[cats + 1]
    cum = world.pop_cum_by_cat
    lo = np.where(start > 0, cum[np.maximum(start - 1, 0)], 0.0)
    target = lo + rng.random(len(cats)) * (cum[end - 1] - lo)
    pos = np.searchsorted(cum, target, side="right")
    # Float rounding can step just outside the run; clamp back into it.
    pos = np.clip(pos, start, end - 1)
    return world.items_by_cat[pos]


def _preferred_category(world: World, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One category per entry, drawn from that user's long-term preference distribution."""
    cum = world.user_pref_cum[users]
    slot = (cum < rng.random(len(users))[:, None]).sum(axis=1)
    slot = np.minimum(slot, cum.shape[1] - 1)
    return world.user_pref_cat[users, slot]


def _candidates(world: World, cfg: SynthConfig, users: np.ndarray, qcat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The shown item of each impression; `qcat` is the query's category (0 in feed)."""
    n = len(users)
    num_items = len(world.item_cat) - 1
    from_query = (qcat > 0) & (rng.random(n) < cfg.search_precision)
    mix = rng.random(n)
    from_pref = ~from_query & (mix < cfg.feed_pref_share)
    from_pop = ~from_query & ~from_pref & (mix < cfg.feed_pref_share + cfg.feed_popular_share)
    item = 1 + rng.integers(0, num_items, size=n)  # uniform, overwritten below where not
    if from_query.any():
        item[from_query] = _in_category(world, qcat[from_query], rng)
    if from_pref.any():
        item[from_pref] = _in_category(world, _preferred_category(world, users[from_pref], rng), rng)
    if from_pop.any():
        target = rng.random(int(from_pop.sum())) * world.pop_cum[-1]
        item[from_pop] = 1 + np.minimum(np.searchsorted(world.pop_cum, target, side="right"), num_items - 1)
    return item.astype(np.int64)


def match(world: World, users: np.ndarray, items: np.ndarray, qcat: np.ndarray) -> np.ndarray:
    """The condition match: search -> item category == query category; feed -> category in the user's feed-mode set."""
    cat = world.item_cat[items]
    in_feed_mode = (world.user_feed_cat[users] == cat[:, None]).any(axis=1)
    return np.where(qcat > 0, cat == qcat, in_feed_mode).astype(np.float32)


def sample_chunk(world: World, cfg: SynthConfig, user_vec: np.ndarray, lo: int, hi: int, day_start: int,
                 rng: np.random.Generator) -> ChunkEvents:
    """Sample one day of users [lo, hi): impressions with click labels, and the behaviours they cause."""
    S = cfg.slate_size
    users = np.arange(lo, hi, dtype=np.int64)
    n_req = rng.poisson(world.user_activity[lo:hi] / S)
    req_user = np.repeat(users, n_req)
    R = len(req_user)
    req_t = rng.integers(0, SECONDS_PER_DAY - S + 1, size=R)
    is_search = rng.random(R) < world.user_search_share[req_user]
    # The query's category: mostly what the user likes, sometimes anything.
    qc = np.where(rng.random(R) < cfg.query_pref_share,
                  _preferred_category(world, req_user, rng),
                  1 + rng.integers(0, cfg.num_categories, size=R))
    q_start, q_end = world.query_cat_start[qc], world.query_cat_start[qc + 1]
    query = world.queries_by_cat[q_start + (rng.random(R) * (q_end - q_start)).astype(np.int64)]
    query = np.where(is_search, query, 0)

    # Expand requests into slates; slot k of a request is shown k seconds after it starts.
    req = np.repeat(np.arange(R), S)
    user = req_user[req]
    ts = day_start + req_t[req] + np.tile(np.arange(S), R)
    query = query[req]
    scenario = np.where(query > 0, SCENARIO_SEARCH, SCENARIO_FEED).astype(np.int32)
    qcat = world.query_cat[query]  # 0 in feed
    item = _candidates(world, cfg, user, qcat, rng)

    interest = _rowdot(user_vec, user, world.item_vec, item)
    matched = match(world, user, item, qcat)
    logit = (cfg.bias + cfg.interest_strength * interest + cfg.condition_strength * matched
             + cfg.quality_strength * world.item_quality[item])
    label = rng.random(len(item)) < _sigmoid(logit)

    order = np.lexsort((ts, user))  # overlapping requests interleave; keep each user in time order
    user, ts, item, scenario, query, label = user[order], ts[order], item[order], scenario[order], query[order], label[order]
    logit, matched = logit[order], matched[order]
    category = world.item_cat[item]
    impressions = {"user_id": user, "ts": ts, "item_id": item, "scenario": scenario, "query_id": query,
                   "category_id": category, "label": label.astype(np.float32)}

    # Behaviours: every click (same ts), and a purchase after some clicks, driven by quality.
    clicked = np.flatnonzero(label)
    buys = clicked[rng.random(len(clicked)) < _sigmoid(cfg.purchase_bias + world.item_quality[item[clicked]])]
    buy_ts = np.minimum(ts[buys] + rng.integers(1, PURCHASE_MAX_DELAY_S + 1, size=len(buys)), day_start + SECONDS_PER_DAY - 1)
    rows = np.concatenate([clicked, buys])
    action = np.concatenate([np.full(len(clicked), ACTION_CLICK), np.full(len(buys), ACTION_PURCHASE)]).astype(np.int32)
    b_ts = np.concatenate([ts[clicked], buy_ts])
    b_order = np.lexsort((action, b_ts, user[rows]))
    rows, action, b_ts = rows[b_order], action[b_order], b_ts[b_order]
    behaviours = {"user_id": user[rows], "ts": b_ts, "item_id": item[rows], "scenario": scenario[rows],
                  "query_id": query[rows], "category_id": category[rows], "action": action}
    return ChunkEvents(impressions, behaviours, logit.astype(np.float32), matched)
