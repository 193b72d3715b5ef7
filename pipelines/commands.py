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


def register_pretrain(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec pretrain`."""
    p = sub.add_parser("pretrain", help="step 1: pre-train SASRec, HSTU or LUM from a YAML config (resumes automatically)")
    p.add_argument("config", help="YAML file with PretrainConfig keys (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=3 out=runs/x")
    p.set_defaults(func=_run("lumrec.pipelines.pretrain", "main"))


def register_daily(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec daily`."""
    p = sub.add_parser("daily", help="the daily pipeline: continue pre-training, query, rank and evaluate day by day (resumable)")
    p.add_argument("config", help="YAML file with DailyConfig keys (see configs/daily_synthetic.yaml)")
    p.add_argument("overrides", nargs="*", help="ds=YYYY-MM-DD, or start=... end=...; key.sub=value overrides")
    p.set_defaults(func=_run("lumrec.pipelines.daily", "main"))


def register_query(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec query`."""
    p = sub.add_parser("query", help="step 2: query a pre-trained LUM under many conditions and write the knowledge store of one day")
    p.add_argument("config", help="YAML file with QueryConfig keys")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. as_of_ds=2026-01-03 users=all")
    p.set_defaults(func=_run("lumrec.pipelines.query", "main"))


def register_rank(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec rank`."""
    p = sub.add_parser("rank", help="step 3: train a ranking model (mlp, din, sim, hstu or another registered backbone) "
                                    "with or without LUM features (resumes automatically)")
    p.add_argument("config", help="YAML file with RankConfig keys")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. model=din lum=null train.epochs=2")
    p.set_defaults(func=_run("lumrec.pipelines.rank", "main"))


def register_retrieve(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec retrieve`."""
    p = sub.add_parser("retrieve", help="step 3: train a two-tower retrieval model with or without LUM features (resumes automatically)")
    p.add_argument("config", help="YAML file with RetrieveConfig keys")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. lum=null train.epochs=2")
    p.set_defaults(func=_run("lumrec.pipelines.retrieve", "main"))
