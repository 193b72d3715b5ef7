"""Step 1: generative pre-training of SASRec, HSTU or LUM on a lumrec dataset, with exact resume.

Determinism: batches come from a packing plan fixed by (seed, epoch); dropout and negative
sampling are seeded by (seed, global step). A run resumed from any checkpoint therefore
continues with the same batches and the same loss curve as an uninterrupted one.

N ranks (torchrun / torchx with WORLD_SIZE > 1; gloo on CPU, like the one-process path): the
embedding tables are sharded with TorchRec's DistributedModelParallel (RowwiseAdamW fused into
their backward), the dense rest is replicated under DDP with AdamW, and each rank trains on a
contiguous slice of every global batch of `rows_per_batch` packed rows. The loss is rescaled so
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
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata, ShardMetadata, TensorProperties
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm import tqdm

from lumrec.allocator import keep_freed_host_memory
from lumrec.checkpoint import CheckpointManager
from lumrec.config import check_same_run, load_config, to_dict
from lumrec.data.batches import PackedBatchLoader
from lumrec.data.dataset import Dataset, day_bounds, write_text_atomic
from lumrec.data.packing import history_windows
from lumrec.data.sequences import sequences_from_dataset
from lumrec.data.tokens import TokenConfig, drop_condition_ids
from lumrec.faults import failpoint
from lumrec.modules.warm_start_config import WarmStartConfig
from lumrec.modules.losses import InfoNCEConfig, InfoNCELoss
from lumrec.modules.sequence_model import RetrievalTrain, SequentialRecommender
from lumrec.optim import RowwiseAdamW
from lumrec.pipelines.model_factory import build_model, split_parameters
from lumrec.pipelines.retrieval_eval import build_tokens, evaluate_retrieval, leave_one_out

if TYPE_CHECKING:
    from lumrec.distributed import DistContext

log = logging.getLogger("lumrec.pretrain")


@dataclass
class DataConfig:
    """Which events to train on and how they become tokens."""

    path: str = "out/ml-1m"  # a lumrec dataset folder (`lumrec import` / `lumrec synth`)
    start: str | None = None  # first day (YYYY-MM-DD) of behaviours to use; None = all
    end: str | None = None
    max_len: int = 200  # tokens per sequence; the most recent are kept
    # Histories longer than max_len in training. "last": only the most recent max_len tokens (the
    # published protocol; the rest is never seen). "windows": the whole history, cut from its end
    # into windows of max_len tokens that train as separate sequences (every transition once).
    # Evaluation always reads the most recent max_len tokens.
    long_history: str = "last"
    condition_features: list[str] = field(default_factory=list)  # LUM: [] = one constant condition
    # LUM: each condition feature of a training event is left empty with this probability (seeded,
    # the same every epoch and on resume), so the model also answers a `none=0` query (no
    # condition) and any subset of its conditions. Evaluation and queries use full conditions.
    condition_dropout: float = 0.0
    item_features: list[str] = field(default_factory=lambda: ["item_id"])
    min_history: int = 1  # users need min_history + 2 events (train + valid + test targets)
    # Events at the end of each history that training never sees. 2: validation and test are
    # held out and early stopping uses validation (strict). 1: only the test event is held out,
    # as in the published ML-1M protocol (Meta's code has no validation split); there is then no
    # validation metric, so the model at the end of the budget is the one tested. 0: nothing is
    # held out and there is no test (continued daily pre-training: the next day tests it).
    train_excludes_last: int = 2
    # Streaming continuation: only items on or after this day (YYYY-MM-DD) are training targets;
    # earlier events are context. Users without events on or after it are skipped. None = all.
    target_start: str | None = None


# data.long_history choices: the most recent max_len tokens only, or the whole history in windows.
LONG_HISTORY = ("last", "windows")

# train.embedding_optimizer -> the optimizer class of the embedding tables (one process).
TABLE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"rowwise_adamw": RowwiseAdamW, "adamw": torch.optim.AdamW}


@dataclass
class TrainConfig:
    """Optimisation, evaluation, checkpoints and budget."""

    seed: int = 0
    epochs: int = 100
    rows_per_batch: int = 128  # packed rows of max_len tokens per step
    lr: float = 1e-3
    embedding_lr: float | None = None  # None = lr
    weight_decay: float = 0.0
    embedding_weight_decay: float = 0.0
    # Optimizer of the embedding tables: "rowwise_adamw" (one second moment per row: fbgemm's
    # PARTIAL_ROWWISE_ADAM, the memory a large table needs) or "adamw" (one per element, as
    # Meta's research trainer uses on ML-1M; one process only, and 2x the table's memory).
    embedding_optimizer: str = "rowwise_adamw"
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    temperature: float = 0.05
    num_negatives: int = 128  # shared uniform negatives per step; -1 = every item (full softmax)
    in_batch_negatives: bool = True  # other queries' targets are negatives too
    # A position's earlier items of its own sequence are not its negatives, whether full-softmax,
    # in-batch or sampled (the candidates an exclude_seen evaluation ranks); the target always is its positive.
    loss_excludes_seen: bool = False
    eval_every_epochs: int = 1
    patience: int = 5  # evaluations without a better validation HR@10 before stopping
    max_minutes: float = 0.0  # training-time budget (0 = none); evaluation time is not counted
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 2
    threads: int = 0  # torch threads (0 = torch's default)
    keep_freed_host_memory: bool = True  # glibc: reuse freed large buffers (see lumrec.allocator)
    eval_rows_per_batch: int = 64
    exclude_seen: bool = True  # rank only items outside the user's visible history (published protocol)
    log_every_steps: int = 20
    # A checkpoint (a run's checkpoints/ folder, or one step-NNNNNNNN in it) whose model and
    # optimizer state a fresh run starts from: continued pre-training (daily: D-1's LUM). Ignored
    # when the run has checkpoints of its own (it resumes from them).
    init_from: str | None = None
    # Feature warm-up: a fresh run (no checkpoints, no init_from) copies the embedding tables of an
    # existing DLRM into the token encoder (names mapped by `name_map`; only same-shape tensors are
    # copied, the rest is reported). Declare the LUM's tables like the DLRM's (model_config.embedding_dim).
    table_init: WarmStartConfig | None = None
    # Warmup-stable-decay: the lr stays constant, then falls linearly to lr * lr_final_ratio over
    # the last `lr_decay_fraction` of the run. The run's length is the time budget when one is set
    # (progress = training seconds / budget), else epochs x batches. 0 = constant lr.
    lr_decay_fraction: float = 0.0
    lr_final_ratio: float = 0.0


@dataclass
class PretrainConfig:
    """A whole pre-training run."""

    model: str = "sasrec"  # sasrec | hstu | hstu-large | lum
    out: str = "runs/pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model_config: dict[str, Any] = field(default_factory=dict)  # keys of the model's own config dataclass


# Keys a resumed run may change: they do not alter what its checkpoints mean (budget, logging,
# threads; init_from and table_init only act on a fresh run). Any other change is refused.
RESUMABLE_CHANGES = ("out", "train.epochs", "train.max_minutes", "train.patience", "train.eval_every_epochs",
                     "train.eval_rows_per_batch", "train.threads", "train.keep_freed_host_memory", "train.log_every_steps",
                     "train.checkpoint_every_steps", "train.keep_checkpoints", "train.init_from", "train.table_init")


@dataclass
class RunState:
    """Progress that a checkpoint carries besides tensors."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # next batch of `epoch`
    best_metric: float = -1.0
    best_epoch: int = -1
    bad_evals: int = 0
    train_seconds: float = 0.0
    tokens: int = 0
    history: list[dict] = field(default_factory=list)
    done: bool = False


_STEP_DIR = re.compile(r"^step-\d{8}$")


def _step_seed(seed: int, step: int) -> int:
    """A per-step seed, so that a resumed run draws the same dropout masks and negatives."""
    return (seed * 1_000_003 + step * 7919) % (2**63 - 1)


def _rank_seed(step_seed: int, rank: int) -> int:
    """Rank `rank`'s own stream of a step (dropout, stochastic length); rank 0's is the step seed."""
    return (step_seed + rank * 104_729) % (2**63 - 1)


def _distributed_context() -> "DistContext | None":
    """The process group when torchrun/torchx started WORLD_SIZE > 1 ranks; None in one process (the plain path).

    gloo on CPU whatever the machine: the pre-trainer runs on CPU in one process too.
    """
    raw = os.environ.get("WORLD_SIZE") or "1"
    try:
        world = int(raw)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None
    if world <= 1:
        return None
    from lumrec.distributed import init_distributed

    return init_distributed("gloo")


@dataclass
class _TableSlot:
    """Where this rank's shard of one table lives in a DENSE kernel: its RowwiseAdamW, flat weight, segment."""

    optimizer: torch.optim.Optimizer
    weight: torch.Tensor
    offset: int  # first element of the table in the flat weight
    rows: int
    dim: int
    row_base: int  # first row of the table in the optimizer's per-row state


def _sharded_like(weight: ShardedTensor, local_meta: ShardMetadata, local: torch.Tensor, rows_only: bool) -> ShardedTensor:
    """A ShardedTensor placed like `weight` (`rows_only`: its row dimension alone) with `local` as this rank's shard."""

    def cut(m: ShardMetadata) -> ShardMetadata:
        if rows_only:
            return ShardMetadata([m.shard_offsets[0]], [m.shard_sizes[0]], m.placement)
        return ShardMetadata(list(m.shard_offsets), list(m.shard_sizes), m.placement)

    meta = weight.metadata()
    size = torch.Size(list(meta.size)[:1] if rows_only else list(meta.size))
    global_meta = ShardedTensorMetadata([cut(m) for m in meta.shards_metadata], size, TensorProperties(dtype=local.dtype))
    return ShardedTensor._init_from_local_shards_and_global_metadata([Shard(local, cut(local_meta))], global_meta)


def _unprefixed(name: str, prefix: str = "model.") -> str:
    """A sharded RetrievalTrain's parameter name as the bare model's (`model.x` -> `x`)."""
    if not name.startswith(prefix):
        raise RuntimeError(f"dense parameter {name!r} is outside the model (expected the prefix {prefix!r})")
    return name[len(prefix) :]


class Pretrainer:
    """Owns the model, optimizers, data and checkpoints of one run, in one process or on N ranks (module docstring).

    One process: `model` is the plain model, `optimizers` = [AdamW (dense), RowwiseAdamW (tables)].
    N ranks: `dmp` is the DistributedModelParallel of `trainer`, `model` the model inside it (tables
    sharded), `optimizers` = [dense AdamW (torchrec CombinedOptimizer), RowwiseAdamW per DENSE kernel]
    (those step inside backward; they are listed for the lr schedule).
    """

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        # Config values are checked before any data is read.
        if cfg.train.embedding_optimizer not in TABLE_OPTIMIZERS:
            raise ValueError(f"train.embedding_optimizer must be one of {tuple(TABLE_OPTIMIZERS)}, "
                             f"got {cfg.train.embedding_optimizer!r}")
        if cfg.data.train_excludes_last not in (0, 1, 2):
            raise ValueError(f"data.train_excludes_last must be 0, 1 or 2, got {cfg.data.train_excludes_last}")
        if cfg.data.long_history not in LONG_HISTORY:
            raise ValueError(f"data.long_history must be one of {LONG_HISTORY}, got {cfg.data.long_history!r}")
        if cfg.data.long_history == "windows" and cfg.data.target_start is not None:
            # Older windows would hold no targets on or after target_start: pure cost.
            raise ValueError("data.long_history=windows cannot be combined with data.target_start")
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
        self.model: SequentialRecommender = build_model(cfg.model, cfg.model_config, self.meta, data, self.token_config, cfg.data.max_len)
        self.lum = self.model.predicts_from != 1
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
        self.ctx = _distributed_context()
        self.is_main = self.ctx is None or self.ctx.is_main
        part = None if self.ctx is None else (self.ctx.rank, self.ctx.world_size)
        self.loader = PackedBatchLoader(tokens, cfg.data.max_len, cfg.train.rows_per_batch, shuffle_seed=cfg.train.seed, part=part)
        t = cfg.train
        loss = InfoNCELoss(InfoNCEConfig(
            temperature=t.temperature, num_sampled_negatives=t.num_negatives, in_batch_negatives=t.in_batch_negatives,
            exclude_seen=t.loss_excludes_seen,
        ), self.model.num_items, process_group=None if self.ctx is None else self.ctx.process_group)
        self.trainer = RetrievalTrain(self.model, loss, min_target_ts=self.min_target_ts)
        self.ckpt = CheckpointManager(self.out / "checkpoints", keep=t.keep_checkpoints)
        self.best = CheckpointManager(self.out / "best", keep=1)
        self.dmp = None  # the DistributedModelParallel of `trainer` on N ranks
        if self.ctx is None:
            self.optimizers = self._build_optimizers()
        else:
            if self.ckpt.latest() is None and not t.init_from and t.table_init is not None:
                self._init_tables(t.table_init)  # into the unsharded model: sharding copies the tables
            self.optimizers = self._shard()
        # The configured lr of every optimizer group: the schedule scales these (not the groups'
        # current values, which a checkpoint may carry decayed).
        self._base_lrs = [[group["lr"] for group in opt.param_groups] for opt in self.optimizers]
        self._lr_factor = 1.0
        self.state = RunState()
        self.resumed_from_step: int | None = None  # set when run() continues an earlier process's checkpoint
        self.writer = None

    def _build_optimizers(self) -> list[torch.optim.Optimizer]:
        """`train.embedding_optimizer` for the embedding tables (RowwiseAdamW by default), AdamW for dense parameters."""
        t = self.cfg.train
        tables, dense = split_parameters(self.model)
        opts: list[torch.optim.Optimizer] = []
        if dense:
            opts.append(torch.optim.AdamW(dense, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay))
        if tables:
            emb_lr = t.embedding_lr or t.lr
            opts.append(TABLE_OPTIMIZERS[t.embedding_optimizer](tables, lr=emb_lr, betas=t.betas, eps=t.eps, weight_decay=t.embedding_weight_decay))
        return opts

    def _shard(self) -> list[Any]:
        """Shard the tables over the ranks (RowwiseAdamW in backward) and DDP the rest; returns [dense AdamW, *table optimizers].

        After this, `self.trainer` is the RetrievalTrain with sharded tables (called through
        `self.dmp`) and `self.model` its SequentialRecommender, whose state_dict has one
        process's names (tables as ShardedTensors).
        """
        from torchrec.modules.embedding_modules import EmbeddingCollection

        from lumrec.distributed import dense_optimizer, shard_model
        from lumrec.optim import fused_params_for

        t = self.cfg.train
        if t.embedding_optimizer != "rowwise_adamw":
            raise ValueError(f"train.embedding_optimizer={t.embedding_optimizer!r} runs in one process only; "
                             "sharded tables (WORLD_SIZE > 1) use rowwise_adamw")
        unshardable = [name for name, m in self.model.named_modules() if isinstance(m, EmbeddingCollection)]
        if unshardable:
            raise ValueError(f"model {self.cfg.model!r}: EmbeddingCollection {unshardable} cannot be sharded with RowwiseAdamW "
                             "on CPU (lumrec.optim.sharding); pre-train it in one process (WORLD_SIZE=1)")
        table_opt = fused_params_for(self.ctx.device, lr=t.embedding_lr or t.lr, betas=t.betas, eps=t.eps,
                                     weight_decay=t.embedding_weight_decay)
        self.dmp = shard_model(self.trainer, self.ctx, table_opt)
        self.trainer = self.dmp.module
        self.model = self.trainer.model
        self.dense_optimizer = dense_optimizer(self.dmp, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
        self._table_slots = self._find_table_slots()
        # A one-process RowwiseAdamW group's keys, for checkpoints that one process can read.
        probe = RowwiseAdamW([torch.zeros(1, 1, requires_grad=True)], **table_opt["optimizer_kwargs"])
        self._table_group = {k: v for k, v in probe.param_groups[0].items() if k != "params"}
        return [self.dense_optimizer, *self.dmp.lumrec_table_sharder.attached_optimizers]

    def _find_table_slots(self) -> dict[str, _TableSlot]:
        """This rank's table shards by the state-dict key of their weight: optimizer, flat weight and segment."""
        from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

        from lumrec.optim.sharding import dense_kernel_segments, iter_dense_kernels

        slots: dict[str, _TableSlot] = {}
        for fqn, module in self.model.named_modules():
            if not isinstance(module, ShardedEmbeddingBagCollection):
                continue
            prefix = f"{fqn}.embedding_bags." if fqn else "embedding_bags."
            for kernel in iter_dense_kernels(module):
                weight = kernel.emb_module.weights
                optimizer = weight._in_backward_optimizers[-1]  # the RowwiseAdamW the sharder attached
                row_base = 0
                for table, (offset, rows, dim) in zip(kernel.config.embedding_tables, dense_kernel_segments(kernel)):
                    slots[f"{prefix}{table.name}.weight"] = _TableSlot(optimizer, weight, offset, rows, dim, row_base)
                    row_base += rows
        return slots

    # -- checkpoints ------------------------------------------------------------------------
    def _state(self, for_save: bool = False) -> dict[str, Any]:
        """What a checkpoint holds: {"model": ..., "optim": ...} with one process's names on any world size."""
        if self.dmp is not None:
            return self._sharded_state(param_groups=for_save)
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

    def _sharded_state(self, param_groups: bool) -> dict[str, Any]:
        """This rank's part of a checkpoint, named and laid out like one process's `get_state_dict`.

        Dense parameters and their AdamW state are replicated tensors (DCP writes them once);
        tables and their RowwiseAdamW moments (exp_avg [rows, dim], exp_avg_sq_row and row_step
        [rows]) are ShardedTensors over views of the live shards and state, so loading is in place
        and DCP reshards between world sizes. `param_groups` (for saving) adds the hyper-parameters
        one process restores; on N ranks the lrs always come from this run's config and schedule.
        """
        model_sd = self.model.state_dict()
        state: dict[str, Any] = {}
        dense = dict(self.dense_optimizer.optimizers).get("dense")
        dense_names: list[str] = []
        if dense is not None:
            self._init_dense_state(dense)
            for name, param in dense.params.items():
                dense_names.append(_unprefixed(name))
                state[dense_names[-1]] = dict(dense.state[param])
        table_names = sorted(k for k, v in model_sd.items() if isinstance(v, ShardedTensor))
        for key in table_names:
            table_state = self._table_state(key, model_sd[key])
            if table_state is not None:  # else another rank holds this table
                state[key] = table_state
        optim: dict[str, Any] = {"state": state}
        if param_groups:
            groups = []
            if dense is not None:
                groups.append({**{k: v for k, v in dense.param_groups[0].items() if k != "params"}, "params": dense_names})
            if table_names:
                lr = (self.cfg.train.embedding_lr or self.cfg.train.lr) * self._lr_factor
                groups.append({**self._table_group, "lr": lr, "params": table_names})
            optim["param_groups"] = groups
        return {"model": model_sd, "optim": optim}

    @staticmethod
    def _init_dense_state(dense: Any) -> None:
        """Create AdamW's lazy state (a step with zero gradients at lr 0, as torch's get_state_dict does) so DCP can load into it."""
        inner = dense._optimizer
        params = list(dense.params.values())
        if all(inner.state.get(p) for p in params):
            return
        lrs = [group["lr"] for group in inner.param_groups]
        for p in params:
            p.grad = torch.zeros_like(p)
        for group in inner.param_groups:
            group["lr"] = 0.0
        inner.step()
        for group, lr in zip(inner.param_groups, lrs):
            group["lr"] = lr
        inner.zero_grad(set_to_none=True)

    def _table_state(self, key: str, weight: ShardedTensor) -> dict[str, Any] | None:
        """RowwiseAdamW state of this rank's shard of table `key` as ShardedTensors; None when it holds none."""
        shards = weight.local_shards()
        if not shards:
            return None
        slot = self._table_slots.get(key)
        if slot is None or len(shards) != 1 or list(shards[0].metadata.shard_sizes) != [slot.rows, slot.dim]:
            raise RuntimeError(f"{key}: expected one local shard of whole rows in a DENSE kernel; found {len(shards)} "
                               f"shard(s), kernel segment {slot}")
        opt = slot.optimizer
        st = opt._init_state(opt.param_groups[0], slot.weight)  # lazy state must exist before DCP loads into it
        rows = slice(slot.row_base, slot.row_base + slot.rows)
        exp_avg = st["exp_avg"][slot.offset : slot.offset + slot.rows * slot.dim].view(slot.rows, slot.dim)
        meta = shards[0].metadata
        return {
            "step": st["step"],
            "exp_avg": _sharded_like(weight, meta, exp_avg, rows_only=False),
            "exp_avg_sq_row": _sharded_like(weight, meta, st["exp_avg_sq_row"][rows], rows_only=True),
            "row_step": _sharded_like(weight, meta, st["row_step"][rows], rows_only=True),
        }

    def save(self) -> None:
        """Checkpoint tensors plus run state (data position, best metric, history)."""
        self.state.epoch, self.state.batch = self.loader.epoch, self.loader.batch
        self.ckpt.save(self.state.step, self._state(for_save=True), extra=asdict(self.state))

    def maybe_resume(self) -> bool:
        """Load the latest complete checkpoint of this run, if any (else `train.init_from`'s weights, if set)."""
        if self.ckpt.latest() is None:
            if self.cfg.train.init_from:
                self._init_from(self.cfg.train.init_from)
            elif self.cfg.train.table_init is not None and self.dmp is None:  # N ranks: done before sharding
                self._init_tables(self.cfg.train.table_init)
            return False
        check_same_run(self.out / "config.json", to_dict(self.cfg), RESUMABLE_CHANGES, to_dict(PretrainConfig()))
        state = self._state()
        info = self.ckpt.load(state)
        self._apply_state(state)
        self.state = RunState(**info.extra)
        self.loader.epoch, self.loader.batch = self.state.epoch, self.state.batch
        self.resumed_from_step = self.state.step
        log.info("resumed from step %d (epoch %d, batch %d)", self.state.step, self.state.epoch, self.state.batch)
        return True

    def _init_from(self, source: str) -> None:
        """Start from another run's model and optimizer state (a checkpoints/ folder or one step in it)."""
        path = Path(source)
        manager, step = CheckpointManager(path, keep=0), None
        if _STEP_DIR.match(path.name):
            manager, step = CheckpointManager(path.parent, keep=0), int(path.name.split("-")[1])
        elif manager.latest() is None:
            raise FileNotFoundError(f"train.init_from: {path} holds no complete checkpoint (step-NNNNNNNN with its meta file)")
        state = self._state()
        manager.load(state, step)
        self._apply_state(state)
        # Moments carry over; the learning rates are this run's (the source's may have decayed).
        for opt, lrs in zip(self.optimizers, self._base_lrs):
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr
        log.info("initialised from %s", manager.step_dir(step if step is not None else manager.latest()))

    def _init_tables(self, cfg: WarmStartConfig) -> None:
        """Feature warm-up: the token encoder's tables from an existing DLRM's (see TrainConfig.table_init)."""
        from lumrec.modules.warm_start import load_source_state, warm_start

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
            from lumrec.data.dataset import write_text_atomic

            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out / "table_init.json", json.dumps(self.table_init_report, indent=2))
        log.info("token encoder tables initialised from %s: %s", cfg.source, copied)

    # -- training ---------------------------------------------------------------------------
    def _log_scalar(self, name: str, value: float, step: int) -> None:
        if not self.is_main:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"))
        self.writer.add_scalar(name, value, step)

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
        """Rank 0's `value` on every rank (decisions such as the time budget must agree); itself in one process."""
        from lumrec.distributed import from_rank0

        return from_rank0(self.ctx, value)

    def _seconds(self, t0: float) -> float:
        """Training seconds so far; on N ranks rank 0's clock, so that lr and time budget agree everywhere."""
        seconds = self.state.train_seconds + (time.perf_counter() - t0)
        if self.ctx is None:
            return seconds
        box = torch.tensor([seconds], dtype=torch.float64)
        dist.broadcast(box, src=0)
        return float(box)

    def train_step(self, batch) -> tuple[float, int, int]:
        """One optimisation step on a packed batch; returns the global batch's (mean loss, queries, tokens)."""
        seed = _step_seed(self.cfg.train.seed, self.state.step)
        if self.dmp is not None:
            return self._sharded_step(batch, seed)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        loss, queries = self.trainer(batch, generator)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        return float(loss.detach()), queries, batch.num_tokens

    def _sharded_step(self, batch, seed: int) -> tuple[float, int, int]:
        """`train_step` on this rank's slice: the global mean loss's gradient, tables updated in backward."""
        from lumrec.distributed import global_mean_loss

        own = _rank_seed(seed, self.ctx.rank)
        torch.manual_seed(own)  # dropout: each rank its own masks
        # Sampled negatives from the step seed alone: the same on every rank, as in one process.
        loss, queries = self.dmp(batch, torch.Generator().manual_seed(own), torch.Generator().manual_seed(seed))
        # A stand-in for an empty slice (`batch.padding`) has no query and trains no token.
        counts = torch.tensor([queries, 0 if batch.padding else batch.num_tokens], dtype=torch.int64)
        dist.all_reduce(counts)
        total_queries, tokens = int(counts[0]), int(counts[1])
        if total_queries > 0:
            # Ranks' gradients are averaged (DDP, torchrec): scaled by world * local / global queries,
            # they average to the gradient of the mean over every rank's queries.
            loss = global_mean_loss(loss, queries, self.ctx, total_queries)
        self.dense_optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the table shards were updated here (RowwiseAdamW in backward)
        self.dense_optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        return float(mean) / self.ctx.world_size, total_queries, tokens

    def evaluate(self, which: str = "valid") -> dict[str, float]:
        """Leave-one-out metrics on the validation or test targets."""
        seqs = self.split.valid if which == "valid" else self.split.test
        return evaluate_retrieval(self.model, seqs, self.token_config, self.cfg.data.max_len,
                                  self.cfg.train.eval_rows_per_batch, exclude_seen=self.cfg.train.exclude_seen)

    def run(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train until epochs, patience, time budget or `max_steps` run out; then test the best model."""
        t = self.cfg.train
        self.maybe_resume()
        if dist.is_initialized():
            dist.barrier()  # every rank has compared config.json before rank 0 rewrites it
        if self.is_main:
            write_text_atomic(self.out / "config.json", json.dumps(to_dict(self.cfg), indent=2))
        budget = t.max_minutes * 60 if t.max_minutes > 0 else math.inf
        total_steps = max(1, t.epochs * len(self.loader))
        (self.dmp if self.dmp is not None else self.model).train()
        while not self.state.done and self.loader.epoch < t.epochs:
            epoch = self.loader.epoch
            bar = tqdm(total=len(self.loader), initial=self.loader.batch, desc=f"epoch {epoch}", unit="batch",
                       mininterval=2.0, dynamic_ncols=True,
                       # Only rank 0 shows a bar; TQDM_DISABLE=1 (the demo sets it) silences it too.
                       disable=not self.is_main or os.environ.get("TQDM_DISABLE", "") not in ("", "0"))
            t0, tok0 = time.perf_counter(), self.state.tokens
            for batch in self.loader:
                if t.lr_decay_fraction > 0:
                    progress = self._seconds(t0) / budget if budget < math.inf else self.state.step / total_steps
                    factor = self._set_lr(progress)
                loss, _, tokens = self.train_step(batch)
                self.state.step += 1
                self.state.tokens += tokens
                failpoint("pretrain.step")
                elapsed = time.perf_counter() - t0
                bar.update(1)
                if self.state.step % t.log_every_steps == 0:
                    tps = (self.state.tokens - tok0) / max(elapsed, 1e-9)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
                    self._log_scalar("train/loss", loss, self.state.step)
                    self._log_scalar("train/tokens_per_s", tps, self.state.step)
                    if t.lr_decay_fraction > 0:
                        self._log_scalar("train/lr_factor", factor, self.state.step)
                if self.state.step % t.checkpoint_every_steps == 0:
                    self.state.train_seconds += time.perf_counter() - t0
                    t0, tok0 = time.perf_counter(), self.state.tokens
                    self.save()
                if max_steps is not None and self.state.step >= max_steps:
                    break
                if budget < math.inf and self._seconds(t0) > budget:
                    log.info("time budget of %.1f min reached", t.max_minutes)
                    self.state.done = True
                    break
            bar.close()
            self.state.train_seconds += time.perf_counter() - t0
            if max_steps is not None and self.state.step >= max_steps:
                self.save()
                return {"step": self.state.step, "stopped": "max_steps"}
            finished_epoch = self.loader.batch == 0 and self.loader.epoch == epoch + 1
            evaluated = self.validates and (finished_epoch and (epoch + 1) % t.eval_every_epochs == 0 or self.state.done)
            if evaluated:
                self._end_of_epoch_eval(epoch)
            # Epoch ends are saved only where state beyond the step checkpoints changed (an evaluation, the end):
            # with short epochs an every-epoch save cost more than training (Beauty: 21 steps per epoch).
            if evaluated or self.state.done or self.loader.epoch >= t.epochs:
                self.save()
        return self._final()

    def _end_of_epoch_eval(self, epoch: int) -> None:
        """Validation metrics, best-model bookkeeping and early stopping."""
        t = self.cfg.train
        # Every rank evaluates alike; rank 0's numbers rule, so early stopping agrees to the bit.
        metrics = self._rank0(self.evaluate("valid"))
        self.state.history.append({"epoch": epoch, "step": self.state.step, **metrics})
        for name, value in metrics.items():
            self._log_scalar(f"valid/{name}", value, self.state.step)
        if self.is_main:
            log.info("epoch %d valid %s", epoch, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if metrics["hr@10"] > self.state.best_metric:
            self.state.best_metric, self.state.best_epoch, self.state.bad_evals = metrics["hr@10"], epoch, 0
            self.best.save(self.state.step, {"model": self.model.state_dict()}, extra={"epoch": epoch, **metrics})
        else:
            self.state.bad_evals += 1
            if self.state.bad_evals >= t.patience:
                log.info("early stopping: no better validation HR@10 for %d evaluations", t.patience)
                self.state.done = True

    def _final(self) -> dict[str, Any]:
        """Test metrics of the best validation model; written to results.json."""
        if self.best.latest() is not None:
            state = {"model": self.model.state_dict()}
            self.best.load(state)
            self.model.load_state_dict(state["model"])
        test = self._rank0(self.evaluate("test")) if self.tests else {}
        secs = self.state.train_seconds
        result = {
            "model": self.cfg.model,
            "test": test,
            "best_valid_hr@10": self.state.best_metric,
            "best_epoch": self.state.best_epoch,
            "epochs_run": self.loader.epoch,
            "steps": self.state.step,
            "resumed_from_step": self.resumed_from_step,
            "train_users": self.num_train_users,
            "train_minutes": round(secs / 60, 2),
            "tokens_per_s": round(self.state.tokens / secs, 1) if secs > 0 else None,
            "history": self.state.history,
        }
        if (self.out / "table_init.json").exists():
            result["table_init"] = json.loads((self.out / "table_init.json").read_text())
        if self.is_main:
            (self.out / "results.json").write_text(json.dumps(result, indent=2))
        if test and self.is_main:
            log.info("test %s", " ".join(f"{k}={v:.4f}" for k, v in test.items()))
        if self.writer is not None:
            self.writer.close()
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
