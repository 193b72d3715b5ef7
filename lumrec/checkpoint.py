"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, verified, resumable, reshardable.

A checkpoint is a folder ``ROOT/step-00000123/`` holding DCP's files plus ``lumrec_meta.json``
(step, free-form JSON ``extra`` such as data position and RNG seeds, and a SHA-256 of every
file). It is written under a temporary name and renamed when complete, and the meta file is
written last, so a killed job never leaves something that looks like a checkpoint. Loading
verifies the digests and raises ``CheckpointError`` naming the folder and the file.
Paths go through iopath, so a ``PathManager`` handler can map other URIs to local folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from iopath.common.file_io import g_pathmgr

from lumrec.faults import failpoint

log = logging.getLogger(__name__)

META_FILE = "lumrec_meta.json"
_STEP_RE = re.compile(r"^step-(\d{8})$")


@contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """Silence DCP's "torch.distributed is disabled ... assuming ... a single process" warning.

    DCP warns on every save/load with ``no_dist=True``; lumrec passes it exactly when there is no
    process group (or a plain model is loaded by one rank alone), so the assumption is the intent.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


class CheckpointError(RuntimeError):
    """A missing, partial or corrupt checkpoint; the message names the folder and the file."""


@dataclass
class CheckpointInfo:
    """What lumrec_meta.json records besides DCP's own metadata."""

    step: int
    extra: dict[str, Any] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    world_size: int = 1


def _local(path: str | os.PathLike) -> Path:
    """Map a path or URI to a local folder through iopath."""
    return Path(g_pathmgr.get_local_path(str(path)))


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast_str(value: str) -> str:
    """Rank 0's string on every rank (for the shared temporary folder name)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointManager:
    """Saves numbered checkpoints under one folder, keeps the last `keep`, finds the latest complete one."""

    def __init__(self, root: str | os.PathLike, keep: int = 3):
        self.root = _local(root)
        self.keep = keep

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def steps(self) -> list[int]:
        """Steps with a complete (renamed, meta-bearing) checkpoint, ascending."""
        if not self.root.exists():
            return []
        found = []
        for child in self.root.iterdir():
            match = _STEP_RE.match(child.name)
            if match and (child / META_FILE).exists():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self) -> int | None:
        """The newest complete step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
        """Write `state` (tensors, nested dicts, Stateful objects) as checkpoint `step`, atomically."""
        final = self.step_dir(step)
        tmp_name = _broadcast_str(f".tmp-step-{step:08d}-{uuid.uuid4().hex[:8]}")
        tmp = self.root / tmp_name
        if _rank() == 0:
            tmp.mkdir(parents=True, exist_ok=False)
        _barrier()
        with _single_process_is_intended():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        _barrier()
        if _rank() == 0:
            digests = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            info = CheckpointInfo(step=step, extra=extra or {}, digests=digests, world_size=_world())
            meta_tmp = tmp / f".{META_FILE}.tmp"
            meta_tmp.write_text(json.dumps(info.__dict__, indent=2, sort_keys=True))
            os.replace(meta_tmp, tmp / META_FILE)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
            log.info("checkpoint step %d saved to %s", step, final)
        _barrier()
        failpoint("checkpoint.saved")
        return final

    def verify(self, step: int) -> CheckpointInfo:
        """Check that checkpoint `step` is complete and its files match their digests."""
        folder = self.step_dir(step)
        meta = folder / META_FILE
        if not folder.exists():
            raise CheckpointError(f"{folder}: no such checkpoint (complete steps: {self.steps()})")
        if not meta.exists():
            raise CheckpointError(f"{folder}: partial checkpoint, {META_FILE} missing")
        try:
            info = CheckpointInfo(**json.loads(meta.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise CheckpointError(f"{meta}: corrupt checkpoint metadata: {err}") from None
        for name, digest in info.digests.items():
            path = folder / name
            if not path.exists():
                raise CheckpointError(f"{folder}: file {name} listed in {META_FILE} is missing")
            if _sha256(path) != digest:
                raise CheckpointError(f"{path}: corrupt checkpoint file (SHA-256 mismatch)")
        return info

    def load(self, state: dict[str, Any], step: int | None = None) -> CheckpointInfo:
        """Load checkpoint `step` (default: latest) into `state` in place; resharding is DCP's."""
        if step is None:
            step = self.latest()
            if step is None:
                raise CheckpointError(f"{self.root}: no complete checkpoint to load")
        info = self.verify(step)
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=str(self.step_dir(step)), no_dist=not dist.is_initialized())
        return info

    def _prune(self) -> None:
        """Keep the newest `keep` checkpoints and drop leftovers of killed saves."""
        for old in self.steps()[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(self.step_dir(old), ignore_errors=True)
        for child in self.root.iterdir():
            if child.name.startswith(".tmp-step-"):
                shutil.rmtree(child, ignore_errors=True)


def load_model_weights(path: str | os.PathLike, model: torch.nn.Module, prefix: str = "model") -> None:
    """Load only `prefix`'s tensors of a checkpoint folder into `model` (for warm starts and evaluation)."""
    folder = _local(path)
    step_match = _STEP_RE.match(folder.name)
    if not step_match:
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected step-NNNNNNNN)")
    CheckpointManager(folder.parent).verify(int(step_match.group(1)))
    state = {prefix: model.state_dict()}
    # A plain (unsharded) model is loaded by this process alone, even inside a process group: the
    # other ranks may be doing something else (e.g. rank 0 querying a LUM while the others wait).
    local = not dist.is_initialized() or not any(_is_sharded(v) for v in state[prefix].values())
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(folder), no_dist=local)
    model.load_state_dict(state[prefix])


def _is_sharded(value: Any) -> bool:
    """Whether a state-dict value is spread over ranks (ShardedTensor or DTensor)."""

    return isinstance(value, (ShardedTensor, DTensor))
