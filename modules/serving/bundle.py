"""A serving bundle (what ``lumrec export`` writes) and its loader: one folder, scored one request at a time.

A ranker bundle holds:

    model.pt2      the AOTInductor package of the ranker's ``RankerServing`` wrapper (lumrec.modules.serving.export)
    serving.json   the manifest: format, kind, model name, run, checkpoint (step, digest), `version`, the
                   context keys (in input order) and their vocabulary sizes (`context_vocab`), the candidate and
                   history keys, max_history, the item statistics' columns, the LUM feature config and its width
    items.npz      per item id: `category_id` (the candidate's other id) and, with item statistics,
                   `item_stats` [num_items, d], the latest day's values
    parity.pt      a random example and the eager model's scores on it: ``load_bundle`` checks the package on it

A two-tower bundle (``kind: two_tower``) holds `user_tower.pt2` and `item_tower.pt2` instead of
`model.pt2` (``TwoTowerBundle``).

``ServingBundle.score`` turns a request (user, candidate item ids, context ids, history) into the
wrapper's tensors the way training batches are built, looks the LUM features up from a
``KnowledgeSource`` and runs the package. Malformed requests raise ``RequestError`` naming the field.

Example (``lumrec export RUN OUT`` wrote the folder)::

    bundle = load_bundle("out/bundle")           # checks parity.pt through the package
    result = bundle.score(7, [12, 40, 3], context={"scenario": 1}, history=[5, 9])
    result.scores, result.knowledge_missing       # ([0.12, 0.31, 0.05], True): no knowledge given
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lumrec.knowledge import NoKnowledge
from lumrec.modules.lum_features import KnowledgeSource, LUMFeatureConfig, LUMFeatureModule, candidates_kjt
from lumrec.modules.serving.export import load_package

__all__ = [
    "BUNDLE_FORMAT",
    "BundleError",
    "RequestError",
    "ScoreResult",
    "ServingBundle",
    "TwoTowerBundle",
    "load_bundle",
    "read_manifest",
]

BUNDLE_FORMAT = 1
MANIFEST = "serving.json"
MODEL_FILE = "model.pt2"
ITEMS_FILE = "items.npz"
PARITY_FILE = "parity.pt"
PARITY_TOLERANCE = 1e-5
DEFAULT_MAX_CANDIDATES = 2000
_ITEM_KEYS = ("item_id", "category_id")  # the per-candidate keys a bundle derives from the item id


class BundleError(RuntimeError):
    """A bundle folder that cannot be served (missing or damaged file, parity check failed); names the file."""


class RequestError(ValueError):
    """A malformed request; `field` names the part of the request (e.g. ``candidates[3]``) and str(e) says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class ScoreResult:
    """Scores in candidate order; `knowledge_missing`: the user had no stored knowledge (or none was given)."""

    scores: list[float]
    knowledge_missing: bool


class _Recording:
    """A KnowledgeSource that remembers whether every user lookup came back missing (one per request: no shared state)."""

    def __init__(self, source: KnowledgeSource) -> None:
        self.source, self.dim = source, int(source.dim)
        self.user_lookups, self.all_missing = 0, True

    def user_vectors(self, user_ids: torch.Tensor, feature: str, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vectors, missing = self.source.user_vectors(user_ids, feature, values)
        self.user_lookups += 1
        self.all_missing = self.all_missing and bool(torch.as_tensor(missing).all())
        return vectors, missing

    def item_vectors(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.item_vectors(item_ids)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """`path`/serving.json, checked for its format version."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise BundleError(f"{file}: no bundle manifest (write the bundle with `lumrec export RUN OUT`)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{file}: not valid JSON: {err}") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{file}: bundle format {manifest.get('format')!r}; this lumrec reads format {BUNDLE_FORMAT} "
                          "(export the run again)")
    return manifest


def _int(value: Any, field: str) -> int:
    """`value` as an int (bools and floats with a fraction are not ids)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RequestError(field, f"expected an integer id, got {value!r}")
    return int(value)


def _ids(values: Sequence[Any] | None, field: str, size: int | None, what: str) -> list[int]:
    """Checked ids: integers in [0, size) (`size` None: any non-negative)."""
    if values is None:
        return []
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RequestError(field, f"expected a list of {what} ids, got {type(values).__name__}")
    out = []
    for i, value in enumerate(values):
        v = _int(value, f"{field}[{i}]")
        if v < 0:
            raise RequestError(f"{field}[{i}]", f"{what} id {v} is negative")
        if size is not None and v >= size:
            raise RequestError(f"{field}[{i}]", f"{what} {v} is not in the model's vocabulary ({size} {what}s)")
        out.append(v)
    return out


class ServingBundle:
    """A loaded ranker bundle: ``score`` one user's candidates (thread-safe; see ``score``).

    `max_candidates`: the most candidates one request may hold (more is a RequestError);
    `num_runners`: model instances of the package, so that as many requests run at once (more wait).
    A bundle kind that scores another way (``lumrec.modules.serving.m_falcon_bundle``) overrides
    `_load_model`, `_check_parity` and `_forward`; requests are read the same way.
    """

    KIND = "ranker"

    def __init__(self, path: str | os.PathLike, check: bool = True, max_candidates: int = DEFAULT_MAX_CANDIDATES,
                 num_runners: int = 2) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        if m.get("kind") != self.KIND:
            raise BundleError(f"{self.path / MANIFEST}: kind {m.get('kind')!r} is not a {self.KIND!r} bundle (use load_bundle)")
        self.version: str = m["version"]
        self.max_candidates = int(max_candidates)
        # In the wrapper's input order (the list), each with its vocabulary size.
        self.context_keys: list[str] = list(m["context_keys"])
        self.context_vocab: dict[str, int] = {k: int(m["context_vocab"][k]) for k in self.context_keys}
        self.candidate_keys: list[str] = list(m["candidate_keys"])
        self.history_keys: list[str] = list(m["history_keys"])
        self.num_items, self.num_users = int(m["num_items"]), int(m["num_users"])
        self.max_history: int | None = m["max_history"]
        self.timestamps: bool = bool(m["timestamps"])
        items = _load_items(self.path / ITEMS_FILE)
        self.item_category = torch.from_numpy(items["category_id"].astype(np.int64))
        self.item_stats = torch.from_numpy(items["item_stats"].astype(np.float32)) if "item_stats" in items else None
        self.dense_dim = int(m["dense_dim"])
        lum = m.get("lum")
        self.uses_lum = lum is not None
        self.lum_dim = int(lum["output_width"]) if lum else 0
        self.knowledge_dim = int(lum["dim"]) if lum else 0
        self.lum_config = (LUMFeatureConfig(conditions=[tuple(c) for c in lum["conditions"]],
                                            candidate_condition_feature=lum["candidate_condition_feature"],
                                            features=list(lum["features"]), normalize=bool(lum["normalize"])) if lum else None)
        self.runner = self._load_model(num_runners)
        if check:
            self.parity_error = self._check_parity()

    # -- the model: an AOTInductor package ----------------------------------------------------

    def _load_model(self, num_runners: int) -> Any:
        return _load_runner(self.path / MODEL_FILE, num_runners)

    def _check_parity(self) -> float:
        return check_parity(self.runner, self.path / PARITY_FILE)

    def _forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return _run(self.runner, inputs)

    # -- requests ---------------------------------------------------------------------------

    def _context(self, user_id: int, context: Mapping[str, int] | None) -> torch.Tensor:
        """The context ids in manifest order; a key the request omits is 0 (none: no query, unknown scenario)."""
        given = dict(context or {})
        if not isinstance(context, (Mapping, type(None))):
            raise RequestError("context", f"expected a mapping of context key to id, got {type(context).__name__}")
        unknown = sorted(set(given) - set(self.context_vocab) - {"user_id"})
        if unknown:
            raise RequestError(f"context.{unknown[0]}", f"unknown context key; the model reads {sorted(self.context_vocab)}")
        if "user_id" in given and _int(given["user_id"], "context.user_id") != user_id:
            raise RequestError("context.user_id", f"{given['user_id']} differs from user_id {user_id}")
        given["user_id"] = user_id
        values = []
        for key, size in self.context_vocab.items():
            v = _int(given.get(key, 0), f"context.{key}")
            field = "user_id" if key == "user_id" else f"context.{key}"
            if v < 0:
                raise RequestError(field, f"id {v} is negative")
            if v >= size:
                raise RequestError(field, f"{key} {v} is not in the model's vocabulary ({size} values)")
            values.append(v)
        return torch.tensor(values, dtype=torch.int64)

    def _lum(self, user_id: int, items: torch.Tensor, categories: torch.Tensor, context: Mapping[str, int],
             knowledge: KnowledgeSource | None) -> tuple[torch.Tensor, bool]:
        """LUM features [B, w] and whether the user had no stored knowledge."""
        if knowledge is None:
            source: Any = NoKnowledge(self.knowledge_dim)
        else:
            if int(getattr(knowledge, "dim", -1)) != self.knowledge_dim:
                raise ValueError(f"knowledge source {type(knowledge).__name__} has dim {getattr(knowledge, 'dim', None)}; "
                                 f"bundle {self.path} was trained on knowledge of dim {self.knowledge_dim}")
            source = knowledge
        recording = _Recording(source)
        module = LUMFeatureModule(self.lum_config, recording)
        feature = self.lum_config.candidate_condition_feature
        cond = None
        if feature is not None:
            # As in training (`getattr(batch, feature)`): the candidate's own category, or the request's context id.
            if feature == "category_id":
                cond = categories
            elif feature == "item_id":
                cond = items
            else:
                cond = torch.full_like(items, int(context.get(feature, 0)))
        kjt = candidates_kjt(items, torch.tensor([items.numel()]), cond, condition_key=self.lum_config.candidate_condition_key
                             or "category_id")
        values = module(torch.tensor([user_id], dtype=torch.int64), kjt).values()
        missing = knowledge is None or (recording.all_missing if recording.user_lookups else False)
        return values, missing

    def inputs(self, user_id: int, candidates: Sequence[int], context: Mapping[str, int] | None = None,
               history: Sequence[int] | None = None, history_ts: Sequence[int] | None = None, request_ts: int | None = None,
               knowledge: KnowledgeSource | None = None) -> tuple[tuple[torch.Tensor, ...], bool]:
        """(the package's input tensors, knowledge missing) of a request, validated (see ``score``)."""
        user_id = _int(user_id, "user_id")
        if user_id < 0:
            raise RequestError("user_id", f"id {user_id} is negative")
        ctx = self._context(user_id, context)
        if candidates is None or (isinstance(candidates, Sequence) and len(candidates) == 0):
            raise RequestError("candidates", "no candidates to score")
        items = _ids(candidates, "candidates", self.num_items, "item")
        if len(items) > self.max_candidates:
            raise RequestError("candidates", f"{len(items)} candidates; at most {self.max_candidates} per request")
        hist = _ids(history, "history", self.num_items, "item")
        times = _ids(history_ts, "history_ts", None, "time") if history_ts is not None else None
        if times is not None and len(times) != len(hist):
            raise RequestError("history_ts", f"{len(times)} times for {len(hist)} history items")
        if self.max_history is not None and len(hist) > self.max_history:
            # Training keeps the most recent max_history behaviours (histories are oldest first).
            hist = hist[len(hist) - self.max_history:]
            times = None if times is None else times[len(times) - self.max_history:]
        if request_ts is None:
            request_ts = int(time.time())
        request_ts = _int(request_ts, "request_ts")
        if times is None:
            times = [request_ts - 1] * len(hist)  # unknown behaviour times: just before the request
        item_t = torch.tensor(items, dtype=torch.int64)
        cat_t = self.item_category[item_t]
        per_key = {"item_id": item_t, "category_id": cat_t}
        cands = torch.stack([per_key[k] for k in self.candidate_keys])
        hist_t = torch.tensor(hist, dtype=torch.int64)
        hist_per_key = {"hist_item_id": hist_t, "hist_category_id": self.item_category[hist_t]}
        hist_rows = torch.stack([hist_per_key[k] for k in self.history_keys]) if self.history_keys else torch.zeros(0, len(hist), dtype=torch.int64)
        b = len(items)
        dense = self.item_stats[item_t] if self.item_stats is not None else torch.zeros(b, 0)
        missing = knowledge is None
        lum = torch.zeros(b, 0)
        if self.uses_lum:
            lum, missing = self._lum(user_id, item_t, cat_t, dict(context or {}), knowledge)
        inputs = (ctx, cands, hist_rows, dense.contiguous(), lum.contiguous().float(),
                  torch.tensor([request_ts], dtype=torch.int64), torch.tensor(times, dtype=torch.int64))
        return inputs, missing

    def score(self, user_id: int, candidates: Sequence[int], context: Mapping[str, int] | None = None,
              history: Sequence[int] | None = None, history_ts: Sequence[int] | None = None, request_ts: int | None = None,
              knowledge: KnowledgeSource | None = None) -> ScoreResult:
        """Scores (click probabilities) of `candidates` (item ids) for `user_id`.

        - `context`: the request's context ids by key (scenario, query_id, ...); a key the model
          reads that the request omits is 0, the "none / unknown" id of training data.
        - `history`: the user's behaviours (item ids), oldest first; the most recent
          `max_history` are kept, as in training; their categories come from the bundle's item
          table. `history_ts` (unix seconds, same length) and `request_ts` matter only to a
          backbone that reads times; without them the behaviours are taken as just before the request.
        - `knowledge`: where the user's LUM knowledge is looked up. None (no store, or the store
          is down) gives what training gave a user with no knowledge before the sample's day:
          zero vectors with every missing flag set (``lumrec.knowledge.NoKnowledge``), and
          `knowledge_missing` True. A user the store does not know is scored the same way and
          also reports `knowledge_missing` True. A bundle without LUM features reads no
          knowledge; its `knowledge_missing` is True only when `knowledge` is None.

        Raises ``RequestError`` naming the field for an unknown context key, a negative id, an id
        outside the model's vocabulary, no candidates, or more than `max_candidates`.

        Thread safety: a request's tensors and LUM module are its own; the bundle's state is read
        only; the package runs up to `num_runners` requests at once and queues the rest.
        tests/test_export.py scores from 8 threads at once and checks every result against the same
        request scored alone.
        """
        inputs, missing = self.inputs(user_id, candidates, context, history, history_ts, request_ts, knowledge)
        with torch.inference_mode():
            out = self._forward(inputs)
        return ScoreResult(out.reshape(-1).tolist(), bool(missing))


class TwoTowerBundle:
    """A loaded two-tower bundle: `user_vectors` / `item_vectors` through the towers' packages (tensors in, vectors out)."""

    def __init__(self, path: str | os.PathLike, check: bool = True, num_runners: int = 2) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.version: str = self.manifest["version"]
        self.uses_lum = self.manifest.get("lum") is not None
        self.lum_dim = int(self.manifest["lum"]["user_width"]) if self.uses_lum else 0
        self.user_tower = _load_runner(self.path / "user_tower.pt2", num_runners)
        self.item_tower = _load_runner(self.path / "item_tower.pt2", num_runners)
        if check:
            self.parity_error = max(check_parity(self.user_tower, self.path / "parity_user.pt"),
                                    check_parity(self.item_tower, self.path / "parity_item.pt"))

    def user_vectors(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The user tower on its `TowerServing` inputs (ids [K, U], history [H, T], history lengths [U], LUM [U, w])."""
        with torch.inference_mode():
            return _run(self.user_tower, inputs)

    def item_vectors(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The item tower on its `TowerServing` inputs (ids [K, N], empty history, lengths [N], LUM [N, w])."""
        with torch.inference_mode():
            return _run(self.item_tower, inputs)


def _load_items(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise BundleError(f"{path}: the bundle's item table is missing (export the run again)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: unreadable item table: {err}") from None


def _load_runner(path: Path, num_runners: int) -> Any:
    if not path.is_file():
        raise BundleError(f"{path}: the bundle's model package is missing (export the run again)")
    try:
        return load_package(path, num_runners=num_runners)
    except RuntimeError as err:
        raise BundleError(f"{path}: cannot load the AOTInductor package: {err}") from None


def _run(runner: Any, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    out = runner(*inputs)
    return out[0] if isinstance(out, (list, tuple)) else out


def check_parity(runner: Any, path: Path, tolerance: float = PARITY_TOLERANCE, what: str = "the package",
                 why: str = "the package does not match this machine or the export is broken") -> float:
    """Run `path`'s example through `runner` (called with its inputs); the largest difference from the eager outputs
    it holds (raises past `tolerance`, naming `what` was checked and `why` it may differ)."""
    if not path.is_file():
        raise BundleError(f"{path}: the bundle's parity example is missing (export the run again)")
    saved = torch.load(path, weights_only=True)
    with torch.inference_mode():
        out = _run(runner, saved["inputs"])
    expected = saved["outputs"]
    if tuple(out.shape) != tuple(expected.shape):
        raise BundleError(f"{path}: {what} returned shape {tuple(out.shape)}, the eager model {tuple(expected.shape)}")
    error = float((out.float() - expected.float()).abs().max()) if expected.numel() else 0.0
    if not error <= tolerance:
        raise BundleError(f"{path}: {what} differs from the eager model by {error:.3g} (> {tolerance:g}); {why}: export the run again")
    return error


def load_bundle(path: str | os.PathLike, check: bool = True, **options: Any) -> ServingBundle | TwoTowerBundle:
    """The bundle in folder `path` (a ranker's ``ServingBundle``, an HSTU run's ``MFalconBundle``, a two-tower run's ``TwoTowerBundle``).

    `check`: run parity.pt through the loaded package and raise ``BundleError`` if it differs
    from the eager outputs by more than 1e-5. `options`: ``ServingBundle``'s `max_candidates`, `num_runners`.
    """
    kind = read_manifest(path).get("kind")
    if kind == "ranker":
        return ServingBundle(path, check=check, **options)
    if kind == "hstu_m_falcon":
        from lumrec.modules.serving.m_falcon_bundle import MFalconBundle  # imports the HSTU ranker only when served

        return MFalconBundle(path, check=check, **options)
    if kind == "two_tower":
        options.pop("max_candidates", None)
        return TwoTowerBundle(path, check=check, **options)
    raise BundleError(f"{Path(path) / MANIFEST}: unknown bundle kind {kind!r}")
