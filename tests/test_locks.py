"""Run-folder locks and leftovers, with real processes and real files: a second job on a locked folder stops at once
naming the holder, a killed holder's lock is free, and a job's start removes what killed writers left in its folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lumrec.checkpoint import CheckpointManager
from lumrec.data.importers import run_import
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.errors import EXIT_LOCK_HELD
from lumrec.faults import ENV as FAILPOINTS
from lumrec.knowledge import knowledge_days, load_knowledge, write_knowledge
from lumrec.locks import (BREAK_ENV, LOCK_FILE, LockHeldError, LockInfo, RunLock, held_here, lock_holder, remove_leftovers,
                          stale_lock_refusal)
from lumrec.pipelines.daily import DailyConfig, DailyJob
from lumrec.pipelines.query import QueryConfig, run_query
from rank_spawn import become_rank, free_port, join_ranks, spawn_ranks  # tests/rank_spawn.py

# Holds FOLDER's lock as job "holder" with an unfinished save of its own in it, until RELEASE exists.
HOLD = """
import sys, time, pathlib
from lumrec.locks import RunLock
folder, ready, release = map(pathlib.Path, sys.argv[1:4])
with RunLock(folder, "holder"):
    (folder / "checkpoints" / ".tmp-step-00000005-0123abcd").mkdir(parents=True)
    ready.touch()
    while not release.exists():
        time.sleep(0.05)
    (folder / "holder-finished").write_text("ok")
"""

# A pretrain-like job killed (SIGKILL) in the middle of a checkpoint save, holding FOLDER's lock.
KILLED_SAVE = """
import os, signal, sys, torch
from lumrec.checkpoint import CheckpointManager
from lumrec.locks import RunLock

class KillDuringSave:
    def state_dict(self):
        os.kill(os.getpid(), signal.SIGKILL)
    def load_state_dict(self, state):
        pass

with RunLock(sys.argv[1], "pretrain"):
    CheckpointManager(os.path.join(sys.argv[1], "checkpoints")).save(3, {"w": torch.zeros(2), "killer": KillDuringSave()})
"""

CONDS = ["scenario=1", "scenario=2"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (FAILPOINTS, BREAK_ENV)}
    env.update(extra)
    return env


class Holder:
    """A separate process holding a folder's lock until `release()`."""

    def __init__(self, folder: Path, scratch: Path) -> None:
        self.ready, self.done = scratch / "ready", scratch / "release"
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(self.ready), str(self.done)], env=_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "the holder did not take the lock"
            time.sleep(0.05)

    def release(self) -> int:
        self.done.touch()
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("locks") / "data"
    generate(path, SynthConfig(seed=3, num_users=40, num_items=30, num_categories=3, num_queries=4, num_days=3,
                               impressions_per_user_day=4), progress=False)
    return path


def _pretrain_config(tmp_path: Path, data: Path) -> Path:
    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump({
        "model": "sasrec", "out": "unused",
        "data": {"path": str(data), "max_len": 16},
        "train": {"seed": 0, "epochs": 1, "rows_per_batch": 8, "num_negatives": 8, "threads": 1, "checkpoint_every_steps": 2,
                  "eval_every_epochs": 1},
        "model_config": {"d_model": 8, "num_blocks": 1, "num_heads": 1},
    }))
    return config


def _pretrain(config: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lumrec.cli", "pretrain", str(config), f"out={out}"], env=_env(),
                          capture_output=True, text=True, timeout=300)


def test_second_pretrain_fails_at_once_naming_the_holder_and_a_killed_holders_lock_is_free(tmp_path, data):
    config, run = _pretrain_config(tmp_path, data), tmp_path / "run"
    holder = Holder(run, tmp_path)
    try:
        info = lock_holder(run)
        assert info is not None and info.pid == holder.proc.pid and info.job == "holder"
        before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
        t0 = time.monotonic()
        second = _pretrain(config, run)
        assert second.returncode == EXIT_LOCK_HELD, second.stderr
        # One line naming the folder and the holder (host, pid, start time, job), and what to do; no traceback.
        assert "Traceback" not in second.stderr
        message = second.stderr.strip().splitlines()[-1]
        for part in (str(run), socket.gethostname(), f"pid {holder.proc.pid}", f"started {info.started}", "'holder'",
                     "wait for that job to finish"):
            assert part in message, (part, message)
        assert time.monotonic() - t0 < 120
        # The holder's folder is untouched: no config, no checkpoint, its unfinished save still there.
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
        assert holder.release() == 0
    finally:
        holder.kill()
    assert (run / "holder-finished").read_text() == "ok" and lock_holder(run) is None  # released: the file is empty

    # A job killed (-9) inside a checkpoint save while holding the lock: its lock is free, its temp folder goes.
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(run)], env=_env(), capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    # Its start removed the holder's temporary folder (the holder had ended); its own killed save left one.
    leftovers = [p.name for p in (run / "checkpoints").glob(".tmp-step-*")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-step-00000003-")
    dead = lock_holder(run)
    assert dead is not None and dead.job == "pretrain"  # the file still names the killed holder
    third = _pretrain(config, run)
    assert third.returncode == 0, third.stderr
    assert "which ended without releasing it" in third.stderr and "removed" in third.stderr
    assert not list((run / "checkpoints").glob(".tmp-step-*")) and (run / "results.json").exists()
    assert lock_holder(run) is None


def test_query_daily_import_and_synth_take_their_folders_lock(tmp_path, data):
    store, out, dataset = tmp_path / "knowledge", tmp_path / "daily", tmp_path / "imported"
    holders = []
    try:
        for folder in (store, out, dataset):
            scratch = tmp_path / f"scratch-{folder.name}"
            scratch.mkdir()
            holders.append(Holder(folder, scratch))
        with pytest.raises(LockHeldError, match=rf"{store} is in use by job 'holder' on host"):
            run_query(QueryConfig(store=str(store), as_of_ds="2026-01-02", checkpoint=str(tmp_path / "none")))
        with pytest.raises(LockHeldError, match=rf"{out} is in use by job 'holder'"):
            DailyJob(DailyConfig(data=str(data), out=str(out), ds="2026-01-02")).run()
        with pytest.raises(LockHeldError, match=rf"{dataset} is in use"):
            run_import("ml-100k", tmp_path / "no-source", dataset)
        synth = subprocess.run([sys.executable, "-m", "lumrec.cli", "synth", str(dataset), "--num-days", "1"], env=_env(),
                               capture_output=True, text=True, timeout=120)
        assert synth.returncode == EXIT_LOCK_HELD and f"pid {holders[2].proc.pid}" in synth.stderr, synth.stderr
        # The holders' own temporary folders survived: a job that did not get the lock cleans nothing.
        for folder in (store, out, dataset):
            assert (folder / "checkpoints" / ".tmp-step-00000005-0123abcd").exists()
    finally:
        for holder in holders:
            holder.release()


def test_a_killed_knowledge_write_is_cleaned_by_the_next_query_start(tmp_path):
    store = tmp_path / "knowledge"
    users, items = torch.arange(1, 6), torch.arange(1, 4)
    write_knowledge(store, "2026-01-02", "v1", users, CONDS, torch.ones(5, 2, 4), items, torch.ones(3, 4))
    script = ("import sys, torch\nfrom lumrec.knowledge import write_knowledge\n"
              "write_knowledge(sys.argv[1], sys.argv[2], 'v2', torch.arange(1, 6), ['scenario=1', 'scenario=2'], "
              "torch.zeros(5, 2, 4), torch.arange(1, 4), torch.zeros(3, 4))\n")
    # Killed while writing users of a new day, and while swapping a rewritten day into place.
    for day, point in (("2026-01-03", "knowledge.users_written"), ("2026-01-02", "knowledge.old_moved_aside")):
        killed = subprocess.run([sys.executable, "-c", script, str(store), day], env=_env(**{FAILPOINTS: point}),
                                capture_output=True, text=True, timeout=120)
        assert killed.returncode == -9, killed.stderr
    hidden = sorted(p.name.split("-")[0] + "-" + p.name.split("=")[1][:10] for p in store.iterdir() if p.name.startswith("."))
    assert hidden == [".old-2026-01-02", ".tmp-2026-01-02", ".tmp-2026-01-03"]
    assert knowledge_days(store) == []  # the swap was cut short: for now no day 2026-01-02
    # The query job's start (its lock) removes the temporary partitions and puts the moved-aside day back;
    # then it fails on its missing checkpoint, the store already clean.
    with pytest.raises(Exception, match="none"):
        run_query(QueryConfig(store=str(store), as_of_ds="2026-01-04", checkpoint=str(tmp_path / "none")))
    assert sorted(p.name for p in store.iterdir()) == [LOCK_FILE, "as_of_ds=2026-01-02"]
    assert knowledge_days(store) == ["2026-01-02"] and load_knowledge(store, "2026-01-02").model_version == "v1"


def test_daily_start_removes_its_stage_manifest_temps_and_leaves_nested_jobs_folders_to_them(tmp_path, data):
    out = tmp_path / "daily"
    stages = out / "days" / "ds=2026-01-02" / "stages"
    stages.mkdir(parents=True)
    # What a write_text_atomic killed before its rename leaves: `.<name>.<32 hex>.tmp` beside the target.
    manifest_tmp = stages / f".rank.json.{'ab' * 16}.tmp"
    report_tmp = out / f".report.tsv.{'cd' * 16}.tmp"
    manifest_tmp.write_text("{")
    report_tmp.write_text("ds")
    # A nested job's folder (its own lock file): its leftovers are its own job's to remove.
    nested = out / "days" / "ds=2026-01-02" / "lum"
    nested_tmp = nested / "checkpoints" / ".tmp-step-00000004-89abcdef"
    nested_tmp.mkdir(parents=True)
    (nested / LOCK_FILE).touch()
    with pytest.raises(ValueError, match="has no partition"):  # the day is checked after the lock is taken
        DailyJob(DailyConfig(data=str(data), out=str(out), ds="2027-01-01")).run()
    assert not manifest_tmp.exists() and not report_tmp.exists() and nested_tmp.exists()
    assert lock_holder(out) is None and (out / LOCK_FILE).exists()


def test_a_save_removes_only_its_own_temp_folder(tmp_path):
    class Fails:
        def state_dict(self):
            raise RuntimeError("disk on fire")

        def load_state_dict(self, state):
            pass

    other = tmp_path / ".tmp-step-00000002-feedf00d"  # another writer's unfinished save
    other.mkdir()
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(RuntimeError, match="disk on fire"):
        mgr.save(3, {"w": torch.zeros(2), "bad": Fails()})
    mgr.save(4, {"w": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "step-00000004"]


def test_a_lock_its_holder_did_not_release_is_taken_over_where_flock_works(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    stale = LockInfo("elsewhere.example", 4242, "pretrain", "2026-01-01T00:00:00Z", "lumrec pretrain x.yaml")
    (folder / LOCK_FILE).write_text(json.dumps(stale.__dict__))  # killed on another host (or container)
    leftover = folder / f".config.json.{'0' * 32}.tmp"
    leftover.write_text("{")
    with caplog.at_level("WARNING", logger="lumrec.locks"), RunLock(folder, "rank"):
        assert lock_holder(folder).job == "rank" and lock_holder(folder).pid == os.getpid() and not leftover.exists()
    assert "taking over the lock of job 'pretrain' on host elsewhere.example, pid 4242" in caplog.text
    assert "if it still runs on elsewhere.example, this file system does not share locks across hosts" in caplog.text
    assert lock_holder(folder) is None


def test_without_flock_the_lock_file_decides():
    lock_file = Path("run") / LOCK_FILE
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = socket.gethostname()
    other = LockInfo("elsewhere.example", 4242, "pretrain", "2026-01-01T00:00:00Z", "lumrec pretrain x.yaml")
    refusal = stale_lock_refusal(lock_file, other, flock_works=False)
    assert refusal is not None and "pid 4242 on elsewhere.example" in refusal and f"{BREAK_ENV}=1" in refusal
    assert stale_lock_refusal(lock_file, other, flock_works=False, breaking=True) is None
    alive = LockInfo(here, os.getpid(), "daily", "2026-01-01T00:00:00Z", "lumrec daily")
    assert "still running" in stale_lock_refusal(lock_file, alive, flock_works=False)
    dead = LockInfo(here, int(ended.stdout), "daily", "2026-01-01T00:00:00Z", "lumrec daily")
    assert stale_lock_refusal(lock_file, dead, flock_works=False) is None
    assert stale_lock_refusal(lock_file, other, flock_works=True) is None  # the flock is ours: nobody sharing it lives


def test_nested_lock_on_the_same_folder_and_leftover_forms(tmp_path):
    with RunLock(tmp_path, "outer"):
        with RunLock(tmp_path / ".", "inner"):  # the same folder: shared, not a deadlock
            assert held_here(tmp_path)
        assert held_here(tmp_path) and lock_holder(tmp_path).job == "outer"
    assert not held_here(tmp_path)
    # `.old-NAME-x` goes back when NAME is missing and goes when NAME exists; other names are never touched.
    (tmp_path / ".old-a-0000abcd").mkdir()
    (tmp_path / ".old-b-0000abcd").mkdir()
    (tmp_path / "b").mkdir()
    keep = [tmp_path / ".tmp-notes", tmp_path / "x.tmp", tmp_path / ".cache.tmp", tmp_path / ".tmp-step-1-XYZ"]
    for path in keep:
        path.mkdir()
    removed = remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [".old-a-0000abcd", ".old-b-0000abcd"]
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").is_dir() and all(p.exists() for p in keep)


def _rank_main(rank: int, world: int, port: int, folder: str, result_dir: str) -> None:
    from lumrec.distributed import init_distributed

    become_rank(rank, world, port)
    ctx = init_distributed("gloo")
    try:
        try:
            with RunLock(folder, "rank", ctx):
                outcome = "taken"
        except LockHeldError as err:
            outcome = f"held: {err}"
        Path(result_dir, f"rank{rank}").write_text(outcome)
        ctx.barrier()  # the group still works: no rank was left inside a collective
    finally:
        ctx.close()


def test_every_rank_learns_that_rank0_could_not_take_the_lock(tmp_path):
    folder = tmp_path / "run"
    holder = Holder(folder, tmp_path)
    try:
        start = time.monotonic()
        join_ranks(spawn_ranks(_rank_main, (2, free_port(), str(folder), str(tmp_path))), start, 120, "2 ranks")
    finally:
        holder.release()
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}").read_text()
        assert text.startswith("held: ") and f"pid {holder.proc.pid}" in text, (rank, text)
