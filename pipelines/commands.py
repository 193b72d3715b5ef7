"""Registrars of the job subcommands of `lumrec`; light on purpose: jobs are imported when run."""

from __future__ import annotations

import argparse

from lumrec.cli import add_dataclass_args
from lumrec.data.synthetic import SynthConfig


def register_demo(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec demo`."""
    p = sub.add_parser("demo", help="run the main job on embedded synthetic logs (no download)")
    p.add_argument("--out", default="out/demo", help="working folder (default out/demo)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per packed row")
    p.add_argument("--pretrain-minutes", type=float, default=None,
                   help="wall-clock cap on step 1 (default none: 15 epochs, the same numbers on every machine)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of step 1 (default 2)")
    add_dataclass_args(p, SynthConfig)
    p.set_defaults(func=_run("lumrec.pipelines.demo", "main"))


def _run(module: str, function: str):
    """A subcommand handler that imports `module` only when the subcommand runs."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), function)(args)

    return handler


def _config_job(sub: argparse._SubParsersAction, job: str, help: str, config_help: str, overrides_help: str) -> None:
    """Add `lumrec JOB CONFIG [key=value ...]`, handled by `lumrec.pipelines.JOB.main` (imported when it runs)."""
    p = sub.add_parser(job, help=help)
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=_run(f"lumrec.pipelines.{job}", "main"))


def register_pretrain(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec pretrain`."""
    _config_job(sub, "pretrain", "step 1: pre-train SASRec, HSTU or LUM from a YAML config (resumes automatically)",
                "YAML file with PretrainConfig keys (see configs/)", "key.sub=value overrides, e.g. train.epochs=3 out=runs/x")


def register_daily(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec daily`."""
    _config_job(sub, "daily", "the daily pipeline: continue pre-training, query, rank and evaluate day by day (resumable)",
                "YAML file with DailyConfig keys (see configs/daily_synthetic.yaml)",
                "ds=YYYY-MM-DD, or start=... end=...; key.sub=value overrides")


def register_query(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec query`."""
    _config_job(sub, "query", "step 2: query a pre-trained LUM under many conditions and write the knowledge store of one day",
                "YAML file with QueryConfig keys", "key.sub=value overrides, e.g. as_of_ds=2026-01-03 users=all")


def register_rank(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec rank`."""
    _config_job(sub, "rank", "step 3: train a ranking model (mlp, din, sim, hstu or another registered backbone) "
                             "with or without LUM features (resumes automatically)",
                "YAML file with RankConfig keys", "key.sub=value overrides, e.g. model=din lum=null train.epochs=2")


def register_retrieve(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec retrieve`."""
    _config_job(sub, "retrieve", "step 3: train a two-tower retrieval model with or without LUM features (resumes automatically)",
                "YAML file with RetrieveConfig keys", "key.sub=value overrides, e.g. lum=null train.epochs=2")


def register_export(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec export`."""
    p = sub.add_parser("export", help="export a trained ranking run (or a two-tower run's towers) to an AOTInductor "
                                      "serving bundle")
    p.add_argument("run", help="a `lumrec rank` (or `lumrec retrieve`) run folder")
    p.add_argument("out", help="the bundle folder to write (written whole or not at all)")
    p.add_argument("--checkpoint", default="best", choices=["best", "latest"], help="which checkpoint of the run (default best)")
    p.set_defaults(func=_run("lumrec.pipelines.export", "main"))


def register_serve(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec serve`."""
    p = sub.add_parser("serve", help="serve an exported ranker over HTTP (POST /rank), LUM knowledge read from Redis")
    p.add_argument("bundle", help="a bundle folder written by `lumrec export`")
    p.add_argument("--redis", default=None, help="Redis URL of the published knowledge, e.g. redis://127.0.0.1:6379/0 "
                                                  "(default: none; LUM inputs are then the missing-knowledge default)")
    p.add_argument("--prefix", default="lumrec", help="key prefix the knowledge was published under (default lumrec)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--on-redis-down", default="serve", choices=["serve", "fail"],
                   help="serve: keep scoring with missing knowledge and report not ready; fail: answer 503")
    p.add_argument("--max-candidates", type=int, default=None, help="most candidates per request (default 1000)")
    p.add_argument("--refresh-seconds", type=float, default=None,
                   help="how often the knowledge version is polled and a down Redis retried (default 5)")
    p.add_argument("--watch", default=None, help="a pointer file holding a bundle path: swapped in when it changes")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default 1)")
    p.add_argument("--workers", type=int, default=None, help="most requests scored at once, in threads (default 16)")
    p.set_defaults(func=_run("lumrec.pipelines.serve", "main"))


def register_plan(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec plan`."""
    p = sub.add_parser("plan", help="run TorchRec's sharding planner on the meta device for a topology and table sizes "
                                    "(no memory allocated): the plan, memory per rank and cost estimates")
    p.add_argument("config", nargs="?", default=None, help="YAML file with PlanConfig keys (default: built-in example)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. world_size=64 tables.item_id.rows=2000000000")
    p.add_argument("--out", default=None, help="write the plan as JSON to this file")
    p.set_defaults(func=_run("lumrec.pipelines.plan", "main"))
