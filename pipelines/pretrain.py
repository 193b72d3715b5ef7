"""Step 1: generative pre-training of SASRec, HSTU or LUM on a lumrec dataset, with exact resume.

Determinism: batches come from a packing plan fixed by (seed, epoch); dropout and negative
sampling are seeded by (seed, global step). A run resumed from any checkpoint therefore
continues with the same batches and the same loss curve as an uninterrupted one.

The loop itself (resume, budgets, patience, best checkpoint, results, TensorBoard) is
`lumrec.train.TrainLoop`; pre-training gives it its step (the warmup-stable-decay lr, tokens
counted), the validation HR@10 every `eval_every_epochs` epochs, rank 0's clock, and epoch-end
saves only after an evaluation or at the end. `lumrec.pipelines.pretrain_config` holds the config.

N ranks (torchrun / torchx with WORLD_SIZE > 1; gloo on CPU, like the one-process path): the
embedding tables are sharded with TorchRec's DistributedModelParallel (RowwiseAdamW fused into
their backward; placed by the planner, row-wise included, since every table lookup is padded
with empty bags to one size over the ranks), the dense rest is replicated under DDP with AdamW,
and each rank trains on a contiguous slice of every global batch of `rows_per_batch` packed
rows. The loss is rescaled so
that the gradient is that of the mean over all ranks' queries; sampled negatives are the same on
every rank and in-batch negatives are every rank's targets, so N ranks train like one process
(tests/test_pretrain_distributed.py; equal up to float rounding with dropout and stochastic
length off: those draw per rank). Evaluation runs identically on every rank (not sped up);
rank 0 writes config.json, results.json and TensorBoard. Checkpoints keep one process's names
and layout (tables and their RowwiseAdamW moments as ShardedTensors), so DCP moves them between
world sizes: a 2-rank checkpoint resumes on 2 ranks, or initialises (`train.init_from`) or is read
(`lumrec.checkpoint.load_model_weights`) by an unsharded model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torchrec.modules.embedding_modules import EmbeddingCollection

from lumrec.allocator import keep_freed_host_memory
from lumrec.checkpoint import CheckpointManager
from lumrec.config import default_values, load_config, to_dict
from lumrec.data.batches import JaggedBatch, PackedBatchLoader
from lumrec.data.dataset import Dataset, day_bounds, write_text_atomic
from lumrec.data.packing import history_windows
from lumrec.data.sequences import sequences_from_dataset
from lumrec.data.tokens import TokenConfig, drop_condition_ids
from lumrec.device import (activation_meter, autocast, format_bytes, move_to_device, resolve_device,
                           set_activation_checkpointing)
from lumrec.distributed import DistContext, dense_optimizer, from_rank0, global_mean_loss, init_distributed, shard_model
from lumrec.modules.layers.equal_lookups import set_lookup_group
from lumrec.modules.layers.losses import InfoNCEConfig, InfoNCELoss
from lumrec.modules.retrieval.sequence_model import RetrievalTrain, SequentialRecommender
from lumrec.modules.warm_start import load_source_state, warm_start
from lumrec.modules.warm_start_config import WarmStartConfig
from lumrec.meta_tables import build_with_meta_tables
from lumrec.optim import fused_params_for, rowwise_adamw_kwargs
from lumrec.optim.sparse_grads import sparse_table_gradients
from lumrec.modules.retrieval.registry import build_model
from lumrec.modules.table_parameters import split_parameters
from lumrec.pipelines.pretrain_config import (  # the configs are importable from here too
    LONG_HISTORY,
    RESUMABLE_CHANGES,
    TABLE_OPTIMIZERS,
    DataConfig,
    PretrainConfig,
    TrainConfig,
    split_protocol,
)
from lumrec.pipelines.retrieval_eval import build_tokens, evaluate_retrieval, leave_one_out
from lumrec.tracking import count_parameters, log_job_end, log_job_start
from lumrec.train import (
    Budget,
    EvalResult,
    Evaluation,
    GradNormProbe,
    Rank0Clock,
    RunCheckpoints,
    RunConfig,
    SavePolicy,
    StepResult,
    TrainLoop,
    TrainState,
    dense_parameters,
)
from lumrec.train.sharded_state import ShardedCheckpointState

log = logging.getLogger("lumrec.pretrain")

__all__ = ["DataConfig", "PretrainConfig", "Pretrainer", "TrainConfig", "main"]


_STEP_DIR = re.compile(r"^step-\d{8}$")


def _step_seed(seed: int, step: int) -> int:
    """A per-step seed, so that a resumed run draws the same dropout masks and negatives."""
    return (seed * 1_000_003 + step * 7919) % (2**63 - 1)


def _rank_seed(step_seed: int, rank: int) -> int:
    """Rank `rank`'s own stream of a step (dropout, stochastic length); rank 0's is the step seed."""
    return (step_seed + rank * 104_729) % (2**63 - 1)


def _distributed_context(device: torch.device) -> DistContext | None:
    """The process group when torchrun/torchx started WORLD_SIZE > 1 ranks; None in one process (the plain path).

    gloo on the CPU whatever the machine (as in one process); nccl when `device` (train.device) is this rank's GPU.
    """
    raw = os.environ.get("WORLD_SIZE") or "1"
    try:
        world = int(raw)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None
    if world <= 1:
        return None
    return init_distributed("nccl" if device.type == "cuda" else "gloo")


def _build_model(cfg: PretrainConfig, meta: Any, data: Dataset, token_config: TokenConfig) -> SequentialRecommender:
    """`build_model`; on N ranks with its embedding tables on meta, so that no rank ever holds a whole table.

    Sharding fills each rank's shards with the rows the CPU build holds (`lumrec.meta_tables`), so
    N ranks start from the 1-process weights. `train.table_init` copies into whole tables before
    sharding, so it keeps the CPU build, as does a model whose table init cannot be replayed per
    row range (`MetaInitError`, logged).
    """
    def build() -> SequentialRecommender:
        return build_model(cfg.model, cfg.model_config, meta, data, token_config, cfg.data.max_len)

    if cfg.train.table_init is not None or (os.environ.get("WORLD_SIZE") or "1").strip() in ("", "1"):
        return build()
    return build_with_meta_tables(build, f"model {cfg.model}")


class Pretrainer:
    """Owns the model, optimizers, data and checkpoints of one run, in one process or on N ranks (module docstring).

    One process: `model` is the plain model, `optimizers` = [AdamW (dense), RowwiseAdamW (tables)].
    N ranks: `dmp` is the DistributedModelParallel of `trainer`, `model` the model inside it (tables
    sharded), `optimizers` = [dense AdamW (torchrec CombinedOptimizer), RowwiseAdamW per DENSE kernel]
    (those step inside backward; they are listed for the lr schedule).

    `pooled_sharding_types` (class attribute) narrows the planner's choice for the pooled tables on
    N ranks (None: its free choice, row-wise included; every rank's lookups are padded to one
    stride, `lumrec.modules.layers.equal_lookups`); tests set ("row_wise",).
    """

    pooled_sharding_types: tuple[str, ...] | None = None

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        # Config values are checked before any data is read.
        if cfg.train.embedding_optimizer not in TABLE_OPTIMIZERS:
            raise ValueError(f"train.embedding_optimizer must be one of {tuple(TABLE_OPTIMIZERS)}, "
                             f"got {cfg.train.embedding_optimizer!r}")
        # Checked again here: a caller may set train_excludes_last after the config was built.
        self.protocol = split_protocol(cfg.data)
        if cfg.data.long_history not in LONG_HISTORY:
            raise ValueError(f"data.long_history must be one of {LONG_HISTORY}, got {cfg.data.long_history!r}")
        if cfg.data.long_history == "windows" and cfg.data.target_start is not None:
            # Older windows would hold no targets on or after target_start: pure cost.
            raise ValueError("data.long_history=windows cannot be combined with data.target_start")
        self.device = resolve_device(cfg.train.device, "train.device")  # `cuda` without a GPU fails before any data is read
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.keep_freed_host_memory:
            keep_freed_host_memory()
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        data = Dataset(cfg.data.path)
        self.meta = data.read_meta()
        seqs = sequences_from_dataset(data, cfg.data.start, cfg.data.end)
        self.split = leave_one_out(seqs, cfg.data.min_history)
        self.validates = cfg.data.train_excludes_last == 2
        self.tests = cfg.data.train_excludes_last > 0
        self.min_target_ts: int | None = None
        if cfg.data.target_start is not None:
            self.min_target_ts = day_bounds(cfg.data.target_start)[0]
        self.token_config = TokenConfig(
            condition_features=list(cfg.data.condition_features), item_features=list(cfg.data.item_features)
        )
        torch.manual_seed(cfg.train.seed)
        self.model: SequentialRecommender = _build_model(cfg, self.meta, data, self.token_config)
        self.lum = self.model.predicts_from != 1
        if cfg.train.activation_checkpointing and not set_activation_checkpointing(self.model, True):
            raise ValueError(f"train.activation_checkpointing: model {cfg.model!r} has no HSTU or transformer stack to checkpoint; "
                             "set it to false")
        train_seqs = {2: self.split.train, 1: self.split.valid, 0: seqs}[cfg.data.train_excludes_last]
        if self.min_target_ts is not None:
            train_seqs = train_seqs.active_since(self.min_target_ts)
        if len(train_seqs) == 0:
            raise ValueError(f"{cfg.data.path}: no training sequences (data.start={cfg.data.start}, data.end={cfg.data.end}, "
                             f"data.target_start={cfg.data.target_start})")
        self.num_train_users = len(train_seqs)
        tokens = build_tokens(train_seqs, self.token_config, self.lum)
        if cfg.data.condition_dropout:
            if not self.lum:
                raise ValueError(f"data.condition_dropout applies to LUM only; model {cfg.model!r} has no condition tokens")
            tokens = drop_condition_ids(tokens, cfg.data.condition_dropout, seed=cfg.train.seed)
        if cfg.data.long_history == "windows":
            tokens = tokens.take_spans(*history_windows(tokens.offsets, tokens.token_type, cfg.data.max_len))
        self.ctx = _distributed_context(self.device)
        self.is_main = self.ctx is None or self.ctx.is_main
        part = None if self.ctx is None else (self.ctx.rank, self.ctx.world_size)
        self.loader = PackedBatchLoader(tokens, cfg.data.max_len, cfg.train.rows_per_batch, shuffle_seed=cfg.train.seed, part=part)
        t = cfg.train
        loss = InfoNCELoss(InfoNCEConfig(
            temperature=t.temperature, num_sampled_negatives=t.num_negatives, in_batch_negatives=t.in_batch_negatives,
            exclude_seen=t.loss_excludes_seen,
        ), self.model.num_items, process_group=None if self.ctx is None else self.ctx.process_group)
        self.trainer = RetrievalTrain(self.model, loss, min_target_ts=self.min_target_ts)
        self.num_parameters = count_parameters(self.model)  # before sharding: the whole model's size
        self.checkpoints = RunCheckpoints(self.out, t.keep_checkpoints, lambda for_load: self._state(for_save=not for_load),
                                          self._apply_state, lambda: {"model": self.model.state_dict()})
        self.dmp = None  # the DistributedModelParallel of `trainer` on N ranks
        # The first training step of this process measures the activation memory (lumrec.device.activation_meter).
        self.activation_bytes: int | None = None
        self.activation_tokens = 0
        self._activation_method = ""
        if self.ctx is None:
            self.trainer.to(self.device)  # before the optimizers, whose state follows the parameters' device
            self.optimizers = self._build_optimizers()
            self.grad_norm = GradNormProbe(split_parameters(self.model)[1])
        else:
            if self.checkpoints.latest() is None and not t.init_from and t.table_init is not None:
                self._init_tables(t.table_init)  # into the unsharded model: sharding copies the tables
            self.optimizers = self._shard()
            self.grad_norm = GradNormProbe(dense_parameters(self.dense_optimizer))  # tables step inside backward
        # The configured lr of every optimizer group: the schedule scales these (not the groups'
        # current values, which a checkpoint may carry decayed).
        self._base_lrs = [[group["lr"] for group in opt.param_groups] for opt in self.optimizers]
        self._lr_factor = 1.0
        self._total_steps: int | None = None  # epochs x batches, the lr schedule's length without a time budget
        self.loop = TrainLoop(
            "pretrain", self.out, self.loader, self._loop_step,
            Evaluation("hr@10", self._validate, every_epochs=t.eval_every_epochs, enabled=self.validates),
            self.checkpoints, RunConfig(to_dict(cfg), RESUMABLE_CHANGES, default_values(cfg)),
            # Patience 0 stops at the first evaluation without a better HR@10, as patience 1 does.
            Budget(t.epochs, max_minutes=t.max_minutes, max_steps=t.max_steps, patience=max(1, t.patience),
                   checkpoint_every_steps=t.checkpoint_every_steps,
                   log_every_steps=t.log_every_steps),
            self._results, clock=Rank0Clock(self.ctx), ctx=self.ctx,
            # Epoch ends are saved only where state beyond the step checkpoints changed (an evaluation, the end):
            # with short epochs an every-epoch save cost more than training (Beauty: 21 steps per epoch).
            saves=SavePolicy(every_epoch=False),
            train_mode=lambda: (self.dmp if self.dmp is not None else self.model).train(), on_fresh_start=self._fresh_start,
        )

    @property
    def state(self) -> TrainState:
        """Where the run stands (step, loader position, best validation HR@10, history)."""
        return self.loop.state

    @property
    def resumed_from_step(self) -> int | None:
        """The step this process's run continued from (None for a fresh run)."""
        return self.loop.resumed_from_step

    def _build_optimizers(self) -> list[torch.optim.Optimizer]:
        """`train.embedding_optimizer` for the embedding tables (RowwiseAdamW by default), AdamW for dense parameters."""
        t = self.cfg.train
        tables, dense = split_parameters(self.model)
        opts: list[torch.optim.Optimizer] = []
        if dense:
            opts.append(torch.optim.AdamW(dense, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay))
        if tables:
            emb_lr = t.embedding_lr or t.lr
            if t.embedding_optimizer == "rowwise_adamw":
                sparse_table_gradients(self.model)  # a step costs O(rows touched); the same bits as dense gradients
            opts.append(TABLE_OPTIMIZERS[t.embedding_optimizer](tables, lr=emb_lr, betas=t.betas, eps=t.eps, weight_decay=t.embedding_weight_decay))
        return opts

    def _shard(self) -> list[Any]:
        """Shard the tables over the ranks (RowwiseAdamW in backward) and DDP the rest; returns [dense AdamW, *table optimizers].

        After this, `self.trainer` is the RetrievalTrain with sharded tables (called through
        `self.dmp`) and `self.model` its SequentialRecommender, whose state_dict has one
        process's names (tables as ShardedTensors).
        """
        t = self.cfg.train
        if t.embedding_optimizer != "rowwise_adamw":
            raise ValueError(f"train.embedding_optimizer={t.embedding_optimizer!r} runs in one process only; "
                             "sharded tables (WORLD_SIZE > 1) use rowwise_adamw")
        unshardable = [name for name, m in self.model.named_modules() if isinstance(m, EmbeddingCollection)]
        if unshardable:
            raise ValueError(f"model {self.cfg.model!r}: EmbeddingCollection {unshardable}: the sharded pre-training "
                             "checkpoint (lumrec.train.sharded_state) holds EmbeddingBagCollection tables only; "
                             "pre-train it in one process (WORLD_SIZE=1)")
        table_lr = t.embedding_lr or t.lr
        # fbgemm's fused PARTIAL_ROWWISE_ADAM on CUDA with its CUDA build, else RowwiseAdamW (any device).
        table_opt = fused_params_for(self.ctx.device, lr=table_lr, betas=t.betas, eps=t.eps, weight_decay=t.embedding_weight_decay)
        self.dmp = shard_model(self.trainer, self.ctx, table_opt, pooled_sharding_types=self.pooled_sharding_types)
        self.trainer = self.dmp.module
        self.model = self.trainer.model
        # Ranks' slices hold different numbers of tokens (bags) and of candidates (their own targets),
        # which torchrec's row-wise pooled output cannot take: every lookup is padded to one stride.
        set_lookup_group(self.model, self.ctx.process_group)
        self.dense_optimizer = dense_optimizer(self.dmp, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
        # The checkpoint's table group has RowwiseAdamW's settings on any device (one process reads it).
        table_kwargs = rowwise_adamw_kwargs(table_lr, t.betas, t.eps, t.embedding_weight_decay)
        self.sharded_state = ShardedCheckpointState(self.model, self.dense_optimizer, table_kwargs)
        # RowwiseAdamW per DENSE kernel (none when fused: those step inside fbgemm, their lr in the dense part's "fused").
        return [self.dense_optimizer, *self.dmp.lumrec_table_optimizers]

    # -- checkpoints ------------------------------------------------------------------------
    def _state(self, for_save: bool = False) -> dict[str, Any]:
        """What a checkpoint holds: {"model": ..., "optim": ...} with one process's names on any world size."""
        if self.dmp is not None:
            table_lr = (self.cfg.train.embedding_lr or self.cfg.train.lr) * self._lr_factor
            return self.sharded_state.state_dict(param_groups=for_save, table_lr=table_lr)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizers)
        return {"model": model_sd, "optim": optim_sd}

    def _apply_state(self, state: dict[str, Any]) -> None:
        """Put a state loaded by DCP into the model and optimizers."""
        if self.dmp is None:
            set_state_dict(self.model, self.optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
            return
        # The optimizer state was loaded in place (views); the model goes through load_state_dict
        # so that torchrec copies the table shards whatever DCP did with them.
        self.model.load_state_dict(state["model"])

    def save(self) -> None:
        """Checkpoint tensors plus run state (data position, best metric, history)."""
        self.loop.save()

    def maybe_resume(self) -> bool:
        """Load the latest complete checkpoint of this run, if any (else `train.init_from`'s weights, if set)."""
        return self.loop.resume()

    def _fresh_start(self) -> None:
        """A run without checkpoints of its own: `train.init_from`'s weights, or `train.table_init`'s tables, if set."""
        if self.cfg.train.init_from:
            self._init_from(self.cfg.train.init_from)
        elif self.cfg.train.table_init is not None and self.dmp is None:  # N ranks: done before sharding
            self._init_tables(self.cfg.train.table_init)

    def _init_from(self, source: str) -> None:
        """Start from another run's model and optimizer state (a checkpoints/ folder or one step in it)."""
        path = Path(source)
        manager, step = CheckpointManager(path, keep=0), None
        if _STEP_DIR.match(path.name):
            manager, step = CheckpointManager(path.parent, keep=0), int(path.name.split("-")[1])
        elif not manager.candidates():
            raise FileNotFoundError(f"train.init_from: {path} holds no complete checkpoint (step-NNNNNNNN with its meta file)")
        state = self._state()
        info = manager.load(state, step)  # a root folder: its newest checkpoint that verifies
        self._apply_state(state)
        # Moments carry over; the learning rates are this run's (the source's may have decayed).
        for opt, lrs in zip(self.optimizers, self._base_lrs):
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr
        log.info("initialised from %s", manager.step_dir(info.step))

    def _init_tables(self, cfg: WarmStartConfig) -> None:
        """Feature warm-up: the token encoder's tables from an existing DLRM's (see TrainConfig.table_init)."""
        if not cfg.source:
            raise ValueError("train.table_init.source is empty; give the DLRM's checkpoint folder or torch.save file")
        cfg = WarmStartConfig(source=cfg.source, name_map=cfg.name_map, strict_shapes=False, exclude=cfg.exclude,
                              checkpoint_key=cfg.checkpoint_key)
        tables = {name for name, _ in self.model.named_parameters() if "embedding_bags" in name}
        # Only tables travel: a DLRM's dense layers mean nothing to the LUM.
        # DLRMs hold tables in EmbeddingBagCollections (".embedding_bags.") and, for behaviour
        # sequences (DIN/SIM), EmbeddingCollections (".embeddings.").
        source = {k: v for k, v in load_source_state(cfg.source, cfg.checkpoint_key).items()
                  if ".embedding_bags." in k or ".embeddings." in k}
        report = warm_start(self.model, source, cfg)
        copied = sorted(set(report.copied) & tables)
        if not copied:
            raise ValueError(f"train.table_init: no embedding table of {cfg.source} matched the LUM's tables {sorted(tables)} "
                             "(check name_map and model_config.embedding_dim)")
        self.table_init_report = {"source": cfg.source, "tables": copied}
        if self.is_main:  # kept beside the checkpoints: a resumed run reports it too
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out / "table_init.json", json.dumps(self.table_init_report, indent=2))
        log.info("token encoder tables initialised from %s: %s", cfg.source, copied)

    # -- training ---------------------------------------------------------------------------
    def lr_multiplier(self, progress: float) -> float:
        """Factor on the base lr at `progress` in [0, 1] of the run (warmup-stable-decay)."""
        t = self.cfg.train
        if t.lr_decay_fraction <= 0:
            return 1.0
        left = 1.0 - min(max(progress, 0.0), 1.0)
        if left >= t.lr_decay_fraction:
            return 1.0
        return t.lr_final_ratio + (1.0 - t.lr_final_ratio) * left / t.lr_decay_fraction

    def _set_lr(self, progress: float) -> float:
        """Every optimizer group's lr = its configured lr x the schedule's factor; returns the factor."""
        factor = self.lr_multiplier(progress)
        self._lr_factor = factor
        for opt, lrs in zip(self.optimizers, self._base_lrs):
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * factor
        return factor

    def _rank0(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (decisions such as early stopping must agree); itself in one process."""
        return from_rank0(self.ctx, value)

    def _loop_step(self, batch: JaggedBatch, log_step: bool) -> StepResult:
        """The loop's step: the lr schedule's factor, `train_step`, and the scalars of a log step."""
        t = self.cfg.train
        scalars: dict[str, float | None] = {}
        if t.lr_decay_fraction > 0:
            if self._total_steps is None:  # at the run's first step, as the loader's length then
                planned = t.epochs * len(self.loader)
                self._total_steps = max(1, min(planned, t.max_steps) if t.max_steps else planned)
            budget = self.loop.budget.max_seconds
            progress = self.loop.train_seconds() / budget if budget < math.inf else self.state.step / self._total_steps
            scalars["lr_factor"] = self._set_lr(progress)
        self.grad_norm.armed = log_step
        loss, _, tokens = self.train_step(batch)
        scalars["lr"] = t.lr * self._lr_factor
        scalars["grad_norm"] = self.grad_norm.take()
        return StepResult(loss, tokens, scalars)

    def train_step(self, batch: JaggedBatch) -> tuple[float, int, int]:
        """One optimisation step on a packed batch; returns the global batch's (mean loss, queries, tokens)."""
        seed = _step_seed(self.cfg.train.seed, self.state.step)
        if self.dmp is not None:
            return self._sharded_step(batch, seed)
        torch.manual_seed(seed)
        batch = move_to_device(batch, self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        with self._measure(batch), autocast(self.device, self.cfg.train.precision):
            loss, queries = self.trainer(batch, generator)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        self.grad_norm()  # the dense gradients' norm at log steps (read only)
        for opt in self.optimizers:
            opt.step()
        return float(loss.detach()), queries, batch.num_tokens

    def _sharded_step(self, batch: JaggedBatch, seed: int) -> tuple[float, int, int]:
        """`train_step` on this rank's slice: the global mean loss's gradient, tables updated in backward."""
        own = _rank_seed(seed, self.ctx.rank)
        torch.manual_seed(own)  # dropout: each rank its own masks
        batch = move_to_device(batch, self.device)
        # Sampled negatives from the step seed alone: the same on every rank, as in one process.
        with self._measure(batch), autocast(self.device, self.cfg.train.precision):
            loss, queries = self.dmp(batch, torch.Generator(device=self.device).manual_seed(own),
                                     torch.Generator(device=self.device).manual_seed(seed))
        # A stand-in for an empty slice (`batch.padding`) has no query and trains no token.
        counts = torch.tensor([queries, 0 if batch.padding else batch.num_tokens], dtype=torch.int64, device=self.device)
        dist.all_reduce(counts)
        total_queries, tokens = int(counts[0]), int(counts[1])
        if total_queries > 0:
            # Ranks' gradients are averaged (DDP, torchrec): scaled by world * local / global queries,
            # they average to the gradient of the mean over every rank's queries.
            loss = global_mean_loss(loss, queries, self.ctx, total_queries)
        self.dense_optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the table shards were updated here (RowwiseAdamW in backward)
        self.grad_norm()
        self.dense_optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        return float(mean) / self.ctx.world_size, total_queries, tokens

    def evaluate(self, which: str = "valid") -> dict[str, float]:
        """Leave-one-out metrics on the validation or test targets."""
        seqs = self.split.valid if which == "valid" else self.split.test
        return evaluate_retrieval(self.model, seqs, self.token_config, self.cfg.data.max_len,
                                  self.cfg.train.eval_rows_per_batch, exclude_seen=self.cfg.train.exclude_seen, device=self.device)

    @contextlib.contextmanager
    def _measure(self, batch: JaggedBatch) -> Iterator[None]:
        """The process's first forward under an activation meter (measuring leaves every number as it is); later ones as they are."""
        if self._activation_method:
            yield
            return
        params = [p for p in self.trainer.parameters() if p.device.type == self.device.type]
        meter = activation_meter(self.device, params)
        self._activation_method, self.activation_tokens = meter.method, batch.num_tokens
        with meter:
            yield
        self.activation_bytes = meter.bytes
        if self.is_main:
            log.info("pretrain first step: activation memory %s", self.activation_summary()["activation_memory"])

    def activation_summary(self) -> dict[str, str]:
        """Activation memory per token of the first step this process ran (how it was measured), for the start/end lines."""
        if self.activation_bytes is None or not self.activation_tokens:
            return {"activation_memory": "unmeasured"}
        per_token = self.activation_bytes / self.activation_tokens
        return {"activation_memory": f"{format_bytes(per_token)} per token ({self._activation_method}, "
                                     f"{self.activation_tokens:,} tokens, {format_bytes(self.activation_bytes)})"}

    def run(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train until epochs, patience, time budget or `max_steps` run out; then test the best model.

        `max_steps` stops as a kill would, after a checkpoint, and returns {"step": ..., "stopped": "max_steps"}.
        """
        self._total_steps = None
        if self.is_main:
            log_job_start("pretrain", data=f"{self.num_train_users:,} users, {self.loader.tokens.num_tokens:,} tokens",
                          parameters=self.num_parameters, device=str(self.device), threads=torch.get_num_threads(),
                          **({"ranks": self.ctx.world_size} if self.ctx is not None else {}), **self._speed_settings())
        result = self.loop.run(max_steps=max_steps)
        if self.is_main:
            secs = self.state.train_seconds
            log_job_end("pretrain", steps=self.state.step, parameters=f"{self.num_parameters:,}", device=str(self.device),
                        tokens_per_s=f"{self.state.tokens / secs:,.0f}" if secs > 0 else "unmeasured", **self.activation_summary())
        if "stopped" in result:
            return {"step": result["step"], "stopped": result["stopped"]}
        return result

    def _speed_settings(self) -> dict[str, str]:
        """The start line's precision and activation checkpointing, where they differ from the defaults."""
        t = self.cfg.train
        return {**({"precision": t.precision} if t.precision != "fp32" else {}),
                **({"activation_checkpointing": "on"} if t.activation_checkpointing else {})}

    def _validate(self, epoch: int, state: TrainState) -> EvalResult:
        """Validation metrics; HR@10 picks the best model and drives early stopping."""
        # Every rank evaluates alike; rank 0's numbers rule, so early stopping agrees to the bit.
        metrics = self._rank0(self.evaluate("valid"))
        if self.is_main:
            log.info("epoch %d valid %s", epoch, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return EvalResult({"epoch": epoch, "step": state.step, **metrics}, score=metrics["hr@10"],
                          best_extra={"epoch": epoch, **metrics}, scalars={"valid": metrics})

    def _results(self, state: TrainState) -> dict[str, Any]:
        """Test metrics of the best validation model (results.json)."""
        if self.checkpoints.best.latest() is not None:
            best = {"model": self.model.state_dict()}
            self.checkpoints.best.load(best)
            self.model.load_state_dict(best["model"])
        test = self._rank0(self.evaluate("test")) if self.tests else {}
        self.loop.scalars.scalars("test", test, state.step)
        secs = state.train_seconds
        result = {
            "model": self.cfg.model,
            "protocol": self.protocol,  # data.protocol: which events trained, selected and tested
            "test": test,
            "best_valid_hr@10": state.best_metric,
            "best_epoch": state.best_epoch,
            "epochs_run": self.loader.epoch,
            "steps": state.step,
            "resumed_from_step": self.resumed_from_step,
            "train_users": self.num_train_users,
            "train_minutes": round(secs / 60, 2),
            "tokens_per_s": round(state.tokens / secs, 1) if secs > 0 else None,
            "history": state.history,
        }
        if (self.out / "table_init.json").exists():
            result["table_init"] = json.loads((self.out / "table_init.json").read_text())
        if test and self.is_main:
            log.info("test %s", " ".join(f"{k}={v:.4f}" for k, v in test.items()))
        return result

    def close(self) -> None:
        """Destroy the process group if this trainer created it (nothing to do in one process)."""
        if self.ctx is not None:
            self.ctx.close()


def main(args: argparse.Namespace) -> int:
    """`lumrec pretrain CONFIG [key=value ...]`; under torchrun with WORLD_SIZE > 1, sharded over the ranks."""
    cfg = load_config(PretrainConfig, args.config, overrides=args.overrides)
    trainer = Pretrainer(cfg)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    if trainer.is_main:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return 0
