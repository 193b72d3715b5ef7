"""LUM's three steps on one data set: Base vs Base+LUM ranking AUC over seeds, and the LUM paper's ablations.

One data set per invocation: a named one (``--dataset``, config ``configs/lum_tables/<dataset>.yaml``),
or any lumrec data set folder (``--data-dir``) or import spec (``--import KIND SRC``, else the
``source`` section of the config) with any config file (``--config``). Each invocation:

1. imports the data set once (cached under ``--out``; synthetic logs are generated; ``--data-dir``
   is read as it is), then checks every condition feature and value of the config against the data
   (``lum_tables_checks``: a missing one stops the run before any training, naming the config key),
2. pre-trains a LUM (step 1, ``Pretrainer``) for a step budget (the config's ``lum_budget.steps``,
   or ``--steps`` / ``--epochs``; ``--minutes`` for a wall-clock budget) on events the ranking
   samples never see (point-in-time, below),
3. queries it under the configured conditions into a knowledge store (step 2, ``run_query``),
4. trains the ranking backbone (``--model``, default SIM) without and with LUM features for each
   of ``--seeds`` seeds on the same samples, features and budget (step 3, ``run_rank``),

then prints a table (test AUC mean ± std, NE, paired ΔAUC vs Base with its seed-to-seed std),
ends with one JSON line and merges the row into ``<out>/results/lum_tables.json`` (``--out`` defaults
to ``out/bench``, ignored by git; the recorded tables take ``--results benchmarks/results/lum_tables.json``).

Point-in-time (``knowledge.mode`` in the config):

- ``daily`` (synthetic logs): the LUM trains on days <= ``pretrain_end``; a store is written as
  of every day from ``pretrain_end`` to the day before the last sample day; a sample of day D
  reads the newest store before D. Ranking samples start the day after ``pretrain_end``.
- ``fixed`` (ML-1M ratings, real timestamps over 872 days): the LUM trains on days <=
  ``pretrain_end``, one store as of that day, ranking samples from the next day on.
- ``user_cut`` (ML-1M implicit, Amazon Beauty: timestamps synthesised within ONE day): a
  knowledge view keeps, per user, every event before their last ``ranking_events + 2`` events;
  the LUM trains on the view and is queried from it (one store); the ranking samples are those
  last events (``implicit_next_item`` with ``max_train_per_user = ranking_events``, the last two
  are validation and test), so every sample comes after all of its user's knowledge events
  (``run_rank`` checks it per sample through ``lum.history_data``).

Rows: ``base``; ``lum`` (Base+LUM: several conditions, direct features o_q + e_i and interest
matching sim(o_q, e_i) = "multi-conditions" and "both"); with ``--ablations`` also
``no-condition`` (a second LUM pre-trained with a constant condition token), ``single-condition``
(only the candidate's own condition), ``direct`` (o_q + e_i only) and ``matching`` (sim only).
``hstu-e2e`` (with ``--ablations``): HSTU trained end to end for ranking (``model: hstu``), no LUM, the
generative baseline of the paper's tables. A config's ``extra_rows`` adds named feature sets read from
the main LUM's store (with ``--ablations``), e.g. the unconditioned answer ``none=0`` alone.
Seeds vary the ranker (init and batch order); the LUM and the samples are the same for all seeds.
``--first-seed K`` (with ``--rows``) adds seeds K.. to rows of an earlier invocation. The LUM can
train on the same source imported with other options (``knowledge.lum_source_options``, e.g.
coarse categories as conditions while the ranker keeps the fine ones). ``lum_budget: {select_on:
validation}`` trains each LUM for the number of epochs a validation probe picks (each user's last
knowledge event held out, early stopping on next-item HR@10) instead of a fixed step budget.

    .venv/bin/python benchmarks/lum_tables.py --dataset ml1m-ratings [--seeds 3] [--steps 2315] [--ablations] \
        --results benchmarks/results/lum_tables.json
    .venv/bin/python benchmarks/lum_tables.py --data-dir out/my-import --config my_lum.yaml --epochs 20 --model din
    .venv/bin/python benchmarks/lum_tables.py --tiny     # < 60 s smoke run on tiny synthetic logs
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from typing import Any

from lum_tables_checks import check_config  # noqa: E402  (sibling script modules)
from lum_tables_data import SourceSpec, ensure_dataset, ensure_lum_dataset, write_knowledge_view  # noqa: E402,F401
from results_file import merge_row  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "lum_tables.json"  # the recorded tables: written only when --results names it
DEFAULT_OUT = REPO / "out" / "bench"  # /out/ is ignored by git: default runs stay outside the tracked tree
CONFIGS = REPO / "configs" / "lum_tables"
DATASETS = {
    "synthetic": "synthetic.yaml",
    "synthetic-strength0": "synthetic_strength0.yaml",
    "ml1m-ratings": "ml1m_ratings.yaml",
    "ml1m-implicit": "ml1m_implicit.yaml",
    "beauty-implicit": "beauty_implicit.yaml",
    "beauty-implicit-attributes": "beauty_implicit_attributes.yaml",
    "beauty-implicit-fine": "beauty_implicit_fine.yaml",
}
ROW_LABELS = {
    "base": "Base",
    "lum": "Base+LUM (multi-conditions, both)",
    "no-condition": "  w/o condition tokens (constant)",
    "single-condition": "  single condition (candidate's)",
    "direct": "  direct feature only (o_q + e_i)",
    "matching": "  interest matching only (sim)",
    "hstu-e2e": "HSTU end to end (ranking)",
}
NOT_RUN: tuple[str, ...] = ()
LUM_FREE_ROWS = ("base", "hstu-e2e")  # rows that read no LUM features

log = logging.getLogger("lumrec.bench.lum_tables")


# -- config ------------------------------------------------------------------------------------


@dataclass
class KnowledgeSpec:
    """Which events the LUM may see, and what step 2 asks it."""

    mode: str = "daily"  # daily | fixed | user_cut (see the module doc)
    pretrain_end: str | None = None  # daily / fixed: the last day the LUM trains on (and, fixed, the store's day)
    ranking_events: int = 20  # user_cut: each user's most recent training targets kept for ranking
    conditions: list[dict[str, Any]] = field(default_factory=list)  # QueryConfig.conditions: {feature, values}
    top_values: int = 0  # > 0: a condition with values "all" asks only its most frequent values in the LUM's data
    # Importer options changed for the LUM's own copy of the source (e.g. {category: most_frequent}: LUM
    # conditioned on coarse groups while the ranker keeps the fine category). Ids and events must agree
    # with the ranker's import; the benchmark checks it.
    lum_source_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class FeatureSpec:
    """The LUM features of one row (RankLUMConfig's feature fields)."""

    conditions: list[str] = field(default_factory=list)
    candidate_condition_feature: str | None = None
    features: list[str] = field(default_factory=lambda: ["oq", "item", "sim", "missing"])
    normalize: bool = False  # L2-normalise the direct features o_q, e_i (RankLUMConfig.normalize)
    label: str = ""  # extra_rows: the row's label in the table (default: its name)


@dataclass
class LumBudgetSpec:
    """How long each LUM pre-trains: a step budget, or as many epochs as a validation probe picks.

    `steps`: the step budget a run uses when the command line names none (--steps / --epochs /
    --minutes). The configs of the recorded tables set it to the steps their LUM reached: the
    same training on any machine, where a wall-clock budget buys whatever the machine's load allows.
    """

    # time: train until the budget (steps, epochs or --minutes) runs out. validation: first a probe run that
    # holds out each user's last knowledge event for validation (train_excludes_last 2) and stops early
    # on validation HR@10; then the LUM itself trains (on every knowledge event but the test one) for
    # the probe's best number of epochs. Small knowledge views overfit: on Beauty (~4 events per user)
    # the constant LUM's HR@200 fell 0.283 -> 0.264 -> 0.251 over 420, 2,115 and 4,200 steps and its
    # ranking gain with it (+0.0112, +0.0051, +0.0000), while HR@10, what the probe stops on, rose.
    select_on: str = "time"
    steps: int | None = None  # the default step budget of each LUM (None: the config's pretrain epochs)
    eval_every_epochs: int = 5  # the probe's validation interval
    patience: int = 3  # evaluations without a better validation HR@10 before the probe stops

    def __post_init__(self) -> None:
        if self.select_on not in ("time", "validation"):
            raise ValueError(f"lum_budget.select_on must be 'time' or 'validation', got {self.select_on!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"lum_budget.steps must be >= 1 or null, got {self.steps}")
        if self.eval_every_epochs < 1 or self.patience < 1:
            raise ValueError("lum_budget.eval_every_epochs and lum_budget.patience must be >= 1")


@dataclass
class LumTablesConfig:
    """One data set's benchmark: source, knowledge plan, LUM pre-training, features, ranking."""

    source: SourceSpec = field(default_factory=SourceSpec)
    knowledge: KnowledgeSpec = field(default_factory=KnowledgeSpec)
    pretrain: dict[str, Any] = field(default_factory=dict)  # PretrainConfig keys; data.path, data.end, out are set here
    lum_budget: LumBudgetSpec = field(default_factory=LumBudgetSpec)  # how many epochs each LUM trains
    lum: FeatureSpec = field(default_factory=FeatureSpec)  # the Base+LUM row
    single_condition: FeatureSpec = field(default_factory=FeatureSpec)  # the single-condition ablation
    # More feature sets read from the main LUM's store, each a row of its own (run with --ablations):
    # e.g. the unconditioned answer alone, beside the multi-condition Base+LUM row.
    extra_rows: dict[str, FeatureSpec] = field(default_factory=dict)
    rank: dict[str, Any] = field(default_factory=dict)  # RankConfig keys except data, out, model, lum
    tiny: dict[str, Any] = field(default_factory=dict)  # overrides of this config for --tiny (deep-merged); pretrain_steps: step budget


def deep_merge(base: dict, over: dict) -> dict:
    """`base` with `over` merged in (nested mappings merged, everything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_path(dataset: str | Path) -> Path:
    """A named data set's config file, or `dataset` itself when it is a path."""
    return CONFIGS / DATASETS[dataset] if dataset in DATASETS else Path(dataset)


def load_bench_config(dataset: str | Path, tiny: bool) -> LumTablesConfig:
    """The config file of a named data set, or the file at path `dataset` (with its `tiny` overrides for --tiny), checked key by key."""
    import yaml

    from lumrec.config import from_dict

    path = config_path(dataset)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file (or --dataset one of {sorted(DATASETS)})")
    raw = yaml.safe_load(path.read_text()) or {}
    if "extends" in raw:  # a variant: another config (beside this one, else of configs/lum_tables/) with some keys changed
        parent = path.parent / raw["extends"] if (path.parent / raw["extends"]).is_file() else CONFIGS / raw["extends"]
        raw.pop("extends")
        raw = deep_merge(yaml.safe_load(parent.read_text()) or {}, raw)
    if tiny:
        # `pretrain_steps` is the tiny run's step budget, not a key of the config itself.
        raw = deep_merge(raw, {k: v for k, v in raw.get("tiny", {}).items() if k != "pretrain_steps"})
    return from_dict(LumTablesConfig, raw, source=str(path))


# -- steps 1 and 2: knowledge ----------------------------------------------------------------------


@dataclass
class LumBudget:
    """The budget each LUM of one invocation trains for: steps, epochs or wall-clock minutes (0 / None: unset)."""

    steps: int = 0
    epochs: int | None = None
    minutes: float = 0.0
    source: str = ""  # where it came from: "--steps", "--epochs", "--minutes", "config lum_budget.steps", ...

    def record(self) -> dict[str, Any]:
        return {"steps": self.steps or None, "epochs": self.epochs, "minutes": self.minutes or None, "from": self.source}


def resolve_budget(args: argparse.Namespace, cfg: LumTablesConfig) -> LumBudget:
    """The LUM budget: the command line's (--steps, --epochs, --minutes), else the config's step budget, else its epochs."""
    if args.steps:
        return LumBudget(steps=args.steps, source="--steps")
    if args.epochs:
        return LumBudget(epochs=args.epochs, source="--epochs")
    if args.minutes:
        return LumBudget(minutes=args.minutes, source="--minutes")
    if args.tiny and cfg.tiny.get("pretrain_steps"):
        return LumBudget(steps=int(cfg.tiny["pretrain_steps"]), source="config tiny.pretrain_steps")
    if cfg.lum_budget.steps:
        return LumBudget(steps=cfg.lum_budget.steps, source="config lum_budget.steps")
    return LumBudget(epochs=cfg.pretrain.get("train", {}).get("epochs"), source="config pretrain.train.epochs")


def pretrain_lum(cfg: LumTablesConfig, data_path: Path, out: Path, end: str | None, budget: LumBudget, threads: int,
                 condition_features: list[str] | None = None) -> dict[str, Any]:
    """Step 1: pre-train the LUM of the config on `data_path` (days <= `end`) within `budget`; resumes an earlier run."""
    train: dict[str, Any] = {"max_minutes": budget.minutes, "max_steps": budget.steps, "threads": threads}
    if budget.epochs:
        train["epochs"] = budget.epochs
    raw = deep_merge(cfg.pretrain, {"model": "lum", "out": str(out), "data": {"path": str(data_path), "end": end}, "train": train})
    if condition_features is not None:
        raw["data"]["condition_features"] = list(condition_features)
    probe = None
    if cfg.lum_budget.select_on == "validation":
        probe = budget_probe(raw, cfg.lum_budget, out / "budget-probe")
        raw["train"]["epochs"] = probe["epochs"]
    result = run_pretrain(raw)
    if probe is not None:
        result["budget_probe"] = probe
    return result


def run_pretrain(raw: dict[str, Any]) -> dict[str, Any]:
    """One Pretrainer run of the PretrainConfig mapping `raw` (an earlier run in its `out` is resumed)."""
    from lumrec.config import from_dict
    from lumrec.pipelines.pretrain import PretrainConfig, Pretrainer

    pcfg = from_dict(PretrainConfig, raw, source="lum_tables pretrain")
    t0 = time.perf_counter()
    result = Pretrainer(pcfg).run()
    # train_minutes: the run's own training time (a resumed, finished run reports it too; this call's wall time would be ~0).
    minutes = result.get("train_minutes", round((time.perf_counter() - t0) / 60, 2))
    return {"steps": result["steps"], "test": result["test"], "minutes": minutes, "epochs": result.get("epochs_run"),
            "best_epoch": result.get("best_epoch"), "best_valid_hr@10": result.get("best_valid_hr@10"),
            "condition_features": pcfg.data.condition_features}


def budget_probe(raw: dict[str, Any], spec: LumBudgetSpec, out: Path) -> dict[str, Any]:
    """The LUM's epoch budget chosen on validation: a run holding out each user's last training event, stopped early."""
    probe_raw = deep_merge(raw, {"out": str(out), "data": {"train_excludes_last": 2},
                                 "train": {"eval_every_epochs": spec.eval_every_epochs, "patience": spec.patience}})
    result = run_pretrain(probe_raw)
    if result["best_epoch"] is None or result["best_epoch"] < 0:  # no evaluation before the budget ran out
        epochs = int(raw["train"].get("epochs", 1))
    else:
        epochs = result["best_epoch"] + 1
    log.info("LUM budget probe %s: best validation HR@10 %s after %d epochs", out, result["best_valid_hr@10"], epochs)
    return {**result, "epochs": epochs}


def query_specs(cfg: LumTablesConfig, data_path: Path, end: str | None, const: bool) -> list:
    """Step 2's conditions: the config's (the constant condition for a constant-condition LUM); "all" cut to top values if asked."""
    import numpy as np

    from lumrec.data.dataset import Dataset
    from lumrec.pipelines.query import ConditionSpec

    if const:
        return [ConditionSpec("const", "all")]
    specs = [ConditionSpec(c["feature"], c.get("values", "all")) for c in cfg.knowledge.conditions]
    if cfg.knowledge.top_values > 0:
        events = Dataset(data_path).read_days("behaviours", None, end)
        for spec in specs:
            if spec.values == "all":
                values = events.column(spec.feature).to_numpy()
                ids, counts = np.unique(values[values > 0], return_counts=True)
                spec.values = sorted(ids[np.argsort(-counts, kind="stable")[: cfg.knowledge.top_values]].tolist())
    return specs


def redo(run: Path, fresh: bool) -> Path:
    """`run`, emptied first under --fresh. Only what an invocation redoes is emptied: rows it does not rerun keep their runs."""
    if fresh and run.exists():
        shutil.rmtree(run)
    return run


def build_knowledge(run: Path, store: Path, days: list[str], specs: list, data_path: Path, fresh: bool) -> list[str]:
    """Step 2: a knowledge partition of `store` as of each of `days` (existing complete partitions kept unless `fresh`)."""
    from lumrec.knowledge import knowledge_days
    from lumrec.pipelines.query import QueryConfig, run_query

    have = set(knowledge_days(redo(store, fresh)))
    for day in days:
        if day in have:
            continue
        q = QueryConfig(checkpoint=str(run), data=str(data_path), as_of_ds=day, conditions=specs, users="all", store=str(store),
                        progress=False)
        result = run_query(q)
        log.info("knowledge as of %s: %d users x %d conditions in %.1f s", day, result["users"], result["conditions"], result["seconds"])
    return days


# -- step 3 and the table ------------------------------------------------------------------------------




def lum_row_config(spec: FeatureSpec, store: Path, as_of: str | None, history_data: Path | None, **changes: Any):
    """RankLUMConfig of one row."""
    from lumrec.modules.lum_join import RankLUMConfig

    values = {**asdict(spec), **changes}
    values.pop("label")
    return RankLUMConfig(store=str(store), as_of_ds=as_of, history_data=str(history_data) if history_data else None, **values)


def extend_seeds(earlier: dict[str, dict], new: dict[str, dict], first_seed: int) -> dict[str, dict]:
    """Rows of seeds first_seed.. appended to the same rows of seeds 0..first_seed-1; stats and paired Δ recomputed.

    An earlier row that already has these seeds (Base, rerun by every invocation) keeps its values,
    which every earlier row was paired against; a rerun that differs is logged and recorded in the
    row as `rerun_auc` (float rounding in another process can move a seeded run slightly).
    """
    from lumrec.comparison import summarize_seeds

    runs: dict[str, list[dict]] = {}
    reruns: dict[str, list[float]] = {}
    for name, row in new.items():
        old = earlier.get(name, {})
        have = int(old.get("seeds", 0))
        if have >= first_seed + row["seeds"]:
            kept = old["auc"][first_seed:first_seed + row["seeds"]]
            if any(abs(a - b) > 1e-6 for a, b in zip(kept, row["auc"])):
                log.warning("row %s: seeds from %d rerun to AUC %s, the earlier run gave %s (kept)", name, first_seed, row["auc"], kept)
                reruns[name] = row["auc"]
            auc, ne = old["auc"], old["ne"]
        elif have == first_seed:
            auc, ne = old.get("auc", []) + row["auc"], old.get("ne", []) + row["ne"]
        else:
            raise ValueError(f"row {name!r}: --first-seed {first_seed} but the results hold {have} seed(s) of it")
        valid = old.get("valid_auc", []) + row.get("valid_auc", []) if have == first_seed else old.get("valid_auc", [])
        runs[name] = [{"test": {"auc": a, "ne": n}} for a, n in zip(auc, ne)]
        if len(valid) == len(auc):
            for run, v in zip(runs[name], valid):
                run["valid"] = {"auc": v}
    out = summarize_seeds(runs)
    for name, values in reruns.items():
        out[name]["rerun_auc"] = {"first_seed": first_seed, "auc": values}
    return out


def select_on_validation(summary: dict[str, dict]) -> dict[str, Any] | None:
    """The LUM row with the best mean validation AUC (the feature set a user would ship), with its test figures."""
    candidates = {k: r for k, r in summary.items() if k not in LUM_FREE_ROWS and "valid_auc_mean" in r}
    if not candidates:
        return None
    name = max(candidates, key=lambda k: candidates[k]["valid_auc_mean"])
    row = candidates[name]
    return {"row": name, "candidates": sorted(candidates), "valid_auc_mean": row["valid_auc_mean"], "auc_mean": row["auc_mean"],
            "auc_std": row["auc_std"], "delta_auc_mean": row.get("delta_auc_mean"), "delta_auc_std": row.get("delta_auc_std")}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every step for one data set; returns the merged row."""
    from lumrec.config import from_dict
    from lumrec.data.dataset import Dataset, shift_ds
    from lumrec.data.ranking_samples import build_ranking_samples
    from lumrec.comparison import comparison_table, summarize_seeds
    from lumrec.pipelines.rank import run_rank
    from lumrec.pipelines.rank_config import RankConfig

    t_start = time.perf_counter()
    cfg_file = config_path(args.config or args.dataset)
    cfg = load_bench_config(cfg_file, args.tiny)
    dataset = run_name(args)
    key = f"{dataset}{'-tiny' if args.tiny else ''}/{args.model}"
    work = Path(args.out) / "lum_tables" / key.replace("/", "-")
    if args.import_spec:  # `--import KIND SRC`: the config's source with another importer and file (its options kept for the same kind)
        kind, src = args.import_spec
        cfg.source = SourceSpec(kind=kind, src=src, options=cfg.source.options if kind == cfg.source.kind else {})
    if args.data_dir:  # a lumrec data set as it is: the config's source section is not imported
        if cfg.knowledge.lum_source_options:
            raise ValueError(f"{cfg_file}: knowledge.lum_source_options re-imports the source, which --data-dir {args.data_dir} "
                             "does not name: drop --data-dir (the config's source section is imported) or the option")
        data_path = source_path = Path(args.data_dir)
    else:
        data_path = ensure_dataset(cfg.source, Path(args.data), Path(args.out) / ("synthetic-tiny" if args.tiny and dataset == "synthetic"
                                                                                 else dataset + ("-tiny" if args.tiny else "")))
        source_path = ensure_lum_dataset(cfg, Path(args.data), Path(args.out), dataset, data_path)
    check_config(cfg, source_path, data_path, str(cfg_file))  # before any training: every condition exists in the data
    data = Dataset(data_path)
    mode = cfg.knowledge.mode
    rank_raw = deep_merge(cfg.rank, {"data": str(data_path), "model": args.model})
    rank_raw.setdefault("train", {})["threads"] = args.threads
    samples_raw = rank_raw.setdefault("samples", {})

    # Which events the LUM sees and which days its stores are as of (point-in-time; module doc).
    history_data: Path | None = None
    if mode in ("daily", "fixed"):
        if cfg.knowledge.pretrain_end is None:
            raise ValueError(f"{cfg_file}: knowledge.pretrain_end is required for mode {mode!r}")
        lum_data, end = source_path, cfg.knowledge.pretrain_end
        samples_raw["first_day"] = shift_ds(end, 1)
        sample_days = data.days("impressions" if samples_raw.get("protocol") == "impressions" else "behaviours")
        # daily: a store as of every day a sample's "day - 1" can be, from pretrain_end on.
        store_days = [d for d in data.days("behaviours") if end <= d < sample_days[-1]] if mode == "daily" else [end]
        as_of = None if mode == "daily" else end
    elif mode == "user_cut":
        k = cfg.knowledge.ranking_events
        lum_data = history_data = write_knowledge_view(source_path, Path(args.out) / f"{dataset}-view-{k}", k + 2)
        end = Dataset(lum_data).days("behaviours")[-1]
        store_days, as_of = [end], end
        samples_raw["max_train_per_user"] = k
    else:
        raise ValueError(f"knowledge.mode must be daily, fixed or user_cut, got {mode!r}")

    budget = resolve_budget(args, cfg)
    log.info("LUM budget: %s", budget.record())
    pre: dict[str, Any] = {}
    stores = {"lum": work / "store"}
    # Rows without LUM features (base, hstu-e2e) need no LUM: `--rows hstu-e2e` pre-trains none.
    if not args.rows or set(args.rows.split(",")) - set(LUM_FREE_ROWS):
        pre["lum"] = pretrain_lum(cfg, lum_data, redo(work / "lum", args.fresh), end, budget, args.threads)
        build_knowledge(work / "lum", stores["lum"], store_days, query_specs(cfg, lum_data, end, False), lum_data, args.fresh)
    # The constant-condition LUM only serves the no-condition row (skipped when --rows leaves that row out).
    if args.ablations and (not args.rows or "no-condition" in args.rows.split(",")):
        pre["lum-const"] = pretrain_lum(cfg, lum_data, redo(work / "lum-const", args.fresh), end, budget, args.threads, [])
        stores["lum-const"] = work / "store-const"
        build_knowledge(work / "lum-const", stores["lum-const"], store_days, query_specs(cfg, lum_data, end, True), lum_data, args.fresh)

    rows: dict[str, Any] = {"base": None, "lum": lum_row_config(cfg.lum, stores["lum"], as_of, history_data)}
    if args.ablations:
        if "lum-const" in stores:
            rows["no-condition"] = lum_row_config(cfg.lum, stores["lum-const"], as_of, history_data, conditions=["const=0"],
                                                  candidate_condition_feature=None)
        rows["single-condition"] = lum_row_config(cfg.single_condition, stores["lum"], as_of, history_data)
        rows["direct"] = lum_row_config(cfg.lum, stores["lum"], as_of, history_data, features=["oq", "item", "missing"])
        rows["matching"] = lum_row_config(cfg.lum, stores["lum"], as_of, history_data, features=["sim", "missing"])
        rows["hstu-e2e"] = "hstu"  # the ranking model itself changes: HSTU end to end, no LUM
        for name, spec in cfg.extra_rows.items():
            if name in rows:
                raise ValueError(f"{cfg_file}: extra_rows.{name} is a built-in row's name")
            rows[name] = lum_row_config(spec, stores["lum"], as_of, history_data)
    for name in NOT_RUN:
        rows[name] = "not run"
    if args.rows:  # a subset (Base always: every Δ is paired against it)
        wanted = {"base", *args.rows.split(",")}
        unknown = wanted - set(rows)
        if unknown:
            raise ValueError(f"--rows: {sorted(unknown)} not among this invocation's rows {sorted(rows)} (ablation rows need --ablations)")
        rows = {k: v for k, v in rows.items() if k in wanted}

    base_cfg = from_dict(RankConfig, rank_raw, source=f"{cfg_file} rank")
    samples = build_ranking_samples(data, base_cfg.samples)  # built once: every row and seed ranks the same samples
    runs: dict[str, list[dict]] = {}
    for name, lum in rows.items():
        runs[name] = []
        if lum == "not run":
            continue
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            rcfg = copy.deepcopy(base_cfg)
            rcfg.out, rcfg.lum, rcfg.train.seed = str(redo(work / "rank" / name / f"seed{seed}", args.fresh)), lum, seed
            if lum == "hstu":
                rcfg.model, rcfg.lum = "hstu", None
            result = run_rank(rcfg, samples=samples)
            runs[name].append(result)
            log.info("%s seed %d: test AUC %.4f", name, seed, result["test"]["auc"])
    summary = summarize_seeds(runs)
    extra_labels = {name: "  " + (spec.label or name) for name, spec in cfg.extra_rows.items()}
    labels = {k: ROW_LABELS.get(k, extra_labels.get(k, k)) for k in summary}
    lum_note = f", LUM pre-training {pre['lum']['steps']} steps / {pre['lum']['minutes']} min" if "lum" in pre else ", no LUM"
    print(f"\n{dataset} ({'tiny, ' if args.tiny else ''}{args.model}, seeds {args.first_seed}..{args.first_seed + args.seeds - 1}"
          f"{lum_note}): test AUC")
    print(comparison_table(summary, labels))
    selected = select_on_validation(summary)
    if selected is not None:
        print(f"selected on validation AUC among {', '.join(selected['candidates'])}: {selected['row']} "
              f"(valid {selected['valid_auc_mean']:.4f}, test {selected['auc_mean']:.4f}, Δ vs Base {selected['delta_auc_mean'] or 0:+.4f})")
    counts = samples.counts()
    row = {
        "dataset": dataset, "model": args.model, "tiny": args.tiny, "seeds": args.seeds, "budget_minutes": budget.minutes or None,
        "budget": budget.record(), "config": str(cfg_file),
        "data_dir": str(data_path),
        "first_seed": args.first_seed,
        "knowledge_mode": mode, "store_days": store_days, "pretrain": pre, "samples": counts,
        "rows": summary, "labels": {k: v.strip() for k, v in labels.items()},
        "lum_features": asdict(cfg.lum), "wall_minutes": round((time.perf_counter() - t_start) / 60, 2),
        "threads": args.threads, "selected_on_validation": selected,
    }
    planted = data.read_meta().extra
    if "oracle_auc" in planted:  # synthetic logs: what knowing the hidden click model is worth, with and without the condition
        row["oracle_auc"] = {"with_condition": planted["oracle_auc"], "without_condition": planted["oracle_auc_no_condition"],
                             "condition_strength": planted["config"]["condition_strength"]}
    results = Path(args.results)
    if args.rows and results.exists():
        # A row subset adds to the data set's table: rows of earlier invocations that were not rerun are kept
        # (Base is rerun every time and, seeded, must come out the same, so their paired Δ still holds).
        earlier = json.loads(results.read_text()).get(key, {})
        if args.first_seed > 0:  # more seeds of earlier rows: extend their per-seed lists
            summary = extend_seeds(earlier.get("rows", {}), summary, args.first_seed)
            row["rows"], row["seeds"] = summary, earlier.get("seeds", args.seeds)
        kept = {k: v for k, v in earlier.get("rows", {}).items() if k not in summary}
        if kept:
            row["rows"] = {**kept, **summary}
            row["labels"] = {**earlier.get("labels", {}), **row["labels"]}
            row["pretrain"] = {**earlier.get("pretrain", {}), **pre}
            row["rows_kept_from_earlier_invocation"] = sorted(kept)
        row["selected_on_validation"] = select_on_validation(row["rows"])
    merge_row(results, key, row)
    return row


def run_name(args: argparse.Namespace) -> str:
    """The row's data set name: the named data set, else the --data-dir folder's and/or the --config file's name."""
    parts = [Path(args.data_dir).name] if args.data_dir else [Path(args.import_spec[1]).stem] if args.import_spec else []
    if args.config:
        parts.append(Path(args.config).stem)
    return "+".join(parts) or args.dataset


def main(argv: list[str] | None = None) -> int:
    from lumrec.modules.ranking.registry import ranker_names

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic", choices=sorted(DATASETS),
                        help="a named data set and its config (default synthetic); --data-dir / --config replace either")
    parser.add_argument("--data-dir", default=None, help="a lumrec data set folder to run on as it is (no import)")
    parser.add_argument("--import", dest="import_spec", nargs=2, metavar=("KIND", "SRC"), default=None,
                        help="import SRC (relative to --data, or absolute) with `lumrec import KIND` instead of the config's source")
    parser.add_argument("--config", default=None,
                        help="a lum_tables config file, any path (default configs/lum_tables/<dataset>.yaml); its source section is "
                             "the import spec when --data-dir is not given")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder holding ml-1m/, amazon-beauty/ (default ../shared/data)")
    parser.add_argument("--model", default="sim", choices=ranker_names(), help="registered ranking backbone (default sim, as in the LUM paper)")
    parser.add_argument("--steps", type=int, default=None,
                        help="LUM pre-training budget in steps (default: the config's lum_budget.steps, the steps the recorded "
                             "row's LUM trained; without one, the config's pretrain epochs)")
    parser.add_argument("--epochs", type=int, default=None, help="LUM pre-training budget in epochs instead")
    parser.add_argument("--minutes", type=float, default=None,
                        help="LUM pre-training budget in wall-clock minutes instead (what it buys depends on the machine and its load)")
    parser.add_argument("--seeds", type=int, default=3, help="ranker seeds per row (default 3)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds FIRST..FIRST+SEEDS-1; > 0 adds seeds to the rows --rows names (their earlier seeds kept)")
    parser.add_argument("--ablations", action="store_true", help="also the LUM paper's ablation rows")
    parser.add_argument("--rows", default="", help="comma-separated subset of the rows to rank (base is always run), e.g. lum,no-condition")
    parser.add_argument("--tiny", action="store_true", help="< 60 s smoke run: the config's tiny overrides on tiny synthetic logs (or on --data-dir with --config), few steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --tiny)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="working folder: data cache, runs, stores (default out/bench, ignored by git)")
    parser.add_argument("--results", default=None,
                        help=f"JSON file the row is merged into (default OUT/results/lum_tables.json; the recorded tables: {RESULTS.relative_to(REPO)})")
    parser.add_argument("--fresh", action="store_true",
                        help="redo from scratch the LUMs, stores and rank runs this invocation needs (other rows' runs are kept)")
    args = parser.parse_args(argv)
    if args.tiny and args.dataset != "synthetic":
        parser.error("--tiny runs on tiny synthetic logs only (drop --dataset or use --dataset synthetic), or on --data-dir with --config")
    if args.data_dir and args.import_spec:
        parser.error("--data-dir and --import are two data sets: give one")
    if sum(x is not None for x in (args.steps, args.epochs, args.minutes)) > 1:
        parser.error("--steps, --epochs and --minutes are three budgets: give one")
    if (args.epochs is not None and args.epochs < 1) or (args.steps is not None and args.steps < 1) or \
            (args.minutes is not None and args.minutes <= 0):
        parser.error("--steps and --epochs must be >= 1, --minutes > 0")
    if args.results is None:
        args.results = str(Path(args.out) / "results" / "lum_tables.json")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.first_seed < 0 or (args.first_seed > 0 and not args.rows):
        parser.error("--first-seed must be >= 0, and > 0 only with --rows (it adds seeds to the rows it names)")
    args.fresh = args.fresh or args.tiny  # a smoke run never reuses an earlier one
    if args.threads is None:
        args.threads = 1 if args.tiny else 2
    from lumrec.cli import setup_logging

    setup_logging()
    import torch

    torch.set_num_threads(args.threads)
    row = run_benchmark(args)
    print(json.dumps(row, separators=(",", ":"), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
