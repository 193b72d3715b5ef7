"""Warnings from torch, torchrec and fbgemm that lumrec expects, each explained and silenced at one place.

A job's output should hold only what its user can act on. Each entry below names a message the
pinned stack prints on every run although nothing is wrong, and why:

    >>> [entry.source for entry in KNOWN_LIBRARY_WARNINGS][:2]
    ['fbgemm', 'torchrec']

`silence_known_library_noise()` installs the filters (the `lumrec` command does so at start);
anything not listed here still reaches the user.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

__all__ = ["KNOWN_LIBRARY_WARNINGS", "KnownWarning", "silence_known_library_noise"]


@dataclass(frozen=True)
class KnownWarning:
    """A message (regular expression, matched at its start) the pinned stack prints, and why it is harmless."""

    source: str
    message: str
    why: str
    category: type[Warning] | None = None  # a warnings.warn category, or None for a logging record
    logger: str | None = None  # the logger of a logging record


KNOWN_LIBRARY_WARNINGS: tuple[KnownWarning, ...] = (
    KnownWarning(
        "fbgemm",
        r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered",
        "The CPU DENSE kernel (RowwiseAdamW's tables) runs its backward through an autograd Function "
        "inside the op, not through a kernel on the Autograd dispatch key, so torch's fallback warns "
        "although the gradients are exact (tests/test_dense_kernel_gradients.py checks them against "
        "nn.functional.embedding_bag).",
        category=UserWarning,
    ),
    KnownWarning(
        "torchrec",
        r"Compute Kernel is dense, caching params will be ignored",
        "torchrec logs this for every table on the DENSE kernel; lumrec passes no caching params.",
        logger="torchrec.distributed.utils",
    ),
    KnownWarning(
        "torch",
        r"Please use DTensor instead and we are deprecating ShardedTensor",
        "torchrec 1.8's sharded tables and their state dicts are ShardedTensors; there is no DTensor "
        "path in the pinned torchrec.",
        category=FutureWarning,
    ),
    KnownWarning(
        "torch",
        r"`broadcast_buffers` is deprecated",
        "torchrec 1.8's DistributedModelParallel builds its DDP wrapper with broadcast_buffers=False.",
        category=FutureWarning,
    ),
    KnownWarning(
        "torch",
        r"is_fx_tracing will return true for both fx.symbolic_trace and torch.export",
        "torchrec's KeyedJaggedTensor asks torch.fx whether it is being traced; the notice is about "
        "torch.export, which no lumrec job runs.",
        logger="torch.fx._symbolic_trace",
    ),
    KnownWarning(
        "torch",
        r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        "torchrec 1.8's row-wise sharded lookups exchange their rows with these collectives; the "
        "pinned torchrec has no other path, and they work as documented.",
        category=FutureWarning,
    ),
    KnownWarning(
        "torchrec",
        r"HeuristicalStorageReservation is known to cause issues",
        "torchrec 1.8's default planner reservation, which lumrec's jobs keep: it reserves memory for "
        "the dense part and the input batches (what a GPU rank needs beside its tables). The issue it "
        "warns of is a dense size taken from unmaterialised tensors; lumrec builds only the tables on "
        "meta, which the estimate leaves out, and the dense part whole.",
        category=FutureWarning,
    ),
    KnownWarning(
        "torchrec",
        r"There is a known issue with TorchRec's dense tensor size calculation in dry run",
        "The same estimate, logged at every plan; see the HeuristicalStorageReservation entry.",
        logger="torchrec.distributed.planner.storage_reservations",
    ),
    KnownWarning(
        "torch",
        r"torch.distributed is disabled, unavailable or uninitialized",
        "DCP assumes one process when no process group exists: that is the intent of a one-process run.",
        category=UserWarning,
    ),
)


class _DropKnownRecords(logging.Filter):
    """Drops the logging records of one logger that match known messages."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


_installed = False


def silence_known_library_noise() -> None:
    """Install a filter for every entry of KNOWN_LIBRARY_WARNINGS (idempotent)."""
    global _installed
    if _installed:
        return
    by_logger: dict[str, list[str]] = {}
    for entry in KNOWN_LIBRARY_WARNINGS:
        if entry.category is not None:
            warnings.filterwarnings("ignore", message=entry.message, category=entry.category)
        if entry.logger is not None:
            by_logger.setdefault(entry.logger, []).append(entry.message)
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(_DropKnownRecords(patterns))
    _installed = True
