"""Config drift of the daily job: the config each finished stage ran with, compared on every rerun.

A stage of day D records the resolved config it ran with (the job template of `lumrec daily`'s
config with the day's keys set; paths inside the daily folder written as ``$OUT/...``, so a moved
folder compares equal) in ``days/ds=D/stages/STAGE.config.json`` and that config's SHA-256 digest
in its manifest. A rerun resolves the config again and compares: keys in `NEUTRAL_CHANGES` (thread
counts, progress bars, logging and checkpoint cadence) do not change what a stage computes and are
allowed; any other difference is a `DriftError` naming the day, the stage and each key with its
saved and new value, unless the run asks to redo the changed days (``redo=changed``).

A day whose model has other shapes than the checkpoint it continues (the day before's, or
``lum_init``) gets a `ShapeMismatchError` naming the tensors (`shape_mismatches`).

    >>> from pathlib import Path
    >>> portable({"out": "/runs/d/days/ds=2026-01-02/rank", "data": "/data/logs"}, Path("/runs/d"))
    {'out': '$OUT/days/ds=2026-01-02/rank', 'data': '/data/logs'}
    >>> saved = {"train": {"lr": 0.01, "threads": 1}}
    >>> drift = stage_drift("2026-01-02", "rank", saved, config_digest(saved), {"train": {"lr": 0.02, "threads": 2}})
    >>> drift.changes, drift.neutral
    ({'train.lr': (0.01, 0.02)}, {'train.threads': (1, 2)})
    >>> drift.describe()
    'stage rank: rank.train.lr 0.01 -> 0.02'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lumrec.checkpoint import CheckpointManager, read_metadata
from lumrec.config import config_changes, default_values, to_dict
from lumrec.data.dataset import write_text_atomic
from lumrec.errors import CheckpointLoadError, UserError
from lumrec.faults import failpoint

log = logging.getLogger("lumrec.daily")

__all__ = ["checkpoint_shapes", "config_digest", "describe_mismatches", "drift_message", "DriftChecks", "DriftError",
           "NEUTRAL_CHANGES", "portable", "REDO_JOURNAL", "redo_targets", "RedoJournal", "remove_output", "SECTIONS",
           "shape_key_changes", "SHAPE_KEYS", "shape_mismatches", "ShapeMismatchError", "stage_drift", "StageDrift"]

_STEP_DIR = re.compile(r"^step-\d{8}$")

# The placeholder of the daily folder in recorded configs.
OUT_TOKEN = "$OUT"

# Keys of a stage's resolved config that do not change what it computes: a finished stage whose config differs
# only in these is kept as it is. A thread count changes float summation order, not the computation: the days
# run after the change use the new count. The device, likewise (and activation checkpointing recomputes the same values).
_TRAINING = ("out", "train.threads", "train.progress", "train.log_every_steps", "train.checkpoint_every_steps",
             "train.keep_checkpoints", "train.device")
NEUTRAL_CHANGES: dict[str, tuple[str, ...]] = {
    "pretrain": _TRAINING + ("train.keep_freed_host_memory", "train.activation_checkpointing"),
    "query": ("threads", "progress", "redis", "device"),  # where the partition is also published does not change it
    "rank": _TRAINING,
    "eval": _TRAINING,
}

# The daily config's section each stage's resolved config comes from (how an operator names the key).
SECTIONS = {"pretrain": "pretrain", "query": "query", "rank": "rank", "eval": "rank"}


class DriftError(UserError):
    """Finished days of the daily folder were run with another config; the message names days, keys and values."""


class ShapeMismatchError(CheckpointLoadError):
    """A day's model does not fit the checkpoint it continues from; the message names the tensors and what to do."""


def portable(value: Any, out: Path) -> Any:
    """`value` (a config as plain data) with every path inside the daily folder `out` written as $OUT/..."""
    root = os.fspath(out)
    if isinstance(value, Mapping):
        return {k: portable(v, out) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, out) for v in value]
    if isinstance(value, str) and (value == root or value.startswith(root + os.sep)):
        return OUT_TOKEN + value[len(root):]
    return value


def config_digest(config: Mapping[str, Any]) -> str:
    """SHA-256 of a config's canonical JSON (sorted keys): equal configs, equal digests."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


@dataclass
class StageDrift:
    """How a finished stage's recorded config differs from the one a rerun resolves.

    `changes`: keys that change the stage's outputs, {key: (saved, new)}; `neutral`: keys that do not.
    """

    ds: str
    stage: str
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    neutral: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def describe(self, which: str = "changes", limit: int = 6) -> str:
        """"stage S: key saved -> new, ..." with the daily config's section in front of each key."""
        items = list(getattr(self, which).items())
        section = SECTIONS.get(self.stage, self.stage)
        shown = ", ".join(k if k.startswith("(") else f"{section}.{k} {_short(a)} -> {_short(b)}" for k, (a, b) in items[:limit])
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        return f"stage {self.stage}: {shown}{more}"


def _short(value: Any, width: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def stage_drift(ds: str, stage: str, saved: Mapping[str, Any] | None, saved_digest: str, current: Mapping[str, Any],
                defaults: Mapping[str, Any] | None = None) -> StageDrift | None:
    """The drift of one finished stage, or None when it ran with `current` as it is.

    `saved`: the recorded config (None: its file is missing); `saved_digest`: the manifest's digest.
    A recorded config whose digest is not the manifest's is not the one the stage ran with: the
    difference is unknown and counts as a change. `defaults`: the config's default values, for keys
    the recorded config lacks (written before they existed): at their default they are no change.
    """
    current = json.loads(json.dumps(current))  # tuples as lists, as the recorded JSON holds them
    if config_digest(current) == saved_digest:
        return None
    if saved is None or config_digest(saved) != saved_digest:
        why = "its recorded config is missing" if saved is None else "its recorded config does not match the manifest's digest"
        return StageDrift(ds, stage, {f"(config digest {saved_digest[:12]} in the manifest; {why})": (None, None)})
    allowed = NEUTRAL_CHANGES.get(stage, ())
    changes = config_changes(saved, current, allowed, defaults)
    every = config_changes(saved, current, defaults=defaults)
    if not every:
        return None  # only keys added since, at their defaults
    return StageDrift(ds, stage, changes, {k: v for k, v in every.items() if k not in changes})


def drift_message(out: Path, drifts: list[StageDrift]) -> str:
    """One line: which finished days ran with another config (first stage of each), and the ways on."""
    first = drifts[0]
    days = [d.ds for d in drifts]
    later = f"; later days changed too: {', '.join(f'{d.ds} ({d.describe(limit=3)})' for d in drifts[1:4])}" if len(drifts) > 1 else ""
    more = f" and {len(drifts) - 4} more" if len(drifts) > 4 else ""
    return (f"daily: {out}: day {first.ds} was run with another config ({first.describe()}){later}{more}. "
            f"Its outputs and every later day's were computed with the saved values: pass redo=changed to recompute "
            f"{days[0]} from stage {first.stage} on and every later day of {out}, or set the saved values back, "
            "or write to another out folder (docs/operations.md, config drift)")


def checkpoint_shapes(source: str | os.PathLike, key: str = "model") -> dict[str, tuple[int, ...]]:
    """{name: shape} of the tensors under `key` of a checkpoint folder (its root: the newest that verifies; or one step).

    Read from DCP's metadata alone (lumrec.checkpoint.read_metadata: no code runs, no tensor is loaded).
    """
    folder = Path(source)
    if not _STEP_DIR.match(folder.name):
        manager = CheckpointManager(folder, keep=0)
        folder = manager.step_dir(manager.newest_valid()[0])
    metadata = read_metadata(folder)
    paths = metadata.planner_data or {}
    shapes = {}
    for flat, meta in metadata.state_dict_metadata.items():
        size = getattr(meta, "size", None)  # tensors only (bytes entries have none)
        nested = paths.get(flat)  # DCP flattens {"model": {"a.b": t}} to "model.a.b"; planner_data keeps the path
        if size is None or (nested is not None and (len(nested) < 2 or str(nested[0]) != key)):
            continue
        if nested is None and not flat.startswith(key + "."):
            continue
        name = ".".join(str(p) for p in nested[1:]) if nested is not None else flat[len(key) + 1:]
        shapes[name] = tuple(size)
    return shapes


def shape_mismatches(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]]:
    """(name, saved shape, new shape) of every tensor whose shape differs or that only one side has (None there).

    Either side maps names to tensors or to shapes.

        >>> import torch
        >>> shape_mismatches({"w": (4, 2), "b": (2,)}, {"w": torch.zeros(8, 2), "b": torch.zeros(2)})
        [('w', (4, 2), (8, 2))]
    """
    def shape(t: Any) -> tuple[int, ...] | None:
        if isinstance(t, tuple):
            return t
        size = getattr(t, "size", None)  # torch.Tensor and torchrec's ShardedTensor (its global size) alike
        return tuple(size()) if callable(size) else None

    out = []
    for name in sorted(set(saved) | set(new)):
        a, b = (shape(saved[name]) if name in saved else None), (shape(new[name]) if name in new else None)
        if (name in saved and a is None) or (name in new and b is None):
            continue  # not a tensor (e.g. extra state): DCP does not compare it by shape
        if a != b:
            out.append((name, a, b))
    return out


# Keys of a stage's resolved config that size its model's tensors (named when a day's shapes differ from the day before's).
SHAPE_KEYS = {"pretrain": ("model", "model_config", "data.max_len", "data.condition_features", "data.item_features"),
              "rank": ("model", "sizes", "lum.conditions", "lum.features", "lum.candidate_condition_feature")}


def shape_key_changes(stage: str, saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str:
    """" (pretrain.model_config.d_model 8 -> 16, ...)": the model-sizing keys that differ from a recorded config ("" if none known)."""
    if saved is None:
        return ""
    prefixes = SHAPE_KEYS.get(stage, ())
    found = {k: v for k, v in config_changes(saved, json.loads(json.dumps(current))).items()
             if any(k == p or k.startswith(p + ".") for p in prefixes)}
    return f" ({StageDrift('', stage, found).describe().split(': ', 1)[1]})" if found else ""


def describe_mismatches(found: list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]], limit: int = 6) -> str:
    """"name: saved [a, b], new [c, d]; ..." (a side without the tensor: "none")."""
    fmt = lambda s: "none" if s is None else str(list(s))  # noqa: E731
    shown = "; ".join(f"{name}: saved {fmt(a)}, new {fmt(b)}" for name, a, b in found[:limit])
    return shown + (f"; and {len(found) - limit} more" if len(found) > limit else "")


# -- redo -------------------------------------------------------------------------------------------

REDO_JOURNAL = "redo.json"


class RedoJournal:
    """OUT/redo.json: where a redo starts, written before any output is removed and deleted once all are.

    A run that finds it (the last one was killed mid-redo) finishes the removal first, whatever its flags.
    """

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / REDO_JOURNAL

    def pending(self) -> list[tuple[str, str]] | None:
        """The (day, stage) points of an unfinished redo, or None."""
        if not self.path.exists():
            return None
        try:
            return [(str(ds), str(stage)) for ds, stage in json.loads(self.path.read_text())["from"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"{self.path}: unreadable redo journal ({err}); rerun with redo=changed after deleting it") from None

    def start(self, points: list[tuple[str, str]]) -> None:
        write_text_atomic(self.path, json.dumps({"from": [list(p) for p in points]}, indent=2))

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def redo_targets(points: list[tuple[str, str]], days: list[str], stages: list[str]) -> list[tuple[str, str]]:
    """Every (day, stage) a redo from `points` recomputes: from each point's stage on, on its day and every later day.

    A stage depends on earlier stages of its day and on the same or earlier stages of the day before,
    never on a later stage, so the later days keep the stages before the point's.

        >>> redo_targets([("d2", "rank")], ["d1", "d2", "d3"], ["pretrain", "query", "rank", "eval"])
        [('d2', 'rank'), ('d2', 'eval'), ('d3', 'rank'), ('d3', 'eval')]
    """
    out = []
    for day in sorted(days):
        starts = [stages.index(stage) for ds, stage in points if ds <= day]
        if starts:
            out.extend((day, stage) for stage in stages[min(starts):])
    return out


def remove_output(path: Path) -> None:
    """Remove a stage's output file or folder if present (a rerun after a kill removes what is left)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# -- the checks, as DailyJob runs them ----------------------------------------------------------------


class DriftChecks:
    """Config drift and redo of a daily folder: the part of `DailyJob` that compares and removes finished stages.

    Uses the job's layout (`out`, `stage_file`, `config_file`, `stage_done`, `stages`, `_write_table`),
    its config's `redo` and its rank-0 helpers (`is_main`, `_from_main`, `_barrier`).
    """

    def stage_config(self, stage: Any, ds: str) -> dict[str, Any] | None:
        """The resolved config of `stage` on day `ds` as recorded, or None (a stage without one)."""
        config = stage.config(self, ds) if stage.config is not None else None
        return self.recorded_form(config) if config is not None else None

    def stage_defaults(self, stage: Any, ds: str) -> dict[str, Any] | None:
        """The default values of `stage`'s config class as recorded (None: none, or it needs arguments)."""
        defaults = default_values(stage.config(self, ds) if stage.config is not None else None)
        return json.loads(json.dumps(portable(defaults, self.out))) if defaults is not None else None

    def recorded_form(self, config: Any) -> dict[str, Any]:
        """A job's dataclass config as a stage records it: plain JSON data, paths in the daily folder as $OUT/..."""
        return json.loads(json.dumps(portable(to_dict(config), self.out)))

    def drifts(self, days: list[str]) -> list[StageDrift]:
        """The finished stages of `days` whose resolved config differs from the one they ran with (after a change, none of that day)."""
        found = []
        for ds in days:
            for stage in self.stages():
                done = self.stage_done(ds, stage.name) if stage.config is not None else None
                if done is None or "config_digest" not in done:
                    continue
                try:
                    saved = json.loads(self.config_file(ds, stage.name).read_text())
                except (FileNotFoundError, json.JSONDecodeError):
                    saved = None
                drift = stage_drift(ds, stage.name, saved, done["config_digest"], self.stage_config(stage, ds) or {},
                                    self.stage_defaults(stage, ds))
                if drift is not None:
                    found.append(drift)
                    if drift.changes:
                        break  # its later stages are redone with it
        return found

    def _check_drift(self, days: list[str]) -> None:
        """Refuse finished stages whose config changed (or, with redo=changed, remove them and what follows them)."""
        drifts = self.drifts(days)  # every rank reads the same files (nothing writes now), so all decide alike
        for d in drifts:
            if d.neutral and not d.changes and self.is_main:
                log.info("%s: kept as it ran (%s; keys that do not change its outputs)", d.ds, d.describe("neutral"))
        changed = [d for d in drifts if d.changes]
        if not changed:
            return
        if self.cfg.redo != "changed":
            raise DriftError(drift_message(self.out, changed))
        if self.is_main:
            log.warning("redo=changed: recomputing %s", "; ".join(f"{d.ds} from {d.describe()}" for d in changed))
        self._redo([(d.ds, d.stage) for d in changed])

    def _redo(self, points: list[tuple[str, str]]) -> None:
        """Remove the outputs from each point's stage on, on its day and every later day (journal first: a kill mid-way is finished by the next run)."""
        journal = RedoJournal(self.out)
        if self.is_main:
            journal.start(points)
            days = sorted(p.name.removeprefix("ds=") for p in (self.out / "days").glob("ds=*"))
            every = {s.name: s for s in self.stages(every=True)}
            targets = redo_targets(points, days, list(every))
            for ds, name in targets:  # manifests first: from here on every target stage reads as incomplete
                remove_output(self.stage_file(ds, name))
            failpoint("daily.redo.manifests_removed")
            for ds, name in targets:
                stage = every[name]
                for path in [self.config_file(ds, name), *(stage.outputs(self, ds) if stage.outputs else [])]:
                    remove_output(path)
            self._write_table()
            journal.done()
            log.info("redo: removed the outputs of %d stage(s) of %s", len(targets), ", ".join(sorted({d for d, _ in targets})))
        self._barrier()

    def _finish_pending_redo(self) -> None:
        """A redo the last run was killed in: finish its removals before anything runs."""
        points = self._from_main(RedoJournal(self.out).pending() if self.is_main else None)
        if points:
            if self.is_main:
                log.warning("%s: finishing the redo a killed run started (from %s)", self.out / REDO_JOURNAL, points)
            self._redo(points)

