"""The daily pipeline: LUM's three steps for one day D, stage by stage, never losing or double-counting a day.

    lumrec daily CONFIG ds=2026-01-15            # one day
    lumrec daily CONFIG start=2026-01-13 end=2026-01-15   # a range, in order; complete days are skipped

Stages of day D (each one a folder under ``OUT/days/ds=D/`` plus a stage manifest written last):

(a) ``pretrain``: continue LUM pre-training from D-1's checkpoint (model and optimizer state)
    with D's behaviours as targets; earlier days are context only. The first day, with no
    D-1, pre-trains on all history up to D (``bootstrap_epochs``).
(b) ``query``: grouped query of the users with behaviour on D, written to the knowledge store
    as of D; every other user's vectors are carried over from the previous partition
    (``full_refresh: true`` re-queries everyone). The report says how many were refreshed.
(c) ``rank``: train the DLRM on D's impressions; each sample reads the knowledge as of D-1
    (point-in-time); warm-started from D-1's DLRM (the first day: ``rank_warm_start``, e.g. the
    company's existing model, or from scratch).
(d) ``eval``: next-day AUC, NE and calibration of D's DLRM on D+1's impressions (which read
    the knowledge as of D); ``report.json`` of the day and a line per day in ``OUT/report.tsv``.
    Without D+1's impressions the day waits (incomplete) and a later run finishes it.

Exactly once: a stage runs only when its manifest is absent. Its work resumes from its own
checkpoints (pre-training and ranking resume exactly, mid-epoch included), the knowledge
partition and the reports are replaced atomically, so a job killed anywhere and rerun ends with
the same checkpoints and metrics as an uninterrupted one (``tests/test_daily.py`` kills each
stage with ``lumrec.faults`` failpoints).

Config drift (``pipelines/daily_drift.py``): a stage's manifest holds the digest of the resolved
config it ran with, recorded beside it. A rerun whose config changes a finished stage's outputs
is refused, naming the day and each key (saved and new value), unless ``redo=changed``: then the
outputs of that stage and every later one of the day and of every later day are removed (a
journal, ``OUT/redo.json``, lets a killed redo finish on the next run) and the days run again.

The stages are one list, ``DAY_STAGES``: each ``Stage`` has its name, whether it needs LUM, its
work (a ``DailyJob`` method) and its columns of the report table. TensorBoard scalars go to
``OUT/tb`` at step = the day's index among the dataset's impression days: ``next_day/auc``,
``next_day/ne``, ``next_day/calibration``, ``next_day/log_loss`` and ``seconds/<stage>``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from lumrec.checkpoint import CheckpointManager
from lumrec.config import check_at_least, check_days, load_config
from lumrec.data.dataset import Dataset, write_text_atomic
from lumrec.data.synthetic import SynthConfig, generate, generated_with
from lumrec.device import check_device_setting, resolve_device
from lumrec.distributed import barrier, from_rank0, init_distributed, is_main
from lumrec.errors import EXIT_WAITING
from lumrec.faults import failpoint
from lumrec.knowledge import KNOWLEDGE_MANIFEST, latest_as_of, partition_dir
from lumrec.locks import LockHeldError, RunLock, under_lock
from lumrec.modules.warm_start_config import WarmStartConfig, WarmStartError
from lumrec.pipelines.daily_drift import (DriftChecks, ShapeMismatchError, checkpoint_shapes, config_digest, describe_mismatches,
                                          shape_key_changes, shape_mismatches)
from lumrec.pipelines.pretrain import Pretrainer
from lumrec.pipelines.pretrain_config import PretrainConfig
from lumrec.pipelines.query import QueryConfig, run_query
from lumrec.pipelines.rank import Ranker, run_rank
from lumrec.pipelines.rank_config import RankConfig
from lumrec.tracking import ScalarLog, log_job_start, progress_bar

log = logging.getLogger("lumrec.daily")

__all__ = ["DAY_STAGES", "Column", "DailyConfig", "DailyJob", "Stage", "main", "report_table", "run_daily"]


@dataclass
class DailyConfig:
    """Which days, where, and the templates of the three jobs (day-specific keys are set per day)."""

    data: str = "out/demo/data"  # a lumrec dataset with daily behaviours and impressions
    # Set: `data` is lumrec's synthetic logs of this config, generated there first when missing (so a
    # fresh clone runs the job with nothing prepared). None: `data` must already hold a dataset.
    synthetic: SynthConfig | None = None
    out: str = "out/daily"
    ds: str | None = None  # one day; or a range:
    start: str | None = None
    end: str | None = None
    with_lum: bool = True  # False: the DLRM alone (stages a and b are skipped): the daily baseline
    # (a) LUM pre-training. Per day: out, data.path, data.end, data.target_start, train.init_from, epochs.
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(model="lum"))
    epochs_per_day: int = 1
    bootstrap_epochs: int = 5  # the first day without lum_init: all history up to it, this many epochs
    lum_init: str | None = None  # the first day continues this LUM (a pretrain run's checkpoints/ folder) instead
    # (b) knowledge query. Per day: checkpoint, as_of_ds, store, users, carry_over_from.
    query: QueryConfig = field(default_factory=QueryConfig)
    full_refresh: bool = False
    # (c)+(d) ranking. Per day: data, out, the samples' days and split, lum.store, warm_start.
    rank: RankConfig = field(default_factory=RankConfig)
    rank_warm_start: WarmStartConfig | None = None  # the first day's DLRM (later days: D-1's)
    # A finished stage whose config changed in a way that changes its outputs: "none" refuses to go on;
    # "changed" recomputes it, the later stages of its day and every later day.
    redo: Literal["none", "changed"] = "none"
    # Set ("auto" | "cpu" | "cuda"): every stage runs there (pretrain.train.device, query.device, rank.train.device
    # and the ranks' process group); None: each stage's own key.
    device: str | None = None

    def __post_init__(self) -> None:
        check_days(self, "ds", "start", "end")
        if self.device is not None:
            check_device_setting(self.device, "device")
        check_at_least(self, 1, "epochs_per_day", "bootstrap_epochs")


class DailyJob(DriftChecks):
    """Runs the stages of a range of days over one output folder."""

    def __init__(self, cfg: DailyConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        # Under torchrun (N ranks) every rank runs every stage: training stages shard their models over
        # the ranks; single-writer work (the logs, the knowledge partition, manifests, reports) is rank 0's.
        self.ctx = None
        # The stages' device (daily `device`, else pre-training's): `cuda` without a GPU fails before any work.
        setting, key = (cfg.device, "device") if cfg.device is not None else (cfg.pretrain.train.device, "pretrain.train.device")
        self.device = resolve_device(setting, key)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.ctx = init_distributed(device=self.device)
        if cfg.synthetic is not None:
            self._ensure_synthetic(cfg.synthetic)
        self.data = Dataset(cfg.data)
        if not self.data.manifest_path.exists():
            raise FileNotFoundError(f"daily: {self.data.manifest_path} not found: `data` is not a lumrec dataset "
                                    "(import one with `lumrec import`, or set `synthetic` to generate the synthetic logs there)")
        self.store = self.out / "knowledge"
        self.tb = ScalarLog(self.out, enabled=self.is_main)  # per day: next-day metrics and stage seconds
        self.behaviour_days = self.data.days("behaviours")
        self.impression_days = self.data.days("impressions")
        if not self.impression_days:
            raise ValueError(f"{self.data.root}: no impressions partitions; the daily DLRM trains on impressions")

    def _ensure_synthetic(self, synth: SynthConfig) -> None:
        """Rank 0 generates the synthetic logs into `data` unless they are there; the others wait.

        A dataset of another origin at `data` is an error, never replaced: earlier days' outputs were built on it.
        """
        problem = None
        if self.is_main:
            try:
                # The dataset being written is locked like any other; the outcome travels to every rank
                # (a rank left out of the decision would wait forever in the next collective).
                with RunLock(self.cfg.data, "daily (synthetic logs)"):
                    made = generated_with(self.cfg.data, synth)
                    if made is None:
                        log.info("generating the synthetic logs (%s) into %s", synth, self.cfg.data)
                        generate(self.cfg.data, synth, progress=False)
                    elif not made:
                        problem = ("data", f"daily: {self.cfg.data} holds a dataset that was not generated with `synthetic` = "
                                           f"{asdict(synth)}; point `data` at another folder, or set `synthetic: null` to use the "
                                           "dataset as it is")
            except LockHeldError as err:
                problem = ("lock", str(err))
        problem = self._from_main(problem)
        if problem:
            kind, message = problem
            raise LockHeldError(message, self.cfg.data) if kind == "lock" else ValueError(message)

    @property
    def is_main(self) -> bool:
        return is_main(self.ctx)

    def _barrier(self) -> None:
        barrier(self.ctx)

    def _from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        return from_rank0(self.ctx, value)

    # -- days and stages ---------------------------------------------------------------------
    def days(self) -> list[str]:
        """The days to process, in order: `ds`, or the impression days in [start, end]."""
        c = self.cfg
        if c.ds is not None:
            if c.start is not None or c.end is not None:
                raise ValueError("daily: give ds or start/end, not both")
            wanted = [c.ds]
        elif c.start is not None and c.end is not None:
            if c.start > c.end:
                raise ValueError(f"daily: start {c.start} is after end {c.end}")
            wanted = [d for d in self.impression_days if c.start <= d <= c.end]
        else:
            raise ValueError("daily: give ds=YYYY-MM-DD or start=... end=...")
        missing = [d for d in wanted if d not in self.impression_days]
        if missing or not wanted:
            raise ValueError(f"daily: {self.data.root}/impressions has no partition for {missing or [c.start, c.end]}; "
                             f"it has {self.impression_days[0]}..{self.impression_days[-1]}")
        return wanted

    def day_dir(self, ds: str) -> Path:
        return self.out / "days" / f"ds={ds}"

    def stage_file(self, ds: str, stage: str) -> Path:
        return self.day_dir(ds) / "stages" / f"{stage}.json"

    def config_file(self, ds: str, stage: str) -> Path:
        """The resolved config the stage ran with (its digest is in the stage manifest)."""
        return self.day_dir(ds) / "stages" / f"{stage}.config.json"

    def stage_done(self, ds: str, stage: str) -> dict[str, Any] | None:
        """The manifest of a complete stage, or None."""
        path = self.stage_file(ds, stage)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: corrupt stage manifest ({err}); delete it to rerun the stage") from None

    def _finish_stage(self, ds: str, stage: str, result: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the stage's config, then its manifest last (both atomically): from now on the stage is complete."""
        failpoint(f"daily.{stage}.before_manifest")
        digest = {"config_digest": config_digest(config)} if config is not None else {}
        manifest = self._from_main({"ds": ds, "stage": stage, **result, **digest})
        if self.is_main:
            if config is not None:
                write_text_atomic(self.config_file(ds, stage), json.dumps(config, indent=2, sort_keys=True))
            write_text_atomic(self.stage_file(ds, stage), json.dumps(manifest, indent=2, sort_keys=True))
        self._barrier()  # no rank reads the stage as incomplete after this
        return manifest  # what a later run reads back for a complete stage: the report is the same either way

    def previous_day(self, ds: str) -> str | None:
        """The impression day before `ds` (the day whose models D continues from), or None for the first."""
        earlier = [d for d in self.impression_days if d < ds]
        return earlier[-1] if earlier else None

    def _require(self, ds: str, stage: str) -> dict[str, Any]:
        done = self.stage_done(ds, stage)
        if done is None:
            raise RuntimeError(f"daily: stage {stage} of {ds} is not complete ({self.stage_file(ds, stage)} missing); run that day first")
        return done

    def _continues(self, ds: str, stage: str) -> str | None:
        """The previous day if its `stage` is complete; None if no earlier day was ever processed; else an error."""
        prev = self.previous_day(ds)
        if prev is None or not self.day_dir(prev).exists():
            return None
        self._require(prev, stage)
        return prev

    # -- (a) pre-training -------------------------------------------------------------------
    def pretrain_config(self, ds: str) -> PretrainConfig:
        """The LUM pre-training job of day `ds`: D-1's checkpoint (or `lum_init`) continued on D's behaviours."""
        prev = self._continues(ds, "pretrain")
        source = str(self.day_dir(prev) / "lum" / "checkpoints") if prev is not None else self.cfg.lum_init
        cfg: PretrainConfig = copy.deepcopy(self.cfg.pretrain)
        cfg.out = str(self.day_dir(ds) / "lum")
        cfg.data.path = str(self.data.root)
        cfg.data.end = ds
        # Every event of the day trains: the next day tests it (stage d). A `data.protocol` the template
        # may name is replaced by this split, not refused as a contradiction.
        cfg.data.train_excludes_last, cfg.data.protocol = 0, None
        cfg.data.target_start = ds if source is not None else None
        cfg.train.init_from = source
        cfg.train.epochs = self.cfg.epochs_per_day if source is not None else self.cfg.bootstrap_epochs
        if self.cfg.device is not None:
            cfg.train.device = self.cfg.device
        return cfg

    def pretrain(self, ds: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """(a) Continue LUM pre-training from D-1's checkpoint with D's behaviours as targets."""
        prev = self._continues(ds, "pretrain")
        cfg = self.pretrain_config(ds)
        source = cfg.train.init_from
        trainer = Pretrainer(cfg)
        if source is not None and trainer.checkpoints.latest() is None:  # a fresh run loads `source` into this model
            found = shape_mismatches(checkpoint_shapes(source), trainer._state()["model"])  # DCP loads equal shapes only
            if found:
                raise self._shape_error(ds, "pretrain", prev, source, describe_mismatches(found), self.recorded_form(cfg),
                                        "start a new daily folder (out=...) whose first day pre-trains afresh (or continues a "
                                        "LUM of the new shape: lum_init)")
        result = trainer.run()
        summary = {"continued_from": prev or (source and "lum_init"), "steps": result["steps"], "train_users": result["train_users"],
                   "epochs": cfg.train.epochs, "train_minutes": result["train_minutes"], **_inexact(result)}
        if "table_init" in result:  # feature warm-up (first day only): which tables came from the DLRM
            summary["table_init_tables"] = result["table_init"]["tables"]
        return summary

    def _shape_error(self, ds: str, stage: str, prev: str | None, source: str, tensors: str, current: dict[str, Any],
                     migrate: str) -> ShapeMismatchError:
        """Day `ds`'s model does not fit the checkpoint it continues: the tensors, the keys changed since `prev`, what to do."""
        run = Path(source).parent  # a run's checkpoints/ folder, or one step-NNNNNNNN in it
        record = self.config_file(prev, stage) if prev is not None else (run.parent if run.name == "checkpoints" else run) / "config.json"
        try:
            saved = json.loads(record.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            saved = None
        what = f"day {prev}'s" if prev is not None else "lum_init's"
        return ShapeMismatchError(
            f"daily: day {ds}: {what} {'LUM' if stage == 'pretrain' else 'DLRM'} ({source}) does not fit this day's model"
            f"{shape_key_changes(stage, saved, current)}: {tensors}. A checkpoint continues only into the same shapes: set "
            f"the keys back to the values in {record}, or {migrate} (docs/operations.md, model changes between days)")

    # -- (b) knowledge query ----------------------------------------------------------------
    def query_config(self, ds: str) -> QueryConfig:
        """The knowledge query of day `ds`: D's LUM asked for D's active users (or everyone), the others carried over."""
        cfg: QueryConfig = copy.deepcopy(self.cfg.query)
        cfg.checkpoint = str(self.day_dir(ds) / "lum")
        cfg.checkpoint_kind = "latest"
        cfg.data = str(self.data.root)
        cfg.as_of_ds = ds
        cfg.store = str(self.store)
        previous = latest_as_of(self.store, ds)
        incremental = previous is not None and not self.cfg.full_refresh and ds in self.behaviour_days
        cfg.users = "active" if incremental else "all"
        cfg.carry_over_from = previous if incremental else None
        if self.cfg.device is not None:
            cfg.device = self.cfg.device
        return cfg

    def query(self, ds: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """(b) Refresh the knowledge as of D: the active users, the others carried over (or everyone)."""
        self._require(ds, "pretrain")
        cfg = self.query_config(ds)
        # Every rank answers a share of the users; rank 0 writes the partition (one writer).
        result = self._from_main(run_query(cfg, self.ctx))
        refreshed = result["users"]
        return {"refresh": "incremental" if cfg.users == "active" else "full", "refreshed_users": refreshed,
                "carried_over_users": result["carried_over"], "carry_over_from": cfg.carry_over_from,
                "total_users": refreshed + result["carried_over"], "conditions": result["conditions"],
                "model_version": result["model_version"], "seconds": result["seconds"],
                **({"redis_version": result["redis_version"]} if "redis_version" in result else {})}

    # -- (c) ranking ------------------------------------------------------------------------
    def rank_config(self, ds: str, eval_day: str | None = None) -> RankConfig:
        """The DLRM job of day `ds` (train on its impressions), or its evaluation on `eval_day`."""
        cfg: RankConfig = copy.deepcopy(self.cfg.rank)
        cfg.data = str(self.data.root)
        day = eval_day or ds
        cfg.samples.protocol = "impressions"
        cfg.samples.first_day = cfg.samples.last_day = day
        cfg.samples.split_mode = "all_test" if eval_day else "all_train"
        cfg.samples.test_start = cfg.samples.valid_start = None
        if self.cfg.with_lum:
            if cfg.lum is None:
                raise ValueError("daily: with_lum is true but rank.lum is not set (which conditions and features the DLRM gets)")
            cfg.lum.store = str(self.store)
            cfg.lum.as_of_ds = None  # per sample of day X: the newest partition before X
        else:
            cfg.lum = None
        cfg.out = str(self.day_dir(ds) / ("eval" if eval_day else "rank"))
        if eval_day is None:  # training: warm-started from D-1's DLRM, the first day from rank_warm_start
            prev = self._continues(ds, "rank")
            if prev is not None:
                cfg.warm_start = WarmStartConfig(source=str(self.day_dir(prev) / "rank" / "checkpoints"))
            else:
                cfg.warm_start = copy.deepcopy(self.cfg.rank_warm_start)
        if self.cfg.device is not None:
            cfg.train.device = self.cfg.device
        return cfg

    def rank(self, ds: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """(c) Train D's DLRM on D's impressions, warm-started from D-1's."""
        if self.cfg.with_lum:
            self._require(ds, "query")  # D's samples read D-1's knowledge; the order keeps days in sequence
        prev = self._continues(ds, "rank")
        cfg = self.rank_config(ds)
        try:
            result = run_rank(cfg)
        except WarmStartError as err:
            if prev is None or "cannot be carried over" not in str(err):
                raise  # rank_warm_start's, or an unreadable source: the error names it
            # The warm start names the tensors; its advice (name_map, exclude) is for a hand-written warm start.
            tensors = str(err).split(": ", 1)[-1].split(". Map names with", 1)[0]
            source = cfg.warm_start.source
            raise self._shape_error(ds, "rank", prev, source, tensors, self.recorded_form(cfg),
                                    f"start a new daily folder (out=...) whose first day warm-starts from this DLRM with "
                                    f"rank_warm_start: {{source: {source}, strict_shapes: false}} (equal shapes are copied, "
                                    "LUM input columns widen, the rest start afresh)") from None
        last = result["history"][-1]
        return {"warm_start": result.get("warm_start"), "train_samples": result["samples"]["train"]["samples"],
                "train_loss": last["train_loss"], "epochs": result["epochs_run"], "steps": result["steps"],
                "train_minutes": result["train_minutes"], **_inexact(result)}

    def eval_config(self, ds: str) -> RankConfig | None:
        """The next-day evaluation job of day `ds`, or None while D+1's impressions are not there."""
        nxt = self.next_day(ds)
        return self.rank_config(ds, eval_day=nxt) if nxt is not None else None

    # -- (d) next-day evaluation and the report ----------------------------------------------
    def next_day(self, ds: str) -> str | None:
        later = [d for d in self.impression_days if d > ds]
        return later[0] if later else None

    def evaluate(self, ds: str) -> dict[str, Any] | None:
        """Next-day metrics of D's DLRM, or None when D+1's impressions are not there yet."""
        self._require(ds, "rank")
        nxt = self.next_day(ds)
        if nxt is None:
            return None
        ranker = Ranker(self.rank_config(ds, eval_day=nxt))
        ckpt = CheckpointManager(self.day_dir(ds) / "rank" / "checkpoints", keep=0)
        step = ckpt.latest()
        if step is None:
            raise RuntimeError(f"{ckpt.root}: no complete checkpoint of day {ds}'s DLRM")
        # DCP loads in place: into plain tensors on one process, into each rank's shards on N (resharding if needed).
        state = {"model": ranker.model.state_dict()}
        ckpt.load(state, step)
        ranker.model.load_state_dict(state["model"])
        metrics = ranker.evaluate("test")
        return {"eval_day": nxt, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}

    def write_report(self, ds: str, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The day's report.json, then OUT/report.tsv rebuilt from every complete day's report (both atomic)."""
        report = {"ds": ds, **stages}
        if self.is_main:
            write_text_atomic(self.day_dir(ds) / "report.json", json.dumps(report, indent=2, sort_keys=True))
            failpoint("daily.report.written")
            self._write_table()
        self._barrier()
        return report

    def _write_table(self) -> None:
        """OUT/report.tsv rebuilt from every day's report.json (rank 0)."""
        reports = [json.loads(path.read_text()) for path in sorted((self.out / "days").glob("ds=*/report.json"))]
        write_text_atomic(self.out / "report.tsv", report_table(reports))

    def evaluate_and_report(self, ds: str, results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        """(d) Next-day metrics of D's DLRM and the day's report (written before the stage completes), or None: waiting."""
        metrics = self.evaluate(ds)
        if metrics is None:
            return None
        self.write_report(ds, {**results, "eval": metrics})
        return metrics

    # -- the loop ---------------------------------------------------------------------------
    def stages(self, every: bool = False) -> tuple[Stage, ...]:
        """The stages of a day in order (without LUM: those that need none; `every`: all of them)."""
        return tuple(s for s in DAY_STAGES if every or self.cfg.with_lum or not s.needs_lum)

    def run_day(self, ds: str, bar: Any = None, label: str = "") -> dict[str, Any]:
        """All stages of day `ds` that are not complete yet; returns the stage results and the day's status.

        `bar`: a progress bar advanced once per stage, described as `"<label>: <stage>"`.
        """
        results: dict[str, dict[str, Any]] = {}
        seconds: dict[str, float] = {}
        status = "complete"
        for stage in self.stages():
            if bar is not None:
                bar.set_description(f"{label}: {stage.name}")
            done = self.stage_done(ds, stage.name)
            if done is not None:
                log.info("%s %s: complete, skipped", ds, stage.name)
                results[stage.name] = done
            else:
                t0 = time.perf_counter()
                log.info("%s %s: running", ds, stage.name)
                config = self.stage_config(stage, ds)  # before it runs: what it runs with
                result = stage.run(self, ds, results)
                if result is None:
                    status = f"waiting for {stage.waits_for}"
                    log.info("%s %s: %s", ds, stage.name, status)
                    break
                results[stage.name] = self._finish_stage(ds, stage.name, result, config)
                seconds[stage.name] = time.perf_counter() - t0
                log.info("%s %s: done in %.1f s", ds, stage.name, seconds[stage.name])
            if bar is not None:
                bar.update(1)
        self._write_scalars(ds, results, seconds)
        return {"ds": ds, "status": status, **results}

    def _write_scalars(self, ds: str, results: dict[str, dict[str, Any]], seconds: dict[str, float]) -> None:
        """TensorBoard scalars of what this run did on day `ds`, at step = the day's index among the impression days."""
        step = self.impression_days.index(ds)
        for name, value in seconds.items():
            self.tb.scalar(f"seconds/{name}", value, step)
        if "eval" in seconds:
            metrics = ("auc", "ne", "calibration", "log_loss")
            self.tb.scalars("next_day", {k: v for k, v in results["eval"].items() if k in metrics}, step)
        self.tb.flush()

    @under_lock(lambda self: RunLock(self.out, "daily", self.ctx))  # its stages lock their own folders too
    def run(self) -> list[dict[str, Any]]:
        """Every day of the range in order; complete days are skipped. Returns one status per day."""
        days = self.days()
        stages = self.stages()
        self._finish_pending_redo()
        self._check_drift(days)
        if self.is_main:
            log_job_start("daily", data=f"{len(days)} day(s) {days[0]}..{days[-1]} of {self.data.root}", device=str(self.device),
                          threads=torch.get_num_threads(), lum="yes" if self.cfg.with_lum else "no",
                          ranks=self.ctx.world_size if self.ctx is not None else 1)
        bar = progress_bar(len(days) * len(stages), "daily", main_process=self.is_main, unit="stage")
        out = []
        try:
            for i, ds in enumerate(days, 1):
                if all(self.stage_done(ds, s.name) is not None for s in stages):
                    log.info("%s: complete, skipped", ds)
                    out.append({"ds": ds, "status": "skipped (complete)"})
                    bar.update(len(stages))
                    continue
                out.append(self.run_day(ds, bar, f"day {i}/{len(days)}"))
        finally:
            bar.close()
            self.tb.close()
        return out


@dataclass(frozen=True)
class Column:
    """A column of the report table: its header and a day's cell, made from the result of the column's stage."""

    name: str
    cell: Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class Stage:
    """One stage of a day: its name, whether it needs LUM, its work and its columns in the report table.

    `run(job, ds, results)` does the work for day `ds` (`results`: the day's earlier stages) and
    returns what the stage manifest records, or None while the day cannot complete (`waits_for`).
    A day without a stage's result shows "-" in its columns. `config(job, ds)` is the dataclass config it
    runs with (its digest goes into the manifest); `outputs(job, ds)` the files and folders it writes.
    """

    name: str
    run: Callable[[DailyJob, str, dict[str, dict[str, Any]]], dict[str, Any] | None]
    columns: tuple[Column, ...]
    needs_lum: bool = False
    waits_for: str = ""
    config: Callable[[DailyJob, str], Any] | None = None  # the job config the stage runs with on a day (recorded, compared)
    outputs: Callable[[DailyJob, str], list[Path]] | None = None  # what a redo removes besides the manifest and config


DAY_STAGES: tuple[Stage, ...] = (
    Stage("pretrain", DailyJob.pretrain, needs_lum=True, config=DailyJob.pretrain_config,
          outputs=lambda job, ds: [job.day_dir(ds) / "lum"], columns=(
        Column("lum_steps", lambda r: r.get("steps", "-")),
        Column("lum_users", lambda r: r.get("train_users", "-")),
    )),
    Stage("query", DailyJob.query, needs_lum=True, config=DailyJob.query_config,
          outputs=lambda job, ds: [partition_dir(job.store, ds) / KNOWLEDGE_MANIFEST, partition_dir(job.store, ds)], columns=(
        Column("refresh", lambda r: r.get("refresh", "-")),
        Column("refreshed", lambda r: r.get("refreshed_users", "-")),
        Column("carried", lambda r: r.get("carried_over_users", "-")),
    )),
    Stage("rank", DailyJob.rank, config=DailyJob.rank_config, outputs=lambda job, ds: [job.day_dir(ds) / "rank"], columns=(
        Column("rank_samples", lambda r: r["train_samples"]),
        Column("warm_start", lambda r: "yes" if r.get("warm_start") else "no"),
        Column("train_loss", lambda r: f"{r['train_loss']:.4f}"),
    )),
    Stage("eval", DailyJob.evaluate_and_report, waits_for="next day", config=DailyJob.eval_config,
          outputs=lambda job, ds: [job.day_dir(ds) / "report.json", job.day_dir(ds) / "eval"], columns=(
        Column("eval_day", lambda r: r["eval_day"]),
        Column("next_day_auc", lambda r: f"{r['auc']:.4f}"),
        Column("ne", lambda r: f"{r['ne']:.4f}"),
        Column("calibration", lambda r: f"{r['calibration']:.4f}"),
    )),
)


def report_table(reports: list[dict[str, Any]]) -> str:
    """The cumulative per-day table (tab-separated, one line per complete day): `ds`, then every stage's columns."""
    lines = ["\t".join(["ds"] + [c.name for stage in DAY_STAGES for c in stage.columns])]
    for r in sorted(reports, key=lambda r: r["ds"]):
        cells = [r["ds"]] + [c.cell(r[stage.name]) if stage.name in r else "-" for stage in DAY_STAGES for c in stage.columns]
        lines.append("\t".join(str(cell) for cell in cells))
    return "\n".join(lines) + "\n"


def _inexact(result: dict[str, Any]) -> dict[str, Any]:
    """A training run's declaration that a resume changed its thread count (its weights are not bit-identical), if any."""
    return {k: result[k] for k in ("bit_identical_resume", "threads") if k in result}


def run_daily(cfg: DailyConfig) -> list[dict[str, Any]]:
    """Process `cfg`'s days in order (complete days skipped); returns one status per day."""
    return DailyJob(cfg).run()


def main(args: argparse.Namespace) -> int:
    """`lumrec daily CONFIG [ds=... | start=... end=...] [key=value ...]`."""
    cfg = load_config(DailyConfig, args.config, overrides=args.overrides)
    statuses = run_daily(cfg)
    # A day waiting for the next day's data is no failure, but a scheduler must tell it from "done": rerun later.
    code = EXIT_WAITING if any(s["status"].startswith("waiting") for s in statuses) else 0
    if os.environ.get("RANK", "0") != "0":
        return code  # rank 0 prints
    table = Path(cfg.out) / "report.tsv"
    if table.exists():
        print(table.read_text().rstrip())
    print(json.dumps([{"ds": s["ds"], "status": s["status"]} for s in statuses]))
    return code
