"""The `lumrec` command: data subcommands here, job subcommands registered by lumrec.pipelines.

Subcommands import their code when they run (imports inside the `_cmd_*` functions): `lumrec --help`
and the data commands start in well under a second instead of loading torch and torchrec.

Core never imports pipelines (DESIGN.md layering), so jobs plug in through the entry-point
group ``lumrec.commands``: each entry is a function ``register(subparsers)`` that adds a
subcommand whose parsed args carry ``func``.

Every failure reaches the user as one line, ``lumrec <command>: error: <message>``, and the exit
code of its class (``lumrec.errors``); ``--debug`` (before or after the subcommand) adds the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import traceback
import typing
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lumrec.errors import describe
from lumrec.library_noise import silence_known_library_noise

log = logging.getLogger("lumrec")


class _DropLibraryChatter(logging.Filter):
    """Drops fbgemm's per-library "Successfully loaded" INFO records, logged on the root logger at import."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno < logging.WARNING and "fbgemm_gpu" in record.pathname)


def setup_logging(verbose: bool = False) -> None:
    """Plain timestamped logs on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,  # torchrec installs a root handler on import, which would make this a no-op
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropLibraryChatter())
    # torchrec's import trips a torch.fx deprecation notice that says nothing about lumrec.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    # torchrec logs its sharding internals at INFO (lookup groups, feature validation, the planner's
    # search) on every rank for every sharded model; lumrec logs the plan itself. `lumrec -v` shows them.
    logging.getLogger("torchrec").setLevel(logging.DEBUG if verbose else logging.WARNING)
    silence_known_library_noise()


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--field-name` flag per scalar field of dataclass `cls` (default: the field's)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if tp is bool:
            parser.add_argument(flag, dest=f.name, type=_parse_bool, default=None, metavar="BOOL", help=f"(default {default})")
        elif tp in (int, float, str):
            parser.add_argument(flag, dest=f.name, type=tp, default=None, help=f"(default {default})")


def dataclass_overrides(args: argparse.Namespace, cls: type) -> dict:
    """The dataclass fields that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# -- data subcommands -------------------------------------------------------------------------


def _cmd_import(args: argparse.Namespace) -> int:
    from lumrec.data.importers import run_import
    from lumrec.data.stats import dataset_stats, format_stats

    names = ("movies", "users", "attributes", "name", "base_day", "positive_threshold", "overwrite", "category",
             "user_col", "item_col", "time_col", "time_unit", "rating_col", "label_col", "category_col",
             "categories_col", "list_sep", "delimiter")
    options = {n: getattr(args, n) for n in names if getattr(args, n) not in (None, False)}
    run_import(args.kind, args.src, args.out, **options)
    print(format_stats(dataset_stats(args.out)))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from lumrec.data.stats import dataset_stats, format_stats

    print(format_stats(dataset_stats(args.dir)))
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from lumrec.config import load_config
    from lumrec.data.stats import dataset_stats, format_stats
    from lumrec.data.synthetic import SynthConfig, generate
    from lumrec.locks import RunLock

    base = load_config(SynthConfig, args.config) if args.config else SynthConfig()
    config = dataclasses.replace(base, **dataclass_overrides(args, SynthConfig))
    with RunLock(args.out, "synth"):  # one writer per dataset folder
        generate(args.out, config, progress=True)
    print(format_stats(dataset_stats(args.out)))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from lumrec.data.dataset import Dataset
    from lumrec.data.schema import TABLES

    data = Dataset(args.dir)
    meta = data.read_meta()
    print(f"{args.dir}: dataset {meta.name!r} from {meta.source}")
    for name, spec in TABLES.items():
        if not data.has_table(name):
            continue
        if spec.partitioned:
            rows = sum(b.num_rows for _, b in data.iter_batches(name))
            print(f"  {name:<12} ok  {rows:>10,} rows in {len(data.days(name))} day(s)")
        else:
            print(f"  {name:<12} ok  {data.read_table(name).num_rows:>10,} rows")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from lumrec.plots import plot_paths

    datasets = [d for d in args.datasets.split(",") if d] if args.datasets else None
    for path in plot_paths([Path(p) for p in args.inputs], Path(args.out), datasets):
        print(path)
    return 0


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import your own event table or a public data set into lumrec's Parquet layout")
    p.add_argument("kind", help="table (your CSV/Parquet events) | sasrec | amazon | ml-1m | ml-1m-ratings | ml-100k")
    p.add_argument("src", help="the source file (folder for ml-1m and ml-100k)")
    p.add_argument("out", help="output dataset folder")
    p.add_argument("--movies", help="ml-1m movies.dat for genres (ml-1m, ml-1m-ratings, ml-100k)")
    p.add_argument("--users", help="users.dat for user features (ml-1m, ml-1m-ratings)")
    p.add_argument("--attributes", help="Name_item2attributes.json (amazon; default: beside SRC; without one, no categories)")
    p.add_argument("--name", help="dataset name recorded in the manifest (default: the source file's name without suffixes)")
    p.add_argument("--user-col", help="table: user id column (default user_id; integers or strings)")
    p.add_argument("--item-col", help="table: item id column (default item_id; integers or strings)")
    p.add_argument("--time-col", help="table: event time column (default timestamp)")
    p.add_argument("--time-unit", choices=["s", "ms", "date"],
                   help="table: time column holds unix seconds (default), milliseconds, or dates / date-times (UTC unless zoned)")
    p.add_argument("--rating-col", help="table: rating column (kept; impressions labelled rating >= --positive-threshold)")
    p.add_argument("--label-col", help="table: 0/1 label column (writes labelled impressions)")
    p.add_argument("--category-col", help="table: item category column")
    p.add_argument("--categories-col", help="table: column listing an item's categories (list column, or text split by --list-sep)")
    p.add_argument("--list-sep", help="table: separator of --categories-col text values (default |)")
    p.add_argument("--delimiter", help="table: CSV field separator (default , or tab for .tsv)")
    p.add_argument("--base-day", help="first day of synthesised timestamps (ml-1m, amazon, sasrec)")
    p.add_argument("--category", choices=["first", "most_frequent"],
                   help="amazon: category_id = each item's first attribute (default) or the one most items share")
    p.add_argument("--positive-threshold", type=float, help="rating >= this is a positive label (default 4; ml-1m-ratings, ml-100k, table)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("stats", help="print events, users, items, days and per-day counts of a dataset")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("synth", help="generate synthetic industrial logs (the embedded default data)")
    p.add_argument("out")
    p.add_argument("--config", help="YAML file with SynthConfig keys")
    from lumrec.data.synthetic import SynthConfig

    add_dataclass_args(p, SynthConfig)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("plot", help="draw PNGs from result files: training curves, daily next-day AUC, Base vs Base+LUM bars")
    p.add_argument("inputs", nargs="+", help="run folders (results.json / tb/), daily folders (report.tsv), "
                   "demo folders, or a lum_tables results JSON")
    p.add_argument("--out", default="plots", help="folder the PNGs are written to (default plots/)")
    p.add_argument("--datasets", help="comma-separated data sets (and their order) of a lum_tables results file's bars")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("validate", help="read every table of a dataset and check it against the schemas")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_validate)


def _plugin_registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommand registrars advertised in the `lumrec.commands` entry-point group."""
    registrars = []
    for ep in sorted(entry_points(group="lumrec.commands"), key=lambda e: e.name):
        try:
            registrars.append(ep.load())
        except Exception as err:  # noqa: BLE001 - one broken job must not hide the data commands
            print(f"lumrec: warning: subcommand {ep.name!r} ({ep.value}) failed to load: {err}", file=sys.stderr)
    return registrars


def build_parser() -> argparse.ArgumentParser:
    """The full `lumrec` argument parser."""
    parser = argparse.ArgumentParser(prog="lumrec", description="LUM and HSTU generative recommenders on TorchRec.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="print the traceback of a failure (exit codes: docs/operations.md)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_data_commands(sub)
    for register in _plugin_registrars():
        register(sub)
    for command in sub.choices.values():
        # SUPPRESS: a subcommand that was not given --debug leaves the top-level value alone.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print the traceback of a failure")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lumrec` console command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        # Log lines go through tqdm while a job runs, so they print above its progress bar, not across it.
        with logging_redirect_tqdm():
            return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every failure becomes one line and its class's exit code
        return report_failure(args.command, err, debug=args.debug)
    except BaseException as err:  # torch DCP raises CheckpointException, a BaseException
        if isinstance(err, (SystemExit, GeneratorExit)):
            raise
        return report_failure(args.command, err, debug=args.debug)


def report_failure(command: str, err: BaseException, debug: bool = False) -> int:
    """Print `err` as one line `lumrec COMMAND: error: MESSAGE` (and its traceback when `debug`); return its exit code."""
    code, message = describe(err)
    # The failed job's progress bars end first, so the error gets a line of its own.
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    if debug:
        traceback.print_exception(err)
    print(f"lumrec {command}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
