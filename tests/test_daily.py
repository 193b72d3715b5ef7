"""The daily pipeline: stages in order, incremental knowledge refresh, warm start between days, and exactly once:
a job killed (SIGKILL, via lumrec.faults failpoints) inside every stage, then rerun, ends with the same
checkpoints, knowledge and reports as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lumrec.config import from_dict
from lumrec.data.dataset import Dataset
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.faults import parse_failpoints
from lumrec.knowledge import knowledge_days, load_knowledge
from lumrec.modules.warm_start import load_source_state
from lumrec.pipelines.daily import DAY_STAGES, Column, DailyConfig, DailyJob, Stage, report_table

from daily_helpers import tiny_daily_config  # noqa: E402 - shared by the daily tests

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
# Keys whose values are wall-clock times: everything else must be equal across runs.
TIMING_KEYS = {"train_minutes", "seconds"}


def _config(data: str) -> dict:
    return tiny_daily_config(data, checkpoint_every_steps=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("daily")
    data = root / "data"
    generate(data, SynthConfig(seed=5, num_users=40, num_items=30, num_categories=3, num_queries=4, num_days=4,
                               impressions_per_user_day=6), progress=False)
    config = root / "daily.yaml"
    config.write_text(yaml.safe_dump(_config(str(data))))
    return root, config


def _daily(config: Path, out: Path, *extra: str, failpoints: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LUMREC_FAILPOINTS"}
    if failpoints:
        env["LUMREC_FAILPOINTS"] = failpoints
    return subprocess.run(
        [sys.executable, "-m", "lumrec.cli", "daily", str(config), f"out={out}", f"start={DAYS[1]}", f"end={DAYS[2]}", *extra],
        env=env, capture_output=True, text=True, timeout=300,
    )


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}  # model_version: the weights' digest, compared
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def _outputs(out: Path) -> dict:
    """Everything a day leaves behind that must not depend on interruptions."""
    found: dict = {"table": (out / "report.tsv").read_text(), "knowledge_days": knowledge_days(out / "knowledge")}
    for ds in (DAYS[1], DAYS[2]):
        day = out / "days" / f"ds={ds}"
        # Paths name the run's own folder (e.g. the warm start's source): compare them relative to it.
        found[f"report {ds}"] = _strip_timing(json.loads((day / "report.json").read_text().replace(str(out), "OUT")))
        for stage in ("pretrain", "query", "rank", "eval"):
            found[f"{stage} {ds}"] = _strip_timing(json.loads((day / "stages" / f"{stage}.json").read_text().replace(str(out), "OUT")))
        found[f"lum {ds}"] = load_source_state(day / "lum" / "checkpoints")
        found[f"rank {ds}"] = load_source_state(day / "rank" / "checkpoints")
        lookup = load_knowledge(out / "knowledge", ds)
        found[f"knowledge {ds}"] = lookup.user_table(lookup.conditions)
    return found


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if key.startswith(("lum ", "rank ")):
            assert x.keys() == y.keys(), key
            for name in x:
                assert torch.equal(x[name], y[name]), f"{key}: {name}"
        elif key.startswith("knowledge "):
            assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]), key
        else:
            assert x == y, key


@pytest.fixture(scope="module")
def reference(world):
    root, config = world
    out = root / "uninterrupted"
    done = _daily(config, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_days_run_in_order_with_incremental_refresh_and_warm_start(reference):
    out, done = reference
    table = (out / "report.tsv").read_text().splitlines()
    assert table[0].split("\t")[:3] == ["ds", "lum_steps", "lum_users"]
    assert [line.split("\t")[0] for line in table[1:]] == [DAYS[1], DAYS[2]]
    first = json.loads((out / "days" / f"ds={DAYS[1]}" / "report.json").read_text())
    second = json.loads((out / "days" / f"ds={DAYS[2]}" / "report.json").read_text())
    # Day 1 bootstraps the LUM on all history and queries everyone; day 2 continues and refreshes the active users only.
    assert first["pretrain"]["continued_from"] is None and second["pretrain"]["continued_from"] == DAYS[1]
    assert first["query"]["refresh"] == "full" and first["query"]["carried_over_users"] == 0
    assert second["query"]["refresh"] == "incremental"
    assert second["query"]["refreshed_users"] > 0 and second["query"]["carried_over_users"] > 0
    assert second["query"]["total_users"] >= first["query"]["total_users"]
    # Day 2's DLRM starts from day 1's; day 1's from scratch (no rank_warm_start configured).
    assert first["rank"]["warm_start"] is None
    assert second["rank"]["warm_start"]["copied"] > 0 and second["rank"]["warm_start"]["missing"] == []
    assert second["eval"]["eval_day"] == DAYS[3] and 0.0 < second["eval"]["auc"] < 1.0
    # The knowledge as of each processed day exists; samples of day D read D-1's (latest before D).
    assert knowledge_days(out / "knowledge") == [DAYS[1], DAYS[2]]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [{"ds": DAYS[1], "status": "complete"}, {"ds": DAYS[2], "status": "complete"}]


def test_carried_over_users_keep_their_vectors(world, reference):
    root, _ = world
    out, _ = reference
    old, new = load_knowledge(out / "knowledge", DAYS[1]), load_knowledge(out / "knowledge", DAYS[2])
    old_ids, old_vecs = old.user_table(old.conditions)
    new_ids, new_vecs = new.user_table(old.conditions)
    active = set(Dataset(root / "data").read_days("behaviours", start=DAYS[2], end=DAYS[2]).column("user_id").to_pylist())
    new_row = {u: i for i, u in enumerate(new_ids.tolist())}
    carried = [u for u in old_ids.tolist() if u not in active]
    report = json.loads((out / "days" / f"ds={DAYS[2]}" / "report.json").read_text())["query"]
    assert report["carried_over_users"] == len(carried) and report["refreshed_users"] == len(active)
    for i, u in enumerate(old_ids.tolist()):
        if u not in active:
            assert torch.equal(old_vecs[i], new_vecs[new_row[u]]), u
    # The refreshed users were asked the continued model: their answers moved.
    moved = [u for i, u in enumerate(old_ids.tolist()) if u in active and not torch.equal(old_vecs[i], new_vecs[new_row[u]])]
    assert len(moved) == len(active & set(old_ids.tolist()))


def test_complete_days_are_skipped(world, reference):
    out, _ = reference
    before = (out / "report.tsv").read_text()
    again = _daily(world[1], out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1]) == [
        {"ds": DAYS[1], "status": "skipped (complete)"}, {"ds": DAYS[2], "status": "skipped (complete)"}]
    assert (out / "report.tsv").read_text() == before


def test_tensorboard_scalars_per_day(reference):
    """Next-day metrics and stage seconds at step = the day's index among the impression days; query's under the store."""
    out, _ = reference
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    for tag in ("next_day/auc", "next_day/ne", "next_day/calibration"):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2], tag  # DAYS[1], DAYS[2]
        for s, ds in zip(scalars, DAYS[1:3]):
            metric = json.loads((out / "days" / f"ds={ds}" / "report.json").read_text())["eval"][tag.split("/")[1]]
            assert s.value == pytest.approx(metric, abs=1e-6), (tag, ds)
    for stage in ("pretrain", "query", "rank", "eval"):
        assert [s.step for s in events.Scalars(f"seconds/{stage}")] == [1, 2], stage
    query = EventAccumulator(str(out / "knowledge" / "tb"))
    query.Reload()
    refreshed = [json.loads((out / "days" / f"ds={ds}" / "report.json").read_text())["query"]["refreshed_users"] for ds in DAYS[1:3]]
    assert [s.value for s in query.Scalars("query/users")] == refreshed


# The report table as a list of (header, cell of a day's report): the columns the table has always had.
TABLE_REFERENCE = (
    ("ds", lambda r: r["ds"]),
    ("lum_steps", lambda r: r.get("pretrain", {}).get("steps", "-")),
    ("lum_users", lambda r: r.get("pretrain", {}).get("train_users", "-")),
    ("refresh", lambda r: r.get("query", {}).get("refresh", "-")),
    ("refreshed", lambda r: r.get("query", {}).get("refreshed_users", "-")),
    ("carried", lambda r: r.get("query", {}).get("carried_over_users", "-")),
    ("rank_samples", lambda r: r["rank"]["train_samples"]),
    ("warm_start", lambda r: "yes" if r["rank"].get("warm_start") else "no"),
    ("train_loss", lambda r: f"{r['rank']['train_loss']:.4f}"),
    ("eval_day", lambda r: r["eval"]["eval_day"]),
    ("next_day_auc", lambda r: f"{r['eval']['auc']:.4f}"),
    ("ne", lambda r: f"{r['eval']['ne']:.4f}"),
    ("calibration", lambda r: f"{r['eval']['calibration']:.4f}"),
)


def _reports() -> list[dict]:
    with_lum = {"ds": DAYS[2], "pretrain": {"steps": 4, "train_users": 19}, "query": {"refresh": "incremental", "refreshed_users": 19,
                "carried_over_users": 21}, "rank": {"train_samples": 290, "warm_start": {"copied": 3}, "train_loss": 0.48871},
                "eval": {"eval_day": DAYS[3], "auc": 0.600014, "ne": 0.98889, "calibration": 1.121825}}
    without = {"ds": DAYS[1], "rank": {"train_samples": 180, "warm_start": None, "train_loss": 0.57244},
               "eval": {"eval_day": DAYS[2], "auc": 0.396988, "ne": 1.309617, "calibration": 2.47377}}
    return [with_lum, without]


def test_the_stage_list_drives_the_report_table(monkeypatch):
    reports = _reports()
    expected = ["\t".join(name for name, _ in TABLE_REFERENCE)]
    expected += ["\t".join(str(cell(r)) for _, cell in TABLE_REFERENCE) for r in sorted(reports, key=lambda r: r["ds"])]
    assert report_table(reports) == "\n".join(expected) + "\n"  # byte for byte
    assert report_table(reports).splitlines()[1].split("\t")[1:6] == ["-"] * 5  # a day without LUM
    assert [s.name for s in DAY_STAGES] == ["pretrain", "query", "rank", "eval"]
    # A stage added to the list adds its columns to the table (and "-" for days without its result).
    extra = Stage("serve", DailyJob.rank, columns=(Column("qps", lambda r: r["qps"]),))
    monkeypatch.setattr("lumrec.pipelines.daily.DAY_STAGES", DAY_STAGES + (extra,))
    lines = report_table([{**reports[0], "serve": {"qps": 12}}, reports[1]]).splitlines()
    assert lines[0].endswith("\tcalibration\tqps") and lines[1].endswith("\t-") and lines[2].endswith("\t12")


def test_stages_without_lum():
    job = object.__new__(DailyJob)
    job.cfg = DailyConfig(with_lum=False)
    assert [s.name for s in job.stages()] == ["rank", "eval"]
    job.cfg = DailyConfig()
    assert [s.name for s in job.stages()] == ["pretrain", "query", "rank", "eval"]


# Each run of the chain is killed at the next point; every stage is hit, mid-work and between its output and its manifest.
KILL_CHAIN = [
    "pretrain.step@4",               # day 1, bootstrap pre-training, between checkpoints
    "daily.pretrain.before_manifest",
    "knowledge.users_written@2",     # day 1's query, half-written partition
    "daily.query.before_manifest",   # partition committed, stage not
    "rank.step@3",                   # day 1's DLRM, mid-epoch
    "daily.rank.before_manifest",
    "daily.report.written",          # day 1's report written, table and eval manifest not
    "daily.eval.before_manifest",
    "pretrain.step@2",               # day 2, continued pre-training (resumes its own checkpoint, not D-1's)
    "knowledge.users_written@1",     # day 2's incremental query
    "rank.step@1",                   # day 2's warm-started DLRM before its first checkpoint
]


def test_killed_anywhere_then_rerun_equals_uninterrupted(world, reference):
    root, config = world
    out = root / "killed"
    for point in KILL_CHAIN:
        run = _daily(config, out, failpoints=point)
        assert run.returncode == -9, f"{point}: expected a SIGKILL, got {run.returncode}\n{run.stderr[-3000:]}"
    final = _daily(config, out)
    assert final.returncode == 0, final.stderr[-3000:]
    _assert_same(_outputs(reference[0]), _outputs(out))


def test_failpoint_spec_parsing():
    assert parse_failpoints("a, b@3,,c@1") == {"a": 1, "b": 3, "c": 1}
    with pytest.raises(ValueError, match="name@N"):
        parse_failpoints("a@x")
    with pytest.raises(ValueError, match=">= 1"):
        parse_failpoints("a@0")


def test_bad_day_arguments_name_the_problem(world):
    root, config = world
    run = subprocess.run([sys.executable, "-m", "lumrec.cli", "daily", str(config), f"out={root / 'bad'}", "ds=2030-01-01"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "impressions has no partition" in run.stderr


def test_synthetic_logs_are_generated_when_missing_and_never_replaced(tmp_path):
    """`synthetic` makes a fresh clone's job self-contained; a dataset of another origin is an error, not overwritten."""
    tiny = {"seed": 5, "num_users": 40, "num_items": 30, "num_categories": 3, "num_queries": 4, "num_days": 4,
            "impressions_per_user_day": 6}
    keys = {**_config(str(tmp_path / "logs")), "out": str(tmp_path / "out"), "synthetic": tiny}
    job = DailyJob(from_dict(DailyConfig, keys, source="test"))
    assert job.impression_days == DAYS
    made = Dataset(tmp_path / "logs").read_meta().extra["config"]
    assert made == asdict(SynthConfig(**tiny))
    stamp = Dataset(tmp_path / "logs").manifest_path.stat().st_mtime_ns
    DailyJob(from_dict(DailyConfig, keys, source="test"))  # the same logs: reused as they are
    assert Dataset(tmp_path / "logs").manifest_path.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="not generated with `synthetic`"):
        DailyJob(from_dict(DailyConfig, {**keys, "synthetic": {**tiny, "seed": 6}}, source="test"))
    with pytest.raises(FileNotFoundError, match="not a lumrec dataset"):
        DailyJob(from_dict(DailyConfig, {**keys, "data": str(tmp_path / "nothing"), "synthetic": None}, source="test"))
