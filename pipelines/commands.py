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
