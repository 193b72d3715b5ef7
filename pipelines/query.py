"""Step 2: query a pre-trained LUM under many conditions at once and write the knowledge store of one day.

    lumrec query CONFIG [key=value ...]

For day `as_of_ds` it loads the run's LUM (config.json + best or latest checkpoint), builds
every selected user's history from behaviours of days `<= as_of_ds` only (point-in-time: a
later day is never read), asks all conditions in one grouped pass per batch
(``lumrec.modules.retrieval.grouped_query``) with the queries timed at the end of `as_of_ds`, and writes
`STORE/as_of_ds=<day>/` (``lumrec.knowledge``): one vector per (user, condition) and the
item-token embedding of every item. Knowledge written for day D is used from day D+1 on.
TensorBoard scalars of each run (users, conditions, seconds, users per second) go to `STORE/tb`
at step = the as-of day's number (days since 1970-01-01), so the runs of a store form one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lumrec.config import check_at_least, check_days, load_config
from lumrec.data.batches import make_jagged_batch
from lumrec.data.dataset import SECONDS_PER_DAY, day_bounds
from lumrec.data.packing import pack_sequences
from lumrec.data.sequences import UserSequences, sequences_from_dataset
from lumrec.data.tokens import build_lum_tokens
from lumrec.device import check_device_setting, move_to_device, resolve_device
from lumrec.distributed import DistContext, gather_to_rank0, init_distributed
from lumrec.knowledge import Condition, KnowledgeWriter, load_knowledge, parse_condition
from lumrec.knowledge.redis_store import RedisKnowledgeConfig, publish_partition
from lumrec.locks import RunLock, under_lock
from lumrec.modules.retrieval.grouped_query import (
    CONSTANT_FEATURE,
    UNCONDITIONED_FEATURE,
    build_grouped_query_layout,
    condition_features,
    condition_query_embeddings,
    default_max_history,
    grouped_query,
    grouped_query_supported,
    query_encode,
    separate_queries,
)
from lumrec.modules.retrieval.lum import LUM
from lumrec.pipelines.pretrained_lum import LoadedLUM, load_pretrained_lum
from lumrec.tracking import ScalarLog, count_parameters, log_job_start, progress_bar

# The registrar lives with the others (light: `lumrec --help` does not import this job).
from lumrec.pipelines.commands import register_query  # noqa: E402,F401

log = logging.getLogger("lumrec.query")

__all__ = ["ConditionSpec", "QueryConfig", "main", "register_query", "resolve_conditions", "run_query"]


@dataclass
class ConditionSpec:
    """Conditions of one feature: explicit `values`, or "all" (every id 1..vocab-1; `[0]` for `const` and `none`)."""

    feature: str
    values: list[int] | str = "all"


@dataclass
class QueryConfig:
    """One knowledge-query job: which model, which day, which users and conditions, where to write."""

    checkpoint: str = "runs/pretrain"  # a pretrain run's `out` folder, or one step-NNNNNNNN folder inside it
    checkpoint_kind: str = "auto"  # for a run folder: "best", "latest" or "auto" (best if there is one, else latest)
    data: str | None = None  # dataset folder; None: the run's data.path
    as_of_ds: str = ""  # the day (YYYY-MM-DD) the knowledge is as of (required)
    conditions: list[ConditionSpec] = field(default_factory=list)  # []: every value of every condition the LUM knows
    users: str = "active"  # "active": users with behaviours on as_of_ds; "all": the users table and every user seen
    history_start: str | None = None  # first day of history to read (None: all days up to as_of_ds)
    rows_per_batch: int = 64  # packed rows of histories per grouped pass
    store: str = "out/knowledge"
    model_version: str | None = None  # None: "<run>/<kind>/step-NNNNNNNN@<digest>" of the checkpoint
    item_chunk: int = 65536  # items embedded per call
    # Which items get an e_i row: "seen" = items in the histories read (days <= as_of_ds), "all" = the whole
    # vocabulary. With id-only item features an item the LUM never saw has an untrained random embedding;
    # left out, it reads as "missing" downstream instead of as noise. Use "all" when item features carry
    # content that makes a cold item's embedding meaningful.
    items: str = "seen"
    threads: int = 0  # torch threads (0 = torch's default)
    progress: bool = True
    # Incremental refresh: an earlier as_of_ds of the same store whose users that are not queried
    # now keep their vectors (a user without new behaviour has the same history). None = no carry-over.
    carry_over_from: str | None = None
    # Set: the committed partition is also published to this Redis (lumrec.knowledge.redis_store), atomically.
    redis: RedisKnowledgeConfig | None = None
    # Where the LUM answers (lumrec.device): "cpu", "cuda" (this rank's GPU) or "auto" (cuda when one is visible).
    # Histories are packed on the CPU; the answers come back to the CPU to be written.
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_at_least(self, 1, "rows_per_batch", "item_chunk", section="query")
        check_at_least(self, 0, "threads", section="query")
        check_device_setting(self.device, "query.device")
        # as_of_ds "" = not set yet (a daily template sets it per day; the job itself requires it).
        check_days(self, *(["as_of_ds"] if self.as_of_ds else []), "history_start", "carry_over_from", section="query")


def resolve_conditions(specs: list[ConditionSpec], lum: LUM, vocab_sizes: dict[str, int]) -> list[Condition]:
    """The query conditions of `specs` ("all" expanded from the dataset's vocabularies); [] = all of every feature."""
    known = condition_features(lum)
    specs = specs or [ConditionSpec(f, "all") for f in known if f != UNCONDITIONED_FEATURE]
    out: list[Condition] = []
    for spec in specs:
        if spec.feature not in known:
            raise ValueError(f"query: condition feature {spec.feature!r} is not a condition of this LUM; it has {known}")
        if isinstance(spec.values, str):
            if spec.values != "all":
                raise ValueError(f"query: conditions[{spec.feature}].values must be a list of ids or 'all', got {spec.values!r}")
            if spec.feature in (CONSTANT_FEATURE, UNCONDITIONED_FEATURE):
                values = [0]
            elif spec.feature in vocab_sizes:
                values = list(range(1, int(vocab_sizes[spec.feature])))  # 0 = missing
            else:
                raise ValueError(f"query: no vocabulary size for {spec.feature!r} in the dataset manifest; list its values")
        else:
            values = [parse_condition((spec.feature, v), source=f"query: conditions[{spec.feature}]").value for v in spec.values]
            if spec.feature == UNCONDITIONED_FEATURE and values != [0]:
                raise ValueError(f"query: conditions[none].values must be [0] or 'all' (the unconditioned token has no id), got {spec.values!r}")
        out.extend(parse_condition((spec.feature, v), source=f"query: conditions[{spec.feature}]") for v in values)
    dups = sorted({str(c) for c in out if out.count(c) > 1})
    if dups:
        raise ValueError(f"query: condition(s) {dups} asked more than once")
    if not out:
        raise ValueError("query: no conditions to ask")
    return out


def _select_users(cfg: QueryConfig, loaded: LoadedLUM, seqs: UserSequences) -> np.ndarray:
    """Sorted user ids to query: active on as_of_ds, or all known users."""
    if cfg.users == "active":
        return seqs.active_since(day_bounds(cfg.as_of_ds)[0]).user_ids
    if cfg.users == "all":
        ids = [seqs.user_ids]
        if loaded.data.has_table("users"):
            ids.append(loaded.data.read_table("users", columns=["user_id"]).column("user_id").to_numpy().astype(np.int64))
        return np.unique(np.concatenate(ids))
    raise ValueError(f"query: users must be 'active' or 'all', got {cfg.users!r}")


def _answers_without_history(lum: LUM, conditions: list[Condition], as_of_ts: int, grouped: bool) -> torch.Tensor:
    """`[1, N, d_model]`: the answers for a user with no history (each condition token alone at position 0)."""
    query_x = condition_query_embeddings(lum, conditions)
    empty = query_x.new_zeros(0, query_x.shape[1])

    def one_pass(x: torch.Tensor) -> torch.Tensor:
        layout = build_grouped_query_layout(torch.zeros(2, dtype=torch.int64, device=x.device), x.shape[0], max_history=0)
        return query_encode(lum, empty, layout, x, as_of_ts=as_of_ts)

    if grouped:
        return one_pass(query_x)
    return torch.cat([one_pass(query_x[j : j + 1]) for j in range(len(conditions))], dim=1)


def _carry_over(writer: KnowledgeWriter, cfg: QueryConfig, conditions: list[Condition], queried: np.ndarray) -> int:
    """Copy the users of partition `cfg.carry_over_from` that were not queried now into `writer`; returns how many."""
    old = load_knowledge(cfg.store, cfg.carry_over_from)
    if old.dim != writer.dim:
        raise ValueError(f"query: carry_over_from={cfg.carry_over_from} has dim {old.dim}, the model {writer.dim}; refresh all users")
    try:
        ids, vectors = old.user_table([str(c) for c in conditions])
    except KeyError as err:
        raise ValueError(f"query: cannot carry over from {cfg.carry_over_from}: {err.args[0]}; refresh all users") from None
    keep = ~np.isin(ids.numpy(), queried)
    if keep.any():
        writer.write_users(ids.numpy()[keep], vectors.numpy()[keep])
    return int(keep.sum())


@under_lock(lambda cfg, ctx=None: RunLock(cfg.store, "query", ctx))  # one writer per knowledge store
def run_query(cfg: QueryConfig, ctx: DistContext | None = None) -> dict[str, Any]:
    """Write the knowledge store partition of `cfg.as_of_ds`; returns a summary (store, counts, seconds).

    With `ctx` (N ranks) every rank must call it: the users' batches are split over the ranks and rank 0
    writes the partition; rank 0 returns the summary, the others only what they computed.
    """
    if not cfg.as_of_ds:
        raise ValueError("query: as_of_ds is required (the day the knowledge is as of)")
    if cfg.carry_over_from is not None and cfg.carry_over_from >= cfg.as_of_ds:
        raise ValueError(f"query: carry_over_from={cfg.carry_over_from} must be a day before as_of_ds={cfg.as_of_ds}")
    if cfg.rows_per_batch < 1:
        raise ValueError(f"query: rows_per_batch must be >= 1, got {cfg.rows_per_batch}")
    if cfg.items not in ("seen", "all"):
        raise ValueError(f"query: items must be 'seen' or 'all', got {cfg.items!r}")
    # The queries happen "at the end of as_of_ds": HSTU's time bias sees them as the next event.
    as_of_ts = day_bounds(cfg.as_of_ds)[1]
    device = resolve_device(cfg.device, "query.device")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    loaded = load_pretrained_lum(cfg.checkpoint, cfg.checkpoint_kind, cfg.data)
    lum = loaded.model.to(device)
    conditions = resolve_conditions(cfg.conditions, lum, loaded.meta.vocab_sizes)
    version = cfg.model_version or loaded.model_version
    max_history = default_max_history(lum)
    grouped = grouped_query_supported(lum)
    if not grouped:
        log.warning("HSTU with hstu.normaliser='length': grouped answers would differ, using %d separate passes", len(conditions))
    ask = grouped_query if grouped else separate_queries

    if cfg.users == "active" and cfg.as_of_ds not in loaded.data.days("behaviours"):
        raise ValueError(f"query: users='active' but {loaded.data.root}/behaviours has no partition ds={cfg.as_of_ds}")
    # Point-in-time: only days <= as_of_ds are read, so a later event cannot reach a history.
    seqs = sequences_from_dataset(loaded.data, cfg.history_start, cfg.as_of_ds)
    users = _select_users(cfg, loaded, seqs)
    with_history = seqs.select_users(users, missing_ok=True)
    with_history = with_history.take(np.flatnonzero(with_history.lengths() > 0)).truncate(max_history // 2 + 1)
    no_history = np.setdiff1d(users, with_history.user_ids)
    tokens = build_lum_tokens(with_history, loaded.token_config)
    # Each user's row also gets the N query tokens: pack so that history + queries stay within one budget
    # (packing histories alone put ~8 short Beauty users x 637 conditions into one attention row).
    plan = pack_sequences(tokens.offsets, tokens.token_type, max_history, extra_per_sequence=len(conditions))
    n_batches = -(-plan.num_rows // cfg.rows_per_batch)
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    main = rank == 0
    if main:
        log_job_start("query", data=f"{len(users):,} users ({len(no_history):,} without history) x {len(conditions)} conditions, "
                      f"{n_batches:,} batches", parameters=count_parameters(lum), device=str(device), threads=torch.get_num_threads(),
                      as_of=cfg.as_of_ds)

    extra = {"checkpoint": str(loaded.checkpoint), "users": cfg.users, "grouped": grouped, "as_of_ts": as_of_ts}
    # On N ranks each rank answers every N-th batch; rank 0 gathers each round and writes the batches in
    # their 1-rank order (one writer, memory bounded by one round), so the partition is the same on any N.
    writer_cm = KnowledgeWriter(cfg.store, cfg.as_of_ds, version, [str(c) for c in conditions], lum.config.d_model, extra) \
        if main else contextlib.nullcontext()
    carried = 0
    with torch.no_grad(), writer_cm as writer:
        bar = progress_bar(n_batches, f"query {cfg.as_of_ds}", main_process=cfg.progress and main, unit="batch", mininterval=2.0)
        for first in range(0, n_batches, world):
            k = first + rank
            answer = None
            if k < n_batches:
                lo = k * cfg.rows_per_batch
                batch = make_jagged_batch(tokens, plan.rows(lo, min(lo + cfg.rows_per_batch, plan.num_rows)))
                answer = (batch.user_ids, ask(lum, move_to_device(batch, device), conditions, as_of_ts=as_of_ts).cpu())
            for part in gather_to_rank0(ctx, answer) or []:
                if part is not None:
                    writer.write_users(*part)
                    bar.update(1)
        bar.close()
        item_ids = torch.arange(1, lum.num_items)  # 0 is padding
        if cfg.items == "seen":
            seen = np.unique(seqs.item_id)
            item_ids = torch.from_numpy(seen[(seen > 0) & (seen < lum.num_items)])
        if main:
            if len(no_history):
                # Without history an answer depends on the condition only: compute it once, give it to all.
                answers = _answers_without_history(lum, conditions, as_of_ts, grouped).cpu()
                writer.write_users(no_history, answers.expand(len(no_history), -1, -1))
            carried = _carry_over(writer, cfg, conditions, users) if cfg.carry_over_from else 0
            # Carried rows are labelled with this partition's day and version (one per partition, checked by
            # the reader); the manifest says where they came from and how many there are.
            writer.extra.update(carry_over_from=cfg.carry_over_from, carried_over_users=carried)
            for i in range(0, len(item_ids), cfg.item_chunk):
                chunk = item_ids[i : i + cfg.item_chunk]
                writer.write_items(chunk, lum.item_embeddings(chunk.to(device)).cpu())
    if not main:
        return {"as_of_ds": cfg.as_of_ds, "rank": rank, "batches": len(range(rank, n_batches, world))}
    result = {
        "store": str(writer.final),
        "as_of_ds": cfg.as_of_ds,
        "model_version": version,
        "users": int(len(users)),
        "users_without_history": int(len(no_history)),
        "carried_over": int(carried),
        "carry_over_from": cfg.carry_over_from,
        "conditions": len(conditions),
        "rows": int(len(users)) * len(conditions),
        "items": int(len(item_ids)),
        "grouped": grouped,
        "batches": n_batches,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if cfg.redis is not None:  # after the commit: the Parquet partition stays the source of truth
        result["redis_version"] = publish_partition(cfg.store, cfg.as_of_ds, cfg.redis)
    log.info("knowledge for %s written to %s (%d users x %d conditions)", cfg.as_of_ds, writer.final, len(users), len(conditions))
    _write_scalars(cfg, result)
    return result


def _write_scalars(cfg: QueryConfig, result: dict[str, Any]) -> None:
    """The run's counts and speed as TensorBoard scalars under STORE/tb, at step = the as-of day's number."""
    tb = ScalarLog(cfg.store)
    step = day_bounds(cfg.as_of_ds)[0] // SECONDS_PER_DAY
    tb.scalars("query", {k: result[k] for k in ("users", "users_without_history", "carried_over", "conditions", "items", "seconds")}, step)
    tb.scalar("query/users_per_second", result["users"] / max(result["seconds"], 1e-9), step)
    tb.close()


def main(args: argparse.Namespace) -> int:
    """`lumrec query CONFIG [key=value ...]`."""
    cfg = load_config(QueryConfig, args.config, overrides=args.overrides)
    ctx = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun / torchx: the users are split over the ranks
        ctx = init_distributed(device=resolve_device(cfg.device, "query.device"))
    try:
        result = run_query(cfg, ctx)
    finally:
        if ctx is not None:
            ctx.close()
    if ctx is None or ctx.is_main:
        print(json.dumps(result))
    return 0
