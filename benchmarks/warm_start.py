"""The LUM paper's warm-start table: next-day AUC of daily-trained models that start from scratch or from an existing DLRM.

Every row is the daily pipeline (``lumrec.pipelines.daily``) over the same days, data and budget;
rows differ only in how their models start:

- ``DLRM(scratch)``: the DLRM alone (no LUM), first day from random init.
- ``DLRM(param+feature)``: the DLRM alone, continuing the existing DLRM (its parameters and features).
- ``LUM(scratch)``: DLRM + LUM features; LUM pre-trained from scratch, DLRM from random init.
- ``LUM(feature)``: as LUM(scratch), but the LUM's token encoder is declared with the existing
  DLRM's table sizes and initialised from its trained tables ("feature" warm-up).
- ``LUM(param)``: as LUM(scratch), but the DLRM + LUM starts from the existing DLRM's parameters
  (LUM inputs at zero: its first predictions are the old model's).
- ``LUM(feature+param)``: both.
- ``HSTU(scratch)``: the generative baseline: HSTU trained end to end for ranking (``model: hstu``:
  the candidate appended to the behaviour sequence, its HSTU state -> MLP), no LUM, from scratch.

The "existing DLRM" is the same backbone (SIM) trained without LUM on the days before the first
daily day (``Setup.existing``). The first daily day is a warm-up (LUM rows have no knowledge before
it); the table shows each day's next-day AUC and the mean over the days after the warm-up.

Set-ups are YAML files of ``Setup`` keys: ``configs/warm_start/synthetic.yaml`` (lumrec's logs,
conditions scenario and query, days 7-10) and ``configs/warm_start/ml1m_ratings.yaml`` (``--data``/
ml-1m/ratings_partial_first487650.dat.gz by real day: each rating is an impression labelled rating
>= 4, conditions the genres, days 2000-11-24..30). ``--config`` takes any such file and ``--data-dir``
any lumrec data set folder (read as it is); every condition, column and day the set-up names is
checked against the data before anything trains. Budgets are epochs (``bootstrap_epochs``,
``epochs_per_day``, ``rank_epochs``), the same on any machine.

    .venv/bin/python benchmarks/warm_start.py --dataset synthetic [--row all] [--threads 2] [--fresh]
    .venv/bin/python benchmarks/warm_start.py --dataset ml1m-ratings [--data ../shared/data] [--seeds 3]
    .venv/bin/python benchmarks/warm_start.py --data-dir out/my-import --config my_warm_start.yaml
    .venv/bin/python benchmarks/warm_start.py --tiny      # < 2 min smoke run on tiny synthetic logs

One row or seed per invocation works too (``--row lum-param``, ``--first-seed 2``); runs merge into
``OUT/results/warm_start.json`` under the data set's name (``--out`` defaults to out/bench/warm_start,
ignored by git; the recorded tables take ``--results benchmarks/results/warm_start.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lum_tables import SourceSpec, deep_merge, ensure_dataset  # noqa: E402  (sibling script modules)
from lum_tables_checks import ConfigMismatch, DataFacts, check_condition_text, check_feature, check_value  # noqa: E402
from results_file import merge_row  # noqa: E402

from lumrec.library_noise import silence_known_library_noise  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "warm_start.json"
ROWS = {
    "dlrm-scratch": "DLRM(scratch)",
    "dlrm-param-feature": "DLRM(param+feature)",
    "hstu-scratch": "HSTU(scratch)",
    "lum-scratch": "LUM(scratch)",
    "lum-feature": "LUM(feature)",
    "lum-param": "LUM(param)",
    "lum-feature-param": "LUM(feature+param)",
}
NOT_RUN: dict[str, str] = {}

log = logging.getLogger("lumrec.bench.warm_start")


@dataclass
class Setup:
    """One data set's days, sizes and LUM settings (the same for every row)."""

    source: SourceSpec  # the synthetic logs' config, or the importer kind, file and options (relative to --data)
    existing: tuple[str, str]  # the existing DLRM's training days
    daily: tuple[str, str]  # the daily pipeline's days (the first is the warm-up)
    bootstrap_epochs: int  # the LUM's first day: epochs over all history up to it
    epochs_per_day: int
    d_model: int
    embedding_dim: int  # DLRM tables, and the LUM token encoder's (so features can warm up)
    rank_epochs: int
    max_len: int  # LUM tokens per user ([c, i] pairs: max_len / 2 events)
    condition_features: list[str]
    pretrain_train: dict[str, Any]  # PretrainConfig.train keys
    query_conditions: list[dict[str, Any]]
    lum: dict[str, Any]  # RankLUMConfig keys: which conditions and features the DLRM gets
    context_keys: list[str] | None
    item_stats: list[str]
    max_history: int
    name_map: dict[str, str]  # the DLRM's table names (regex) -> the LUM token encoder's ("feature" warm-up)


CONFIGS = REPO / "configs" / "warm_start"
DATASETS = {"synthetic": "synthetic.yaml", "ml1m-ratings": "ml1m_ratings.yaml"}


def load_setup(config: str | Path, tiny: bool = False) -> Setup:
    """A data set's `Setup` from its YAML file (with its `tiny` overrides for --tiny), checked key by key."""
    import yaml

    from lumrec.config import from_dict

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file (or --dataset one of {sorted(DATASETS)})")
    raw = yaml.safe_load(path.read_text()) or {}
    overrides = raw.pop("tiny", {}) or {}
    if tiny:
        raw = deep_merge(raw, overrides)
    raw["existing"], raw["daily"] = tuple(raw.get("existing", ())), tuple(raw.get("daily", ()))
    return from_dict(Setup, raw, source=str(path))


def check_setup(setup: Setup, data: Path, config: str) -> None:
    """Every condition, column and day the setup names against the data set, before anything trains.

    A missing one is a ``ConfigMismatch`` naming the config file and key (``lum_tables_checks``).
    """
    facts = DataFacts.of(data)
    for feature in setup.condition_features:
        check_feature(feature, "condition_features", facts, config)
    for i, cond in enumerate(setup.query_conditions):
        feature = cond.get("feature")
        check_feature(feature, f"query_conditions[{i}]", facts, config)
        if feature not in setup.condition_features:
            raise ConfigMismatch(f"{config}: query_conditions[{i}]: feature {feature!r} is asked but the LUM is not trained on it "
                                 f"(condition_features is {setup.condition_features})")
        if cond.get("values", "all") != "all":
            for value in cond["values"]:
                check_value(feature, value, f"query_conditions[{i}]", facts, config, f"{feature}={value}")
    for i, text in enumerate(setup.lum.get("conditions", [])):
        check_condition_text(text, f"lum.conditions[{i}]", facts, config)
    if setup.lum.get("candidate_condition_feature"):
        check_feature(setup.lum["candidate_condition_feature"], "lum.candidate_condition_feature", facts, config, items_too=True)
    for key in setup.context_keys or []:
        if key not in facts.vocab:
            raise ConfigMismatch(f"{config}: context_keys: {key!r} has no vocabulary in data set {facts.name}; it has {sorted(facts.vocab)}")
    if setup.item_stats:
        from lumrec.data.dataset import Dataset

        dataset = Dataset(data)
        days = dataset.days("item_stats") if dataset.has_table("item_stats") else []
        have = set(dataset.read_days("item_stats", days[-1], days[-1]).schema.names) if days else set()
        missing = [c for c in setup.item_stats if c not in have]
        if missing:
            raise ConfigMismatch(f"{config}: item_stats: column(s) {missing} are not in data set {facts.name}'s item_stats table"
                                 f" ({sorted(have) if have else 'absent'})")
    from lumrec.data.dataset import Dataset

    days = Dataset(data).days("behaviours")
    for key in ("existing", "daily"):
        first, last = getattr(setup, key)
        if not days or first < days[0] or last > days[-1] or first > last:
            raise ConfigMismatch(f"{config}: {key}: days {first}..{last} are not inside data set {facts.name}'s behaviour days "
                                 f"{days[0] + '..' + days[-1] if days else '(none)'}")
    if setup.existing[1] >= setup.daily[0]:
        raise ConfigMismatch(f"{config}: existing: the existing DLRM's days must end before the daily days start ({setup.daily[0]})")


def rank_template(setup: Setup, threads: int, seed: int = 0) -> dict[str, Any]:
    """RankConfig keys shared by every row (SIM)."""
    dim = setup.embedding_dim
    return {
        "model": "sim",
        "sizes": {"embedding_dim": dim, "mlp": [64, 32], "attention_mlp": [32], "context_keys": setup.context_keys,
                  "item_stats": list(setup.item_stats)},
        "lum": copy.deepcopy(setup.lum),
        "train": {"seed": seed, "epochs": setup.rank_epochs, "batch_size": 256, "lr": 0.002, "max_history": setup.max_history,
                  "threads": threads, "progress": False},
    }


def pretrain_template(setup: Setup, threads: int, seed: int = 0) -> dict[str, Any]:
    """PretrainConfig keys of the LUM rows; the token encoder's tables have the DLRM's width so features can warm up."""
    d = setup.d_model
    return {
        "model": "lum",
        "data": {"max_len": setup.max_len, "condition_features": list(setup.condition_features), "item_features": ["item_id"]},
        "train": {"seed": seed, **setup.pretrain_train, "threads": threads, "eval_every_epochs": 10000,
                  "checkpoint_every_steps": 500, "log_every_steps": 50, "keep_checkpoints": 1},
        "model_config": {"d_model": d, "num_layers": 2, "num_heads": 2, "ffn_dim": 2 * d, "embedding_dim": setup.embedding_dim},
    }


def train_existing_dlrm(data: Path, out: Path, setup: Setup, threads: int, seed: int) -> Path:
    """The company's DLRM: the backbone without LUM, trained on the existing days; returns its checkpoints folder."""
    from lumrec.config import from_dict
    from lumrec.pipelines.rank import RankConfig, run_rank

    first, last = setup.existing
    keys = rank_template(setup, threads, seed)
    keys.update(data=str(data), out=str(out), lum=None,
                samples={"protocol": "impressions", "first_day": first, "last_day": last, "split_mode": "all_train"})
    if not (out / "results.json").exists():
        run_rank(from_dict(RankConfig, keys, source="existing DLRM"))
    return out / "checkpoints"


def row_config(row: str, data: Path, out: Path, existing: Path, setup: Setup, threads: int, seed: int):
    """The DailyConfig of one row."""
    from lumrec.config import from_dict
    from lumrec.pipelines.daily import DailyConfig

    lum = row.startswith("lum")
    rank = rank_template(setup, threads, seed)
    if row == "hstu-scratch":
        rank["model"] = "hstu"
    pretrain = pretrain_template(setup, threads, seed)
    if "feature" in row and lum:
        pretrain["train"]["table_init"] = {"source": str(existing), "name_map": dict(setup.name_map)}
    keys: dict[str, Any] = {
        "data": str(data), "out": str(out), "start": setup.daily[0], "end": setup.daily[1], "with_lum": lum,
        "epochs_per_day": setup.epochs_per_day, "bootstrap_epochs": setup.bootstrap_epochs, "pretrain": pretrain,
        "query": {"conditions": copy.deepcopy(setup.query_conditions), "threads": threads, "progress": False},
        "rank": rank,
    }
    if row in ("dlrm-param-feature", "lum-param", "lum-feature-param"):
        keys["rank_warm_start"] = {"source": str(existing)}
    return from_dict(DailyConfig, keys, source=f"warm_start row {row}")


def run_row(row: str, data: Path, work: Path, existing: Path, setup: Setup, threads: int, seed: int) -> dict[str, Any]:
    """One row's daily run for one seed (resumes if interrupted); its per-day next-day AUCs."""
    from lumrec.pipelines.daily import run_daily

    cfg = row_config(row, data, work / row, existing, setup, threads, seed)
    t0 = time.perf_counter()
    run_daily(cfg)
    reports = []
    for folder in sorted((work / row / "days").glob("ds=*")):
        reports.append(json.loads((folder / "report.json").read_text()))
    auc = [r["eval"]["auc"] for r in reports]
    return {"seed": seed, "days": [r["ds"] for r in reports], "eval_days": [r["eval"]["eval_day"] for r in reports],
            "next_day_auc": auc, "ne": [r["eval"]["ne"] for r in reports],
            "mean_auc_after_warmup": statistics.fmean(auc[1:] if len(auc) > 1 else auc),
            "warm_start": [bool(r["rank"].get("warm_start")) for r in reports], "wall_minutes": round((time.perf_counter() - t0) / 60, 2),
            "feature_tables": reports[0].get("pretrain", {}).get("table_init_tables", []) if reports else []}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per row over seeds: per-day AUC means, the mean after the warm-up (mean, std), paired delta vs DLRM(scratch)."""
    def mean_std(xs: list[float]) -> tuple[float, float]:
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    base = {r["seed"]: r["mean_auc_after_warmup"] for r in runs.get("dlrm-scratch", [])}
    out: dict[str, dict[str, Any]] = {}
    for row, seeds in runs.items():
        if not seeds:
            continue
        days = seeds[0]["eval_days"]
        entry: dict[str, Any] = {"label": ROWS[row], "seeds": [r["seed"] for r in seeds], "eval_days": days,
                                 "next_day_auc": [statistics.fmean(r["next_day_auc"][i] for r in seeds) for i in range(len(days))],
                                 "per_seed": seeds}
        entry["mean_auc_after_warmup"], entry["std_auc_after_warmup"] = mean_std([r["mean_auc_after_warmup"] for r in seeds])
        paired = [r["mean_auc_after_warmup"] - base[r["seed"]] for r in seeds if r["seed"] in base]
        if paired and row != "dlrm-scratch":
            entry["delta_mean"], entry["delta_std"] = mean_std(paired)
        out[row] = entry
    return out


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    """Rows x days: next-day AUC (mean over seeds); the mean after the warm-up day and the paired delta to DLRM(scratch)."""
    days = next((r["eval_days"] for r in rows.values() if "eval_days" in r), [])
    head = f"{'row':<22}" + "".join(f"{'AUC ' + d[5:]:>11}" for d in days) + f"{'mean* ± std':>18}{'Δ vs DLRM(scratch)':>22}{'seeds':>7}"
    print(head)
    print("-" * len(head))
    for key, label in ROWS.items():
        r = rows.get(key)
        if r is None or "next_day_auc" not in r:
            reason = (r or {}).get("status", "not run")
            print(f"{label:<22}  {reason}")
            continue
        delta = f"{r['delta_mean']:+.4f} ± {r['delta_std']:.4f}" if "delta_mean" in r else ""
        mean = f"{r['mean_auc_after_warmup']:.4f} ± {r['std_auc_after_warmup']:.4f}"
        print(f"{label:<22}" + "".join(f"{a:>11.4f}" for a in r["next_day_auc"]) + f"{mean:>18}{delta:>22}{len(r['seeds']):>7}")
    print("(* mean over the days after the first (warm-up) day; AUC DAY = next-day AUC on DAY of the model trained the day before;"
          " Δ: paired by seed)")


def run_name(args: argparse.Namespace) -> str:
    """The results' key: the named data set, else the --data-dir folder's and/or the --config file's name (+ -tiny)."""
    parts = [Path(args.data_dir).name] if args.data_dir else []
    if args.config:
        parts.append(Path(args.config).stem)
    return ("+".join(parts) or args.dataset) + ("-tiny" if args.tiny else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="synthetic", choices=sorted(DATASETS), help="a named set-up (configs/warm_start/)")
    parser.add_argument("--config", default=None, help="a set-up file, any path (default the named data set's)")
    parser.add_argument("--data-dir", default=None, help="a lumrec data set folder to run on as it is (no import)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder (real data sets)")
    parser.add_argument("--row", default="all", help=f"all, or comma-separated rows of {list(ROWS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="out/bench/warm_start", help="working folder: data, runs (default out/bench/warm_start)")
    parser.add_argument("--results", default=None,
                        help=f"JSON file the rows are merged into (default OUT/results/warm_start.json; the recorded tables: "
                             f"{RESULTS.relative_to(REPO)})")
    parser.add_argument("--fresh", action="store_true", help="delete earlier runs of the chosen rows first")
    parser.add_argument("--seeds", type=int, default=1, help="seeds FIRST..FIRST+N-1 (LUM and DLRM init, batch order)")
    parser.add_argument("--first-seed", type=int, default=0, help="first seed: runs of other seeds in the results file are kept")
    parser.add_argument("--tiny", action="store_true", help="the set-up's tiny overrides: a smoke run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    silence_known_library_noise()
    log.setLevel(logging.INFO)

    config = Path(args.config) if args.config else CONFIGS / DATASETS[args.dataset]
    setup = load_setup(config, args.tiny)
    name = run_name(args)
    work = Path(args.out) / name
    data = Path(args.data_dir) if args.data_dir else ensure_dataset(setup.source, Path(args.data), work / "data")
    rows = [r for r in ROWS if r not in NOT_RUN] if args.row == "all" else args.row.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"--row: unknown row(s) {unknown}; choose from {list(ROWS)}")
    check_setup(setup, data, str(config))  # before anything trains
    results = Path(args.results) if args.results else Path(args.out) / "results" / "warm_start.json"
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    runs: dict[str, list[dict[str, Any]]] = {}
    previous = json.loads(results.read_text()).get(name, {}) if results.exists() else {}
    for row, entry in previous.get("rows", {}).items():
        # runs measured by earlier invocations (other rows, other seeds) stay in the table
        kept = [r for r in entry.get("per_seed", []) if row not in rows or r["seed"] not in seeds]
        if kept:
            runs[row] = kept
    t0 = time.perf_counter()
    for seed in seeds:
        seed_dir = work / f"seed{seed}"
        if args.fresh:
            for row in rows:
                shutil.rmtree(seed_dir / row, ignore_errors=True)
        existing = train_existing_dlrm(data, seed_dir / "existing_dlrm", setup, args.threads, seed)
        for row in rows:
            log.info("seed %d row %s", seed, row)
            result = run_row(row, data, seed_dir, existing, setup, args.threads, seed)
            runs.setdefault(row, []).append(result)
            runs[row].sort(key=lambda r: r["seed"])
            log.info("seed %d row %s: next-day AUC %s", seed, row, [round(a, 4) for a in result["next_day_auc"]])
    summary = summarize(runs)
    for row, reason in NOT_RUN.items():
        summary[row] = {"label": ROWS[row], "status": "not run: " + reason}
    print_table(summary)
    record = {"dataset": name, "config": str(config.relative_to(REPO) if config.resolve().is_relative_to(REPO) else config),
              "data_dir": str(data), "existing_days": setup.existing, "daily_days": setup.daily, "threads": args.threads,
              "budget": {"bootstrap_epochs": setup.bootstrap_epochs, "epochs_per_day": setup.epochs_per_day, "rank_epochs": setup.rank_epochs},
              "wall_minutes": round((time.perf_counter() - t0) / 60, 1), "rows": summary}
    merge_row(results, name, record)
    figures = {k: round(r["mean_auc_after_warmup"], 4) for k, r in summary.items() if "mean_auc_after_warmup" in r}
    print(json.dumps({"dataset": name, "seeds": seeds, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
