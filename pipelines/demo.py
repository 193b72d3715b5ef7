"""The README's demo job: LUM's three steps on embedded synthetic logs, Base vs Base+LUM, then three daily runs.

    synthetic logs (11 days) -> stats, [condition, item] tokens, one packed batch
    step 1: pre-train a small LUM on days 1-7 (15 short epochs, 330 steps)
    step 2: grouped query under every scenario and query -> knowledge store as of days 7, 8, 9
    step 3: rank day 8 / 9 / 10 impressions (train / valid / test) with SIM, without and with LUM features
            (each day's samples read the knowledge as of the day before)
    step 4: the daily pipeline on days 8, 9, 10: continue step 1's LUM on the day, refresh the knowledge
            of its active users, train SIM warm-started from the day before (day 8: from step 3's Base,
            LUM inputs at zero), next-day AUC; prints the per-day table

The synthetic click model plants a condition effect (docs/synthetic.md): in the feed a user
clicks more in their own feed-mode categories, in search items of the query's category. The
LUM reads each user's whole behaviour history under [scenario, query] condition tokens; the
ranker's features are the request (scenario, query), the candidate (item, category, item
statistics) and the user's recent behaviours. Base+LUM adds interest matching: the cosine of
the LUM's answer `o_q` under the feed, search and the request's own query with the candidate's
item embedding `e_i`.

The output folder is the demo's own: every run replaces its ``lum/``, ``knowledge/``, ``rank/`` and
``daily/``. A folder that holds anything else is refused (`claim_demo_folder`); the demo marks
the folders it creates with ``.lumrec-demo``, so ``make demo`` reruns in ``out/demo``.

    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp()) / "demo"
    >>> claim_demo_folder(folder)
    >>> sorted(p.name for p in folder.iterdir())
    ['.lumrec-demo']
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from lumrec.cli import dataclass_overrides
from lumrec.comparison import comparison_table, summarize_seeds
from lumrec.data.batches import make_jagged_batch
from lumrec.data.dataset import Dataset, write_text_atomic
from lumrec.data.packing import epoch_plan, padding_waste
from lumrec.data.ranking.config import RankingSampleConfig
from lumrec.data.ranking_samples import build_ranking_samples
from lumrec.data.sequences import sequences_from_dataset
from lumrec.data.stats import dataset_stats
from lumrec.data.synthetic import SynthConfig, ensure_generated
from lumrec.data.tokens import TokenConfig, build_lum_tokens, item_dense_matrix
from lumrec.errors import UserError
from lumrec.locks import RunLock
from lumrec.modules.lum_join import RankLUMConfig
from lumrec.modules.warm_start_config import WarmStartConfig
from lumrec.pipelines.daily import DailyConfig, run_daily
from lumrec.pipelines.pretrain import DataConfig, PretrainConfig, Pretrainer, TrainConfig
from lumrec.pipelines.query import ConditionSpec, QueryConfig, run_query
from lumrec.pipelines.rank import RankConfig, run_rank
from lumrec.pipelines.rank_config import RankModelConfig, RankTrainConfig

log = logging.getLogger("lumrec.demo")

# The marker of a folder the demo writes, and what it writes there (steps 1-4 replace all but data/ on every run).
DEMO_MARKER = ".lumrec-demo"
DEMO_ENTRIES = ("data", "lum", "knowledge", "rank", "daily")

# The demo's synthetic logs: the defaults over 11 days (7 for the LUM, 3 for the ranker, one more for step 4's last next-day AUC).
DEMO_SYNTH = {"num_days": 11}
ITEM_STATS = ["f_ctr_7d", "f_log_impressions_7d", "f_popularity"]


@dataclasses.dataclass
class DemoConfig:
    """What the demo generates, how it tokenises and packs, and the sizes of its three steps."""

    out: str = "out/demo"
    max_len: int = 256  # tokens per packed row in the packing illustration
    rows_per_batch: int = 32
    condition_features: tuple[str, ...] = ("scenario", "query_id")
    seed: int = 0
    # -- step 1 -----------------------------------------------------------------------------
    pretrain_days: int = 7  # the LUM trains on the first N days; the ranker's samples start the day after
    pretrain_epochs: int = 15  # 330 steps: the budget is in epochs, so every machine prints the same numbers
    pretrain_minutes: float = 0.0  # optional wall-clock cap (0 = none); with a cap the numbers depend on the machine
    pretrain_steps: int | None = None  # a step budget instead (tests)
    pretrain_log_every_steps: int = 10  # the loss curve in lum/tb (`lumrec plot out/demo/lum`)
    lum_max_len: int = 64  # tokens per LUM sequence (32 most recent events)
    lum_d_model: int = 32
    lum_rows_per_batch: int = 32
    # -- step 3 -----------------------------------------------------------------------------
    rank_model: str = "sim"
    rank_epochs: int = 2
    rank_batch_size: int = 256
    lum_features: tuple[str, ...] = ("sim", "missing")  # interest matching sim(o_q, e_i) and missing flags
    threads: int = 2  # pre-training
    daily: bool = True  # step 4: three simulated days of the daily pipeline
    daily_epochs: int = 2  # continued pre-training passes over each day's behaviours
    step_threads: int = 1  # query and ranking: small matrices, a second thread mostly waits (and hurts on a busy machine)


class DemoFolderError(UserError):
    """The demo's output folder holds something the demo did not write; the message says what and what to do."""


def _synthetic_logs(root: Path) -> bool:
    """Whether `root` holds a dataset lumrec's synthetic generator wrote (its manifest records the SynthConfig)."""
    try:
        made = Dataset(root).read_meta().extra.get("config")
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(made, dict) and set(made) == {f.name for f in dataclasses.fields(SynthConfig)}


def claim_demo_folder(out: Path) -> None:
    """Refuse `out` unless it is the demo's own (absent, empty, marked, or only the demo's folders with synthetic logs); mark it.

    Steps 1-4 delete and rewrite `out`'s lum/, knowledge/, rank/ and daily/: never in a folder of anything else.
    """
    if (out / DEMO_MARKER).is_file():
        return
    if out.exists() and not out.is_dir():
        raise DemoFolderError(f"demo: --out {out} is a file; pass a new or empty folder")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    others = [name for name in entries if name not in DEMO_ENTRIES]
    # A folder of only the demo's entries with lumrec's synthetic logs in data/ is a demo run's (made before the marker).
    if entries and (others or not _synthetic_logs(out / "data")):
        found = others or entries
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        what = "" if others else " (its data/ is not lumrec's synthetic logs)"
        raise DemoFolderError(
            f"demo: --out {out} is not a demo folder: it holds {shown}{what} and no {DEMO_MARKER} marker. The demo deletes "
            f"and rewrites {', '.join(DEMO_ENTRIES[1:])} in its folder: pass --out with a new or empty folder, or remove {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `lumrec demo`: every demo run replaces lum/, knowledge/, rank/ and daily/ here\n")


def ensure_synthetic(root: Path, config: SynthConfig) -> Dataset:
    """Generate the synthetic logs into `root` unless a dataset made with the same config is there."""
    with RunLock(root, "demo (synthetic logs)"):  # one writer per dataset folder
        made = ensure_generated(root, config)
    if made:
        log.info("generated synthetic logs into %s", root)
    else:
        log.info("reusing synthetic logs in %s (same config)", root)
    return Dataset(root)


def describe_batch(batch, dense_names: list[str]) -> str:
    """Two lines on what one packed batch holds."""
    kjt = batch.kjt
    types = batch.token_type
    dense = f", dense {tuple(batch.dense.shape)} ({', '.join(dense_names[:3])}, ...)" if batch.dense is not None else ""
    return (
        f"packed batch: {batch.num_rows} rows, {batch.num_segments} user sequences, {batch.num_tokens} tokens "
        f"({int((types == 0).sum())} condition, {int((types == 1).sum())} item; longest sequence {batch.max_seq_len()})\n"
        f"  KeyedJaggedTensor: stride {kjt.stride()} tokens, keys {kjt.keys()}{dense}"
    )


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Only warnings from these loggers while the block runs (the demo prints its own summary lines)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def show_data(cfg: DemoConfig, data: Dataset) -> dict:
    """Stats, LUM tokens and one packed batch of the logs (the data side of step 1), in a few lines."""
    stats = dataset_stats(data.root)
    print(f"synthetic logs: {stats['events']:,} behaviours, {stats.get('impressions', 0):,} impressions "
          f"({stats.get('positive_labels', 0):,} clicks), {stats['users']:,} users, {stats['items']:,} items, "
          f"{stats['days']} days ({stats.get('first_day')} .. {stats.get('last_day')})")
    seqs = sequences_from_dataset(data)
    tokens = build_lum_tokens(seqs, TokenConfig(condition_features=list(cfg.condition_features)))
    items = data.read_table("items")
    # Point-in-time: the newest item statistics describe the days before it.
    last_day = data.days("item_stats")[-1]
    stats_table = data.read_days("item_stats", start=last_day, end=last_day).drop(["ds"])
    num_items = data.read_meta().vocab_sizes["item_id"]
    content, content_names = item_dense_matrix(items, ["content"], num_items)
    stat_matrix, stat_names = item_dense_matrix(stats_table, None, num_items)
    print(f"LUM tokens: {tokens.num_tokens:,} ([c, i] per event; condition = {', '.join(cfg.condition_features)})")
    plan = epoch_plan(tokens.offsets, tokens.token_type, cfg.max_len, shuffle_seed=cfg.seed)
    batch = make_jagged_batch(tokens, plan.rows(0, min(cfg.rows_per_batch, plan.num_rows)), dense_table=np.concatenate([stat_matrix, content], axis=1))
    print(describe_batch(batch, stat_names + content_names))
    kept = plan.lengths
    waste_packed = padding_waste(plan.row_lengths(), cfg.max_len)
    waste_padded = padding_waste(kept[kept > 0], cfg.max_len)
    print(f"  padding waste at max_len {cfg.max_len}: padded {waste_padded:.1%}, packed {waste_packed:.1%}")
    return {"events": int(seqs.num_events), "users": len(seqs), "tokens": int(tokens.num_tokens), "packed_rows": int(plan.num_rows),
            "waste_padded": round(float(waste_padded), 4), "waste_packed": round(float(waste_packed), 4)}


def lum_pretrain_config(cfg: DemoConfig, data: Dataset, run: Path, end: str):
    """The demo LUM's PretrainConfig (step 1; the daily pipeline's template in step 4)."""

    return PretrainConfig(
        model="lum", out=str(run),
        data=DataConfig(path=str(data.root), end=end, max_len=cfg.lum_max_len, condition_features=list(cfg.condition_features),
                        item_features=["item_id"], train_excludes_last=1),
        train=TrainConfig(seed=cfg.seed, epochs=cfg.pretrain_epochs, rows_per_batch=cfg.lum_rows_per_batch, lr=2e-3, num_negatives=-1,
                          max_minutes=cfg.pretrain_minutes, threads=cfg.threads, eval_every_epochs=10_000,
                          checkpoint_every_steps=10**9, log_every_steps=cfg.pretrain_log_every_steps),
        model_config={"d_model": cfg.lum_d_model, "num_layers": 2, "num_heads": 2, "ffn_dim": 2 * cfg.lum_d_model},
    )


def step1_pretrain(cfg: DemoConfig, data: Dataset, run: Path, end: str) -> dict:
    """Pre-train the LUM on days <= `end` for the time (or step) budget."""

    pcfg = lum_pretrain_config(cfg, data, run, end)
    t0 = time.perf_counter()
    result = Pretrainer(pcfg).run(max_steps=cfg.pretrain_steps)
    seconds = time.perf_counter() - t0
    steps = result.get("steps", result.get("step"))
    hr = result.get("test", {}).get("hr@10")
    quality = f", next-item HR@10 {hr:.3f} (held-out last events)" if hr is not None else ""
    print(f"step 1: LUM (d_model {cfg.lum_d_model}, [{', '.join(cfg.condition_features)}] conditions) pre-trained on days "
          f"<= {end}: {steps} steps ({cfg.threads} thread(s)) in {seconds:.0f} s{quality}")
    return {"lum_steps": int(steps), "lum_hr@10": None if hr is None else round(hr, 4), "pretrain_s": round(seconds, 1)}


def step2_query(cfg: DemoConfig, run: Path, store: Path, days: list[str]) -> dict:
    """Grouped query of every scenario and query for every user, one knowledge partition per day."""

    t0 = time.perf_counter()
    results = []
    for day in days:
        q = QueryConfig(checkpoint=str(run), as_of_ds=day, users="all", store=str(store), threads=cfg.step_threads,
                        conditions=[ConditionSpec(f, "all") for f in cfg.condition_features])
        results.append(run_query(q))
    seconds = time.perf_counter() - t0
    r = results[-1]
    print(f"step 2: knowledge store {store}: {r['users']:,} users x {r['conditions']} conditions (grouped query, one pass per "
          f"user batch) as of {', '.join(days)} in {seconds:.0f} s")
    return {"knowledge_days": days, "conditions": r["conditions"], "query_s": round(seconds, 1)}


def ranker_parts(cfg: DemoConfig, store: Path):
    """The demo ranker's sizes, training and LUM settings (step 3, and the daily DLRM of step 4)."""

    # No user_id table: with one day of training impressions per-user embeddings only overfit (measured).
    sizes = RankModelConfig(embedding_dim=16, mlp=[64, 32], attention_mlp=[32], context_keys=["scenario", "query_id"],
                            item_stats=ITEM_STATS)
    train = RankTrainConfig(seed=cfg.seed, epochs=cfg.rank_epochs, batch_size=cfg.rank_batch_size, lr=2e-3, max_history=50,
                            threads=cfg.step_threads)
    lum = RankLUMConfig(store=str(store), conditions=["scenario=1", "scenario=2"], candidate_condition_feature="query_id",
                        features=list(cfg.lum_features))
    return sizes, train, lum


def step3_rank(cfg: DemoConfig, data: Dataset, store: Path, out: Path, first_day: str, last_day: str) -> dict:
    """Rank Base vs Base+LUM on the same samples, features and budget; print the table and return the summary."""

    sample_cfg = RankingSampleConfig(protocol="impressions", first_day=first_day, last_day=last_day, test_fraction=0.3,
                                     valid_fraction=0.3)
    samples = build_ranking_samples(data, sample_cfg)
    counts = samples.counts()
    sizes, train, lum = ranker_parts(cfg, store)
    t0 = time.perf_counter()
    runs = {}
    for name, lum_cfg in (("base", None), ("lum", lum)):
        rcfg = RankConfig(data=str(data.root), out=str(out / name), samples=sample_cfg, model=cfg.rank_model, sizes=sizes,
                          lum=lum_cfg, train=train)
        runs[name] = [run_rank(rcfg, samples=samples)]
    seconds = time.perf_counter() - t0
    summary = summarize_seeds(runs)
    # Kept beside the runs: `lumrec plot out/demo` draws Base vs Base+LUM from it.
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    print(f"step 3: {cfg.rank_model.upper()} ranker, train {counts['train']['samples']:,} / valid {counts['valid']['samples']:,} / "
          f"test {counts['test']['samples']:,} impressions, {cfg.rank_epochs} epochs each, {seconds:.0f} s; "
          f"LUM features: {runs['lum'][0]['lum_dim']} (interest matching under feed, search, the request's query + missing flags)\n")
    labels = {"base": f"Base ({cfg.rank_model.upper()})", "lum": f"Base+LUM ({cfg.rank_model.upper()} + LUM features)"}
    print(comparison_table(summary, labels))
    return {"summary": summary, "samples": counts, "rank_s": round(seconds, 1),
            "input_width": {k: v[0]["input_width"] for k, v in runs.items()}}


def step4_daily(cfg: DemoConfig, data: Dataset, out: Path, days: list[str]) -> dict:
    """Three simulated days of the daily pipeline, continuing step 1's LUM and warm-starting from step 3's Base DLRM."""

    daily_out = out / "daily"
    pretrain = lum_pretrain_config(cfg, data, daily_out, days[0])
    pretrain.train.epochs, pretrain.train.max_minutes = cfg.daily_epochs, 0.0
    sizes, train, lum = ranker_parts(cfg, daily_out / "knowledge")
    train = dataclasses.replace(train, progress=False)  # the daily job's own bar counts the stages
    dcfg = DailyConfig(
        data=str(data.root), out=str(daily_out), start=days[0], end=days[-1], epochs_per_day=cfg.daily_epochs,
        lum_init=str(out / "lum" / "checkpoints"), pretrain=pretrain,
        query=QueryConfig(conditions=[ConditionSpec(f, "all") for f in cfg.condition_features], threads=cfg.step_threads,
                          progress=False),
        rank=RankConfig(model=cfg.rank_model, sizes=sizes, lum=lum, train=train),
        # The DLRM "the company already has": step 3's Base (no LUM inputs); LUM's columns start at zero.
        rank_warm_start=WarmStartConfig(source=str(out / "rank" / "base" / "checkpoints")),
    )
    t0 = time.perf_counter()
    with _quiet_loggers("lumrec.rank", "lumrec.query", "lumrec.pretrain", "lumrec.modules.warm_start"):
        statuses = run_daily(dcfg)
    seconds = time.perf_counter() - t0
    reports = [json.loads((daily_out / "days" / f"ds={d}" / "report.json").read_text()) for d in days]
    print(f"\nstep 4: daily pipeline, days {days[0]}..{days[-1]} (continue LUM on the day, refresh the knowledge of its "
          f"active users, train {cfg.rank_model.upper()} warm-started from the day before, next-day AUC) in {seconds:.0f} s:\n")
    print(daily_table(reports, first_source=out / "rank" / "base"))
    return {"daily_s": round(seconds, 1), "daily_status": [s["status"] for s in statuses],
            "daily_next_day_auc": [round(r["eval"]["auc"], 4) for r in reports],
            "daily_refreshed": [r["query"]["refreshed_users"] for r in reports]}


def daily_table(reports: list[dict], first_source: Path) -> str:
    """The demo's per-day table: what each day of the daily pipeline did and its next-day AUC (a markdown table)."""
    rows = [["day", "LUM steps", "knowledge refresh", "refreshed / carried users", "DLRM warm start", "next-day AUC", "NE"]]
    for r in reports:
        source = Path(r["rank"].get("warm_start", {}).get("source", ""))
        if not r["rank"].get("warm_start"):
            start = "none"
        elif source.parent == first_source or source == first_source / "checkpoints":
            start = "from step 3's Base"
        else:  # DAILY/days/ds=YYYY-MM-DD/rank/checkpoints: the day before
            start = "from " + source.parent.parent.name.removeprefix("ds=")[5:]
        rows.append([r["ds"], str(r["pretrain"]["steps"]), r["query"]["refresh"],
                     f"{r['query']['refreshed_users']} / {r['query']['carried_over_users']}", start,
                     f"{r['eval']['auc']:.4f}", f"{r['eval']['ne']:.4f}"])
    return _markdown(rows, right=(1, 3, 5, 6))


def _markdown(rows: list[list[str]], right: tuple[int, ...] = ()) -> str:
    """An aligned markdown table (`right`: right-aligned columns), readable as printed and as rendered."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    cell = lambda text, i: text.rjust(widths[i]) if i in right else text.ljust(widths[i])  # noqa: E731
    rule = ["-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)]
    lines = [rows[0], rule] + rows[1:]
    return "\n".join("| " + " | ".join(cell(c, i) if r is not rule else c for i, c in enumerate(r)) + " |" for r in lines)


def run_demo(cfg: DemoConfig, synth: SynthConfig) -> dict:
    """Run the demo (data -> step 1 -> step 2 -> step 3) and return its key figures (also printed as the last line)."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    claim_demo_folder(out)  # before anything is written there
    data = ensure_synthetic(out / "data", synth)
    figures = show_data(cfg, data)
    days = data.days("behaviours")
    if not 1 <= cfg.pretrain_days <= len(days) - 4:
        raise ValueError(f"DemoConfig.pretrain_days must leave 4 days for steps 3-4: {len(days)} days, pretrain_days={cfg.pretrain_days}")
    end = days[cfg.pretrain_days - 1]
    ranked_days = days[cfg.pretrain_days : cfg.pretrain_days + 3]  # step 3: train / valid / test; step 4: the daily days
    # Steps 1-4 start afresh: their folders would otherwise resume runs made on other logs or settings
    # (the folder is the demo's own: claim_demo_folder).
    for name in ("lum", "knowledge", "rank", "daily"):
        shutil.rmtree(out / name, ignore_errors=True)
    print()
    ckpt_log = logging.getLogger("lumrec.checkpoint")
    level = ckpt_log.level
    ckpt_log.setLevel(logging.WARNING)  # every short epoch saves one; the demo's own lines say what happened
    try:
        figures.update(step1_pretrain(cfg, data, out / "lum", end))
        # A sample of day D reads the knowledge as of D-1: stores for the pre-training's last day up to the day before the last.
        figures.update(step2_query(cfg, out / "lum", out / "knowledge", [d for d in days if end <= d < ranked_days[-1]]))
        ranked = step3_rank(cfg, data, out / "knowledge", out / "rank", ranked_days[0], ranked_days[-1])
        if cfg.daily:
            figures.update(step4_daily(cfg, data, out, ranked_days))
    finally:
        ckpt_log.setLevel(level)
    summary = ranked["summary"]
    figures.update({
        "base_auc": round(summary["base"]["auc_mean"], 4), "lum_auc": round(summary["lum"]["auc_mean"], 4),
        "delta_auc": round(summary["lum"]["delta_auc_mean"], 4), "base_ne": round(summary["base"]["ne_mean"], 4),
        "lum_ne": round(summary["lum"]["ne_mean"], 4), "rank_input_width": ranked["input_width"],
        "oracle_auc": data.read_meta().extra.get("oracle_auc", {}).get("all"), "wall_s": round(time.perf_counter() - t0, 1),
    })
    print(json.dumps(figures))
    return figures


def main(args: argparse.Namespace) -> int:
    """`lumrec demo`: run the demo with command-line overrides of the synthetic config."""

    cfg = DemoConfig(out=args.out, max_len=args.max_len)
    for name in ("pretrain_minutes", "threads", "step_threads"):  # optional flags (not every registrar adds them)
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    synth = dataclasses.replace(SynthConfig(**DEMO_SYNTH), **dataclass_overrides(args, SynthConfig))
    run_demo(cfg, synth)
    return 0
