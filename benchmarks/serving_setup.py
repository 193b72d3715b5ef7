"""What benchmarks/serving.py serves, built offline: logs, LUMs of several sizes and their knowledge, rankers and bundles.

Everything is built under one work folder and reused when it is already there (a stage is done
when its output exists), so the measuring part can be rerun alone. The LUMs are trained for a few
steps only: what is measured is the cost of serving their answers, which does not depend on how
well they were trained (the knowledge has the same shape either way); the rankers train one epoch.

    >>> [s.name for s in BenchConfig.tiny().lum_sizes], BenchConfig().candidates
    (['lum-tiny'], 100)
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("lumrec.bench.serving")


@dataclass
class LumSize:
    """A LUM's transformer: about 12 * layers * d_model^2 parameters with ffn_dim = 4 * d_model."""

    name: str
    d_model: int
    num_layers: int
    num_heads: int

    def model_config(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "num_layers": self.num_layers, "num_heads": self.num_heads, "ffn_dim": 4 * self.d_model}


@dataclass
class HstuSize:
    """An HSTU ranker: tokens of width 2 * embedding_dim (item and category), about 5 * layers * width^2 parameters."""

    name: str
    embedding_dim: int
    num_layers: int
    num_heads: int


@dataclass
class BenchConfig:
    """The benchmark's sizes and budgets (`tiny()`: a smoke run of every part in a few minutes)."""

    synth: dict[str, Any] = field(default_factory=lambda: {"seed": 0, "num_users": 400, "num_items": 1000, "num_days": 7})
    lum_end: str = "2026-01-03"  # the LUMs train on days <= this; knowledge as of this day
    next_day: str = "2026-01-04"  # a second knowledge day (published during the fault runs)
    rank_first_day: str = "2026-01-04"  # the rankers' samples: days from this one; validation and test days below
    valid_start: str = "2026-01-06"
    test_start: str = "2026-01-07"
    lum_max_len: int = 128
    lum_steps: int = 2
    lum_sizes: list[LumSize] = field(default_factory=lambda: [
        LumSize("lum-1M", 128, 4, 2), LumSize("lum-10M", 256, 12, 4), LumSize("lum-30M", 512, 10, 8),
        LumSize("lum-115M", 896, 12, 8)])
    hstu_sizes: list[HstuSize] = field(default_factory=lambda: [
        HstuSize("hstu-1M", 64, 12, 2), HstuSize("hstu-10M", 192, 14, 4), HstuSize("hstu-30M", 320, 15, 4),
        HstuSize("hstu-105M", 512, 20, 8)])
    histories: list[int] = field(default_factory=lambda: [64, 256, 1024])
    dlrm_history: int = 50  # the DLRM's (SIM's) behaviours per request: its max_history
    candidates: int = 100
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    requests: int = 300  # per load level (closed loop): at most this many ...
    seconds: float = 20.0  # ... within this many seconds
    hstu_concurrency: list[int] = field(default_factory=lambda: [1, 4])
    hstu_requests: int = 40
    hstu_seconds: float = 20.0
    fault_concurrency: int = 4
    fault_seconds: float = 18.0
    budget_ms: float = 30.0  # the LUM paper's online latency budget

    @classmethod
    def tiny(cls) -> "BenchConfig":
        return cls(synth={"seed": 0, "num_users": 120, "num_items": 200, "num_days": 7}, lum_max_len=32,
                   lum_sizes=[LumSize("lum-tiny", 16, 1, 2)], hstu_sizes=[HstuSize("hstu-tiny", 8, 1, 2)], histories=[16, 64],
                   concurrency=[1, 4], requests=30, seconds=5.0, hstu_concurrency=[1], hstu_requests=5, hstu_seconds=5.0,
                   fault_concurrency=2, fault_seconds=6.0)


def ensure_logs(cfg: BenchConfig, work: Path) -> Path:
    """The synthetic logs the benchmark serves (generated once)."""
    from lumrec.data.synthetic import SynthConfig, ensure_generated

    data = work / "data"
    ensure_generated(data, SynthConfig(**cfg.synth))
    return data


def ensure_lum(cfg: BenchConfig, size: LumSize, data: Path, work: Path) -> dict[str, Any]:
    """A LUM of `size` trained `lum_steps` steps and its knowledge as of `lum_end` and `next_day` (two stores' days)."""
    from lumrec.config import from_dict
    from lumrec.knowledge import KNOWLEDGE_MANIFEST, partition_dir
    from lumrec.pipelines.pretrain import PretrainConfig, Pretrainer
    from lumrec.pipelines.query import QueryConfig, run_query
    from lumrec.tracking import count_parameters

    run, store = work / "lums" / size.name, work / "stores" / size.name
    pcfg = from_dict(PretrainConfig, {
        "model": "lum", "out": str(run),
        "data": {"path": str(data), "end": cfg.lum_end, "max_len": cfg.lum_max_len, "condition_features": ["scenario", "query_id"],
                 "item_features": ["item_id"]},
        "train": {"epochs": 1, "max_steps": cfg.lum_steps, "rows_per_batch": 8, "num_negatives": 64, "eval_every_epochs": 1000,
                  "checkpoint_every_steps": 10**9, "log_every_steps": 0},
        "model_config": size.model_config(),
    }, source=f"serving benchmark LUM {size.name}")
    trainer = Pretrainer(pcfg)
    parameters = count_parameters(trainer.model)
    if not (run / "results.json").exists():
        trainer.run()
    del trainer
    for day in (cfg.lum_end, cfg.next_day):
        if not (partition_dir(store, day) / KNOWLEDGE_MANIFEST).exists():
            run_query(from_dict(QueryConfig, {
                "checkpoint": str(run), "as_of_ds": day, "users": "all", "store": str(store), "progress": False,
                "conditions": [{"feature": "scenario", "values": "all"}, {"feature": "query_id", "values": "all"}],
            }, source=f"serving benchmark query {size.name}"))
    return {"name": size.name, "parameters": parameters, "run": str(run), "store": str(store), "d_model": size.d_model,
            "num_layers": size.num_layers}


def rank_keys(cfg: BenchConfig, data: Path, out: Path, seed: int = 0) -> dict[str, Any]:
    """The DLRM's RankConfig keys: SIM with the demo's context keys and item statistics, one epoch."""
    return {
        "data": str(data), "out": str(out), "model": "sim",
        "samples": {"protocol": "impressions", "first_day": cfg.rank_first_day, "valid_start": cfg.valid_start, "test_start": cfg.test_start},
        "sizes": {"embedding_dim": 16, "mlp": [64, 32], "attention_mlp": [32], "context_keys": ["scenario", "query_id"],
                  "item_stats": ["f_ctr_7d", "f_log_impressions_7d", "f_popularity"]},
        "train": {"seed": seed, "epochs": 1, "batch_size": 256, "lr": 0.002, "max_history": cfg.dlrm_history, "progress": False},
    }


def lum_keys(store: str) -> dict[str, Any]:
    """The DLRM's LUM features (RankLUMConfig keys): the demo's, interest matching under feed, search and the request's query."""
    return {"store": store, "conditions": ["scenario=1", "scenario=2"], "candidate_condition_feature": "query_id",
            "features": ["sim", "missing"]}


def ensure_bundle(keys: dict[str, Any], bundle: Path, checkpoint: str = "best", max_steps: int | None = None) -> dict[str, Any]:
    """Train the rank run of `keys` (unless done) and export it to `bundle` (unless there); the bundle's manifest."""
    import json

    from lumrec.config import from_dict
    from lumrec.pipelines.export import export_run
    from lumrec.pipelines.rank import RankConfig, run_rank

    run = Path(keys["out"])
    done = (run / "results.json").exists() or (max_steps is not None and (run / "checkpoints").exists())
    if not done:
        run_rank(from_dict(RankConfig, keys, source=f"serving benchmark rank {run.name}"), max_steps=max_steps)
    if not (bundle / "serving.json").exists():
        shutil.rmtree(bundle, ignore_errors=True)
        export_run(run, bundle, checkpoint)
    return json.loads((bundle / "serving.json").read_text())


def ensure_dlrm_bundles(cfg: BenchConfig, data: Path, lums: list[dict[str, Any]], work: Path) -> dict[str, dict[str, Any]]:
    """The DLRM alone, and one DLRM with LUM features per LUM size (each trained on that LUM's knowledge), exported."""
    bundles = {"dlrm": ensure_bundle(rank_keys(cfg, data, work / "rank" / "dlrm"), work / "bundles" / "dlrm")}
    for lum in lums:
        keys = rank_keys(cfg, data, work / "rank" / lum["name"])
        keys["lum"] = lum_keys(lum["store"])
        bundles[lum["name"]] = ensure_bundle(keys, work / "bundles" / lum["name"])
    # A second DLRM of the smallest LUM (another seed): what a day's model swap brings in.
    first = lums[0]
    keys = rank_keys(cfg, data, work / "rank" / f"{first['name']}-next", seed=1)
    keys["lum"] = lum_keys(first["store"])
    bundles[f"{first['name']}-next"] = ensure_bundle(keys, work / "bundles" / f"{first['name']}-next")
    return bundles


def ensure_hstu_bundles(cfg: BenchConfig, data: Path, work: Path) -> dict[str, dict[str, Any]]:
    """HSTU rankers end to end (no LUM) of each size, a few training steps, exported as M-FALCON bundles."""
    longest = max(cfg.histories)
    bundles = {}
    for size in cfg.hstu_sizes:
        keys = rank_keys(cfg, data, work / "rank" / size.name)
        keys["model"] = "hstu"
        keys["sizes"].update(embedding_dim=size.embedding_dim,
                             backbones={"hstu": {"num_layers": size.num_layers, "hstu": {"num_heads": size.num_heads, "max_len": longest + 1}}})
        keys["train"].update(batch_size=8, max_history=longest, checkpoint_every_steps=1)
        bundles[size.name] = ensure_bundle(keys, work / "bundles" / size.name, checkpoint="latest", max_steps=2)
    return bundles
