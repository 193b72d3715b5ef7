"""Every failure reaches the user as one line `lumrec CMD: error: ...` with its class's exit code, on real files.

The `lumrec` command runs as a subprocess. Disk full and read-only use a size-limited (or read-only)
tmpfs where this machine lets the test mount one (root with CAP_SYS_ADMIN); disk full also runs
everywhere on /dev/full, file too large under RLIMIT_FSIZE in the child process.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lumrec.config import ConfigError, from_dict, load_config
from lumrec.data.dataset import MANIFEST, Dataset, DatasetMeta, day_bounds, write_text_atomic
from lumrec.data.validate import DataValidationError
from lumrec.errors import (
    EXIT_CHECKPOINT, EXIT_DATA, EXIT_INTERNAL, EXIT_IO, EXIT_LOCK_HELD, EXIT_USER, EXIT_WAITING, CheckpointLoadError,
    DataError, LockHeld, StorageError, UserError, describe, writing,
)
from lumrec.pipelines.daily import DailyConfig
from lumrec.pipelines.pretrain_config import PretrainConfig
from lumrec.pipelines.query import QueryConfig
from lumrec.pipelines.rank_config import RankConfig

DAY = "2026-01-02"
SYNTH = ["--num-users", "30", "--num-items", "20", "--num-categories", "3", "--num-queries", "4", "--num-days", "3"]


def lumrec(*args: str, env: dict | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    """The real `lumrec` command in a child process."""
    full_env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lumrec.cli", *args], capture_output=True, text=True, timeout=300,
                          env=full_env, preexec_fn=preexec_fn)


def error_line(run: subprocess.CompletedProcess, command: str) -> str:
    """The one error line of a failed run: no traceback, the line starts with `lumrec COMMAND: error:`."""
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"lumrec {command}: error: "), run.stderr
    return lines[0]


def _behaviours(n: int, seed: int = 0) -> pa.Table:
    """`n` behaviour rows of day DAY with incompressible timestamps (a large data page)."""
    rng = np.random.default_rng(seed)
    start, end = day_bounds(DAY)
    return pa.table({
        "user_id": pa.array(rng.integers(1, 10, n), pa.int64()),
        "ts": pa.array(rng.integers(start, end, n), pa.int64()),
        "item_id": pa.array(rng.integers(1, 10, n), pa.int64()),
        "scenario": pa.array(np.ones(n, np.int32)),
        "category_id": pa.array(np.ones(n, np.int64)),
        "action": pa.array(np.ones(n, np.int32)),
    })


def _dataset(root: Path, table: pa.Table) -> Path:
    """A dataset with one behaviours partition written as-is (no dictionary pages: the data page holds the values)."""
    data = Dataset(root)
    path = data.partition_path("behaviours", DAY)
    path.parent.mkdir(parents=True)
    pq.write_table(table, path, compression="zstd", use_dictionary=False)
    data.write_meta(DatasetMeta(name="t", source="test", vocab_sizes={"user_id": 10, "item_id": 10}))
    return path


# -- the classes and their codes --------------------------------------------------------------


def test_every_class_has_its_own_exit_code():
    codes = {EXIT_INTERNAL, EXIT_USER, EXIT_DATA, EXIT_CHECKPOINT, EXIT_LOCK_HELD, EXIT_IO, EXIT_WAITING}
    assert len(codes) == 7 and 0 not in codes
    assert describe(UserError("x"))[0] == EXIT_USER
    assert describe(ConfigError("x"))[0] == EXIT_USER
    assert describe(DataValidationError("f.parquet", "bad"))[0] == EXIT_DATA
    assert describe(DataError("x"))[0] == EXIT_DATA
    assert describe(CheckpointLoadError("x"))[0] == EXIT_CHECKPOINT
    assert describe(LockHeld("x"))[0] == EXIT_LOCK_HELD
    assert describe(StorageError(errno.ENOSPC, "/x"))[0] == EXIT_IO
    assert describe(FileNotFoundError("missing"))[0] == EXIT_USER
    assert describe(PermissionError(errno.EACCES, "Permission denied", "/etc/x")) == (
        EXIT_IO, "/etc/x: permission denied; check the owner and mode of the path and its folders (ls -ld), or write elsewhere")
    code, message = describe(ZeroDivisionError("division by zero"))
    assert code == EXIT_INTERNAL and "--debug" in message
    assert describe(KeyboardInterrupt())[0] == 130


def test_classes_of_other_modules_map_by_name():
    from lumrec.checkpoint import CheckpointError
    from lumrec.modules.warm_start_config import WarmStartError

    assert describe(CheckpointError("runs/x/checkpoints/step-00000003: corrupt"))[0] == EXIT_CHECKPOINT
    assert describe(WarmStartError("no such source"))[0] == EXIT_CHECKPOINT
    locks = pytest.importorskip("lumrec.locks")
    assert describe(locks.LockHeldError("held by pid 1"))[0] == EXIT_LOCK_HELD


def test_a_message_is_one_line():
    code, message = describe(DataError("first\n  second\n"))
    assert code == EXIT_DATA and message == "first | second"


# -- config: zero and negative sizes, impossible dates ----------------------------------------


@pytest.mark.parametrize("cls, data, key", [
    (PretrainConfig, {"train": {"rows_per_batch": 0}}, "train.rows_per_batch"),
    (PretrainConfig, {"train": {"epochs": -1}}, "train.epochs"),
    (PretrainConfig, {"train": {"eval_rows_per_batch": 0}}, "train.eval_rows_per_batch"),
    (PretrainConfig, {"train": {"num_negatives": 0}}, "train.num_negatives"),
    (PretrainConfig, {"train": {"lr": -0.1}}, "train.lr"),
    (PretrainConfig, {"data": {"max_len": 0}}, "data.max_len"),
    (RankConfig, {"train": {"batch_size": 0}}, "train.batch_size"),
    (RankConfig, {"train": {"epochs": 0}}, "train.epochs"),
    (QueryConfig, {"rows_per_batch": -3}, "rows_per_batch"),
    (DailyConfig, {"epochs_per_day": 0}, "epochs_per_day"),
    (DailyConfig, {"pretrain": {"train": {"rows_per_batch": 0}}}, "pretrain.train.rows_per_batch"),
    (DailyConfig, {"rank": {"train": {"eval_batch_size": 0}}}, "rank.train.eval_batch_size"),
])
def test_zero_or_negative_sizes_are_rejected_at_load_naming_the_key(cls, data, key):
    with pytest.raises(ConfigError, match=rf"^job\.yaml: key '{key}' must be"):
        from_dict(cls, data, source="job.yaml")


def test_model_sizes_are_rejected_naming_the_section():
    # Model configs check their own sizes; the error names the file and the key in the rank job's config.
    with pytest.raises(ConfigError, match=r"^job\.yaml: key 'sizes\.backbones\.hstu\.num_layers' must be >= 1, got 0$"):
        from_dict(DailyConfig, {"rank": {"sizes": {"backbones": {"hstu": {"num_layers": 0}}}}}, source="job.yaml")


@pytest.mark.parametrize("text, key", [
    ("ds: 2026-13-45\n", "ds"),
    ("ds: '2026-02-30'\n", "ds"),
    ("start: 2026-1-x\nend: 2026-01-03\n", "start"),
    ("query: {as_of_ds: 2026-00-10}\n", "query.as_of_ds"),
    ("pretrain: {data: {end: 2026-04-31}}\n", "pretrain.data.end"),
])
def test_impossible_dates_name_the_key_and_the_format(tmp_path, text, key):
    path = tmp_path / "daily.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"daily\.yaml: key '{key}' is not a valid date: .*expected YYYY-MM-DD"):
        load_config(DailyConfig, path)


def test_an_impossible_date_in_an_override(tmp_path):
    path = tmp_path / "daily.yaml"
    path.write_text("out: x\n")
    with pytest.raises(ConfigError, match=r"key 'ds' is not a valid date: '2026-13-45' \(month must be in 1\.\.12\)"):
        load_config(DailyConfig, path, ["ds=2026-13-45"])
    assert load_config(DailyConfig, path, ["ds=2026-01-15"]).ds == "2026-01-15"  # a valid day still reads as text


def test_cli_config_errors_exit_with_the_user_code(tmp_path):
    config = tmp_path / "daily.yaml"
    config.write_text(f"data: {tmp_path / 'none'}\nout: {tmp_path / 'out'}\n")
    run = lumrec("daily", str(config), "ds=2026-13-45")
    assert run.returncode == EXIT_USER
    line = error_line(run, "daily")
    assert "key 'ds' is not a valid date: '2026-13-45'" in line and "YYYY-MM-DD" in line
    pretrain = tmp_path / "pretrain.yaml"
    pretrain.write_text(f"model: lum\nout: {tmp_path / 'run'}\ndata: {{path: {tmp_path / 'none'}}}\n")
    run = lumrec("pretrain", str(pretrain), "train.rows_per_batch=0")
    assert run.returncode == EXIT_USER
    assert "key 'train.rows_per_batch' must be >= 1, got 0" in error_line(run, "pretrain")
    run = lumrec("stats", str(tmp_path / "missing"), "--bogus-flag")  # argparse's usage error: the same class
    assert run.returncode == EXIT_USER


def test_debug_shows_the_traceback(tmp_path):
    quiet = lumrec("validate", str(tmp_path))
    loud = lumrec("--debug", "validate", str(tmp_path))
    after = lumrec("validate", str(tmp_path), "--debug")
    assert quiet.returncode == loud.returncode == after.returncode == EXIT_USER
    assert f"{tmp_path}: not a lumrec dataset" in error_line(quiet, "validate")
    for run in (loud, after):
        assert "Traceback (most recent call last)" in run.stderr
        assert run.stderr.rstrip().splitlines()[-1].startswith("lumrec validate: error: ")


# -- data errors ------------------------------------------------------------------------------


def test_a_corrupt_data_page_with_an_intact_footer_names_the_file_and_partition(tmp_path):
    path = _dataset(tmp_path / "data", _behaviours(4000))
    column = pq.ParquetFile(path).metadata.row_group(0).column(1)  # ts: random values, a large page
    assert column.path_in_schema == "ts"
    raw = bytearray(path.read_bytes())
    # Inside the page's zstd frame, past its header (flipped literals alone can decode to wrong values instead).
    frame = raw.find(b"\x28\xb5\x2f\xfd", column.data_page_offset, column.data_page_offset + column.total_compressed_size)
    assert frame > 0
    raw[frame + 12 : frame + 20] = bytes(b ^ 0xFF for b in raw[frame + 12 : frame + 20])
    path.write_bytes(bytes(raw))
    assert pq.ParquetFile(path).metadata.num_rows == 4000  # the footer still reads
    with pytest.raises(DataValidationError, match=rf"{path}: unreadable Parquet file in table 'behaviours', "
                                                  rf"partition ds={DAY} \(ZSTD decompression failed"):
        list(Dataset(tmp_path / "data").iter_batches("behaviours"))
    run = lumrec("validate", str(tmp_path / "data"))
    assert run.returncode == EXIT_DATA
    line = error_line(run, "validate")
    assert str(path) in line and f"partition ds={DAY}" in line and "restore it" in line


def test_a_zero_row_file_is_rejected_naming_it(tmp_path):
    path = _dataset(tmp_path / "data", _behaviours(0))
    with pytest.raises(DataValidationError, match=r"empty Parquet file \(0 rows\)"):
        list(Dataset(tmp_path / "data").iter_batches("behaviours"))
    run = lumrec("validate", str(tmp_path / "data"))
    assert run.returncode == EXIT_DATA
    assert f"{path}: empty Parquet file (0 rows) in table 'behaviours', partition ds={DAY}" in error_line(run, "validate")


def test_a_zero_byte_file_is_a_data_error(tmp_path):
    path = _dataset(tmp_path / "data", _behaviours(5))
    path.write_bytes(b"")
    run = lumrec("validate", str(tmp_path / "data"))
    assert run.returncode == EXIT_DATA and str(path) in error_line(run, "validate")


# -- disk failures ----------------------------------------------------------------------------


def test_disk_full_on_dev_full_names_the_path():
    # /dev/full answers every write with ENOSPC, a real disk-full error without a full disk.
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with pytest.raises(StorageError, match=r"^/dev/full: no space left on the device; free space") as caught:
        with writing("/dev/full"), open("/dev/full", "wb") as fh:
            fh.write(b"x" * 100_000)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == "/dev/full"
    assert describe(caught.value)[0] == EXIT_IO


class _Mount:
    """A tmpfs mounted on a fresh folder for the test (size-limited, or read-only); skips where mounting is not allowed."""

    def __init__(self, folder: Path, options: str) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, f"lumrec-test-{uuid.uuid4().hex[:6]}", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); /dev/full covers ENOSPC")

    def close(self) -> None:
        subprocess.run(["umount", str(self.folder)], capture_output=True)


@pytest.fixture
def mount(tmp_path):
    mounts: list[_Mount] = []

    def make(name: str, options: str) -> Path:
        mounts.append(_Mount(tmp_path / name, options))
        return tmp_path / name

    yield make
    for m in mounts:
        m.close()


def test_disk_full_in_a_size_limited_folder(mount):
    folder = mount("full", "size=48k")
    run = lumrec("synth", str(folder / "data"), *SYNTH)
    assert run.returncode == EXIT_IO
    line = error_line(run, "synth")
    assert f"{folder / 'data'}/" in line and ".parquet: no space left on the device" in line
    leftovers = [p for p in (folder / "data").rglob("*.tmp")]
    assert not leftovers  # the writer removed its half-written temporary file


def test_disk_full_while_writing_a_text_file(mount):
    folder = mount("small", "size=8k")
    with pytest.raises(StorageError, match=rf"^{folder}/report\.json: no space left on the device"):
        write_text_atomic(folder / "report.json", "x" * 100_000)
    assert list(folder.iterdir()) == []


def test_disk_full_while_saving_a_checkpoint_names_its_folder(mount):
    import torch

    from lumrec.checkpoint import CheckpointManager

    folder = mount("ckpt", "size=256k")
    manager = CheckpointManager(folder / "checkpoints")
    with pytest.raises(StorageError, match=rf"^{folder}/checkpoints/\.tmp-step-00000001-[0-9a-f]+: no space left on the device"):
        manager.save(1, {"w": torch.randn(256, 1024)})  # 1 MiB into 256 KiB
    assert manager.steps() == [] and list((folder / "checkpoints").iterdir()) == []  # the writer removed its temporary folder


def test_disk_full_while_writing_knowledge_names_the_file(mount):
    from lumrec.knowledge import KnowledgeWriter

    folder = mount("knowledge", "size=64k")
    with pytest.raises(StorageError, match=rf"^{folder}/\.tmp-as_of_ds={DAY}-[0-9a-f]+/\S+\.parquet: no space left"):
        with KnowledgeWriter(folder, DAY, "v1", ["scenario=1", "scenario=2"], dim=64) as writer:
            writer.write_users(np.arange(1, 1001), np.random.default_rng(0).normal(size=(1000, 2, 64)).astype(np.float32))
            writer.write_items(np.arange(1, 11), np.zeros((10, 64), np.float32))


def test_read_only_folder(tmp_path, mount):
    if os.geteuid() == 0:
        folder = mount("ro", "size=1m,ro")  # root writes through chmod; a read-only file system stops it
        meaning = "read-only file system"
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        meaning = "permission denied"
    run = lumrec("synth", str(folder / "data"), *SYNTH)
    assert run.returncode == EXIT_IO
    assert f"{folder / 'data'}: {meaning}" in error_line(run, "synth")


def test_file_too_large(tmp_path):
    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal's kill

    run = lumrec("synth", str(tmp_path / "data"), *SYNTH, preexec_fn=limit_file_size)
    assert run.returncode == EXIT_IO
    line = error_line(run, "synth")
    assert f"{tmp_path / 'data'}/" in line and ": file too large; raise the file-size limit" in line


# -- import: the output folder ----------------------------------------------------------------


def _amazon(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "Beauty.txt").write_text("1 2 3\n2 3 4\n")
    (src / "Beauty_item2attributes.json").write_text(json.dumps({"2": [5], "3": [6], "4": [5]}))
    return src / "Beauty.txt"


def test_import_into_a_complete_dataset_names_the_flag(tmp_path):
    src = _amazon(tmp_path)
    out = tmp_path / "out"
    assert lumrec("import", "amazon", str(src), str(out)).returncode == 0
    run = lumrec("import", "amazon", str(src), str(out))
    assert run.returncode == EXIT_USER
    line = error_line(run, "import")
    assert str(out) in line and "pass --overwrite" in line
    assert lumrec("import", "amazon", str(src), str(out), "--overwrite").returncode == 0


def test_a_killed_import_reruns_without_flags(tmp_path):
    src = _amazon(tmp_path)
    out = tmp_path / "out"
    killed = lumrec("import", "amazon", str(src), str(out), env={"LUMREC_FAILPOINTS": "import.before_manifest"})
    assert killed.returncode == -signal.SIGKILL
    assert (out / "behaviours").is_dir() and not (out / MANIFEST).exists()
    again = lumrec("import", "amazon", str(src), str(out))
    assert again.returncode == 0, again.stderr
    assert Dataset(out).read_meta().vocab_sizes["user_id"] == 3


def test_a_disk_failure_inside_torch_dcp_is_named():
    from torch.distributed.checkpoint.api import CheckpointException

    # DCP wraps each rank's failure in a CheckpointException, a BaseException the CLI still reports in one line.
    wrapped = CheckpointException("save failed", {0: (OSError(errno.ENOSPC, "No space left on device"), None)})
    with pytest.raises(StorageError, match=r"^runs/x/\.tmp-step-00000003: no space left on the device") as caught:
        with writing("runs/x/.tmp-step-00000003"):
            raise wrapped
    assert describe(caught.value)[0] == EXIT_IO
    code, message = describe(CheckpointException("load failed", {0: (RuntimeError("Size mismatch"), None)}))
    assert code == EXIT_CHECKPOINT and message == "checkpoint save or load failed: Size mismatch"


# -- lock held, waiting for data --------------------------------------------------------------


def test_a_held_dataset_lock_exits_with_its_code(tmp_path):
    locks = pytest.importorskip("lumrec.locks")
    src = _amazon(tmp_path)
    out = tmp_path / "out"
    with locks.RunLock(out, "test holder"):
        run = lumrec("import", "amazon", str(src), str(out))
    assert run.returncode == EXIT_LOCK_HELD
    assert str(out) in error_line(run, "import")


def test_daily_waiting_for_the_next_day_has_its_own_exit_code(tmp_path):
    config = tmp_path / "daily.yaml"
    config.write_text(json.dumps({
        "data": str(tmp_path / "data"), "out": str(tmp_path / "out"), "with_lum": False,
        "synthetic": {"seed": 5, "num_users": 40, "num_items": 30, "num_categories": 3, "num_queries": 4, "num_days": 3,
                      "impressions_per_user_day": 6},
        "rank": {"model": "mlp", "sizes": {"embedding_dim": 4, "mlp": [8], "context_keys": ["scenario"]},
                 "train": {"epochs": 1, "batch_size": 64, "max_history": 8, "threads": 1, "progress": False}},
    }))
    last = lumrec("daily", str(config), "ds=2026-01-03")  # the last day: no next day to evaluate on yet
    assert last.returncode == EXIT_WAITING, last.stderr[-2000:]
    assert json.loads(last.stdout.strip().splitlines()[-1]) == [{"ds": "2026-01-03", "status": "waiting for next day"}]
    assert ": error: " not in last.stderr
