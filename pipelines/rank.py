"""Step 3: train a ranking model (Embedding+MLP, DIN, SIM, or HSTU end to end) with or without LUM features, with exact resume.

    lumrec rank CONFIG [key=value ...]

Samples come from ``lumrec.data.ranking_samples`` (one of its three protocols); the model's
tables are sized from the dataset manifest's vocabularies. With ``lum`` set, every batch gets
``LUMFeatureModule`` features looked up in a knowledge store (step 2) under the point-in-time
rule, appended to the model's dense input. Training is BCE; validation and test AUC / NE /
calibration are computed every epoch; the best-validation model is kept and its test metrics
are written to ``OUT/results.json``.

Point-in-time rule for knowledge (``RankLUMConfig.as_of_ds``):

- ``as_of_ds: null`` (daily data): a sample of day D uses the partition ``latest_as_of(store, D)``,
  the newest one strictly before D; a sample with none gets zeros with every missing flag set.
- ``as_of_ds: YYYY-MM-DD`` (one store for every sample): allowed for a sample on a later day.
  For a sample on that day or before (a single-day data set such as ML-1M implicit, whose
  timestamps are synthesised within one day) the store must have been queried from a
  *knowledge view* ``history_data``: a copy of the data set that holds, per user, only events
  strictly before that user's first ranking sample. The job checks this for every sample and
  refuses to run otherwise, naming the first offending sample. (The LUM's weights must be
  trained on the view too; ``benchmarks/lum_tables.py`` does so.)

Determinism: model init from ``train.seed``, batch order a function of (seed, epoch), no
dropout; a run resumed from an epoch-boundary (or ``checkpoint_every_steps``) checkpoint
ends with the same weights and metrics as an uninterrupted one.

Ranks: under torchrun/torchx with ``WORLD_SIZE > 1`` the job shards the model's pooled tables
over the ranks with TorchRec's DistributedModelParallel (``lumrec.distributed.shard_model``;
the dense part and the DIN/SIM sequence tables are replicated under DDP). ``train.batch_size``
stays the global batch: each rank takes a contiguous slice of every batch, and the loss is
rescaled (``global_mean_loss``) so that the gradients are those of the global batch. One
process or N ranks train with the same optimizers (RowwiseAdamW on every embedding table,
Adam on the rest), so they reach the same losses, metrics and weights up to float rounding.
Evaluation gathers every rank's predictions, so all ranks compute the same metrics; rank 0
alone writes results.json and config.json. Checkpoints hold the model under the unsharded
model's names (DCP reshards them for any world size), the dense optimizer state and the row-wise
table state (``lumrec.optim.rowwise_adamw_table_state``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from lumrec.config import check_same_run, load_config, to_dict
from lumrec.data.ranking.config import RankingSampleConfig
from lumrec.data.ranking.item_stats import ItemStatsJoin
from lumrec.modules.lum_join import CANDIDATE_FEATURES, LUMJoin, RankLUMConfig
from lumrec.modules.warm_start_config import WarmStartConfig
from lumrec.tracking import count_parameters
from lumrec.train import EpochJob, seed_everything

if TYPE_CHECKING:
    import torch

    from lumrec.data.dataset import Dataset, DatasetMeta
    from lumrec.data.ranking_samples import RankingSampleBatch, RankingSamples
    from lumrec.modules.ranking import TableConfig
    from lumrec.distributed import DistContext
    from lumrec.modules.lum_features import LUMFeatureModule

log = logging.getLogger("lumrec.rank")

__all__ = [
    "MODELS",
    "RankConfig",
    "RankLUMConfig",
    "RankModelConfig",
    "RankTrainConfig",
    "LUMJoin",
    "ItemStatsJoin",
    "build_ranker",
    "check_train_config",
    "comparison_table",
    "context_keys",
    "EpochJob",
    "Ranker",
    "load_job_config",
    "main",
    "register_rank",
    "run_rank",
    "seed_everything",
    "summarize_seeds",
    "vocab_size",
]

MODELS = ("mlp", "din", "sim", "hstu")


# -- configs ---------------------------------------------------------------------------------


@dataclass
class RankModelConfig:
    """Sizes of the ranking model (which parts apply depends on `RankConfig.model`)."""

    embedding_dim: int = 16
    mlp: list[int] = field(default_factory=lambda: [64, 32])
    attention_mlp: list[int] = field(default_factory=lambda: [32])  # din, sim
    attention_normalize: str = "none"  # din, sim: "none" (DIN) or "softmax"
    max_search_len: int = 50  # sim: most recent same-category behaviours (hard search)
    short_len: int = 10  # sim: most recent behaviours of the short branch
    # Pooled per-sample id features; None: user_id, scenario, query_id where the manifest has a vocabulary.
    context_keys: list[str] | None = None
    history_keys: list[str] = field(default_factory=lambda: ["hist_item_id", "hist_category_id"])
    # Multi-hot item features, mean-pooled: X = the candidate's ids of the items table's list column X
    # (e.g. category_ids: all of an item's attributes), hist_X = the bag of X over the kept behaviours.
    list_keys: list[str] = field(default_factory=list)
    item_stats: list[str] = field(default_factory=list)  # dense: columns of `item_stats` of the sample's day (point-in-time)
    hstu_layers: int = 2  # hstu: HSTU layers over [history, candidate]
    hstu_heads: int = 2  # hstu: attention heads (d_model: the concatenated item/category width)
    hstu_dropout: float = 0.0  # hstu: input and layer dropout (0 keeps runs exactly resumable)
    hstu_max_len: int = 256  # hstu: span of the relative position bias and HSTU's normaliser n
    hstu_position_bias: bool = True  # hstu: relative bias over positions
    hstu_time_bias: bool = True  # hstu: relative bias over time gaps (history times and the sample's time)


@dataclass
class RankTrainConfig:
    """Optimisation, evaluation, budget and checkpoints."""

    seed: int = 0
    epochs: int = 3
    batch_size: int = 256
    eval_batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_history: int | None = 100  # most recent behaviours per sample given to the model
    threads: int = 0  # torch threads (0 = torch's default)
    checkpoint_every_steps: int = 0  # 0: checkpoints at epoch boundaries only
    keep_checkpoints: int = 2
    patience: int = 0  # evaluations without a better validation AUC before stopping (0 = never stop early)
    max_minutes: float = 0.0  # training-time budget (0 = none); evaluation is not counted
    log_every_steps: int = 50
    progress: bool = True


@dataclass
class RankConfig:
    """A whole ranking run: data, samples, model, optional LUM features, training."""

    data: str = "out/data"  # a lumrec dataset folder
    out: str = "runs/rank"  # results.json, checkpoints/ and best/ go here
    samples: RankingSampleConfig = field(default_factory=RankingSampleConfig)
    model: str = "sim"  # mlp | din | sim | hstu (HSTU end to end: the candidate appended to the behaviour sequence)
    sizes: RankModelConfig = field(default_factory=RankModelConfig)
    lum: RankLUMConfig | None = None  # None: the base model without LUM features
    train: RankTrainConfig = field(default_factory=RankTrainConfig)
    # Start a fresh run from an existing DLRM's weights (ours or a torchrec model's, via name_map);
    # LUM inputs it lacks start at zero, so the first predictions equal the old model's. Ignored
    # when the run resumes from its own checkpoints.
    warm_start: WarmStartConfig | None = None


# -- the model ---------------------------------------------------------------------------------


def context_keys(keys: list[str] | None, vocab: dict[str, int]) -> list[str]:
    """The pooled per-sample keys: `keys` (each must have a vocabulary) or, for None, every default key that has one."""
    from lumrec.data.ranking_samples import CANDIDATE_KEYS

    if keys is None:
        return [k for k in ("user_id", "scenario", "query_id") if vocab.get(k, 0) > 1]
    for key in keys:
        if key not in CANDIDATE_KEYS or key in ("item_id", "category_id"):
            raise ValueError(f"sizes.context_keys: {key!r} is not a context key; choose from ['user_id', 'scenario', 'query_id']")
        if key not in vocab:
            raise ValueError(f"sizes.context_keys: {key!r} has no vocabulary size in the dataset manifest (has {sorted(vocab)})")
    return list(keys)


def vocab_size(vocab: dict[str, int], key: str) -> int:
    """The manifest's vocabulary size of id column `key` (an error naming it when absent)."""
    if key not in vocab:
        raise ValueError(f"dataset manifest declares no vocabulary size for {key!r} (has {sorted(vocab)})")
    return int(vocab[key])


def list_columns(list_keys: Sequence[str]) -> list[str]:
    """The item list columns the list keys read, in first-use order (hist_X reads X)."""
    from lumrec.data.ranking.samples import HISTORY_BAG_PREFIX

    columns: list[str] = []
    for key in list_keys:
        column = key[len(HISTORY_BAG_PREFIX):] if key.startswith(HISTORY_BAG_PREFIX) else key
        if column not in columns:
            columns.append(column)
    return columns


def list_tables(list_keys: Sequence[str], vocab: dict[str, int], dim: int) -> list["TableConfig"]:
    """One mean-pooled table per item list column, shared by its candidate key X and its bag key hist_X."""
    from lumrec.data.ranking.samples import HISTORY_BAG_PREFIX
    from lumrec.modules.ranking import TableConfig

    if len(set(list_keys)) != len(list_keys):
        raise ValueError(f"sizes.list_keys repeat: {list(list_keys)}")
    tables = []
    for column in list_columns(list_keys):
        keys = [k for k in list_keys if k in (column, HISTORY_BAG_PREFIX + column)]
        tables.append(TableConfig(f"t_list_{column}", vocab_size(vocab, column), dim, keys, pooling="mean"))
    return tables


def build_ranker(model: str, sizes: RankModelConfig, vocab: dict[str, int], dense_dim: int = 0, lum_dim: int = 0):
    """(model, its RankingTrain) of kind `model` with tables sized from the manifest vocabularies `vocab`.

    For `sizes.list_keys`, `vocab` must also size each item list column (see `list_vocab`).
    """
    from lumrec.modules.din import DIN, DINConfig
    from lumrec.modules.hstu_ranking import HSTURanker, HSTURankerConfig
    from lumrec.modules.ranking import EmbeddingMLP, EmbeddingMLPConfig, RankingTrain, TableConfig
    from lumrec.modules.sim import SIM, SIMConfig

    if model not in MODELS:
        raise ValueError(f"model: unknown ranking model {model!r}; choose from {list(MODELS)}")
    hist = list(sizes.history_keys)
    for key in hist:
        if key not in ("hist_item_id", "hist_category_id"):
            raise ValueError(f"sizes.history_keys: {key!r} is not supported; choose from ['hist_item_id', 'hist_category_id']")
    if "hist_item_id" not in hist:
        raise ValueError("sizes.history_keys must include 'hist_item_id'")
    d = sizes.embedding_dim
    context = [TableConfig(f"t_{k}", vocab_size(vocab, k), d, [k]) for k in context_keys(sizes.context_keys, vocab)]
    context += list_tables(sizes.list_keys, vocab, d)
    pairs = [("t_item", "item_id", "hist_item_id"), ("t_category", "category_id", "hist_category_id")]
    pairs = [(t, c, h) for t, c, h in pairs if h in hist or c == "category_id"]
    if model == "mlp":
        # Candidate and history share a table; mean pooling of one candidate id is the id's vector.
        tables = [TableConfig(t, vocab_size(vocab, c), d, [c] + ([h] if h in hist else []), pooling="mean") for t, c, h in pairs]
        m = EmbeddingMLP(EmbeddingMLPConfig(context + tables, dense_dim=dense_dim, lum_dim=lum_dim, mlp=list(sizes.mlp)))
        return m, RankingTrain(m)
    seq_pairs = [(t, c, h) for t, c, h in pairs if h in hist]
    common = dict(
        sequence_tables=[TableConfig(t, vocab_size(vocab, c), d, [c, h]) for t, c, h in seq_pairs],
        candidate_keys=[c for _, c, _ in seq_pairs],
        history_keys=[h for _, _, h in seq_pairs],
        context_tables=context + [TableConfig(t, vocab_size(vocab, c), d, [c]) for t, c, h in pairs if h not in hist],
        dense_dim=dense_dim,
        lum_dim=lum_dim,
        attention_mlp=list(sizes.attention_mlp),
        attention_normalize=sizes.attention_normalize,
        mlp=list(sizes.mlp),
    )
    if model == "din":
        m = DIN(DINConfig(**common))
    elif model == "hstu":
        m = HSTURanker(HSTURankerConfig(
            **common, num_layers=sizes.hstu_layers, num_heads=sizes.hstu_heads, dropout=sizes.hstu_dropout,
            max_len=sizes.hstu_max_len, use_position_bias=sizes.hstu_position_bias, use_time_bias=sizes.hstu_time_bias))
    else:
        if "hist_category_id" not in hist:
            raise ValueError("model sim: hard search needs 'hist_category_id' in sizes.history_keys")
        m = SIM(SIMConfig(**common, max_search_len=sizes.max_search_len, short_len=sizes.short_len))
    return m, RankingTrain(m)


# -- the job -----------------------------------------------------------------------------------


def list_vocab(meta: "DatasetMeta", columns: Sequence[str]) -> dict[str, int]:
    """Vocabulary size of each item list column: the manifest's X_vocab column's, else `vocabulary_source`'s (x_id for x_ids)."""
    from lumrec.modules.token_encoder import vocabulary_source

    out = {}
    for column in columns:
        source = meta.extra.get(f"{column}_vocab") or vocabulary_source(column, meta.vocab_sizes)
        if source not in meta.vocab_sizes:
            raise ValueError(f"sizes.list_keys: the dataset manifest sizes no vocabulary for list column {column!r} "
                             f"(looked for {source!r}; has {sorted(meta.vocab_sizes)})")
        out[column] = int(meta.vocab_sizes[source])
    return out


def attach_item_lists(samples: "RankingSamples", data: "Dataset", columns: Sequence[str]) -> "RankingSamples":
    """The samples with the items table's list columns `columns` attached (ids per item_id), for list keys."""
    from dataclasses import replace

    import pyarrow as pa

    from lumrec.data.tokens import item_lists_from_table

    missing = [c for c in columns if c not in samples.item_lists]
    if not missing:
        return samples
    source = str(data.table_dir("items"))
    table = data.read_table("items")
    for column in missing:
        if column not in table.column_names:
            raise ValueError(f"sizes.list_keys: the items table ({source}) has no column {column!r}; has {table.column_names}")
        if not pa.types.is_list(table.schema.field(column).type):
            raise ValueError(f"sizes.list_keys: column {column!r} of the items table ({source}) is not a list column")
    num_items = int(data.read_meta().vocab_sizes["item_id"])
    lists = {c: item_lists_from_table(table, c, num_items, source) for c in missing}
    return replace(samples, item_lists={**samples.item_lists, **lists})


class Ranker(EpochJob):
    """Owns the samples, joins, model, optimizer and checkpoints of one ranking run, on one process or N ranks.

    One process (no WORLD_SIZE > 1): the plain model, RowwiseAdamW on its embedding tables and Adam
    on the rest, both as torchrec keyed optimizers (their state is keyed by parameter name).
    N ranks: `self.model` is the DistributedModelParallel of the model (pooled tables sharded,
    RowwiseAdamW fused into their backward; the rest under DDP), `self.trainer` wraps it with the
    loss, and the optimizer is the same keyed pair. Its state_dict names match the plain model's.

    TorchRec's TrainPipelineSparseDist is not used for the sharded loop, although it runs on CPU
    (tests/test_distributed.py): (1) its fx rewrite cannot trace these models: on the way to the
    sharded EmbeddingBagCollection, `select_keys` iterates the KJT's keys (tried with DIN on CPU,
    torchrec 1.8: "TraceError: Proxy object cannot be iterated"), and a permuted KJT is not a batch
    attribute as is, which is all it pipelines, so even a traceable variant would gain nothing;
    (2) it pulls the next batch before the current step runs, so the loader position a checkpoint
    records would be one batch ahead and exact resume would need its own bookkeeping; (3) the
    per-rank loss scale for unequal or padded slices (`global_mean_loss`) and the LUM / item
    statistics joins would have to move into the model's forward; (4) on CPU with gloo there are
    no copy/compute streams for it to overlap.
    """

    job = "rank"
    metric = "auc"

    def __init__(self, cfg: RankConfig, samples: "RankingSamples | None" = None) -> None:
        import torch

        from lumrec.data.dataset import Dataset
        from lumrec.data.ranking_samples import RankingBatchLoader, build_ranking_samples

        self.cfg = cfg
        t = self.train = cfg.train
        if cfg.model not in MODELS:
            raise ValueError(f"model: unknown ranking model {cfg.model!r}; choose from {list(MODELS)}")
        check_train_config(t)
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.out = Path(cfg.out)
        data = Dataset(cfg.data)
        meta = data.read_meta()
        columns = list_columns(cfg.sizes.list_keys)
        self.vocab = {**meta.vocab_sizes, **list_vocab(meta, columns)}
        t0 = time.perf_counter()
        self.samples = samples if samples is not None else build_ranking_samples(data, cfg.samples)
        self.samples = attach_item_lists(self.samples, data, columns)
        self.counts = self.samples.counts()
        log.info("samples (%s) in %.1f s: %s", cfg.samples.protocol, time.perf_counter() - t0, self.counts)
        self.lum = LUMJoin(cfg.lum, self.samples) if cfg.lum is not None else None
        self.stats = ItemStatsJoin(cfg.data, cfg.sizes.item_stats, vocab_size(self.vocab, "item_id")) if cfg.sizes.item_stats else None
        seed_everything(t.seed)
        self.model, self.trainer = build_ranker(
            cfg.model, cfg.sizes, self.vocab, self.stats.width if self.stats else 0, self.lum.output_dim if self.lum else 0
        )
        self._input_width = int(self.model.in_features)
        self.num_parameters = count_parameters(self.model)  # before sharding: the whole model's size
        self.ctx = _rank_context()
        self.warm_start_report = self._warm_start(cfg)  # into the unsharded model: sharding copies the weights
        self.optimizer = self._shard() if self.ctx is not None else self._optimizers(self.model, _table_parameters(self.model))
        self.part = None if self.ctx is None else (self.ctx.rank, self.ctx.world_size)
        self.history_keys, self.list_keys = tuple(cfg.sizes.history_keys), tuple(cfg.sizes.list_keys)
        self.loader = RankingBatchLoader(self.samples, "train", t.batch_size, t.max_history, shuffle_seed=t.seed,
                                         history_keys=self.history_keys, part=self.part, list_keys=self.list_keys)
        self._init_job()

    # -- optimizers and sharding ------------------------------------------------------------
    def _table_kwargs(self) -> dict[str, Any]:
        """RowwiseAdamW settings of every table, sharded or not (one place, so both paths agree)."""
        from lumrec.optim import fused_params_for

        return fused_params_for("cpu", lr=self.train.lr, weight_decay=self.train.weight_decay)["optimizer_kwargs"]

    def _optimizers(self, module: "torch.nn.Module", tables: list[str], dense: Any = None) -> Any:
        """A keyed optimizer: RowwiseAdamW on the parameters `tables`, Adam on the others (or `dense`, given).

        Adam keeps the L2 `weight_decay` of the previous all-Adam version; the tables' decay is
        RowwiseAdamW's decoupled one (fbgemm's, on GPU).
        """
        import torch
        from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

        from lumrec.optim import RowwiseAdamW

        t, named = self.train, dict(module.named_parameters())
        if dense is None:
            params = {k: p for k, p in named.items() if k not in set(tables) and p.requires_grad}
            dense = CombinedOptimizer([("dense", KeyedOptimizerWrapper(
                params, lambda ps: torch.optim.Adam(ps, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay)))])
        if not tables:
            return dense
        kwargs = self._table_kwargs()
        table_opt = KeyedOptimizerWrapper({k: named[k] for k in tables}, lambda ps: RowwiseAdamW(ps, **kwargs))
        return CombinedOptimizer([dense, ("tables", table_opt)])

    def _shard(self) -> Any:
        """Shard the model over the ranks; returns the optimizer (fused RowwiseAdamW tables, Adam, RowwiseAdamW sequence tables)."""
        import torch
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        from lumrec.distributed import dense_optimizer, shard_model
        from lumrec.modules.ranking import RankingTrain
        from lumrec.optim import fused_params_for

        if not any(isinstance(m, EmbeddingBagCollection) for m in self.model.modules()):
            raise ValueError(f"model {self.cfg.model}: no pooled table to shard over {self.ctx.world_size} ranks; "
                             "give it context tables (sizes.context_keys)")
        t = self.train
        dmp = shard_model(self.model, self.ctx, fused_params_for(self.ctx.device, lr=t.lr, weight_decay=t.weight_decay))
        # EmbeddingCollections (DIN/SIM sequence tables) stay unsharded: torchrec's DENSE kernel
        # cannot run them on CPU (lumrec.optim.sharding). They are replicated under DDP, which
        # averages their gradients, and get RowwiseAdamW after backward like in one process.
        tables = _table_parameters(dmp.module)
        dense = dense_optimizer(dmp, lr=t.lr, optimizer_class=torch.optim.Adam, weight_decay=t.weight_decay, exclude=tables)
        self.model, self.trainer = dmp, RankingTrain(dmp)
        return self._optimizers(dmp, tables, dense)

    def _warm_start(self, cfg: RankConfig) -> dict[str, Any] | None:
        """Copy `cfg.warm_start`'s weights into a fresh run; a resumed run reads what its start did from warm_start.json."""
        from lumrec.checkpoint import CheckpointManager
        from lumrec.data.dataset import write_text_atomic

        record = Path(cfg.out) / "warm_start.json"
        if CheckpointManager(Path(cfg.out) / "checkpoints", keep=0).latest() is not None:
            return json.loads(record.read_text()) if record.exists() else None
        if cfg.warm_start is None:
            return None
        from lumrec.modules.warm_start import warm_start_from

        report = warm_start_from(self.model, cfg.warm_start)  # every rank: each then shards its own copy
        summary = {"source": cfg.warm_start.source, "copied": len(report.copied),
                   "widened": [w.name for w in report.widened], "missing": report.missing}
        log.info("warm start from %s: %d tensors copied, %d widened, %d new", cfg.warm_start.source,
                 len(report.copied), len(report.widened), len(report.missing))
        if self.is_main:
            write_text_atomic(record, json.dumps(summary, indent=2))
        return summary

    @property
    def input_width(self) -> int:
        """Width of the model's MLP input (grows by the LUM feature width when LUM is on)."""
        return self._input_width

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)

    def ranking_batch(self, batch: "RankingSampleBatch"):
        """The model's input for a sample batch: ids, labels, dense item statistics and LUM features."""
        from lumrec.modules.ranking import RankingBatch

        dense = self.stats(batch) if self.stats is not None else None
        lum = self.lum(batch) if self.lum is not None else None
        sparse = batch.sparse_features
        if self.cfg.model == "hstu":  # its time bias reads the sample's and the behaviours' times from the KJT
            from lumrec.modules.hstu_ranking import with_timestamps

            sparse = with_timestamps(sparse, batch.ts, batch.hist_ts, batch.hist_lengths)
        return RankingBatch(sparse, batch.labels, dense, lum)

    def step_loss(self, batch: "RankingSampleBatch") -> "torch.Tensor":
        """The batch's mean BCE; on N ranks scaled so that the ranks' gradients average to the global batch's."""
        loss = self.trainer(self.ranking_batch(batch))[0]
        if self.ctx is None:
            return loss
        if batch.padding:  # a stand-in for an empty slice: it runs for the collectives and weighs nothing
            return loss * 0.0
        from lumrec.distributed import global_mean_loss

        return global_mean_loss(loss, len(batch), self.ctx, batch.global_batch_size)

    def reduce_loss(self, loss: "torch.Tensor") -> float:
        """The global batch's mean loss (the mean over ranks of the scaled local losses)."""
        if self.ctx is None:
            return float(loss.detach())
        import torch.distributed as dist

        total = loss.detach().clone()
        dist.all_reduce(total)
        return float(total) / self.ctx.world_size

    def evaluate(self, split: str) -> dict[str, float]:
        """AUC, NE, log loss, calibration (and counts) of the current model on `split`.

        On N ranks each scores its slice of every batch and the slices are gathered in batch and
        rank order, i.e. in the one-process order, so every rank computes the same metrics.
        """
        import torch

        from lumrec.ranking_metrics import RankingMetrics

        metrics = RankingMetrics()
        pieces: list[Any] = []
        self.model.eval()
        with torch.no_grad():
            for batch in self.samples.iter_batches(split, self.train.eval_batch_size, None, self.train.max_history,
                                                   history_keys=self.history_keys, part=self.part,
                                                   list_keys=self.list_keys):
                _, logits = self.trainer(self.ranking_batch(batch))
                if self.ctx is None:
                    metrics.update(torch.sigmoid(logits), batch.labels)
                else:
                    pieces.append(None if batch.padding else (torch.sigmoid(logits), batch.labels))
        self.model.train()
        if self.ctx is not None:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, pieces)
            for k in range(len(pieces)):
                parts = [rank_pieces[k] for rank_pieces in gathered if rank_pieces[k] is not None]
                metrics.update(torch.cat([p for p, _ in parts]), torch.cat([y for _, y in parts]))
        return metrics.compute()

    # -- checkpoints ------------------------------------------------------------------------
    def _tensors(self, for_load: bool = False) -> dict[str, Any]:
        """{"model": the model's tensors by unsharded name, "optim": {"state": optimizer state by "dense.NAME" / "tables.NAME"}}.

        The same names on one process and on N ranks: sharded tables' weights and row-wise state
        are ShardedTensors, which DCP reshards, so the checkpoint loads on any world size.
        """
        if for_load and not self.optimizer.state:
            self.optimizer.init_state()  # a zero-gradient step creates the state to load into (weights are loaded after)
        optim = self.optimizer.state_dict()
        if self.ctx is not None:
            from lumrec.optim import rowwise_adamw_table_state

            optim["state"].update({f"tables.{k}": v for k, v in rowwise_adamw_table_state(self.model).items()})
        return {"model": self.model.state_dict(), "optim": optim}

    def _load_tensors(self, state: dict[str, Any]) -> None:
        # DCP has loaded in place (the row-wise table state too: it is a view of the optimizers' own);
        # the keyed optimizer takes the entries it owns.
        self.model.load_state_dict(state["model"])
        own = self.optimizer.state_dict()["state"].keys()
        self.optimizer.load_state_dict({"state": {k: v for k, v in state["optim"]["state"].items() if k in own}})

    def result_extras(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "lum": self.lum is not None, "input_width": self.input_width,
                "lum_dim": self.lum.output_dim if self.lum else 0, "warm_start": self.warm_start_report}


def _rank_context() -> "DistContext | None":
    """The process group's context when this process is one of several ranks (torchrun/torchx WORLD_SIZE > 1,
    or an already initialised group of more than one); None for a single process (no group is created)."""
    import torch.distributed as dist

    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not grouped and os.environ.get("WORLD_SIZE", "").strip() in ("", "1"):
        return None
    from lumrec.distributed import init_distributed

    return init_distributed()  # joins (or reuses) the group; it stays up for later jobs of this process


def _table_parameters(module: "torch.nn.Module") -> list[str]:
    """Names of the trainable parameters of `module`'s (unsharded) EmbeddingBagCollections and EmbeddingCollections."""
    from lumrec.pipelines.model_factory import named_table_parameters

    return [name for name, _ in named_table_parameters(module)]


def check_train_config(t: RankTrainConfig) -> None:
    for name in ("batch_size", "eval_batch_size", "epochs"):
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if t.max_history is not None and t.max_history < 0:
        raise ValueError(f"train.max_history must be >= 0 or null, got {t.max_history}")


def run_rank(cfg: RankConfig, max_epochs: int | None = None, max_steps: int | None = None,
             samples: "RankingSamples | None" = None) -> dict[str, Any]:
    """Train and evaluate one ranking run (resuming from `cfg.out` if it holds checkpoints); returns results.json's content.

    `max_epochs` / `max_steps` stop early as a kill would (after a checkpoint); `samples` reuses built samples.
    """
    return Ranker(cfg, samples).run(max_epochs=max_epochs, max_steps=max_steps)


# -- comparing rows over seeds ----------------------------------------------------------------


def summarize_seeds(runs: dict[str, list[dict]], base: str = "base") -> dict[str, dict[str, Any]]:
    """Per row: AUC / NE mean and std over seeds, and the paired AUC delta vs `base` (mean, std)."""
    import statistics

    def mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    out: dict[str, dict[str, Any]] = {}
    base_auc = [r["test"]["auc"] for r in runs.get(base, [])]
    for name, results in runs.items():
        if not results:
            out[name] = {"status": "not run"}
            continue
        auc = [r["test"]["auc"] for r in results]
        ne = [r["test"]["ne"] for r in results]
        row: dict[str, Any] = {"seeds": len(results), "auc": auc, "ne": ne}
        row["auc_mean"], row["auc_std"] = mean_std(auc)
        valid = [(r.get("valid") or {}).get("auc") for r in results]
        if all(v is not None for v in valid):  # the best epoch's validation AUC: what a row may be chosen on
            row["valid_auc"] = valid
            row["valid_auc_mean"], row["valid_auc_std"] = mean_std(valid)
        row["ne_mean"], row["ne_std"] = mean_std(ne)
        if base_auc and len(base_auc) == len(auc):
            deltas = [a - b for a, b in zip(auc, base_auc)]
            row["delta_auc_mean"], row["delta_auc_std"] = mean_std(deltas)
        out[name] = row
    return out


def comparison_table(summary: dict[str, dict[str, Any]], labels: dict[str, str] | None = None, base: str = "base") -> str:
    """A text table: row, test AUC and NE (mean ± std over seeds), paired ΔAUC vs `base` (mean ± std), seeds."""
    labels = labels or {}

    def cell(mean: float, std: float, seeds: int, signed: bool = False) -> str:
        text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
        return f"{text} ± {std:.4f}" if seeds > 1 else text

    width = max([len(labels.get(k, k)) for k in summary] + [10])
    head = f"{'row':<{width}}  {'test AUC':>16}  {'NE':>16}  {'ΔAUC vs base':>16}  {'seeds':>5}"
    lines = [head, "-" * len(head)]
    for name, row in summary.items():
        label = labels.get(name, name)
        if "auc_mean" not in row:
            lines.append(f"{label:<{width}}  {row.get('status', 'not run'):>16}")
            continue
        n = row["seeds"]
        delta = "-" if name == base or "delta_auc_mean" not in row else cell(row["delta_auc_mean"], row["delta_auc_std"], n, True)
        lines.append(
            f"{label:<{width}}  {cell(row['auc_mean'], row['auc_std'], n):>16}  {cell(row['ne_mean'], row['ne_std'], n):>16}  "
            f"{delta:>16}  {n:>5}"
        )
    return "\n".join(lines)


# -- CLI ---------------------------------------------------------------------------------------


def load_job_config(cls: type, path: str | Path, overrides: list[str] | None = None):
    """`load_config(cls, ...)`, but an error inside the optional `lum` section names its own key (e.g. `lum.conditionz`).

    (lumrec.config reports a bad value of an `X | None` field as "fits none of [X, NoneType]".)
    """
    import yaml

    from lumrec.config import ConfigError, apply_override, from_dict

    try:
        return load_config(cls, path, overrides=overrides)
    except ConfigError:
        data = yaml.safe_load(Path(path).read_text()) or {}
        for item in overrides or []:
            apply_override(data, item, source=str(path))
        if isinstance(data, dict) and isinstance(data.get("lum"), dict):
            from_dict(RankLUMConfig, data["lum"], source=str(path), prefix="lum")  # raises the precise error
        raise


def main(args: argparse.Namespace) -> int:
    """`lumrec rank CONFIG [key=value ...]`."""
    cfg = load_job_config(RankConfig, args.config, overrides=args.overrides)
    result = run_rank(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return 0


def register_rank(sub: argparse._SubParsersAction) -> None:
    """Add `lumrec rank`."""
    p = sub.add_parser("rank", help="step 3: train a ranking model (mlp, din, sim, hstu) with or without LUM features (resumes automatically)")
    p.add_argument("config", help="YAML file with RankConfig keys")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. model=din lum=null train.epochs=2")
    p.set_defaults(func=main)
