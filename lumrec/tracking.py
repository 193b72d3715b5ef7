"""What every job reports besides its results: a one-line start summary and TensorBoard scalars.

    >>> from lumrec.tracking import job_summary
    >>> job_summary("rank", data="1,000 samples", parameters=12345, device="cpu", threads=2)
    'rank: 1,000 samples, 12,345 parameters, device cpu, 2 threads'

`ScalarLog` writes TensorBoard event files under a run folder's `tb/` on the main process only,
and creates the writer at the first scalar, so a job that logs nothing leaves no folder.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from tqdm import tqdm

log = logging.getLogger("lumrec")

__all__ = ["ScalarLog", "count_parameters", "job_summary", "log_job_end", "log_job_start", "progress_bar", "progress_enabled"]


def progress_enabled(main_process: bool = True) -> bool:
    """Whether a progress bar is drawn: on the main process, on a terminal, unless TQDM_DISABLE is set."""
    if not main_process or os.environ.get("TQDM_DISABLE", "") not in ("", "0"):
        return False
    return sys.stderr.isatty()


def progress_bar(total: int | None = None, desc: str = "", main_process: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar on stderr that draws only where `progress_enabled` (logs and CI stay free of bar lines)."""
    return tqdm(total=total, desc=desc, disable=not progress_enabled(main_process), dynamic_ncols=True,
                mininterval=kwargs.pop("mininterval", 1.0), **kwargs)


def count_parameters(module: Any) -> int:
    """Number of elements over a module's parameters (sharded tables count their global size)."""
    total = 0
    for p in module.parameters():
        total += int(p.numel()) if not hasattr(p, "metadata") else int(p.metadata().size.numel())
    return total


def job_summary(job: str, *, data: str, parameters: int | None = None, device: str = "cpu", threads: int | None = None,
                **extra: Any) -> str:
    """One line: the job, its data size, model parameters, device and threads (extra `key=value` pairs appended)."""
    parts = [data]
    if parameters is not None:
        parts.append(f"{parameters:,} parameters")
    parts.append(f"device {device}")
    if threads is not None:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in extra.items()]
    return f"{job}: " + ", ".join(parts)


def log_job_start(job: str, **fields: Any) -> str:
    """Log `job_summary(job, **fields)` at INFO (the first line a job prints) and return it."""
    line = job_summary(job, **fields)
    log.info("%s", line)
    return line


def log_job_end(job: str, **fields: Any) -> str:
    """Log `JOB done: key value, ...` at INFO (the last line of a training run: steps, speed, memory) and return it.

        >>> log_job_end("pretrain", steps=10, tokens_per_s="1,234")
        'pretrain done: steps 10, tokens per s 1,234'
    """
    line = f"{job} done: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in fields.items())
    log.info("%s", line)
    return line


class ScalarLog:
    """TensorBoard scalars of one run folder (`OUT/tb`), written by the main process only.

    `enabled=False` (other ranks, or tracking turned off) makes every call a no-op.
    """

    def __init__(self, out: str | Path, enabled: bool = True, subdir: str = "tb") -> None:
        self.dir = Path(out) / subdir
        self.enabled = enabled
        self._writer = None

    def scalar(self, name: str, value: float, step: int) -> None:
        """Write one scalar (`name` like `train/loss`) at `step`."""
        if not self.enabled or value is None:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.dir))
        self._writer.add_scalar(name, float(value), int(step))

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        """Write every numeric entry of `values` as `prefix/key` (non-numbers such as counts of lists are skipped)."""
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.scalar(f"{prefix}/{key}", value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
