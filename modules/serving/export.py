"""Serving wrappers of trained rankers and towers, ``torch.export`` of them and their AOTInductor packages.

A ranking model takes a torchrec KJT; a serving request is one user and B candidates. A
``RankerServing`` wrapper takes that request as plain tensors, builds the KJT inside its forward
exactly as a training batch lays it out (the per-sample keys in ``CANDIDATE_KEYS`` order, one id
each, then the history keys, the user's history repeated for every candidate) and returns the
scores ``sigmoid(logits)`` [B]. Its inputs, always all of them (an unused one may be empty):

    context    int64 [C]     the user's context ids, in `context_keys` order (user_id, scenario, ...)
    candidates int64 [K, B]  the candidates' ids, one row per `candidate_keys` key (item_id, category_id)
    history    int64 [H, L]  the user's behaviours, oldest first, one row per `history_keys` key (L may be 0)
    dense      float [B, d]  the candidates' item statistics (d may be 0)
    lum        float [B, w]  LUM features, one row per candidate (w may be 0)
    sample_ts  int64 [1]     the request's unix time (read only by backbones registered with timestamps)
    hist_ts    int64 [L]     the behaviours' unix times (same)

``TowerServing`` does the same for one tower of a two-tower model (user tower: [U] users with their
context ids and each user's own history; item tower: [N] items with their ids) -> vectors [N, d].

``export_program`` exports a wrapper with dynamic B and L (``strict=False``); ``compile_package``
compiles the program to an AOTInductor package (``.pt2``), which ``load_package`` loads.

Example::

    >>> from lumrec.modules.ranking.base import EmbeddingMLP, EmbeddingMLPConfig, TableConfig
    >>> model = EmbeddingMLP(EmbeddingMLPConfig([TableConfig("t_user", 10, 4, ["user_id"]),
    ...     TableConfig("t_item", 20, 4, ["item_id", "hist_item_id"], pooling="mean")], lum_dim=2, mlp=[8]))
    >>> wrapper = RankerServing(model, ["user_id"], ["item_id"], ["hist_item_id"], lum_dim=2)
    >>> example = wrapper.example(batch=3, history=4)
    >>> program = export_program(wrapper, example)
    >>> inputs = wrapper.example(batch=5, history=0, seed=1)
    >>> bool(torch.allclose(program.module()(*inputs), wrapper(*inputs), atol=1e-6))
    True
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch._inductor import package as aoti_package
from torch.export import Dim, ExportedProgram
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.modules.ranking.base import HIST_TS_KEY, SAMPLE_TS_KEY

__all__ = [
    "RANKER_INPUTS",
    "RankerServing",
    "TowerServing",
    "compile_package",
    "export_program",
    "load_package",
]

# The order of a RankerServing's inputs (what a bundle's manifest records and `score` passes).
RANKER_INPUTS = ("context", "candidates", "history", "dense", "lum", "sample_ts", "hist_ts")
# Per-sample keys of a training batch, in its KJT order (lumrec.data.ranking.samples.CANDIDATE_KEYS).
_SAMPLE_KEY_ORDER = ("user_id", "item_id", "category_id", "scenario", "query_id")


def _sample_key_order(keys: Sequence[str]) -> list[str]:
    """`keys` in a training batch's KJT order (known per-sample keys first, in their order, then any others)."""
    known = [k for k in _SAMPLE_KEY_ORDER if k in keys]
    return known + [k for k in keys if k not in known]


class RankerServing(nn.Module):
    """A trained ranker behind plain-tensor inputs for one user and B candidates -> scores [B] (see the module doc).

    `context_keys`: the per-request ids the model pools (user_id, scenario, query_id, ...);
    `candidate_keys`: the per-candidate ids (item_id, category_id); `history_keys`: the behaviour
    keys (hist_item_id, hist_category_id); `timestamps`: append the `sample_ts` / `hist_ts` keys
    (backbones registered with `timestamps=True`).
    """

    def __init__(self, model: nn.Module, context_keys: Sequence[str], candidate_keys: Sequence[str], history_keys: Sequence[str],
                 dense_dim: int = 0, lum_dim: int = 0, timestamps: bool = False) -> None:
        super().__init__()
        self.model = model
        self.context_keys, self.candidate_keys, self.history_keys = list(context_keys), list(candidate_keys), list(history_keys)
        overlap = sorted(set(self.context_keys) & set(self.candidate_keys))
        if overlap:
            raise ValueError(f"RankerServing: key(s) {overlap} are both context and candidate keys")
        if not self.candidate_keys:
            raise ValueError("RankerServing: candidate_keys is empty")
        self.dense_dim, self.lum_dim, self.timestamps = int(dense_dim), int(lum_dim), bool(timestamps)
        self.sample_keys = _sample_key_order(self.context_keys + self.candidate_keys)
        # Where each per-sample key's ids come from: ("context", row) or ("candidates", row).
        self._source = [("context", self.context_keys.index(k)) if k in self.context_keys else ("candidates", self.candidate_keys.index(k))
                        for k in self.sample_keys]

    def sparse_features(self, context: torch.Tensor, candidates: torch.Tensor, history: torch.Tensor,
                        sample_ts: torch.Tensor, hist_ts: torch.Tensor) -> KeyedJaggedTensor:
        """The KJT of stride B a training batch of these B (user, candidate) samples would hold."""
        batch, length = candidates.shape[1], history.shape[1]
        values = []
        for kind, row in self._source:
            values.append(context[row].expand(batch) if kind == "context" else candidates[row])
        # Every candidate shares the user's history: sample-major, each sample's L behaviours in turn.
        for row in range(len(self.history_keys)):
            values.append(history[row].unsqueeze(0).expand(batch, length).reshape(-1))
        ones = torch.ones(batch, dtype=torch.int32, device=candidates.device)
        hist_lengths = torch.full((batch,), length, dtype=torch.int32, device=candidates.device)
        lengths = [ones] * len(self.sample_keys) + [hist_lengths] * len(self.history_keys)
        keys = self.sample_keys + self.history_keys
        per_key = [batch] * len(self.sample_keys) + [batch * length] * len(self.history_keys)
        if self.timestamps:
            values += [sample_ts.expand(batch), hist_ts.unsqueeze(0).expand(batch, length).reshape(-1)]
            lengths += [ones, hist_lengths]
            keys = keys + [SAMPLE_TS_KEY, HIST_TS_KEY]
            per_key += [batch, batch * length]
        # The ids per key are known from the shapes: given, torch.export keeps them symbolic (B, B*L) instead
        # of reading them from the lengths, so every tensor downstream has a size it can reason about.
        return KeyedJaggedTensor(keys=keys, values=torch.cat(values).to(torch.int64), lengths=torch.cat(lengths), stride=batch,
                                 length_per_key=per_key)

    def forward(self, context: torch.Tensor, candidates: torch.Tensor, history: torch.Tensor, dense: torch.Tensor,
                lum: torch.Tensor, sample_ts: torch.Tensor, hist_ts: torch.Tensor) -> torch.Tensor:
        """Scores [B] = sigmoid(logits) of the B candidates."""
        kjt = self.sparse_features(context, candidates, history, sample_ts, hist_ts)
        logits = self.model(kjt, dense if self.dense_dim else None, lum if self.lum_dim else None)
        return torch.sigmoid(logits)

    def example(self, batch: int = 4, history: int = 3, seed: int = 0, vocab: dict[str, int] | None = None) -> tuple[torch.Tensor, ...]:
        """Random inputs for `batch` candidates and `history` behaviours (ids below `vocab[key]`, default 2)."""
        g = torch.Generator().manual_seed(seed)
        size = lambda key: max(int((vocab or {}).get(key, 2)), 2)  # noqa: E731

        def ids(key: str, n: int) -> torch.Tensor:
            return torch.randint(1, size(key), (n,), generator=g, dtype=torch.int64)

        context = torch.stack([ids(k, 1)[0] for k in self.context_keys]) if self.context_keys else torch.zeros(0, dtype=torch.int64)
        candidates = torch.stack([ids(k, batch) for k in self.candidate_keys])
        hist_source = [k[len("hist_"):] if k.startswith("hist_") else k for k in self.history_keys]
        hist = (torch.stack([ids(k, history) for k in hist_source]) if hist_source
                else torch.zeros(0, history, dtype=torch.int64))
        dense = torch.rand(batch, self.dense_dim, generator=g)
        lum = torch.rand(batch, self.lum_dim, generator=g)
        sample_ts = torch.tensor([1_767_225_600 + 86_400], dtype=torch.int64)
        hist_ts = torch.sort(torch.randint(1_767_225_600, 1_767_225_600 + 86_400, (history,), generator=g)).values
        return context, candidates, hist, dense, lum, sample_ts, hist_ts

    def dynamic_shapes(self) -> tuple[Any, ...]:
        """Dynamic B (candidates) and L (history) for `export_program`."""
        b, length = Dim("batch", min=1, max=65536), Dim("history", min=0, max=1 << 20)
        return (None, {1: b}, {1: length}, {0: b}, {0: b}, None, {0: length})


class TowerServing(nn.Module):
    """One tower of a two-tower model behind plain tensors -> vectors [N, d].

    `ids`: int64 [K, N], one row per `keys` key (one id each); `history`: int64 [H, N*L] with
    `history_lengths` int32 [N] (the user tower's pooled behaviours; H may be 0); `lum` [N, w].
    """

    def __init__(self, tower: nn.Module, keys: Sequence[str], history_keys: Sequence[str] = (), lum_dim: int = 0) -> None:
        super().__init__()
        self.tower, self.keys, self.history_keys, self.lum_dim = tower, list(keys), list(history_keys), int(lum_dim)

    def forward(self, ids: torch.Tensor, history: torch.Tensor, history_lengths: torch.Tensor, lum: torch.Tensor) -> torch.Tensor:
        """Tower vectors [N, d]."""
        n = ids.shape[1]
        ones = torch.ones(n, dtype=torch.int32, device=ids.device)
        values = [ids[row] for row in range(len(self.keys))] + [history[row] for row in range(len(self.history_keys))]
        lengths = [ones] * len(self.keys) + [history_lengths.to(torch.int32)] * len(self.history_keys)
        per_key = [n] * len(self.keys) + [history.shape[1]] * len(self.history_keys)  # symbolic under export (RankerServing)
        kjt = KeyedJaggedTensor(keys=self.keys + self.history_keys, values=torch.cat(values).to(torch.int64),
                                lengths=torch.cat(lengths), stride=n, length_per_key=per_key)
        return self.tower(kjt, None, lum if self.lum_dim else None)

    def example(self, n: int = 4, history: int = 3, seed: int = 0, vocab: dict[str, int] | None = None) -> tuple[torch.Tensor, ...]:
        """Random inputs for `n` rows with up to `history` behaviours each."""
        g = torch.Generator().manual_seed(seed)
        size = lambda key: max(int((vocab or {}).get(key, 2)), 2)  # noqa: E731
        ids = torch.stack([torch.randint(1, size(k), (n,), generator=g) for k in self.keys])
        lengths = torch.randint(0, history + 1, (n,), generator=g).to(torch.int32)
        total = int(lengths.sum())
        source = [k[len("hist_"):] if k.startswith("hist_") else k for k in self.history_keys]
        hist = (torch.stack([torch.randint(1, size(k), (total,), generator=g) for k in source]) if source
                else torch.zeros(0, total, dtype=torch.int64))
        return ids, hist, lengths, torch.rand(n, self.lum_dim, generator=g)

    def dynamic_shapes(self) -> tuple[Any, ...]:
        """Dynamic N (rows) and T (total behaviours)."""
        n, total = Dim("rows", min=1, max=1 << 20), Dim("behaviours", min=0, max=1 << 24)
        return ({1: n}, {1: total}, {0: n}, {0: n})


class _DropKJTExportNotice(logging.Filter):
    """torchrec logs a warning per KJT split it sees traced; the wrapper splits by sizes it gives, so it says nothing here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "non-strict torch.export KJT" not in record.getMessage()


@contextmanager
def _quiet() -> Iterator[None]:
    notice, root = _DropKJTExportNotice(), logging.getLogger()
    root.addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch's own pytree internals
            yield
    finally:
        root.removeFilter(notice)


def export_program(wrapper: nn.Module, example: Sequence[torch.Tensor], dynamic_shapes: Any = None) -> ExportedProgram:
    """`torch.export` of `wrapper` (eval mode) on `example`, with its own `dynamic_shapes()` unless given."""
    wrapper.eval()
    shapes = wrapper.dynamic_shapes() if dynamic_shapes is None else dynamic_shapes
    with torch.no_grad(), _quiet():
        return torch.export.export(wrapper, tuple(example), dynamic_shapes=shapes, strict=False)


def compile_package(program: ExportedProgram, path: str | os.PathLike) -> float:
    """Compile `program` with AOTInductor into the package file `path` (.pt2); returns the seconds it took."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _quiet():
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return time.perf_counter() - t0


def load_package(path: str | os.PathLike, num_runners: int = 1) -> Any:
    """The compiled model of an AOTInductor package (callable on the wrapper's inputs; `num_runners` calls run at once)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no AOTInductor package (written by `lumrec export`)")
    return aoti_package.load_package(str(path), num_runners=num_runners)
