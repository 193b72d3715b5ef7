"""Config drift: a finished daily day rerun with a changed config is refused (or redone with redo=changed), a next day
whose model shapes differ from the checkpoint it continues gets a named error, and a training run resumed with another
thread count declares that its weights are not bit-identical."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lumrec.config import apply_override, from_dict
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.errors import EXIT_CHECKPOINT, EXIT_USER
from lumrec.knowledge import knowledge_days
from lumrec.pipelines.daily import DailyConfig, run_daily
from lumrec.pipelines.daily_drift import (DriftError, RedoJournal, ShapeMismatchError, config_digest, redo_targets,
                                          stage_drift)
from lumrec.pipelines.pretrain import DataConfig, PretrainConfig, Pretrainer, TrainConfig

from daily_helpers import tiny_daily_config  # noqa: E402 - shared by the daily tests

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
STAGES = ("pretrain", "query", "rank", "eval")


def _config(data: str) -> dict:
    return tiny_daily_config(data, checkpoint_every_steps=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The synthetic logs and a daily folder with days 2 and 3 complete (day 4 has no next day)."""
    root = tmp_path_factory.mktemp("drift")
    data = root / "data"
    generate(data, SynthConfig(seed=5, num_users=40, num_items=30, num_categories=3, num_queries=4, num_days=4,
                               impressions_per_user_day=6), progress=False)
    threads = torch.get_num_threads()
    statuses = _run(root, root / "base", start=DAYS[1], end=DAYS[2])
    torch.set_num_threads(threads)
    assert [s["status"] for s in statuses] == ["complete", "complete"]
    return root


def _daily_config(root: Path, out: Path, *overrides: str, **days: str) -> DailyConfig:
    data = {**_config(str(root / "data")), "out": str(out), **days}
    for item in overrides:
        apply_override(data, item)
    return from_dict(DailyConfig, data, source="test")


def _run(root: Path, out: Path, *overrides: str, **days: str) -> list[dict]:
    threads = torch.get_num_threads()
    try:
        return run_daily(_daily_config(root, out, *overrides, **days))
    finally:
        torch.set_num_threads(threads)  # the jobs set it process-wide


def _copy(world: Path, name: str) -> Path:
    """A copy of the base daily folder elsewhere (recorded paths are relative to the folder, so it is the same run)."""
    out = world / name
    shutil.copytree(world / "base", out)
    return out


def _manifest(out: Path, ds: str, stage: str) -> Path:
    return out / "days" / f"ds={ds}" / "stages" / f"{stage}.json"


def test_each_stage_records_its_config_and_digest(world):
    out = world / "base"
    for ds in DAYS[1:3]:
        for stage in STAGES:
            manifest = json.loads(_manifest(out, ds, stage).read_text())
            recorded = json.loads((out / "days" / f"ds={ds}" / "stages" / f"{stage}.config.json").read_text())
            assert manifest["config_digest"] == config_digest(recorded)
            assert str(out) not in json.dumps(recorded)  # paths inside the folder are written $OUT/...
    rank = json.loads((out / "days" / f"ds={DAYS[2]}" / "stages" / "rank.config.json").read_text())
    assert rank["out"] == f"$OUT/days/ds={DAYS[2]}/rank" and rank["train"]["lr"] == 0.01
    assert rank["warm_start"]["source"] == f"$OUT/days/ds={DAYS[1]}/rank/checkpoints"


def test_a_changed_config_is_refused_naming_day_and_keys(world):
    out = _copy(world, "refused")
    with pytest.raises(DriftError) as err:
        _run(world, out, "rank.train.lr=0.02", "rank.sizes.mlp=[16]", start=DAYS[1], end=DAYS[2])
    text = str(err.value)
    assert f"day {DAYS[1]} was run with another config (stage rank: rank.sizes.mlp [8] -> [16], rank.train.lr 0.01 -> 0.02)" in text
    assert f"later days changed too: {DAYS[2]} (stage rank:" in text and "redo=changed" in text
    # Nothing was touched.
    assert _manifest(out, DAYS[1], "rank").exists() and _manifest(out, DAYS[2], "eval").exists()
    # The command says it in one line, with the user-error exit code.
    config = world / "daily.yaml"
    config.write_text(yaml.safe_dump(_config(str(world / "data"))))
    run = subprocess.run([sys.executable, "-m", "lumrec.cli", "daily", str(config), f"out={out}", f"ds={DAYS[2]}",
                          "bootstrap_epochs=3", "epochs_per_day=2"],
                         capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "LUMREC_FAILPOINTS"})
    assert run.returncode == EXIT_USER, run.stderr[-2000:]
    error = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and error[0].startswith("lumrec daily: error: daily: ")
    # epochs_per_day reaches the day's pre-training as train.epochs (the first day of a folder uses bootstrap_epochs).
    assert f"day {DAYS[2]} was run with another config (stage pretrain: pretrain.train.epochs 1 -> 2)" in error[0]


def test_keys_that_do_not_change_outputs_are_allowed(world, caplog):
    out = _copy(world, "neutral")
    with caplog.at_level(logging.INFO, logger="lumrec.daily"):
        statuses = _run(world, out, "rank.train.threads=2", "rank.train.log_every_steps=5", "query.progress=true",
                        "pretrain.train.keep_checkpoints=3", start=DAYS[1], end=DAYS[2])
    assert [s["status"] for s in statuses] == ["skipped (complete)"] * 2
    assert f"{DAYS[1]}: kept as it ran (stage rank: rank.train.log_every_steps" in caplog.text


def test_redo_changed_recomputes_the_day_and_invalidates_later_days(world):
    out = _copy(world, "redo")
    kept = {stage: _manifest(out, DAYS[1], stage).read_text() for stage in ("pretrain", "query")}
    old_rank = json.loads(_manifest(out, DAYS[1], "rank").read_text())
    statuses = _run(world, out, "rank.train.lr=0.02", "redo=changed", ds=DAYS[1])
    assert [s["status"] for s in statuses] == ["complete"]
    # Day 2: pretrain and query kept as they were, rank and eval recomputed afresh with the new value.
    assert {stage: _manifest(out, DAYS[1], stage).read_text() for stage in ("pretrain", "query")} == kept
    rank = json.loads(_manifest(out, DAYS[1], "rank").read_text())
    assert rank["config_digest"] != old_rank["config_digest"] and rank["train_loss"] != old_rank["train_loss"]
    run_folder = out / "days" / f"ds={DAYS[1]}" / "rank"
    assert json.loads((run_folder / "config.json").read_text())["train"]["lr"] == 0.02  # a resume would have refused it
    # Day 3 continued day 2's DLRM: its rank and eval are gone until it runs again; its LUM and knowledge stay.
    assert _manifest(out, DAYS[2], "pretrain").exists() and _manifest(out, DAYS[2], "query").exists()
    assert not _manifest(out, DAYS[2], "rank").exists() and not (out / "days" / f"ds={DAYS[2]}" / "rank").exists()
    assert not (out / "days" / f"ds={DAYS[2]}" / "report.json").exists()
    assert [line.split("\t")[0] for line in (out / "report.tsv").read_text().splitlines()[1:]] == [DAYS[1]]
    assert knowledge_days(out / "knowledge") == DAYS[1:3] and not (out / "redo.json").exists()
    statuses = _run(world, out, "rank.train.lr=0.02", start=DAYS[1], end=DAYS[2])
    assert [s["status"] for s in statuses] == ["skipped (complete)", "complete"]


def test_a_redo_cut_short_is_finished_by_the_next_run(world):
    """A killed redo leaves its journal: the next run removes what the redo names, with or without the flag."""
    out = _copy(world, "journal")
    report = (out / "days" / f"ds={DAYS[2]}" / "report.json").read_text()
    RedoJournal(out).start([(DAYS[2], "eval")])
    statuses = _run(world, out, start=DAYS[1], end=DAYS[2])
    assert [s["status"] for s in statuses] == ["skipped (complete)", "complete"]
    assert not (out / "redo.json").exists()
    # The evaluation ran again on the same DLRM: the same report apart from its timing.
    again = json.loads((out / "days" / f"ds={DAYS[2]}" / "report.json").read_text())
    assert again["eval"] == json.loads(report)["eval"]


def test_a_redo_killed_midway_is_finished_by_the_next_run(world):
    """SIGKILL after the redo removed the manifests, before the outputs: the rerun (no flag) finishes it and runs the days."""
    out = _copy(world, "killed-redo")
    config = world / "daily-killed.yaml"
    config.write_text(yaml.safe_dump({**_config(str(world / "data")), "out": str(out)}))
    env = {k: v for k, v in os.environ.items() if k != "LUMREC_FAILPOINTS"}

    def daily(*extra: str, failpoints: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lumrec.cli", "daily", str(config), "rank.train.lr=0.02", *extra],
                              capture_output=True, text=True, timeout=300,
                              env={**env, "LUMREC_FAILPOINTS": failpoints} if failpoints else env)

    killed = daily(f"ds={DAYS[1]}", "redo=changed", failpoints="daily.redo.manifests_removed")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "redo.json").exists() and not _manifest(out, DAYS[1], "rank").exists()
    assert (out / "days" / f"ds={DAYS[1]}" / "rank" / "checkpoints").exists()  # the old DLRM, not yet removed
    done = daily(f"start={DAYS[1]}", f"end={DAYS[2]}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finishing the redo a killed run started" in done.stderr and not (out / "redo.json").exists()
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [{"ds": DAYS[1], "status": "complete"},
                                                                 {"ds": DAYS[2], "status": "complete"}]
    for ds in DAYS[1:3]:
        assert json.loads((out / "days" / f"ds={ds}" / "stages" / "rank.config.json").read_text())["train"]["lr"] == 0.02


def test_a_next_day_with_other_model_shapes_is_a_named_error(world):
    out = _copy(world, "shapes")
    with pytest.raises(ShapeMismatchError) as err:
        _run(world, out, "pretrain.model_config.d_model=16", "pretrain.model_config.ffn_dim=32", ds=DAYS[3])
    text = str(err.value)
    lum = out / "days" / f"ds={DAYS[2]}" / "lum" / "checkpoints"
    assert text.startswith(f"daily: day {DAYS[3]}: day {DAYS[2]}'s LUM ({lum}) does not fit this day's model "
                           "(pretrain.model_config.d_model 8 -> 16, pretrain.model_config.ffn_dim 16 -> 32): ")
    assert "ffn_in.weight: saved [16, 8], new [32, 16]" in text
    assert f"days/ds={DAYS[2]}/stages/pretrain.config.json" in text and "new daily folder" in text
    assert err.value.exit_code == EXIT_CHECKPOINT
    # The DLRM: day 4's pre-training and query run, its ranker does not fit day 3's.
    with pytest.raises(ShapeMismatchError) as err:
        _run(world, out, "rank.sizes.embedding_dim=8", ds=DAYS[3])
    text = str(err.value)
    dlrm = out / "days" / f"ds={DAYS[2]}" / "rank" / "checkpoints"
    assert text.startswith(f"daily: day {DAYS[3]}: day {DAYS[2]}'s DLRM ({dlrm}) does not fit this day's model "
                           "(rank.sizes.embedding_dim 4 -> 8): ")
    assert "embedding_bags.t_item.weight: shape [31, 4] in the source vs [31, 8] in the target" in text
    assert f"rank_warm_start: {{source: {dlrm}, strict_shapes: false}}" in text and "Map names" not in text


def test_stage_drift_and_redo_targets():
    saved = {"train": {"lr": 0.01, "threads": 1}, "out": "$OUT/x"}
    assert stage_drift("d", "rank", saved, config_digest(saved), saved) is None
    missing = stage_drift("d", "rank", None, config_digest(saved), {**saved, "out": "$OUT/y"})
    assert list(missing.changes)[0].startswith("(config digest") and "recorded config is missing" in missing.describe()
    tampered = stage_drift("d", "query", {"threads": 3}, config_digest(saved), {"threads": 2})
    assert "does not match the manifest's digest" in tampered.describe()
    # A key added since the stage ran: no drift at its default, a change away from it.
    grown, defaults = {**saved, "train": {**saved["train"], "precision": "fp32"}}, {"train": {"lr": 0.001, "threads": 0, "precision": "fp32"}}
    assert stage_drift("d", "rank", saved, config_digest(saved), grown, defaults) is None
    assert stage_drift("d", "rank", saved, config_digest(saved), grown)  # without defaults: absent -> fp32 counts
    moved = stage_drift("d", "rank", saved, config_digest(saved), {**saved, "train": {**saved["train"], "precision": "bf16"}}, defaults)
    assert moved.changes == {"train.precision": ("fp32", "bf16")}
    assert redo_targets([("d2", "eval"), ("d3", "pretrain")], ["d1", "d2", "d3"], list(STAGES)) == [
        ("d2", "eval"), ("d3", "pretrain"), ("d3", "query"), ("d3", "rank"), ("d3", "eval")]


# -- thread counts on resume ----------------------------------------------------------------------


def _pretrain(world: Path, out: Path, threads: int) -> PretrainConfig:
    return PretrainConfig(
        model="lum", out=str(out),
        data=DataConfig(path=str(world / "data"), max_len=16, condition_features=["scenario"], item_features=["item_id"]),
        train=TrainConfig(seed=0, epochs=1, rows_per_batch=8, lr=0.003, num_negatives=8, threads=threads, eval_every_epochs=10000,
                          checkpoint_every_steps=2, log_every_steps=1000),
        model_config={"d_model": 8, "num_layers": 1, "num_heads": 1, "ffn_dim": 16},
    )


def test_a_resume_with_another_thread_count_is_declared(world, caplog):
    """Allowed (a resumed job may land on another machine), but declared: a WARNING and results.json say so."""
    threads = torch.get_num_threads()
    try:
        same = world / "threads-same"
        assert Pretrainer(_pretrain(world, same, 1)).run(max_steps=2)["stopped"] == "max_steps"
        result = Pretrainer(_pretrain(world, same, 1)).run()
        assert result["resumed_from_step"] == 2 and "bit_identical_resume" not in result

        other = world / "threads-other"
        Pretrainer(_pretrain(world, other, 1)).run(max_steps=2)
        with caplog.at_level(logging.WARNING, logger="lumrec.train"):
            result = Pretrainer(_pretrain(world, other, 2)).run()
        assert result["resumed_from_step"] == 2
        assert result["bit_identical_resume"] is False and result["threads"] == [1, 2]
        assert json.loads((other / "results.json").read_text())["threads"] == [1, 2]
        assert "resumed with 2 torch threads, its checkpoint was trained with 1" in caplog.text
        assert "train.threads=1" in caplog.text
    finally:
        torch.set_num_threads(threads)
