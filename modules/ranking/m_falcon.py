"""M-FALCON inference for the HSTU ranker: one user's history encoded once, M candidates scored in micro-batches.

`HSTURanker.forward` scores a candidate by running the sequence [h_1 .. h_L, c] through every
HSTU layer, so M candidates of one user cost M passes over the same history. Causality makes
the history's states independent of the candidate (a history token never sees a later token),
so M-FALCON (the HSTU paper's microbatched-fast-attention-leveraging-cacheable-operations) splits
the work:

    encode_history:    the history through the stack once; per layer its keys K_l and values V_l  (HistoryCache)
    score_candidates:  per micro-batch of m candidates, per layer l, each candidate's token x:
                       u, v, q, k   = split(silu(f1(LayerNorm(x))))
                       A v          = (silu(q K_l^T + rab(L - j, t_s - t_j)) V_l + silu(q.k + rab(0, 0)) v) / n
                       x            = x + f2(LayerNorm(A v) * u)
                       then the ranker's head: MLP([context, LayerNorm(x), dense, LUM features])

Each candidate attends the whole (kept) history and itself only, sits at position L (the number
of kept behaviours) and, with the time bias on, at the request time `sample_ts`: exactly the last
row of its one-pass sequence, so the scores equal `model(kjt)` on M samples that each carry the
full history (tests/test_m_falcon.py checks 1e-5). HSTU's normaliser n is the model's
(`normaliser="length"`: L + 1, the one-pass segment's length, for history and candidate rows
alike), so the cache does not depend on the candidates; the relative bias of the candidate row
depends on `sample_ts` and is computed per call, so one cache serves several requests of a user.
The last layer's history states are never needed: encode_history runs only its projections.

Cost, with L kept behaviours, M candidates and `num_layers` layers: encode_history is one pass
of L tokens (`num_layers - 1` causal attentions, O(L^2) each); score_candidates is M tokens
through the layers' projections plus M x L attention pairs per layer; one pass per candidate is
M passes of L + 1 tokens (benchmarks/m_falcon.py measures the ratio).

Example::

    >>> from lumrec.modules.ranking.base import TableConfig
    >>> from lumrec.modules.ranking.hstu_ranking import HSTURanker, HSTURankerConfig
    >>> _ = torch.manual_seed(0)
    >>> model = HSTURanker(HSTURankerConfig(
    ...     sequence_tables=[TableConfig("t_item", 50, 4, ["item_id", "hist_item_id"])],
    ...     candidate_keys=["item_id"], history_keys=["hist_item_id"],
    ...     context_tables=[TableConfig("t_user", 5, 4, ["user_id"])], mlp=[8], hstu={"max_len": 16})).eval()
    >>> history, history_ts = {"hist_item_id": torch.tensor([3, 7, 7, 1])}, torch.tensor([10, 20, 35, 60])
    >>> candidates, context = {"item_id": torch.arange(5)}, {"user_id": torch.tensor([2])}
    >>> scorer = MFalconScorer(model, micro_batch=2)
    >>> scores = scorer.score(history, candidates, context, history_ts=history_ts, sample_ts=90)
    >>> kjt = per_candidate_kjt(model.config, history, candidates, context, history_ts=history_ts, sample_ts=90)
    >>> with torch.no_grad():
    ...     one_pass = model(kjt)                       # five sequences [history, candidate]
    >>> scores.shape, bool(torch.allclose(scores, one_pass, atol=1e-5))
    (torch.Size([5]), True)
    >>> cache = scorer.encode_history(history, history_ts)       # reused by later requests of this user
    >>> bool(torch.equal(scorer.score_candidates(cache, candidates, context, sample_ts=90), scores))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.modules.layers.hstu import HSTULayer
from lumrec.modules.layers.relative_bias import RelativeAttentionBias, time_gap_buckets
from lumrec.modules.ops import build_attention_layout, jagged_causal_attention
from lumrec.modules.ranking.base import Dense, dense_part, with_timestamps
from lumrec.modules.ranking.hstu_ranking import HSTURanker, HSTURankerConfig

__all__ = ["HistoryCache", "MFalconScorer", "per_candidate_kjt"]

OWNER = "MFalconScorer"
# A context key given per candidate: one id each ([M]) or a bag each (values, lengths [M]).
CandidateIds = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class HistoryCache:
    """One user's history, encoded: what every candidate of that user attends to, per HSTU layer.

    `length`: behaviours kept (the most recent `max_history`); `keys[l]` `[heads, dqk, length]`
    (transposed for `q @ K`), `values[l]` `[heads, length, dv]`; `timestamps` `[length]` (None when
    the model has no time bias); `norm`: HSTU's n for the candidate rows.
    """

    length: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    timestamps: torch.Tensor | None
    norm: float


def _ids(value: object, name: str) -> torch.Tensor:
    """`value` as a 1-D int64 tensor of ids; anything else is an error naming `name`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{OWNER}: {name} must be a 1-D integer tensor, got {type(value).__name__}")
    if value.dim() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{OWNER}: {name} must be a 1-D integer tensor, got {value.dtype} of shape {tuple(value.shape)}")
    return value.to(torch.int64)


def _check_range(ids: torch.Tensor, size: int, name: str) -> None:
    """Every id in [0, size): an id outside the table is an error naming `name` (instead of an index error deep in torchrec)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise ValueError(f"{OWNER}: {name} has ids outside [0, {size}) (min {int(ids.min())}, max {int(ids.max())})")


def _table_sizes(config: HSTURankerConfig) -> dict[str, int]:
    """Rows of the table each sparse key looks up."""
    tables = list(config.sequence_tables) + list(config.context_tables)
    return {k: t.num_embeddings for t in tables for k in t.feature_names}


def _context_keys(config: HSTURankerConfig) -> list[str]:
    return [k for t in config.context_tables for k in t.feature_names]


def _bags(value: CandidateIds, count: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-candidate context key as (ids, lengths [count]): one id each, or a (values, lengths) pair."""
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"{OWNER}: {name} must be ids [M] or a (values, lengths [M]) pair")
        ids, lengths = _ids(value[0], f"{name} values"), _ids(value[1], f"{name} lengths")
        if lengths.numel() != count or bool((lengths < 0).any()) or int(lengths.sum()) != ids.numel():
            raise ValueError(
                f"{OWNER}: {name} lengths must be {count} non-negative counts summing to its {ids.numel()} values, "
                f"got {lengths.tolist()}"
            )
        return ids, lengths
    ids = _ids(value, name)
    if ids.numel() != count:
        raise ValueError(f"{OWNER}: {name} must have one id per candidate ({count}), got {ids.numel()}")
    return ids, torch.ones(count, dtype=torch.int64)


def _context_kjt(
    config: HSTURankerConfig,
    candidates: Mapping[str, CandidateIds],
    context: Mapping[str, torch.Tensor] | None,
    count: int,
) -> KeyedJaggedTensor | None:
    """The context keys of `count` samples: the user's bags repeated, per-candidate ids as given; None without context tables."""
    keys = _context_keys(config)
    context = dict(context or {})
    unknown = sorted(set(context) - set(keys))
    if unknown:
        raise ValueError(f"{OWNER}: context has key(s) {unknown} that no context table looks up; context keys: {keys}")
    if not keys:
        return None
    sizes = _table_sizes(config)
    values, lengths = [], []
    for key in keys:
        if key in context and key in candidates:
            raise ValueError(f"{OWNER}: context key {key!r} is given both in context (per user) and in candidates (per candidate)")
        if key in context:
            ids = _ids(context[key], f"context[{key!r}]")
            values.append(ids.repeat(count))
            lengths.append(torch.full((count,), ids.numel(), dtype=torch.int64))
        elif key in candidates:
            ids, per = _bags(candidates[key], count, f"candidates[{key!r}]")
            values.append(ids)
            lengths.append(per)
        else:
            raise ValueError(f"{OWNER}: context key {key!r} is missing: give the user's ids in context or one per candidate in candidates")
        _check_range(values[-1], sizes[key], f"context key {key!r}")
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths).to(torch.int32), stride=count)


def _history(config: HSTURankerConfig, history: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """The history keys' ids (all given, same length, in range) and that length."""
    if not isinstance(history, Mapping):
        raise TypeError(f"{OWNER}: history must be a mapping of history key -> ids, got {type(history).__name__}")
    keys = list(config.history_keys)
    unknown = sorted(set(history) - set(keys))
    missing = [k for k in keys if k not in history]
    if unknown or missing:
        raise ValueError(f"{OWNER}: history must have exactly the keys {keys}; missing {missing}, unknown {unknown}")
    return _id_columns(config, history, keys, "history")


def _candidates(config: HSTURankerConfig, candidates: Mapping[str, CandidateIds]) -> tuple[dict[str, torch.Tensor], int]:
    """The candidate keys' ids (one per candidate, in range) and the number of candidates M."""
    if not isinstance(candidates, Mapping):
        raise TypeError(f"{OWNER}: candidates must be a mapping of candidate key -> ids, got {type(candidates).__name__}")
    keys = list(config.candidate_keys)
    missing = [k for k in keys if k not in candidates]
    unknown = sorted(set(candidates) - set(keys) - set(_context_keys(config)))
    if missing or unknown:
        raise ValueError(
            f"{OWNER}: candidates must have the keys {keys} (and may have per-candidate context keys "
            f"{_context_keys(config)}); missing {missing}, unknown {unknown}"
        )
    return _id_columns(config, candidates, keys, "candidates")


def _id_columns(config: HSTURankerConfig, given: Mapping[str, object], keys: list[str], name: str) -> tuple[dict[str, torch.Tensor], int]:
    """`given[k]` as ids for each of `keys`, all of one count and in their table's range; and that count."""
    sizes = _table_sizes(config)
    out = {k: _ids(given[k], f"{name}[{k!r}]") for k in keys}
    count = out[keys[0]].numel()
    for key, ids in out.items():
        if ids.numel() != count:
            raise ValueError(f"{OWNER}: {name}[{key!r}] has {ids.numel()} ids but {name}[{keys[0]!r}] has {count}")
        _check_range(ids, sizes[key], f"{name}[{key!r}]")
    return out, count


def _history_ts(config: HSTURankerConfig, history_ts: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The behaviours' times [length] when the model has a time bias (required then), else None."""
    if not config.hstu.use_time_bias:
        return None
    if history_ts is None:
        raise ValueError(f"{OWNER}: the model's use_time_bias is on: give history_ts (one time per behaviour, {length})")
    ts = _ids(history_ts, "history_ts")
    if ts.numel() != length:
        raise ValueError(f"{OWNER}: history_ts must have one time per behaviour ({length}), got {ts.numel()}")
    return ts


def _sample_ts(config: HSTURankerConfig, sample_ts: int | torch.Tensor | None) -> int | None:
    """The request's time as an int when the model has a time bias (required then), else None."""
    if not config.hstu.use_time_bias:
        return None
    if sample_ts is None:
        raise ValueError(f"{OWNER}: the model's use_time_bias is on: give sample_ts (the request's time)")
    if isinstance(sample_ts, torch.Tensor):
        if sample_ts.numel() != 1 or sample_ts.is_floating_point():
            raise ValueError(f"{OWNER}: sample_ts must be one integer time, got {sample_ts.dtype} of shape {tuple(sample_ts.shape)}")
        return int(sample_ts.reshape(()))
    if isinstance(sample_ts, bool) or not isinstance(sample_ts, int):
        raise TypeError(f"{OWNER}: sample_ts must be an int (the request's time), got {type(sample_ts).__name__}")
    return sample_ts


def _candidate_row_bias(
    rab: RelativeAttentionBias | None, length: int, timestamps: torch.Tensor | None, sample_ts: int | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Relative bias of the candidate row: over the history `[heads, 1, length]` and on itself `[heads, 1, 1]`.

    The candidate sits at position `length` and time `sample_ts`, as the last token of its one-pass
    sequence: the entries are `RelativeAttentionBias.pair_indices`' for that row (i - j clipped to
    max_len - 1, |t_i - t_j| bucketed), with the self pair (0, 0) last.
    """
    if rab is None:
        return None
    bias = None
    if rab.position_weight is not None:
        rel = length - torch.arange(length + 1)
        index = rel.clamp(-(rab.max_len - 1), rab.max_len - 1) + (rab.max_len - 1)
        bias = rab.position_weight[:, index]
    if rab.time_weight is not None:
        if timestamps is None or sample_ts is None:
            raise ValueError(f"{OWNER}: use_time_bias is on but the history has no timestamps")
        gaps = sample_ts - torch.cat([timestamps, torch.tensor([sample_ts])])
        time_bias = rab.time_weight[:, time_gap_buckets(gaps, rab.time_bucket_base, rab.num_time_buckets)]
        bias = time_bias if bias is None else bias + time_bias
    if bias is None:
        return None
    return bias[:, None, :length], bias[:, None, length:]


def _candidate_layer(
    layer: HSTULayer,
    x: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: tuple[torch.Tensor, torch.Tensor] | None,
    norm: float,
) -> torch.Tensor:
    """One HSTU layer on candidate tokens `x [m, d]`, each attending the cached history and itself."""
    cfg, m, heads = layer.config, x.shape[0], layer.config.num_heads
    u, v, q, k = torch.split(
        F.silu(layer.f1(layer.input_norm(x))), [heads * cfg.dv, heads * cfg.dv, heads * cfg.dqk, heads * cfg.dqk], dim=-1
    )
    q = q.reshape(m, heads, cfg.dqk).transpose(0, 1)  # [H, m, dqk]
    k = k.reshape(m, heads, cfg.dqk).transpose(0, 1)
    v = v.reshape(m, heads, cfg.dv).transpose(0, 1)
    scores = torch.matmul(q, keys)  # [H, m, L]
    own = (q * k).sum(-1, keepdim=True)  # [H, m, 1]: the candidate's key is its own
    if bias is not None:
        scores = scores + bias[0].to(scores.dtype)
        own = own + bias[1].to(own.dtype)
    attn = (torch.matmul(F.silu(scores), values) + F.silu(own) * v) / norm  # [H, m, dv]
    attn = attn.transpose(0, 1).reshape(m, heads * cfg.dv)
    return x + layer.f2(layer.dropout(layer.attn_norm(attn) * u))


class MFalconScorer:
    """Scores of M candidates for one user from one encoding of the history (M-FALCON); equal to `model(kjt)`.

    `model`: an `HSTURanker` in eval mode (dropout off; a model in training mode is refused, here
    and at each call). `micro_batch`: candidates per pass through the layers (bounds the
    `[heads, micro_batch, L]` score blocks; scores do not depend on it).

    Inputs, for one user with L behaviours and M candidates:
    - `history`: every history key of the config -> ids `[L]` (oldest first, all of them:
      `max_history` keeps the most recent, as the model does);
    - `candidates`: every candidate key -> ids `[M]`; a context key the candidate decides (e.g.
      an item attribute pooled with the context tables) -> ids `[M]` or `(values, lengths [M])`;
    - `context`: the other context keys -> the user's ids (a bag, shared by every candidate);
    - `history_ts` `[L]` and `sample_ts` (the request's time): needed when `use_time_bias` is on;
    - `dense` `[M, dense_dim]`, `lum` `[M, lum_dim]`: as `HSTURanker.forward`'s dense / LUM features.
    """

    def __init__(self, model: HSTURanker, micro_batch: int = 64) -> None:
        if not isinstance(model, HSTURanker):
            raise TypeError(f"{OWNER}: model must be an HSTURanker, got {type(model).__name__}")
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"{OWNER}: micro_batch must be an int >= 1, got {micro_batch!r}")
        self.model = model
        self.micro_batch = micro_batch
        self._check_eval()

    @property
    def config(self) -> HSTURankerConfig:
        return self.model.config

    def _check_eval(self) -> None:
        # Any submodule counts: a dropout left in training mode would make the scores random.
        training = [name or "the model" for name, m in self.model.named_modules() if m.training]
        if training:
            raise ValueError(
                f"{OWNER}: {training[0]} is in training mode; call model.eval() first (M-FALCON scores with dropout off)"
            )

    def _lookup(self, ids: Mapping[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        """Concatenated per-id vectors `[n, item_dim]` of `keys`' ids (every other sequence key empty)."""
        arch = self.model.sequence_arch
        count = ids[keys[0]].numel()
        lengths = torch.tensor([count if k in ids else 0 for k in arch.keys], dtype=torch.int32)
        values = torch.cat([ids[k] for k in arch.keys if k in ids])
        embedded = arch.embedding_collection(KeyedJaggedTensor(keys=arch.keys, values=values, lengths=lengths, stride=1))
        return torch.cat([embedded[k].values() for k in keys], dim=1)

    @torch.no_grad()
    def encode_history(self, history: Mapping[str, torch.Tensor], history_ts: torch.Tensor | None = None) -> HistoryCache:
        """The history's per-layer keys and values (the most recent `max_history` behaviours), for any number of calls."""
        self._check_eval()
        cfg, model = self.config, self.model
        ids, length = _history(cfg, history)
        ts = _history_ts(cfg, history_ts, length)
        if cfg.max_history is not None and length > cfg.max_history:
            ids = {k: v[-cfg.max_history :] for k, v in ids.items()}
            ts = None if ts is None else ts[-cfg.max_history :]
            length = cfg.max_history
        layer_cfg = cfg.hstu
        normaliser = layer_cfg.resolved_normaliser
        # "length": the one-pass segment is [history, candidate], L + 1 tokens, for every row.
        norm = float(length + 1) if normaliser == "length" else float(normaliser)
        layers = list(model.stack.layers)
        heads = layer_cfg.num_heads
        if length == 0:
            empty_k, empty_v = torch.zeros(heads, layer_cfg.dqk, 0), torch.zeros(heads, 0, layer_cfg.dv)
            return HistoryCache(0, [empty_k] * len(layers), [empty_v] * len(layers), ts, norm)
        x = model.input_dropout(model.input_proj(self._lookup(ids, list(cfg.history_keys))))
        layout = build_attention_layout(torch.tensor([0, length]), timestamps=ts)
        keys, values = [], []
        for i, layer in enumerate(layers):
            u, v, q, k = torch.split(
                F.silu(layer.f1(layer.input_norm(x))),
                [heads * layer_cfg.dv, heads * layer_cfg.dv, heads * layer_cfg.dqk, heads * layer_cfg.dqk], dim=-1,
            )
            keys.append(k.reshape(length, heads, layer_cfg.dqk).permute(1, 2, 0).contiguous())
            values.append(v.reshape(length, heads, layer_cfg.dv).transpose(0, 1).contiguous())
            if i == len(layers) - 1:
                break  # the last layer's history states feed nothing the candidates read
            attn = jagged_causal_attention(
                q.reshape(length, heads, layer_cfg.dqk), k.reshape(length, heads, layer_cfg.dqk),
                v.reshape(length, heads, layer_cfg.dv), kind="hstu", layout=layout,
                relative_bias=layer.relative_bias, normaliser=norm,
            )
            x = x + layer.f2(layer.dropout(layer.attn_norm(attn.reshape(length, heads * layer_cfg.dv)) * u))
        return HistoryCache(length, keys, values, ts, norm)

    @torch.no_grad()
    def score_candidates(
        self,
        cache: HistoryCache,
        candidates: Mapping[str, CandidateIds],
        context: Mapping[str, torch.Tensor] | None = None,
        sample_ts: int | torch.Tensor | None = None,
        dense: Dense = None,
        lum: Dense = None,
    ) -> torch.Tensor:
        """Logits `[M]` of the candidates against an encoded history, `micro_batch` candidates at a time."""
        self._check_eval()
        cfg, model = self.config, self.model
        if not isinstance(cache, HistoryCache):
            raise TypeError(f"{OWNER}: cache must be a HistoryCache from encode_history, got {type(cache).__name__}")
        layers = list(model.stack.layers)
        if len(cache.keys) != len(layers) or (cache.length and cache.keys[0].shape[:2] != (cfg.hstu.num_heads, cfg.hstu.dqk)):
            raise ValueError(f"{OWNER}: cache was encoded by a different model ({len(cache.keys)} layers, this one has {len(layers)})")
        ids, count = _candidates(cfg, candidates)
        when = _sample_ts(cfg, sample_ts)
        ctx_kjt = _context_kjt(cfg, candidates, context, count)
        dense_x = dense_part(dense, cfg.dense_dim, "dense", count, OWNER)
        lum_x = dense_part(lum, cfg.lum_dim, "lum", count, OWNER)
        if count == 0:
            return torch.zeros(0)
        biases = [_candidate_row_bias(layer.relative_bias, cache.length, cache.timestamps, when) for layer in layers]
        tokens = model.input_dropout(model.input_proj(self._lookup(ids, list(cfg.candidate_keys))))
        states = []
        for start in range(0, count, self.micro_batch):
            x = tokens[start : start + self.micro_batch]
            for layer, keys, values, bias in zip(layers, cache.keys, cache.values, biases):
                x = _candidate_layer(layer, x, keys, values, bias, cache.norm)
            states.append(x)
        parts = [] if ctx_kjt is None else [model.context_arch(ctx_kjt)]
        parts.append(model.output_norm(torch.cat(states)))
        parts += [x for x in (dense_x, lum_x) if x is not None]
        return model.over_arch(torch.cat(parts, dim=1))

    def score(
        self,
        history: Mapping[str, torch.Tensor],
        candidates: Mapping[str, CandidateIds],
        context: Mapping[str, torch.Tensor] | None = None,
        history_ts: torch.Tensor | None = None,
        sample_ts: int | torch.Tensor | None = None,
        dense: Dense = None,
        lum: Dense = None,
    ) -> torch.Tensor:
        """Logits `[M]`: `encode_history` then `score_candidates` (one request)."""
        return self.score_candidates(self.encode_history(history, history_ts), candidates, context, sample_ts, dense, lum)


def per_candidate_kjt(
    config: HSTURankerConfig,
    history: Mapping[str, torch.Tensor],
    candidates: Mapping[str, CandidateIds],
    context: Mapping[str, torch.Tensor] | None = None,
    history_ts: torch.Tensor | None = None,
    sample_ts: int | torch.Tensor | None = None,
) -> KeyedJaggedTensor:
    """The one-pass input of the same request: M samples, each with the user's full history and one candidate.

    `model(per_candidate_kjt(...), dense, lum)` is what `MFalconScorer.score` equals; arguments as
    there. The timestamp keys are added when the config has the time bias on.
    """
    hist, length = _history(config, history)
    cand, count = _candidates(config, candidates)
    ctx = _context_kjt(config, candidates, context, count)
    keys = list(config.candidate_keys) + list(config.history_keys)
    values = [cand[k] for k in config.candidate_keys] + [hist[k].repeat(count) for k in config.history_keys]
    lengths = [torch.ones(count, dtype=torch.int64)] * len(config.candidate_keys)
    lengths += [torch.full((count,), length, dtype=torch.int64)] * len(config.history_keys)
    kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths).to(torch.int32), stride=count)
    if ctx is not None:
        kjt = KeyedJaggedTensor.concat([ctx, kjt])
    ts = _history_ts(config, history_ts, length)
    when = _sample_ts(config, sample_ts)
    if ts is not None and when is not None:
        kjt = with_timestamps(kjt, torch.full((count,), when, dtype=torch.int64), ts.repeat(count),
                              torch.full((count,), length, dtype=torch.int64))
    return kjt
