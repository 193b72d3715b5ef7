"""One writer per folder: the lock every lumrec job takes on the folder it writes, and the removal of what killed writers left.

=============================  ======================================================
job                            folder it locks
=============================  ======================================================
pretrain, rank, retrieve       the run folder (`out`), while `lumrec.train.TrainLoop.run` runs
query                          the knowledge store (`store`)
daily                          its `out` (its pretrain, query and rank lock their own folders)
lumrec import, lumrec synth    the dataset folder being written
=============================  ======================================================

The lock is ``fcntl.flock`` on ``FOLDER/.lumrec.lock``. The file holds the holder's host, pid,
job, start time (UTC) and command line; a second job on the folder stops at once with
`LockHeldError` naming them (exit code 73, `lumrec.errors`). The holder empties the file when it releases the lock.
Under N ranks rank 0 alone takes the lock and tells every rank the outcome, so no rank waits
in a collective when the folder is taken. A process may take a lock it already holds (a job
inside a job on the same folder): the lock is released when the outermost holder lets go.

Stale locks. Where ``flock`` works a lock is never stale: the kernel releases it when its
holder's process ends, kill -9 included, and the next job takes it, logging a WARNING that names
the holder that ended without releasing it. That holds on a local disk and on shared file
systems whose locks reach every host (NFSv4, Lustre mounted with ``flock``, GPFS, CephFS), so a
job killed on one host or container resumes on another without help. Two cases need the operator:

- The file system has no ``flock`` at all (it fails with ENOLCK or EOPNOTSUPP; WARNING logged):
  the file's content decides. A holder named on this host holds the folder while its pid is
  alive; one named on another host may be alive, which this host cannot tell, so the job stops
  with `LockHeldError`. Check that pid on that host; once it has ended, rerun with
  ``LUMREC_BREAK_LOCK=1`` to take the lock over.
- ``flock`` works on each host but does not reach across them (NFS mounted with
  ``local_lock=flock``, Lustre with ``localflock``): lumrec cannot see a job on another host. The takeover WARNING
  names the other host's job: if it still runs, stop one of the two, and mount the file system
  with shared locks. Before starting a job on another host, ``cat FOLDER/.lumrec.lock`` shows
  the holder (empty: released).

Leftovers. With the lock taken, this job is the folder's only writer, so every temporary
entry in it is a killed writer's. Taking the lock removes them (logged one by one):

- ``.tmp-NAME-xxxxxxxx/``: a folder written under a temporary name and renamed when complete
  (a checkpoint's ``.tmp-step-...``, a knowledge partition's ``.tmp-as_of_ds=...``): removed.
- ``.old-NAME-xxxxxxxx/``: the previous NAME moved aside while a new one took its place: put
  back when NAME is missing (the swap was cut short), removed otherwise.
- ``.NAME.<32 hex digits>.tmp``: a file written atomically (`lumrec.data.dataset.write_text_atomic`:
  stage manifests, reports, dataset manifests, Parquet tables): removed.

A subfolder holding its own ``.lumrec.lock`` is another job's folder (a daily job's pretrain
run, its knowledge store): that job cleans it when it takes its own lock.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with RunLock(folder, "example"):
    ...     held_here(folder), lock_holder(folder).job
    (True, 'example')
    >>> held_here(folder), lock_holder(folder)
    (False, None)
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from lumrec.errors import LockHeld

if TYPE_CHECKING:
    from lumrec.distributed import DistContext

log = logging.getLogger(__name__)

__all__ = ["BREAK_ENV", "LOCK_FILE", "LockHeldError", "LockInfo", "RunLock", "held_here", "lock_holder", "remove_leftovers",
           "stale_lock_refusal", "under_lock"]

LOCK_FILE = ".lumrec.lock"
BREAK_ENV = "LUMREC_BREAK_LOCK"

# The temporary names lumrec's writers use (module docstring, "Leftovers").
_TMP_DIR = re.compile(r"^\.tmp-(?P<name>.+)-[0-9a-f]{8}$")
_OLD_DIR = re.compile(r"^\.old-(?P<name>.+)-[0-9a-f]{8}$")
_TMP_FILE = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")

# How long a job waits for a holder that has just taken the lock to write who it is.
_INFO_WAIT_S = 1.0


@dataclass(frozen=True)
class LockInfo:
    """Who holds (or last held without releasing) a folder's lock; the content of ``.lumrec.lock``."""

    host: str
    pid: int
    job: str
    started: str  # UTC, ISO 8601
    command: str

    @classmethod
    def here(cls, job: str) -> "LockInfo":
        """This process as a holder of `job`."""
        started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(socket.gethostname(), os.getpid(), job, started, " ".join(sys.argv)[:500])

    @classmethod
    def parse(cls, text: str) -> "LockInfo | None":
        """The holder a lock file names, or None for an empty (released) or unreadable file."""
        try:
            raw = json.loads(text)
            return cls(str(raw["host"]), int(raw["pid"]), str(raw["job"]), str(raw["started"]), str(raw.get("command", "")))
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        return f"job {self.job!r} on host {self.host}, pid {self.pid}, started {self.started} (command: {self.command})"


class LockHeldError(LockHeld):
    """Another job holds (or may hold) the folder; the message names the folder, the holder and what to do."""

    def __init__(self, message: str, folder: str | os.PathLike | None = None, holder: LockInfo | None = None) -> None:
        super().__init__(message)
        self.folder = None if folder is None else Path(folder)
        self.holder = holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _write(fd: int, info: LockInfo | None) -> None:
    """Replace the file's content with `info` (None: empty, i.e. released)."""
    os.ftruncate(fd, 0)
    if info is not None:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(asdict(info), indent=2) + "\n").encode())
    os.fsync(fd)


def _held_message(folder: Path, holder: LockInfo | None) -> str:
    if holder is None:
        who = "another process (it has not written who it is into the lock file yet)"
    else:
        who = holder.describe()
        if holder.host == socket.gethostname() and not _pid_alive(holder.pid):
            who += f"; pid {holder.pid} has ended, so a process it started still holds the lock: stop that one"
    return (f"{folder} is in use by {who}. One job writes a folder at a time: wait for that job to finish, stop it, "
            "or give this job another folder (a lock is free as soon as its holder's process ends, kill -9 included)")


def stale_lock_refusal(lock_file: Path, holder: LockInfo, flock_works: bool, breaking: bool = False) -> str | None:
    """Why the lock that `holder` did not release cannot be taken over (module docstring, "Stale locks"), or None.

    `flock_works`: this process holds the flock, so no live process on a host that shares the lock does.
    `breaking`: the operator said the holder has ended (``LUMREC_BREAK_LOCK=1``).

        >>> info = LockInfo("node-7", 4242, "pretrain", "2026-01-01T00:00:00Z", "lumrec pretrain a.yaml")
        >>> stale_lock_refusal(Path("run/.lumrec.lock"), info, flock_works=True) is None
        True
        >>> stale_lock_refusal(Path("run/.lumrec.lock"), info, flock_works=False).split(";")[0]
        "run/.lumrec.lock: the lock was taken by job 'pretrain' on host node-7, pid 4242, started 2026-01-01T00:00:00Z (command: lumrec pretrain a.yaml), which has not released it"
    """
    if flock_works or breaking:
        return None
    if holder.host == socket.gethostname():
        if not _pid_alive(holder.pid):
            return None
        return (f"{lock_file}: the lock is held by {holder.describe()}, which is still running (this file system has no "
                f"flock, so the lock file decides). Wait for it or stop it; if pid {holder.pid} is another program by now, "
                f"rerun with {BREAK_ENV}=1 to take the lock over")
    return (f"{lock_file}: the lock was taken by {holder.describe()}, which has not released it; it may still run (this "
            f"file system has no flock and {socket.gethostname()} cannot see processes on {holder.host}). Check pid "
            f"{holder.pid} on {holder.host}; once it has ended, rerun with {BREAK_ENV}=1 to take the lock over")


def _open_locked(folder: Path, job: str) -> int:
    """Take the lock of `folder` (created if missing) and write this process into it; returns the open lock file."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder}: exists and is not a folder; give the job a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by programs this job starts (PEP 446)
    try:
        flock_works = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            deadline = time.monotonic() + _INFO_WAIT_S
            holder = LockInfo.parse(_read(fd))
            while holder is None and time.monotonic() < deadline:
                time.sleep(0.05)
                holder = LockInfo.parse(_read(fd))
            raise LockHeldError(_held_message(folder, holder), folder, holder) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            flock_works = False
            log.warning("%s: the file system does not support flock (%s); the lock file's content alone decides (lumrec.locks)",
                        path, err.strerror)
        previous = LockInfo.parse(_read(fd))
        if previous is not None:
            refusal = stale_lock_refusal(path, previous, flock_works, breaking=os.environ.get(BREAK_ENV, "") not in ("", "0"))
            if refusal is not None:
                raise LockHeldError(refusal, folder, previous)
            elsewhere = "" if previous.host == socket.gethostname() else (
                f"; if it still runs on {previous.host}, this file system does not share locks across hosts: stop one of the two")
            log.warning("%s: taking over the lock of %s, which ended without releasing it%s", folder, previous.describe(), elsewhere)
        _write(fd, LockInfo.here(job))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release(fd: int) -> None:
    try:
        _write(fd, None)
    finally:
        os.close(fd)  # closing the last descriptor of the open file releases the flock


@dataclass
class _Held:
    fd: int
    count: int


# Locks this process holds, by real path: a nested job on the same folder shares its parent's lock.
_HELD: dict[str, _Held] = {}


def _key(folder: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(folder))


def held_here(folder: str | os.PathLike) -> bool:
    """Whether this process holds the lock of `folder`."""
    return _key(folder) in _HELD


def lock_holder(folder: str | os.PathLike) -> LockInfo | None:
    """The holder named in `folder`'s lock file (the holder, or one that ended without releasing it); None if released."""
    path = Path(folder) / LOCK_FILE
    try:
        return LockInfo.parse(path.read_text())
    except FileNotFoundError:
        return None


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove what killed writers left in `folder` (module docstring, "Leftovers"); returns the paths removed or put back.

    Call it only while holding `folder`'s lock: another writer's temporary entries look the same.
    """
    root = Path(folder)
    done: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            path = here / name
            tmp, old = _TMP_DIR.match(name), _OLD_DIR.match(name)
            if path.is_symlink():
                continue
            if tmp:
                shutil.rmtree(path)
                log.info("%s: removed %s, left by a killed writer", root, path)
                done.append(path)
            elif old:
                target = here / old.group("name")
                if target.exists():
                    shutil.rmtree(path)
                    log.info("%s: removed %s (the previous %s, replaced by a killed writer)", root, path, target.name)
                else:
                    os.replace(path, target)
                    log.info("%s: put back %s from %s (a killed writer had moved it aside)", root, target, path)
                done.append(path)
            elif not (path / LOCK_FILE).exists():  # a folder with its own lock is its own job's to clean
                keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            if _TMP_FILE.match(name):
                (here / name).unlink()
                log.info("%s: removed %s, left by a killed writer", root, here / name)
                done.append(here / name)
    return done


class RunLock:
    """Hold the lock of `folder` for job `job` inside a ``with`` block; taking it removes the leftovers of killed writers.

    `ctx` (N ranks): rank 0 takes the lock, every rank learns the outcome (each raises `LockHeldError` if rank 0
    could not take it). `clean=False` keeps the leftovers (for a caller that cleans by itself).
    """

    def __init__(self, folder: str | os.PathLike, job: str, ctx: "DistContext | None" = None, clean: bool = True) -> None:
        self.folder, self.job, self.ctx, self.clean = Path(folder), job, ctx, clean
        self._taken = False

    def __enter__(self) -> "RunLock":
        if self.ctx is None or self.ctx.world_size == 1:
            self._take()
            return self
        # Only with a process group: lumrec.distributed (torchrec) is then loaded already, while a
        # data command (`lumrec import`, `lumrec synth`) takes locks without ever loading it.
        from lumrec.distributed import from_rank0

        error: BaseException | None = None
        if self.ctx.is_main:
            try:
                self._take()
            except BaseException as err:  # noqa: BLE001 - every rank must hear of any failure, then it is raised
                error = err
        outcome = from_rank0(self.ctx, None if error is None else (isinstance(error, LockHeldError), str(error)))
        if error is not None:
            raise error
        if outcome is not None:
            held, message = outcome
            if held:
                raise LockHeldError(message, self.folder)
            raise RuntimeError(f"rank 0 could not take the lock of {self.folder}: {message}")
        return self

    def _take(self) -> None:
        key = _key(self.folder)
        if key in _HELD:
            _HELD[key].count += 1
            self._taken = True
            return
        fd = _open_locked(self.folder, self.job)
        _HELD[key] = _Held(fd, 1)
        self._taken = True
        if self.clean:
            try:
                remove_leftovers(self.folder)
            except BaseException:
                self._let_go()
                raise

    def _let_go(self) -> None:
        if not self._taken:
            return
        self._taken = False
        key = _key(self.folder)
        held = _HELD[key]
        held.count -= 1
        if held.count == 0:
            del _HELD[key]
            _release(held.fd)

    def __exit__(self, *exc: Any) -> None:
        self._let_go()


F = TypeVar("F", bound=Callable[..., Any])


def under_lock(make_lock: Callable[..., RunLock]) -> Callable[[F], F]:
    """Decorate a job's entry point to run holding the lock `make_lock(*args, **kwargs)` returns (same arguments).

        >>> import tempfile
        >>> @under_lock(lambda out, steps: RunLock(out, "toy"))
        ... def toy(out, steps):
        ...     return held_here(out)
        >>> toy(tempfile.mkdtemp(), 3)
        True
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with make_lock(*args, **kwargs):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
