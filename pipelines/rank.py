"""Step 3: train a ranking model (Embedding+MLP, DIN, SIM, HSTU end to end, ...) with or without LUM features, with exact resume.

    lumrec rank CONFIG [key=value ...]

The config is ``RankConfig`` (``lumrec.pipelines.rank_config``); ``model`` names a backbone of the
ranking registry (``lumrec.modules.ranking.registry``), built by ``build_ranker`` with tables
sized from the dataset manifest's vocabularies. Samples come from ``lumrec.data.ranking_samples``
(one of its three protocols). With ``lum`` set, every batch gets
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

Ranks: under torchrun/torchx with ``WORLD_SIZE > 1`` the job builds the model's tables on meta
and shards them (pooled and DIN/SIM/HSTU sequence tables, the planner's plan) over the ranks with
TorchRec's DistributedModelParallel (``lumrec.distributed.shard_model``; each shard starts from the
rows one process starts from; the dense part is replicated under DDP). ``train.batch_size``
stays the global batch: each rank takes a contiguous slice of every batch, and the loss is
rescaled (``global_mean_loss``) so that the gradients are those of the global batch. Every rank's
batch has the same size (``equal_parts``: shorter slices end with copies of a sample of the global
batch that weigh nothing in the loss, the gradients and the metrics), because torchrec's row-wise
pooled tables exchange equal local batches; so the planner may place any pooled table row-wise
(``Ranker.pooled_sharding_types``), and no rank need hold a whole one. One
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
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from lumrec.checkpoint import CheckpointManager
from lumrec.config import ConfigValueError, load_config, to_dict
from lumrec.data.dataset import Dataset, write_text_atomic
from lumrec.device import autocast, move_to_device, resolve_device, set_activation_checkpointing
from lumrec.data.ranking.features import attach_item_lists, list_columns, list_vocab, vocab_size
from lumrec.data.ranking.item_stats import ItemStatsJoin
from lumrec.data.ranking_samples import RankingBatchLoader, RankingSampleBatch, RankingSamples, build_ranking_samples
from lumrec.distributed import DistContext, dense_optimizer, global_mean_loss, init_distributed, shard_model
from lumrec.meta_tables import build_with_meta_tables
from lumrec.modules.lum_join import LUMJoin
from lumrec.modules.ranking.builder import build_ranker
from lumrec.modules.ranking.base import RankingBatch, RankingTrain, with_timestamps
from lumrec.modules.ranking.registry import ranker_spec
from lumrec.modules.warm_start import warm_start_from
from lumrec.optim import RowwiseAdamW, fused_params_for, rowwise_adamw_table_state
from lumrec.optim.sparse_grads import sparse_table_gradients
from lumrec.modules.table_parameters import named_table_parameters
from lumrec.pipelines.rank_config import RankConfig, check_train_config
from lumrec.ranking_metrics import RankingMetrics
from lumrec.tracking import count_parameters
from lumrec.train import EpochJob, seed_everything

# The registrar lives with the others (light: `lumrec --help` does not import this job).
from lumrec.pipelines.commands import register_rank  # noqa: E402,F401

log = logging.getLogger("lumrec.rank")

__all__ = ["RankConfig", "Ranker", "main", "register_rank", "run_rank"]


# -- the job -----------------------------------------------------------------------------------


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
    # The planner's choices for pooled (EmbeddingBagCollection) tables on N ranks; None: its free
    # choice among the table sharder's types (table_wise, row_wise for RowwiseAdamW). Batches are
    # padded to equal local sizes, so a row-wise pooled table trains like one process.
    pooled_sharding_types: tuple[str, ...] | None = None

    def __init__(self, cfg: RankConfig, samples: RankingSamples | None = None) -> None:
        self.cfg = cfg
        t = self.train = cfg.train
        self.spec = ranker_spec(cfg.model)  # an unknown model fails before any data is read
        check_train_config(t)
        self.device = resolve_device(t.device, "train.device")  # `cuda` without a GPU fails before any data is read
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
        self.model, self.trainer = _build_ranker(cfg, self.vocab, self.stats.width if self.stats else 0,
                                                 self.lum.output_dim if self.lum else 0)
        self._input_width = int(self.model.in_features)
        if t.activation_checkpointing and not set_activation_checkpointing(self.model, True):
            raise ConfigValueError("train.activation_checkpointing", f"is on but model {cfg.model!r} has no HSTU or "
                                   "transformer stack to checkpoint (the hstu ranker has one); turn it off")
        self.num_parameters = count_parameters(self.model)  # before sharding: the whole model's size
        self.ctx = _rank_context(self.device)
        self.warm_start_report = self._warm_start(cfg)  # into the unsharded model: sharding copies the weights
        if self.ctx is None:  # one process: row-sparse table gradients, a step costs O(rows touched), same bits
            sparse_table_gradients(self.model)
        if self.ctx is None:
            self.trainer.to(self.device)  # before the optimizer, whose state follows the parameters' device
        self.optimizer = self._shard() if self.ctx is not None else self._optimizers(self.model, _table_parameters(self.model))
        self.part = None if self.ctx is None else (self.ctx.rank, self.ctx.world_size)
        self.history_keys, self.list_keys = tuple(cfg.sizes.history_keys), tuple(cfg.sizes.list_keys)
        self.loader = RankingBatchLoader(self.samples, "train", t.batch_size, t.max_history, shuffle_seed=t.seed,
                                         history_keys=self.history_keys, part=self.part, list_keys=self.list_keys,
                                         equal_parts=self.part is not None)
        self._init_job()

    # -- optimizers and sharding ------------------------------------------------------------
    def _table_kwargs(self) -> dict[str, Any]:
        """RowwiseAdamW settings of every table, sharded or not (one place, so both paths agree)."""
        return fused_params_for("cpu", lr=self.train.lr, weight_decay=self.train.weight_decay)["optimizer_kwargs"]

    def _optimizers(self, module: torch.nn.Module, tables: list[str], dense: Any = None) -> Any:
        """A keyed optimizer: RowwiseAdamW on the parameters `tables`, Adam on the others (or `dense`, given).

        Adam keeps the L2 `weight_decay` of the previous all-Adam version; the tables' decay is
        RowwiseAdamW's decoupled one (fbgemm's, on GPU).
        """
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
        if not any(isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)) for m in self.model.modules()):
            raise ValueError(f"model {self.cfg.model}: no embedding table to shard over {self.ctx.world_size} ranks; "
                             "give it context tables (sizes.context_keys)")
        t = self.train
        # Any pooled sharding type: every rank's batch has one size (`equal_parts`), which
        # torchrec's row-wise pooled output needs (lumrec.distributed.shard_model).
        dmp = shard_model(self.model, self.ctx, fused_params_for(self.ctx.device, lr=t.lr, weight_decay=t.weight_decay),
                          pooled_sharding_types=self.pooled_sharding_types)
        # Pooled and sequence tables (EmbeddingCollections of DIN/SIM/HSTU) are sharded, RowwiseAdamW
        # in their backward; any table left unsharded would get RowwiseAdamW here, after backward.
        tables = _table_parameters(dmp.module)
        dense = dense_optimizer(dmp, lr=t.lr, optimizer_class=torch.optim.Adam, weight_decay=t.weight_decay, exclude=tables)
        self.model, self.trainer = dmp, RankingTrain(dmp)
        return self._optimizers(dmp, tables, dense)

    def _warm_start(self, cfg: RankConfig) -> dict[str, Any] | None:
        """Copy `cfg.warm_start`'s weights into a fresh run; a resumed run reads what its start did from warm_start.json."""
        record = Path(cfg.out) / "warm_start.json"
        if CheckpointManager(Path(cfg.out) / "checkpoints", keep=0).latest() is not None:
            return json.loads(record.read_text()) if record.exists() else None
        if cfg.warm_start is None:
            return None
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

    def ranking_batch(self, batch: RankingSampleBatch) -> RankingBatch:
        """The model's input for a sample batch: ids, labels, dense item statistics and LUM features."""
        dense = self.stats(batch) if self.stats is not None else None
        lum = self.lum(batch) if self.lum is not None else None
        sparse = batch.sparse_features
        if self.spec.timestamps:  # e.g. HSTU's time bias: the sample's and the behaviours' times travel in the KJT
            sparse = with_timestamps(sparse, batch.ts, batch.hist_ts, batch.hist_lengths)
        # The joins run on the CPU (knowledge, statistics); the model's input goes to its device whole.
        return move_to_device(RankingBatch(sparse, batch.labels, dense, lum), self.device)

    def step_loss(self, batch: RankingSampleBatch) -> torch.Tensor:
        """The batch's mean BCE (the forward in `train.precision`); on N ranks scaled so that the ranks' gradients
        average to the global batch's."""
        with autocast(self.device, self.train.precision):
            return self._step_loss(batch)

    def _step_loss(self, batch: RankingSampleBatch) -> torch.Tensor:
        if self.ctx is None or batch.pad == 0:
            loss = self.trainer(self.ranking_batch(batch))[0]
            return loss if self.ctx is None else global_mean_loss(loss, len(batch), self.ctx, batch.global_batch_size)
        # Padding samples run through the model (every rank's collectives see one batch size) but
        # stay out of the loss, so their gradient is exactly zero.
        inputs = self.ranking_batch(batch)
        logits = self.model(inputs.sparse_features, inputs.dense_features, inputs.lum_features)
        if batch.padding:  # a stand-in for an empty slice: it runs for the collectives and weighs nothing
            return logits.sum() * 0.0
        labels = inputs.labels.reshape(-1).to(logits.dtype)
        loss = self.trainer.loss_fn(logits[: batch.real], labels[: batch.real])
        return global_mean_loss(loss, batch.real, self.ctx, batch.global_batch_size)

    def reduce_loss(self, loss: torch.Tensor) -> float:
        """The global batch's mean loss (the mean over ranks of the scaled local losses)."""
        if self.ctx is None:
            return float(loss.detach())
        total = loss.detach().clone()
        dist.all_reduce(total)
        return float(total) / self.ctx.world_size

    def evaluate(self, split: str) -> dict[str, float]:
        """AUC, NE, log loss, calibration (and counts) of the current model on `split`.

        On N ranks each scores its slice of every batch and the slices are gathered in batch and
        rank order, i.e. in the one-process order, so every rank computes the same metrics.
        """
        metrics = RankingMetrics()
        pieces: list[Any] = []
        self.model.eval()
        with torch.no_grad():
            for batch in self.samples.iter_batches(split, self.train.eval_batch_size, None, self.train.max_history,
                                                   history_keys=self.history_keys, part=self.part,
                                                   list_keys=self.list_keys, equal_parts=self.part is not None):
                with autocast(self.device, self.train.precision):
                    _, logits = self.trainer(self.ranking_batch(batch))
                probs = torch.sigmoid(logits.float()).cpu()  # metrics (and the gathered pieces) on the CPU, in float32
                if self.ctx is None:
                    metrics.update(probs, batch.labels)
                else:
                    pieces.append(None if batch.padding else (probs[: batch.real], batch.labels[: batch.real]))
        self.model.train()
        if self.ctx is not None:
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
        if for_load and _lacks_state(self.optimizer):
            # A zero-gradient step creates the state to load into (weights are loaded after). Asked of each
            # optimizer: fbgemm's fused one has its state from the start, the dense Adam not before a step.
            self.optimizer.init_state()
        optim = self.optimizer.state_dict()
        if self.ctx is not None:
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


def _lacks_state(optimizer: Any) -> bool:
    """Whether any optimizer inside `optimizer` (a torchrec CombinedOptimizer, nested or not) has trainable parameters but no state yet."""
    parts = getattr(optimizer, "optimizers", None)
    if parts is not None:
        return any(_lacks_state(part) for _, part in parts)
    return not optimizer.state and any(p.requires_grad for p in getattr(optimizer, "params", {}).values())


def _rank_context(device: torch.device | None = None) -> DistContext | None:
    """The process group's context when this process is one of several ranks (torchrun/torchx WORLD_SIZE > 1,
    or an already initialised group of more than one); None for a single process (no group is created).
    `device` (train.device): nccl on this rank's GPU for a CUDA device, gloo for the CPU."""
    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not grouped and os.environ.get("WORLD_SIZE", "").strip() in ("", "1"):
        return None
    return init_distributed(device=device)  # joins (or reuses) the group; it stays up for later jobs of this process


def _build_ranker(cfg: RankConfig, vocab: dict[str, int], stats_width: int, lum_dim: int) -> tuple[Any, Any]:
    """`build_ranker`; on N ranks with its embedding tables on meta, so that no rank ever holds a whole table.

    Sharding then fills each rank's shards with the rows the CPU build holds (`lumrec.meta_tables`),
    so N ranks start from the 1-process weights. A warm start copies into whole tables, so it keeps
    the CPU build, as does a model whose table init cannot be replayed per row range (logged).
    """
    def build() -> tuple[Any, Any]:
        return build_ranker(cfg.model, cfg.sizes, vocab, stats_width, lum_dim)

    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if cfg.warm_start is not None or not (grouped or os.environ.get("WORLD_SIZE", "").strip() not in ("", "1")):
        return build()
    return build_with_meta_tables(build, f"model {cfg.model}")


def _table_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters of `module`'s (unsharded) EmbeddingBagCollections and EmbeddingCollections."""
    return [name for name, _ in named_table_parameters(module)]


def run_rank(cfg: RankConfig, max_epochs: int | None = None, max_steps: int | None = None,
             samples: RankingSamples | None = None) -> dict[str, Any]:
    """Train and evaluate one ranking run (resuming from `cfg.out` if it holds checkpoints); returns results.json's content.

    `max_epochs` / `max_steps` stop early as a kill would (after a checkpoint); `samples` reuses built samples.
    """
    return Ranker(cfg, samples).run(max_epochs=max_epochs, max_steps=max_steps)


# -- CLI ---------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """`lumrec rank CONFIG [key=value ...]`."""
    cfg = load_config(RankConfig, args.config, overrides=args.overrides)
    result = run_rank(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return 0
