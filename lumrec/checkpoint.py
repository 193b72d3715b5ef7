"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, verified, resumable, reshardable.

A checkpoint is a folder ``ROOT/step-00000123/`` holding DCP's files plus ``lumrec_meta.json``
(step, free-form JSON ``extra`` such as data position and RNG seeds, and a SHA-256 of every
file). It is written under a temporary name and renamed when complete, and the meta file is
written last, so a killed job never leaves something that looks like a checkpoint (its temporary
folder is removed by the next job that takes the run folder's lock, `lumrec.locks`). Loading
verifies the digests and raises ``CheckpointError`` naming the folder and the file.
Paths go through iopath, so a ``PathManager`` handler can map other URIs to local folders.

Loading the latest checkpoint (resume, a root folder as ``train.init_from``) takes the newest one
that verifies: each newer one that does not is logged (WARNING) with its reason and skipped; a
folder where none verifies raises one ``CheckpointError`` listing them all. Loading never runs
code from a checkpoint: DCP's ``.metadata`` is unpickled allowing only the classes DCP metadata
consists of, and non-tensor values are read with ``torch.load(weights_only=True)`` (see
"Reading without running code" below); anything else raises ``UnsafeCheckpointError``.

    >>> import tempfile
    >>> folder = CheckpointManager(tempfile.mkdtemp()).save(1, {"w": torch.ones(2)})
    >>> state = {"w": torch.zeros(2)}
    >>> CheckpointManager(folder.parent).load(state).step, state["w"].tolist()
    (1, [1.0, 1.0])
    >>> tensor_digest({"w": torch.ones(2)}) == tensor_digest({"w": torch.ones(2)})
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.tensor import DTensor
from iopath.common.file_io import g_pathmgr

from lumrec.errors import writing
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


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose metadata or values would run code when loaded; never skipped, always raised."""


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


def tensor_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of a state dict's tensors (names, dtypes, shapes, bytes): equal for equal weights, whatever wrote them."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, torch.Tensor):
            continue
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(value.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- reading without running code ------------------------------------------------------------------
# torch's FileSystemReader unpickles `.metadata` with plain pickle, and DefaultLoadPlanner reads
# every non-tensor value (optimizer hyper-parameters, ints, strings) with torch.load(weights_only=
# False): whoever writes a checkpoint folder could run code in the process that loads it, and the
# digest manifest cannot stop that (the same writer wrote it). Tensors DCP reads with
# torch.load(weights_only=True) already, and the stream transforms metadata may name come from
# DCP's own registry (zstd), not from the file. DCP metadata consists of these globals alone (found by
# unpickling real checkpoints of one process and of two ranks, plain and sharded models with
# their optimizers); torch's dtypes, layouts and memory formats are allowed by type below.
_METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),  # an Enum, rebuilt from its value
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by name: a table lookup
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
})
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)
_UNSUPPORTED_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)")  # torch's two wordings
_METADATA_FILE = ".metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only DCP metadata's globals; any other global raises UnsafeCheckpointError."""

    def __init__(self, file: IO[bytes], path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.path}: checkpoint metadata refers to {module}.{name}, which a checkpoint never holds; refusing to load it "
            "(do not use this folder: it was not written by lumrec, or was tampered with)"
        )


def read_metadata(folder: str | os.PathLike, name: str = _METADATA_FILE) -> Metadata:
    """DCP's metadata of a checkpoint folder, unpickled without running code, its data files checked to be the folder's own."""
    path = _local(folder) / name
    try:
        with open(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh, path).load()
    except UnsafeCheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing, so {path.parent} is no DCP checkpoint") from None
    except Exception as err:  # a truncated or garbled pickle fails in many ways
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP checkpoint metadata")
    for storage in metadata.storage_data.values():
        # A data file outside the folder (or one the manifest does not cover) is refused.
        relative = getattr(storage, "relative_path", None)
        if not isinstance(relative, str) or Path(relative).name != relative or relative.startswith(".") \
                or not (path.parent / relative).is_file():
            raise CheckpointError(f"{path}: names data file {relative!r}, which is no file of this checkpoint folder")
    return metadata


class _SafeReader(FileSystemReader):
    """FileSystemReader whose `read_metadata` uses the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = read_metadata(Path(self.path), _METADATA_FILE if rank is None else f"__{rank}{_METADATA_FILE}")
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor values with torch.load(weights_only=True)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            found = _UNSUPPORTED_GLOBAL.search(str(err))
            what = found.group(1) if found else "something other than plain data"
            raise UnsafeCheckpointError(
                f"{self.folder}: checkpoint value {fqn!r} refers to {what}, which a checkpoint never holds; refusing to load it "
                "(do not use this folder: it was not written by lumrec, or was tampered with)"
            ) from None
        # What DefaultLoadPlanner.load_bytes does with the object it unpickled.
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _first_failure(exc: CheckpointException) -> BaseException | None:
    """The first rank's error inside DCP's CheckpointException (a BaseException that wraps every rank's)."""
    for item in exc.failures.values():
        inner = item[0] if isinstance(item, tuple) else item
        if isinstance(inner, BaseException):
            return inner
    return None


def load_dcp(state: dict[str, Any], folder: str | os.PathLike, no_dist: bool) -> None:
    """`dcp.load` of `folder` into `state` in place, without running code from the folder; failures as CheckpointError."""
    folder = _local(folder)
    try:
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=str(folder), storage_reader=_SafeReader(folder), planner=_SafePlanner(folder),
                     no_dist=no_dist)
    except CheckpointException as exc:
        inner = _first_failure(exc)
        if isinstance(inner, (CheckpointError, OSError)):  # ours, or the disk's (its own exit code)
            raise inner from None
        detail = " | ".join(line.strip() for line in str(inner).splitlines() if line.strip()) if inner else str(exc)
        raise CheckpointError(
            f"{folder}: cannot load this checkpoint into the model ({type(inner).__name__}: {detail}); "
            "was it written by a model of another shape or kind?"
        ) from exc


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

    def candidates(self) -> list[int]:
        """Steps of every step-NNNNNNNN folder (complete, partial or damaged), newest first."""
        if not self.root.exists():
            return []
        found = (_STEP_RE.match(child.name) for child in self.root.iterdir() if child.is_dir())
        return sorted((int(match.group(1)) for match in found if match), reverse=True)

    def newest_valid(self) -> tuple[int, CheckpointInfo]:
        """The newest checkpoint that verifies, and its info; each newer one is logged (WARNING) and skipped.

        A checkpoint that would run code when loaded is never skipped (UnsafeCheckpointError).
        """
        skipped: list[tuple[Path, str]] = []
        for step in self.candidates():
            try:
                info = self.verify(step)
            except UnsafeCheckpointError:
                raise
            except CheckpointError as err:
                skipped.append((self.step_dir(step), str(err)))
                if _rank() == 0:
                    log.warning("%s: skipped, not a usable checkpoint: %s", self.step_dir(step), err)
                continue
            if skipped and _rank() == 0:
                log.warning("%s: using step %d, the newest checkpoint that verifies (%d newer skipped)",
                            self.root, step, len(skipped))
            return step, info
        if not skipped:
            raise CheckpointError(f"{self.root}: no complete checkpoint to load")
        reasons = "; ".join(f"{folder.name}: {reason}" for folder, reason in skipped)
        raise CheckpointError(
            f"{self.root}: no checkpoint verifies ({reasons}); restore a good copy, or move {self.root} aside to start afresh"
        )

    def resume(self, state: dict[str, Any]) -> CheckpointInfo:
        """`load` the newest checkpoint that verifies, for the run that owns the folder (every rank together).

        Newer checkpoints that do not verify are renamed step-NNNNNNNN.damaged (kept for inspection,
        never loaded): the run redoes their steps, and under their own names pruning would count
        them among the `keep` newest and delete the good checkpoints the resumed run writes.
        """
        info = self.load(state)
        damaged = [step for step in self.candidates() if step > info.step]
        _barrier()  # every rank has chosen its checkpoint before rank 0 renames the others
        if _rank() == 0:
            for step in damaged:
                folder = self.step_dir(step)
                target, n = folder.with_name(f"{folder.name}.damaged"), 1
                while target.exists():
                    n += 1
                    target = folder.with_name(f"{folder.name}.damaged-{n}")
                os.replace(folder, target)
                log.warning("%s: moved aside to %s", folder, target.name)
        _barrier()
        return info

    def save(self, step: int, state: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
        """Write `state` (tensors, nested dicts, Stateful objects) as checkpoint `step`, atomically."""
        final = self.step_dir(step)
        tmp_name = _broadcast_str(f".tmp-step-{step:08d}-{uuid.uuid4().hex[:8]}")
        tmp = self.root / tmp_name
        if _rank() == 0:
            tmp.mkdir(parents=True, exist_ok=False)
        _barrier()
        try:
            with _single_process_is_intended(), writing(tmp):  # a full disk names the folder (ENOSPC names no file)
                dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
            _barrier()
            if _rank() == 0:
                digests = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
                info = CheckpointInfo(step=step, extra=extra or {}, digests=digests, world_size=_world())
                meta_tmp = tmp / f".{META_FILE}.tmp"
                with writing(meta_tmp):
                    meta_tmp.write_text(json.dumps(info.__dict__, indent=2, sort_keys=True))
                os.replace(meta_tmp, tmp / META_FILE)
                if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
                    shutil.rmtree(final)
                os.replace(tmp, final)
        except BaseException:
            if _rank() == 0:  # this save's own folder and no other: a writer cleans up after itself
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if _rank() == 0:
            self._prune()
            log.info("checkpoint step %d saved to %s", step, final)
        _barrier()
        failpoint("checkpoint.saved")
        return final

    def verify(self, step: int) -> CheckpointInfo:
        """Check that checkpoint `step` is complete, its files match their digests and its DCP metadata reads safely."""
        folder = self.step_dir(step)
        meta = folder / META_FILE
        if not folder.exists():
            raise CheckpointError(f"{folder}: no such checkpoint (complete steps: {self.steps()})")
        if not meta.exists():
            raise CheckpointError(f"{folder}: partial checkpoint, {META_FILE} missing")
        try:
            info = CheckpointInfo(**json.loads(meta.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise CheckpointError(f"{meta}: corrupt checkpoint metadata: {err}") from None
        if not isinstance(info.digests, dict) or not all(
                isinstance(name, str) and Path(name).name == name and isinstance(digest, str)
                for name, digest in info.digests.items()):
            raise CheckpointError(f"{meta}: corrupt checkpoint metadata: 'digests' must map file names of the folder to SHA-256s")
        if info.step != step:
            raise CheckpointError(f"{meta}: records step {info.step!r}, not the folder's step {step}; not a checkpoint lumrec wrote here")
        # Every file DCP reads must be covered by the manifest.
        unlisted = sorted(p.name for p in folder.iterdir()
                          if p.is_file() and p.name not in info.digests and (p.name == _METADATA_FILE or p.suffix == ".distcp"))
        if unlisted:
            raise CheckpointError(f"{folder}: {', '.join(unlisted)} not listed in {META_FILE}; not a checkpoint lumrec wrote")
        for name, digest in info.digests.items():
            path = folder / name
            if not path.exists():
                raise CheckpointError(f"{folder}: file {name} listed in {META_FILE} is missing")
            if _sha256(path) != digest:
                raise CheckpointError(f"{path}: corrupt checkpoint file (SHA-256 mismatch)")
        read_metadata(folder)
        return info

    def load(self, state: dict[str, Any], step: int | None = None) -> CheckpointInfo:
        """Load checkpoint `step` (default: the newest that verifies) into `state` in place; resharding is DCP's."""
        if step is None:
            step, info = self.newest_valid()
        else:
            info = self.verify(step)
        load_dcp(state, self.step_dir(step), no_dist=not dist.is_initialized())
        return info

    def _prune(self) -> None:
        """Keep the newest `keep` checkpoints.

        Temporary folders are left alone: one may be another process's unfinished save. A killed
        save's folder is removed when the next job takes the run folder's lock (`lumrec.locks`).
        """
        for old in self.steps()[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(self.step_dir(old), ignore_errors=True)


def load_model_weights(path: str | os.PathLike, model: torch.nn.Module, prefix: str = "model") -> None:
    """Load only `prefix`'s tensors of a checkpoint folder into `model` (for warm starts and evaluation)."""
    folder = _local(path)
    step_match = _STEP_RE.match(folder.name)
    if not step_match:
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected step-NNNNNNNN)")
    CheckpointManager(folder.parent).verify(int(step_match.group(1)))
    load_verified_weights(folder, model, prefix)


def load_verified_weights(folder: Path, model: torch.nn.Module, prefix: str = "model") -> None:
    """`load_model_weights` of a step folder the caller has just verified (e.g. `newest_valid`): no second hash pass."""
    state = {prefix: model.state_dict()}
    # A plain (unsharded) model is loaded by this process alone, even inside a process group: the
    # other ranks may be doing something else (e.g. rank 0 querying a LUM while the others wait).
    local = not dist.is_initialized() or not any(_is_sharded(v) for v in state[prefix].values())
    load_dcp(state, folder, no_dist=local)
    model.load_state_dict(state[prefix])


def _is_sharded(value: Any) -> bool:
    """Whether a state-dict value is spread over ranks (ShardedTensor or DTensor)."""

    return isinstance(value, (ShardedTensor, DTensor))
