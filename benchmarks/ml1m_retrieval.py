"""Leave-one-out retrieval on ML-1M (default) or any data set: SASRec / HSTU / HSTU-large / LUM, on ML-1M beside the published numbers.

One model per invocation (`--model NAME`, its ML-1M config from configs/, or `--config FILE`, any
pretrain config path); its row is merged into benchmarks/results/ml1m_retrieval.json (ML-1M with
the configs of RUNS) or, for `--data-dir` (a lumrec data set folder) or `--config`, into
OUT/results/retrieval.json outside the tracked tree, and the whole table is printed. A row records
its data set and config; published figures are compared on ML-1M only. MFU = achieved training
FLOP/s (FLOPs per step counted by torch's FlopCounterMode) over the fp32 matmul peak measured
here, on the same machine, in the same run.

    .venv/bin/python benchmarks/ml1m_retrieval.py --model sasrec [--data ../shared/data] [--epochs 140 | --steps N | --minutes 45] [--seed 1]
    .venv/bin/python benchmarks/ml1m_retrieval.py --model hstu --variant decay-0.5 train.lr_decay_fraction=0.5
    .venv/bin/python benchmarks/ml1m_retrieval.py --model hstu --data-dir out/my-import --config my_hstu.yaml --epochs 20

Config overrides change the recipe, so they need `--variant NAME`: the row is `MODEL@NAME`.

`--seed S` trains the same config with `train.seed=S`; the row keeps every seed's results under
`per_seed`, and its `test` metrics (and epochs, tokens/s, MFU) are the means over the seeds run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import merge_row  # noqa: E402  (a sibling script module)

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ml1m_retrieval.json"

# HR@10 / NDCG@10 on ML-1M as published (HSTU paper, Table 2).
PUBLISHED = {
    "sasrec": (0.2853, 0.1603),
    "hstu": (0.3097, 0.1720),
    "hstu-large": (0.3294, 0.1893),
}
# The split those figures use (data.protocol): trained on every event but the test one, no validation.
PUBLISHED_PROTOCOL = "published-ml1m"
# Our runs: model name in the factory, config file, and what the row means.
RUNS = {
    "sasrec": ("sasrec", "configs/ml1m_sasrec.yaml", "SASRec"),
    "hstu": ("hstu", "configs/ml1m_hstu.yaml", "HSTU"),
    "hstu-large": ("hstu-large", "configs/ml1m_hstu_large.yaml", "HSTU-large"),
    "lum-const": ("lum", "configs/ml1m_lum_const.yaml", "LUM, constant condition (fair vs HSTU)"),
    "lum-genre": ("lum", "configs/ml1m_lum_genre.yaml", "LUM, condition = target's genre (extra information)"),
}
# The default budget of each model, in epochs: about what the recorded rows' 45-minute budget reached on the
# 2-core benchmark machine (their epochs_run), so a default run costs about the same and repeats on any machine.
# Config keys some recorded recipes predate, with the value that trains as those runs trained.
PREDATED_KEYS = {"train.max_steps": 0}
DEFAULT_EPOCHS = {"sasrec": 140, "hstu": 120, "hstu-large": 47, "lum-const": 64, "lum-genre": 62}


def measure_matmul_peak(n: int = 2048, repeats: int = 7) -> float:
    """Median fp32 FLOP/s of an n x n matmul with the current torch thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def flops_per_token(trainer, steps: int = 3) -> float:
    """Training FLOPs (forward + backward) per token, counted on a few batches."""
    flops = tokens = 0
    loader_state = (trainer.loader.epoch, trainer.loader.batch)
    for i, batch in enumerate(trainer.loader):
        if i >= steps:
            break
        with FlopCounterMode(display=False) as counter:
            loss, _ = trainer.trainer(batch, torch.Generator().manual_seed(i))
            loss.backward()
        flops += counter.get_total_flops()
        tokens += batch.num_tokens
    for opt in trainer.optimizers:
        opt.zero_grad(set_to_none=True)
    trainer.loader.epoch, trainer.loader.batch = loader_state
    return flops / max(tokens, 1)


def add_run_arguments(parser: argparse.ArgumentParser, default_epochs: str, out: Path, results: Path | None) -> None:
    """The options every ML-1M training benchmark takes: data, budget, threads, seed, folders (`results` None: chosen later).

    The budget is in epochs by default (`default_epochs` says which), or in steps; `--minutes` is a wall-clock option.
    """
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder holding ml-1m/ (default ../shared/data)")
    parser.add_argument("--epochs", type=int, default=None, help=f"training budget in epochs (default {default_epochs})")
    parser.add_argument("--steps", type=int, default=None, help="training budget in steps instead (the config's epochs stay a cap)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training budget in wall-clock minutes instead (the recorded rows of benchmarks/results used "
                             "--minutes; what it buys depends on the machine and its load)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="train.seed of this run; the row averages over the seeds run")
    parser.add_argument("--out", default=str(out), help="working folder for data cache and runs")
    where = results or "benchmarks/results/ml1m_retrieval.json for ML-1M with the model's config, else OUT/results/retrieval.json"
    parser.add_argument("--results", default=None if results is None else str(results), help=f"JSON file the row is merged into (default {where})")
    parser.add_argument("--fresh", action="store_true", help="ignore an earlier run's checkpoints")


def check_budget(parser: argparse.ArgumentParser, args: argparse.Namespace, default_epochs: int) -> None:
    """One budget at most on the command line; none given: `default_epochs` epochs (`args.epochs` is set)."""
    given = [name for name in ("epochs", "steps", "minutes") if getattr(args, name) is not None]
    if len(given) > 1:
        parser.error(f"--{given[0]} and --{given[1]} are two budgets: give one")
    if any(getattr(args, name) <= 0 for name in given):
        parser.error(f"--{given[0]} must be > 0")
    if not given:
        args.epochs = default_epochs


def budget_record(args: argparse.Namespace) -> dict:
    """The row's budget fields: exactly one of them set."""
    return {"budget_minutes": args.minutes, "budget_epochs": args.epochs, "budget_steps": args.steps}


def run_overrides(args: argparse.Namespace, key: str, data_path: Path) -> list[str]:
    """The overrides every run gets: data, its run folder (row `key` at `args.seed`), budget, threads and seed."""
    run_dir = Path(args.out) / "runs" / (key if args.seed == 0 else f"{key}-seed{args.seed}")
    if args.minutes:
        budget = [f"train.max_minutes={args.minutes}", "train.max_steps=0"]
    elif args.steps:
        budget = [f"train.max_steps={args.steps}", "train.max_minutes=0"]
    else:
        budget = [f"train.epochs={args.epochs}", "train.max_minutes=0", "train.max_steps=0"]
    return [f"data.path={data_path}", f"out={run_dir}", *budget, f"train.threads={args.threads}", f"train.seed={args.seed}"]


def start_run(args: argparse.Namespace, cfg, results: Path, key: str) -> dict:
    """Before any work: refuse a seed of another recipe in row `key`, then empty the run folder under --fresh; the recipe."""
    recipe = run_recipe(cfg)
    refuse_mixed_recipes(results, key, read_row(results, key), recipe, args.seed)
    if args.fresh and Path(cfg.out).exists():
        shutil.rmtree(cfg.out)
    return recipe


def run_recipe(cfg) -> dict:
    """The resolved config a run trains with, less what differs between seeds of one row (seed, folders)."""
    from lumrec.config import to_dict

    recipe = json.loads(json.dumps(to_dict(cfg), default=str))
    recipe.pop("out", None)
    recipe["data"].pop("path", None)  # the data cache sits under --out
    recipe["train"].pop("seed", None)
    return recipe


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def recipe_conflicts(earlier: dict | None, recipe: dict, seed: int) -> list[str]:
    """How `recipe` differs from the recipe of each of the earlier row's other seeds (empty: they may share a row).

    Seeds recorded without a recipe are checked on the row's threads and budget only.
    """
    if not earlier:
        return []
    mine = {**PREDATED_KEYS, **flatten(recipe)}
    conflicts = []
    for other, run in sorted((earlier.get("per_seed") or {"0": earlier}).items()):
        if other == str(seed):
            continue  # a rerun of this seed replaces it
        if "recipe" in run:
            # A key a recorded recipe predates had, then, the value that leaves runs as they were.
            theirs = {**PREDATED_KEYS, **flatten(run["recipe"])}
            keys = set(theirs) | set(mine)
        else:
            theirs = {"train.threads": earlier.get("threads"), "train.max_minutes": earlier.get("budget_minutes")}
            keys = set(theirs)
        for k in sorted(keys):
            if theirs.get(k) != mine.get(k):
                conflicts.append(f"seed {other} ran with {k}={theirs.get(k)!r}, this run has {mine.get(k)!r}")
    return conflicts


def read_row(results: Path, key: str) -> dict | None:
    """Row `key` of the results file, None if the file or the row does not exist yet."""
    return json.loads(results.read_text()).get(key) if results.exists() else None


def refuse_mixed_recipes(results: Path, key: str, earlier: dict | None, recipe: dict, seed: int, kept: Path | None = None) -> None:
    """Stop when this seed would share row `key` (`earlier`, as read from `results`) with seeds of another recipe.

    `kept`: where this run's row is saved, when the check comes after training.
    """
    conflicts = recipe_conflicts(earlier, recipe, seed)
    if conflicts:
        shown = "; ".join(conflicts[:6]) + (f"; and {len(conflicts) - 6} more" if len(conflicts) > 6 else "")
        where = f" This run's row is kept in {kept}." if kept is not None else ""
        raise SystemExit(f"{results}: row {key!r} holds seeds of another recipe ({shown}). Its mean would mix them: "
                         f"write this run to another file (--results) or, for ml1m_retrieval.py, a row of its own (--variant NAME).{where}")


def publish_row(results: Path, key: str, row: dict, seed: int, table: Callable[[dict], str], run_dir: Path | None = None) -> None:
    """Merge `row` (one run of `seed`) into the results file under `key`; print `table` of all rows and the JSON line.

    The row is first saved in `run_dir` (if given), so a run that cannot be merged is not lost.
    """
    saved = None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = run_dir / "benchmark_row.json"
        saved.write_text(json.dumps({"key": key, "seed": seed, "row": row}, indent=2, sort_keys=True))
    earlier = read_row(results, key)
    if "recipe" in row:  # again: another invocation may have written this row while we trained
        refuse_mixed_recipes(results, key, earlier, row["recipe"], seed, kept=saved)
    rows = merge_row(results, key, with_seed(earlier, row, seed))
    print(table(rows))
    print(json.dumps(rows, separators=(",", ":"), sort_keys=True))


def measured_run(cfg) -> dict:
    """Train `cfg` to the end of its budget, test it; the row's measured fields (metrics, speed, MFU)."""
    from lumrec.pipelines.pretrain import Pretrainer

    peak = measure_matmul_peak()
    trainer = Pretrainer(cfg)
    fpt = flops_per_token(trainer)
    t0 = time.perf_counter()
    result = trainer.run()
    wall = time.perf_counter() - t0
    return {
        "test": result["test"], "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
        "train_minutes": result["train_minutes"], "wall_minutes": round(wall / 60, 2),
        "resumed_from_step": result["resumed_from_step"], "tokens_per_s": result["tokens_per_s"],
        "flops_per_token": round(fpt, 1), "matmul_peak_gflops": round(peak / 1e9, 2),
        "mfu": round((result["tokens_per_s"] or 0) * fpt / peak, 5),
    }


def ensure_ml1m(data_root: Path, cache: Path) -> Path:
    """Import ML-1M from the shared folder into the cache once."""
    from lumrec.data.dataset import Dataset
    from lumrec.data.importers import run_import

    if not Dataset(cache).manifest_path.exists():
        run_import("ml-1m", data_root / "ml-1m", cache, overwrite=True)
    return cache




# wall_minutes counts this process only: a run resumed from a checkpoint says so in resumed_from_step.
PER_SEED_FIELDS = ("test", "epochs_run", "train_minutes", "wall_minutes", "resumed_from_step", "tokens_per_s", "mfu",
                   "matmul_peak_gflops", "overrides", "threads", "budget_minutes", "recipe")
MEAN_FIELDS = ("epochs_run", "tokens_per_s", "mfu")


def with_seed(earlier: dict | None, row: dict, seed: int) -> dict:
    """`row` (one run of `seed`) merged with the earlier row's other seeds: per-seed results kept, metrics averaged."""
    per_seed = dict(earlier.get("per_seed", {})) if earlier else {}
    if earlier and not per_seed:  # a row written before per-seed results: one run of seed 0
        per_seed["0"] = {k: earlier[k] for k in PER_SEED_FIELDS if k in earlier}
    per_seed[str(seed)] = {k: row[k] for k in PER_SEED_FIELDS if k in row}
    merged = {**row, "per_seed": per_seed, "seeds": sorted(int(k) for k in per_seed)}
    if earlier and "note" in earlier:
        merged["note"] = earlier["note"]
    runs = list(per_seed.values())
    if len(runs) > 1:
        merged["test"] = {m: statistics.fmean(r["test"][m] for r in runs) for m in row["test"]}
        merged["test_std"] = {m: statistics.stdev(r["test"][m] for r in runs) for m in row["test"]}
        for field in MEAN_FIELDS:
            merged[field] = statistics.fmean(r[field] for r in runs)
    return merged


def published_protocol_warning(model: str, cfg) -> str | None:
    """Why `model`'s run under `cfg` does not compare with its published figure (another split protocol); None when it does or none is published."""
    from lumrec.pipelines.pretrain_config import protocol_mismatch, split_protocol

    if model not in PUBLISHED:
        return None
    return protocol_mismatch(split_protocol(cfg.data), PUBLISHED_PROTOCOL, f"the published {model} figure (HSTU paper, Table 2)")


def data_set_name(data_dir: str | None) -> str:
    """"ml-1m" for the default data or a --data-dir imported from ML-1M (published figures apply), else the folder's name."""
    from lumrec.data.dataset import Dataset

    if data_dir is None:
        return "ml-1m"
    data = Dataset(data_dir)
    if not data.manifest_path.exists():
        raise SystemExit(f"--data-dir {data_dir}: not a lumrec data set (no {data.manifest_path.name}); import one with `lumrec import`")
    return "ml-1m" if data.read_meta().extra.get("kind") == "ml-1m" else Path(data_dir).resolve().name


def format_table(rows: dict) -> str:
    """The comparison table over every row measured so far."""
    head = f"{'model':<44} {'seeds':>5} {'HR@10':>7} {'NDCG@10':>8} {'HR@50':>7} {'HR@200':>7} {'NDCG@200':>8} {'pub HR@10':>9} {'pub NDCG@10':>11} {'minutes':>8} {'tok/s':>9} {'MFU':>6}"
    lines = [head, "-" * len(head)]
    # Each model's row, then its recipe variants ("hstu@lr-decay-0.5"), in RUNS order.
    order = [name for model in RUNS for name in sorted(rows) if name.split("@")[0] == model]
    order += sorted(set(rows) - set(order))  # other configs and data sets (--config, --data-dir)
    for name in order:
        r = rows[name]
        t = r["test"]
        # Published figures are ML-1M's: rows of another data set or config show none.
        pub = PUBLISHED.get(name.split("@")[0]) if r.get("dataset", "ml-1m") == "ml-1m" else None
        pub_s = f"{pub[0]:>9.4f} {pub[1]:>11.4f}" if pub else f"{'-':>9} {'-':>11}"
        lines.append(
            f"{r['label']:<44} {len(r.get('seeds', [0])):>5} {t['hr@10']:>7.4f} {t['ndcg@10']:>8.4f} {t['hr@50']:>7.4f} {t['hr@200']:>7.4f} "
            f"{t['ndcg@200']:>8.4f} {pub_s} {r['train_minutes']:>8.1f} {r['tokens_per_s']:>9,.0f} {r['mfu']:>6.2%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(RUNS), help="the model (and, without --config, its ML-1M config)")
    parser.add_argument("--data-dir", default=None, help="a lumrec data set folder to train and test on (default: ML-1M, imported under --out)")
    parser.add_argument("--config", default=None, help="a pretrain config file, any path (default the model's ML-1M config of configs/)")
    add_run_arguments(parser, "the epochs the model's recorded 45-minute row reached, see DEFAULT_EPOCHS", out=REPO / "out" / "bench",
                      results=None)
    parser.add_argument("--variant", default="", help="name of a recipe variant (with overrides): its row is MODEL@VARIANT, its run folder apart")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = parser.parse_args(argv)
    if args.overrides and not args.variant:
        parser.error("overrides change the recipe: name the variant (--variant NAME) so its row does not mix with the config's seeds")
    check_budget(parser, args, DEFAULT_EPOCHS[args.model])
    dataset = data_set_name(args.data_dir)
    key = args.model + (f"+{Path(args.config).stem}" if args.config else "") + (f"@{args.variant}" if args.variant else "")
    if dataset != "ml-1m":
        key = f"{dataset}/{key}"
    if args.results is None:  # the recorded table holds ML-1M rows of the RUNS configs; every other run stays under --out
        args.results = str(RESULTS if not (args.data_dir or args.config) else Path(args.out) / "results" / "retrieval.json")
    from lumrec.cli import setup_logging

    setup_logging()
    torch.set_num_threads(args.threads)

    from lumrec.config import load_config
    from lumrec.pipelines.pretrain import PretrainConfig

    factory_name, config_file, label = RUNS[args.model]
    config_path = Path(args.config) if args.config else REPO / config_file
    if args.config:
        label = f"{label}, {config_path.stem}"
    if dataset != "ml-1m":
        label = f"{label} on {dataset}"
    data_path = Path(args.data_dir) if args.data_dir else Path(args.out) / "ml-1m"
    overrides = [*run_overrides(args, key.replace("/", "-"), data_path), f"model={factory_name}", *args.overrides]
    cfg = load_config(PretrainConfig, config_path, overrides=overrides)
    warning = published_protocol_warning(args.model, cfg) if dataset == "ml-1m" else None
    if warning:
        print(f"WARNING: {key}: {warning}", file=sys.stderr, flush=True)
    recipe = start_run(args, cfg, Path(args.results), key)
    if not args.data_dir:
        ensure_ml1m(Path(args.data), data_path)
    row = {
        "label": f"{label} [{args.variant}]" if args.variant else label, "model": args.model, "variant": args.variant or None,
        **measured_run(cfg), "threads": args.threads, **budget_record(args), "overrides": args.overrides, "dataset": dataset, "data_dir": str(data_path),
        "config": str(config_path.relative_to(REPO) if config_path.is_relative_to(REPO) else config_path),
        "published_hr@10_ndcg@10": PUBLISHED.get(args.model) if dataset == "ml-1m" else None, "recipe": recipe,
        "protocol": {"train_excludes_last": cfg.data.train_excludes_last, "exclude_seen": cfg.train.exclude_seen},
    }
    publish_row(Path(args.results), key, row, args.seed, format_table, Path(cfg.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
