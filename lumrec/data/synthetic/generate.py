"""generate(): write a synthetic lumrec dataset one day (and one user chunk) at a time."""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from lumrec.data.dataset import MANIFEST, Dataset, DatasetMeta, day_bounds, shift_ds
from lumrec.data.schema import SCENARIO_FEED, SCENARIO_SEARCH, TABLES
from lumrec.data.synthetic.config import SynthConfig
from lumrec.data.synthetic.events import sample_chunk
from lumrec.data.synthetic.stats import AucHistogram, ItemCounter
from lumrec.data.synthetic.world import STREAM_EVENTS, World, build_world, drift_interests, rng_for, user_chunks

GENERATOR_VERSION = 1
_OWNED = set(TABLES) | {"vocab", MANIFEST}


@dataclass
class DayReport:
    """What one generated day wrote; handed to `on_day` right after the day's files are on disk."""

    index: int
    ds: str
    impressions: int
    clicks: int
    behaviours: int
    parts: int


def _prepare_out(root: Path) -> None:
    """Make `root` empty of dataset files: replace a previous lumrec dataset, refuse foreign content."""
    if not root.exists():
        root.mkdir(parents=True)
        return
    if not root.is_dir():
        raise ValueError(f"{root}: output path exists and is not a folder")
    foreign = sorted(p.name for p in root.iterdir() if p.name not in _OWNED and not p.name.startswith("."))
    if foreign:
        raise ValueError(f"{root}: output folder holds files that are not a lumrec dataset ({foreign[:3]}); "
                         "choose an empty or new folder")
    # Manifest first, so an interrupted regeneration never looks complete.
    (root / MANIFEST).unlink(missing_ok=True)
    for name in sorted(_OWNED - {MANIFEST}):
        shutil.rmtree(root / name, ignore_errors=True)


def _users_table(world: World) -> pa.Table:
    n = len(world.user_region) - 1
    return pa.table({"user_id": np.arange(1, n + 1, dtype=np.int64),
                     "region": world.user_region[1:], "age_bucket": world.user_age[1:]})


def generated_with(out: str | Path, config: SynthConfig) -> bool | None:
    """Whether the dataset at `out` was generated with `config`; None when `out` holds no dataset."""
    data = Dataset(out)
    if not data.manifest_path.exists():
        return None
    return data.read_meta().extra.get("config") == asdict(config)


def ensure_generated(out: str | Path, config: SynthConfig) -> bool:
    """Generate the logs of `config` into `out` unless a dataset made with the same config is there; True if generated."""
    if generated_with(out, config):
        return False
    generate(out, config, progress=False)
    return True


def _items_table(world: World) -> pa.Table:
    n = len(world.item_cat) - 1
    cat, extra = world.item_cat[1:], world.item_extra_cat[1:]
    counts = 1 + (extra > 0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    values = np.empty(int(offsets[-1]), np.int64)
    values[offsets[:-1]] = cat
    values[offsets[:-1][extra > 0] + 1] = extra[extra > 0]
    d = world.item_content.shape[1]
    content = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * d),
                                       pa.array(world.item_content[1:].reshape(-1)))
    return pa.table({"item_id": np.arange(1, n + 1, dtype=np.int64), "category_id": cat,
                     "category_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                     "content": content})


def _arrow(columns: dict[str, np.ndarray]) -> pa.Table:
    return pa.table({name: pa.array(values) for name, values in columns.items()})


def generate(out: str | Path, config: SynthConfig, progress: bool = False,
             on_day: Callable[[DayReport], None] | None = None) -> DatasetMeta:
    """Generate the synthetic dataset of `config` into folder `out` and return its manifest.

    Deterministic in `config` (same config -> byte-identical Parquet). Memory is bounded by the
    hidden world plus one user chunk of one day: each day's files are written before the next
    day is sampled (`on_day` is called at that point). An existing lumrec dataset at `out` is replaced.
    """
    config.validate()
    root = Path(out)
    _prepare_out(root)
    data = Dataset(root)
    world = build_world(config)
    data.write_table("users", _users_table(world))
    data.write_table("items", _items_table(world))

    counter = ItemCounter(config.num_items)
    names = ("all", "feed", "search")
    auc_full = {k: AucHistogram() for k in names}
    auc_nocond = {k: AucHistogram() for k in names}
    match_clicks = np.zeros((2, 2, 2))  # [search?, match?, (impressions, clicks)]
    totals = {"impressions": 0, "clicks": 0, "behaviours": 0, "searches": 0}
    user_vec = world.user_vec0.copy()
    chunks = user_chunks(config)

    bar = tqdm(total=config.num_days, desc="synth", unit="day", disable=not progress)
    for day in range(config.num_days):
        ds = shift_ds(config.start_day, day)
        day_start = day_bounds(ds)[0]
        if day > 0:
            drift_interests(user_vec, config, day)
        data.write_day("item_stats", ds, counter.table(config.stats_prior_ctr, config.stats_prior_weight))
        report = DayReport(day, ds, 0, 0, 0, len(chunks))
        for part, (lo, hi) in enumerate(chunks):
            ev = sample_chunk(world, config, user_vec, lo, hi, day_start, rng_for(config.seed, STREAM_EVENTS, day, part))
            data.write_day("impressions", ds, _arrow(ev.impressions), part=part)
            data.write_day("behaviours", ds, _arrow(ev.behaviours), part=part)
            imp = ev.impressions
            label = imp["label"]
            counter.add(imp["item_id"], label)
            search = imp["scenario"] == SCENARIO_SEARCH
            for key, mask in (("all", None), ("feed", imp["scenario"] == SCENARIO_FEED), ("search", search)):
                sel = slice(None) if mask is None else mask
                auc_full[key].add(ev.logit[sel], label[sel])
                auc_nocond[key].add(ev.logit[sel] - config.condition_strength * ev.match[sel], label[sel])
            matched = ev.match > 0
            for s in (0, 1):
                for m in (0, 1):
                    sel = (search == bool(s)) & (matched == bool(m))
                    match_clicks[s, m] += (sel.sum(), label[sel].sum())
            report.impressions += len(label)
            report.clicks += int(label.sum())
            report.behaviours += len(ev.behaviours["user_id"])
            totals["searches"] += int(search.sum())
        counter.close_day()
        for key in ("impressions", "clicks", "behaviours"):
            totals[key] += getattr(report, key)
        if on_day is not None:
            on_day(report)
        bar.update(1)
        bar.set_postfix(impressions=totals["impressions"])
    bar.close()

    meta = DatasetMeta(
        name=f"synthetic-seed{config.seed}",
        source="lumrec.data.synthetic",
        vocab_sizes={
            "user_id": config.num_users + 1, "item_id": config.num_items + 1,
            "category_id": config.num_categories + 1, "query_id": config.num_queries + 1,
            "scenario": 3, "region": config.num_regions + 1, "age_bucket": config.num_age_buckets + 1,
        },
        notes="Synthetic industrial logs with planted structure; the hidden model is in docs/synthetic.md.",
        extra={
            "generator_version": GENERATOR_VERSION,
            "config": asdict(config),
            "planted": {
                "bias": config.bias, "w_interest": config.interest_strength,
                "w_condition": config.condition_strength, "w_quality": config.quality_strength,
                "drift": config.drift, "search_precision": config.search_precision,
            },
            "oracle_auc": {k: _round(auc_full[k].auc()) for k in names},
            "oracle_auc_no_condition": {k: _round(auc_nocond[k].auc()) for k in names},
            "ctr_by_match": {
                f"{sc}_{'match' if m else 'nomatch'}": _round(match_clicks[s, m, 1] / match_clicks[s, m, 0])
                for s, sc in ((0, "feed"), (1, "search")) for m in (0, 1)
            },
            "counts": {**totals, "ctr": _round(totals["clicks"] / max(totals["impressions"], 1))},
        },
    )
    data.write_meta(meta)
    return meta


def _round(x: float) -> float | None:
    """Manifest numbers: 4 decimals; NaN (no data) becomes null so the JSON stays standard."""
    return None if (x is None or not math.isfinite(x)) else round(float(x), 4)
