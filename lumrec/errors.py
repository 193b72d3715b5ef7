"""lumrec's error classes, one exit code per class, and the one line the `lumrec` command prints for any failure.

Exit codes (``docs/operations.md`` says what to do about each)::

    0   success
    1   unexpected error: a bug (rerun with --debug for the traceback and report it)
    2   user error: a config key or value, a flag, an input path, an option (argparse's usage code too)
    65  data error: a data file that breaks the schema, a corrupt page, an empty file
    66  checkpoint error: a missing, partial or corrupt checkpoint, an unusable warm-start source
    73  lock held: another run holds the run folder (or the dataset being written)
    74  I/O error: disk full, read-only file system, file too large, permission denied
    75  waiting for data: the daily job's last day waits for the next day's impressions (rerun later)
    130 interrupted (Ctrl-C)

A job raises a subclass of `LumrecError` (or any class with an int ``exit_code`` attribute);
``describe`` maps every other exception to a code and a one-line message.

    >>> from lumrec.errors import DataError, describe, storage_error
    >>> describe(DataError("data/items/items.parquet: empty Parquet file (0 rows)"))
    (65, 'data/items/items.parquet: empty Parquet file (0 rows)')
    >>> err = storage_error(OSError(28, "No space left on device"), "runs/x/results.json")
    >>> err.exit_code, str(err).split(";")[0]
    (74, 'runs/x/results.json: no space left on the device')
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import Iterator

__all__ = [
    "CheckpointLoadError", "DataError", "EXIT_CHECKPOINT", "EXIT_DATA", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_IO",
    "EXIT_LOCK_HELD", "EXIT_OK", "EXIT_USER", "EXIT_WAITING", "LockHeld", "LumrecError", "StorageError", "UserError",
    "describe", "one_line", "storage_error", "writing",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2
EXIT_DATA = 65  # sysexits EX_DATAERR
EXIT_CHECKPOINT = 66  # sysexits EX_NOINPUT: an input (the checkpoint) is missing or unreadable
EXIT_LOCK_HELD = 73  # sysexits EX_CANTCREAT: the run folder cannot be taken
EXIT_IO = 74  # sysexits EX_IOERR
EXIT_WAITING = 75  # sysexits EX_TEMPFAIL: try again later
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT


class LumrecError(Exception):
    """Base of lumrec's own errors; the message is one line that names the file, key or path and what to do."""

    exit_code: int = EXIT_INTERNAL


class UserError(LumrecError):
    """A config key or value, a flag, a path or an option the user gave that cannot work."""

    exit_code = EXIT_USER


class DataError(LumrecError):
    """Input data that breaks the schema or cannot be read (corrupt page, empty file)."""

    exit_code = EXIT_DATA


class CheckpointLoadError(LumrecError):
    """A checkpoint that is missing, partial or corrupt, or a warm-start source that does not fit."""

    exit_code = EXIT_CHECKPOINT


class LockHeld(LumrecError):
    """Another process holds the lock of a run folder or dataset."""

    exit_code = EXIT_LOCK_HELD


# Errno values that are the machine's, not lumrec's: what each means and what the operator can do.
_IO_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free space on that file system (df -h) or write elsewhere, then rerun (jobs resume)"),
    errno.EDQUOT: ("disk quota exceeded", "free space within the quota or write elsewhere, then rerun (jobs resume)"),
    errno.EROFS: ("read-only file system", "write to a writable folder, or remount that file system read-write"),
    errno.EFBIG: ("file too large", "raise the file-size limit (ulimit -f) or use a file system that allows larger files"),
    errno.EACCES: ("permission denied", "check the owner and mode of the path and its folders (ls -ld), or write elsewhere"),
    errno.EPERM: ("operation not permitted", "check the owner and mode of the path and its folders (ls -ld), or write elsewhere"),
    errno.EIO: ("input/output error from the device", "check the disk (dmesg) and rerun"),
}


class StorageError(LumrecError, OSError):
    """An operating-system I/O failure (disk full, read-only, too large, permission) with the path it hit.

    Also an `OSError` (same errno and filename), so code that handles OSError keeps working.
    """

    exit_code = EXIT_IO

    def __init__(self, code: int | None, path: str | os.PathLike | None, detail: str = "") -> None:
        meaning, advice = _IO_ERRNOS.get(code or -1, (detail or "I/O error", "check the path and the device, then rerun"))
        where = f"{os.fspath(path)}: " if path is not None else ""
        self.message, self.detail = f"{where}{meaning}; {advice}", detail
        OSError.__init__(self, code, meaning, None if path is None else os.fspath(path))

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple:  # pickled between ranks: rebuilt from the same arguments
        return type(self), (self.errno, self.filename, self.detail)


def storage_error(err: OSError, path: str | os.PathLike | None = None) -> StorageError | None:
    """`err` as a StorageError naming `path` (default: the error's own filename), or None if it is no disk failure."""
    if isinstance(err, StorageError):
        return err
    if err.errno not in _IO_ERRNOS:
        return None
    return StorageError(err.errno, path if path is not None else err.filename, str(err))


def _wrapped(exc: BaseException) -> BaseException | None:
    """The first error inside torch DCP's CheckpointException (a BaseException carrying `failures`), else None."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for item in failures.values():
            inner = item[0] if isinstance(item, tuple) else item
            if isinstance(inner, BaseException):
                return inner
    return None


# torch.save's zip writer reports a failed write as a RuntimeError without errno ("unexpected pos ...").
_TORCH_WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter failed writing")
_NEARLY_FULL = 1 << 20  # bytes free below which a failed write is read as a full disk


def _failed_torch_write(exc: BaseException, path: str | os.PathLike) -> StorageError | None:
    """A StorageError for torch's errno-less write failure: ENOSPC when the file system is (nearly) full, else a plain I/O error."""
    if not isinstance(exc, RuntimeError) or not any(s in str(exc) for s in _TORCH_WRITE_FAILED):
        return None
    folder = os.path.abspath(os.fspath(path))
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        stat = os.statvfs(folder)
    except OSError:
        stat = None
    if stat is not None and stat.f_bavail * stat.f_frsize < _NEARLY_FULL:
        return StorageError(errno.ENOSPC, path, str(exc))
    return StorageError(None, path, f"write failed ({one_line(str(exc))})")


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a disk failure inside the block into a StorageError naming `path` (ENOSPC names no file by itself).

        >>> with writing("/dev/full"):
        ...     with open("/dev/full", "w") as fh:
        ...         _ = fh.write("x")
        Traceback (most recent call last):
        lumrec.errors.StorageError: /dev/full: no space left on the device; free space ...
    """
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        named = storage_error(err, path)
        if named is None:
            raise
        raise named from err
    except BaseException as exc:  # noqa: BLE001 - only disk failures (also inside DCP's wrapper) are translated
        inner = _wrapped(exc) or exc
        named = storage_error(inner, path) if isinstance(inner, OSError) else _failed_torch_write(inner, path)
        if named is None:
            raise
        raise named from exc


# Classes of other modules mapped by qualified name, so this module imports none of them (no cycles, no torch).
_BY_NAME: dict[str, int] = {
    "lumrec.checkpoint.CheckpointError": EXIT_CHECKPOINT,
    "lumrec.locks.LockHeldError": EXIT_LOCK_HELD,
    "lumrec.modules.warm_start_config.WarmStartError": EXIT_CHECKPOINT,
    "torch.distributed.checkpoint.api.CheckpointException": EXIT_CHECKPOINT,
    "yaml.error.YAMLError": EXIT_USER,
}

# Standard exceptions that carry a user's mistake: a wrong path, a bad value or key.
_USER_TYPES: tuple[type[BaseException], ...] = (
    FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError, KeyError,
)


def one_line(text: str) -> str:
    """`text` on one line: its non-empty lines joined by " | "."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _message(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])  # str(KeyError) is the key's repr in quotes
    return one_line(text) or type(exc).__name__


def describe(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) of any exception, as the `lumrec` command reports it."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code, _message(exc)
    inner = _wrapped(exc)
    if inner is not None:  # torch DCP's wrapper: the first rank's own error says what happened
        code, text = describe(inner)
        if code == EXIT_INTERNAL:
            return EXIT_CHECKPOINT, f"checkpoint save or load failed: {_message(inner)}"
        return code, text
    for cls in type(exc).__mro__:
        mapped = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if mapped is not None:
            return mapped, _message(exc)
    if isinstance(exc, OSError):
        named = storage_error(exc)
        if named is not None:
            return EXIT_IO, str(named)
    if isinstance(exc, _USER_TYPES):
        return EXIT_USER, _message(exc)
    if isinstance(exc, OSError):
        return EXIT_IO, _message(exc)
    return EXIT_INTERNAL, f"unexpected {type(exc).__name__}: {_message(exc)} (rerun with --debug for the traceback)"
