"""Step 3 for retrieval: a two-tower model with or without LUM features, in-batch softmax, Recall@K on all items.

    lumrec retrieve CONFIG [key=value ...]

Training pairs are the positive samples (label > 0) of a ranking-sample protocol: the user at
the sample's time (user_id, context ids, mean-pooled point-in-time history) and the item
(item_id, category_id). The loss is in-batch softmax (``TwoTowerTrain``). Every test positive
is a target: its user vector is scored against every item of the catalogue (id 0, padding,
excluded) and Recall@10 / Recall@50 are averaged over test positives; validation Recall@10
picks the best epoch.

With ``lum`` set, the user tower also gets the LUM outputs `o_q` under the configured fixed
conditions and the item tower the item-token embedding `e_i`, both from the knowledge store
under the same point-in-time rule as ``lumrec rank`` (``lumrec.modules.lum_join.LUMJoin``): the
items a test user is scored against carry the `e_i` of the same partition as the user's `o_q`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.config import load_config, to_dict
from lumrec.data.dataset import Dataset
from lumrec.data.ranking.config import RankingSampleConfig
from lumrec.data.ranking.features import context_keys, vocab_size
from lumrec.data.ranking.reading import item_categories
from lumrec.data.ranking_samples import RankingBatchLoader, RankingSampleBatch, RankingSamples, build_ranking_samples
from lumrec.device import move_to_device, resolve_device
from lumrec.modules.lum_join import LUMJoin, RankLUMConfig
from lumrec.modules.ranking.base import TableConfig
from lumrec.modules.retrieval.two_tower import TwoTower, TwoTowerBatch, TwoTowerConfig, TwoTowerTrain, recall_at_k
from lumrec.modules.table_parameters import split_parameters
from lumrec.pipelines.rank_config import RankTrainConfig, check_train_config
from lumrec.train import EpochJob, seed_everything

# The registrar lives with the others (light: `lumrec --help` does not import this job).
from lumrec.pipelines.commands import register_retrieve  # noqa: E402,F401

log = logging.getLogger("lumrec.retrieve")

__all__ = ["RetrieveConfig", "TwoTowerSizes", "Retriever", "build_two_tower", "main", "register_retrieve", "run_retrieve"]


@dataclass
class TwoTowerSizes:
    """Tower sizes and which id features each tower pools."""

    embedding_dim: int = 16  # table width
    output_dim: int = 32  # tower output (the retrieval vector)
    user_mlp: list[int] = field(default_factory=lambda: [64])
    item_mlp: list[int] = field(default_factory=lambda: [64])
    temperature: float = 0.05
    # User tower context ids; None: user_id, scenario, query_id where the manifest has a vocabulary.
    context_keys: list[str] | None = None
    history_keys: list[str] = field(default_factory=lambda: ["hist_item_id", "hist_category_id"])  # mean-pooled


@dataclass
class RetrieveConfig:
    """A whole retrieval run: data, samples (positives are the pairs), towers, optional LUM features, training."""

    data: str = "out/data"
    out: str = "runs/retrieve"
    samples: RankingSampleConfig = field(default_factory=RankingSampleConfig)
    sizes: TwoTowerSizes = field(default_factory=TwoTowerSizes)
    lum: RankLUMConfig | None = None  # conditions: the fixed conditions of the user tower; `features` is not used
    train: RankTrainConfig = field(default_factory=RankTrainConfig)
    ks: list[int] = field(default_factory=lambda: [10, 50])


def build_two_tower(sizes: TwoTowerSizes, vocab: dict[str, int], lum_user_dim: int = 0, lum_item_dim: int = 0):
    """(TwoTower, TwoTowerTrain) with tables sized from the manifest vocabularies."""
    d = sizes.embedding_dim
    context = context_keys(sizes.context_keys, vocab)
    hist_source = {"hist_item_id": "item_id", "hist_category_id": "category_id"}
    for key in sizes.history_keys:
        if key not in hist_source:
            raise ValueError(f"sizes.history_keys: {key!r} is not supported; choose from {sorted(hist_source)}")
    user_tables = [TableConfig(f"t_user_{k}", vocab_size(vocab, k), d, [k]) for k in context]
    # The user tower owns its history tables (the towers never share keys, so the item tower can embed the catalogue alone).
    user_tables += [TableConfig(f"t_{k}", vocab_size(vocab, hist_source[k]), d, [k], pooling="mean") for k in sizes.history_keys]
    item_tables = [TableConfig("t_item", vocab_size(vocab, "item_id"), d, ["item_id"]),
                   TableConfig("t_category", vocab_size(vocab, "category_id"), d, ["category_id"])]
    cfg = TwoTowerConfig(
        user_tables, item_tables, lum_user_dim=lum_user_dim, lum_item_dim=lum_item_dim, user_mlp=list(sizes.user_mlp),
        item_mlp=list(sizes.item_mlp), embedding_dim=sizes.output_dim, temperature=sizes.temperature,
    )
    model = TwoTower(cfg)
    return model, TwoTowerTrain(model)


class Retriever(EpochJob):
    """Owns the positive pairs, the two towers, the LUM join and the checkpoints of one retrieval run."""

    job = "retrieve"
    metric = "recall@10"

    def __init__(self, cfg: RetrieveConfig, samples: RankingSamples | None = None) -> None:
        self.cfg = cfg
        t = self.train = cfg.train
        check_train_config(t)
        self.device = resolve_device(t.device, "train.device")  # `cuda` without a GPU fails before any data is read
        if not cfg.ks or any(k < 1 for k in cfg.ks):
            raise ValueError(f"ks must be a non-empty list of positive cut-offs, got {cfg.ks}")
        if 10 not in cfg.ks:
            raise ValueError(f"ks must include 10 (validation Recall@10 picks the best epoch), got {cfg.ks}")
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.out = Path(cfg.out)
        data = Dataset(cfg.data)
        self.vocab = data.read_meta().vocab_sizes
        t0 = time.perf_counter()
        every = samples if samples is not None else build_ranking_samples(data, cfg.samples)
        self.samples = every.take(np.flatnonzero(every.label > 0))  # (user, positive item) pairs
        self.counts = self.samples.counts()
        log.info("positive pairs (%s) in %.1f s: %s", cfg.samples.protocol, time.perf_counter() - t0, self.counts)
        if self.counts["test"]["samples"] == 0:
            raise ValueError(f"{cfg.data}: no positive test samples to retrieve")
        self.lum = LUMJoin(cfg.lum, self.samples) if cfg.lum is not None else None
        if self.lum is not None and not self.lum.feature_config.conditions:
            raise ValueError("lum.conditions: the user tower needs at least one fixed condition (candidate conditions need a candidate)")
        # The catalogue: every item id with its primary category (items table, else behaviours).
        category, _ = item_categories(data, self.samples.history)
        self.num_items = vocab_size(self.vocab, "item_id")
        self.item_category = torch.zeros(self.num_items, dtype=torch.int64)
        n = min(len(category), self.num_items)
        self.item_category[:n] = torch.from_numpy(np.asarray(category[:n], dtype=np.int64))
        seed_everything(t.seed)
        self.model, self.trainer = build_two_tower(
            cfg.sizes, self.vocab, self.lum.user_width() if self.lum else 0, self.lum.dim + 1 if self.lum else 0
        )
        self.trainer.to(self.device)  # before the optimizer, whose state follows the parameters' device
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.history_keys = tuple(cfg.sizes.history_keys)
        self.loader = RankingBatchLoader(self.samples, "train", t.batch_size, t.max_history, shuffle_seed=t.seed,
                                         history_keys=self.history_keys)
        self._init_job()

    @property
    def input_widths(self) -> tuple[int, int]:
        """(user tower input width, item tower input width)."""
        return int(self.model.user_tower.in_features), int(self.model.item_tower.in_features)

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)

    def two_tower_batch(self, batch: RankingSampleBatch):
        """The towers' input: one KJT for both (each tower pools its own keys), LUM user / item features."""
        sparse = batch.sparse_features
        lum_user = lum_item = None
        if self.lum is not None:
            lum_user = self.lum.user_features(batch.user_id, batch.day)
            lum_item = self._item_lum(batch)
        # The LUM join runs on the CPU; the towers' input goes to their device whole.
        return move_to_device(TwoTowerBatch(sparse, sparse, batch.item_id, lum_user=lum_user, lum_item=lum_item), self.device)

    def _item_lum(self, batch: RankingSampleBatch) -> torch.Tensor:
        """e_i of each sample's item, from the partition its day uses."""
        out = torch.zeros(len(batch), self.lum.dim + 1)
        for as_of, rows in self.lum.groups(batch.day):
            out[rows] = self.lum.item_features(batch.item_id[rows], as_of)
        return out

    def step_loss(self, batch: RankingSampleBatch) -> torch.Tensor:
        return self.trainer(self.two_tower_batch(batch))[0]

    def _dense_parameters(self) -> list[torch.Tensor]:
        return split_parameters(self.model)[1]  # one Adam for all: the gradient norm reads the towers' dense layers

    def _catalogue(self, as_of: str | None, with_lum: bool) -> torch.Tensor:
        """Item vectors [num_items, d] of the whole catalogue (row = item id)."""
        ids = torch.arange(self.num_items)
        ones = torch.ones(2 * self.num_items, dtype=torch.int32)
        kjt = KeyedJaggedTensor(keys=["item_id", "category_id"], values=torch.cat([ids, self.item_category]), lengths=ones,
                                stride=self.num_items)
        lum = self.lum.item_features(ids, as_of) if with_lum else None
        kjt, lum = move_to_device((kjt, lum), self.device)
        return self.model.item_embeddings(kjt, lum=lum).cpu()

    def evaluate(self, split: str) -> dict[str, float]:
        """Recall@K of `split`'s positives against every item (grouped by knowledge partition when LUM is on)."""
        self.model.eval()
        users, targets, groups = [], [], []
        with torch.no_grad():
            for batch in self.samples.iter_batches(split, self.train.eval_batch_size, None, self.train.max_history,
                                                   history_keys=self.history_keys):
                lum_user = self.lum.user_features(batch.user_id, batch.day) if self.lum is not None else None
                features, lum_user = move_to_device((batch.sparse_features, lum_user), self.device)
                users.append(self.model.user_embeddings(features, lum=lum_user).cpu())
                targets.append(batch.item_id)
                groups.append([self.lum.as_of(int(d)) for d in batch.day.tolist()] if self.lum is not None else [None] * len(batch))
            user_vecs, target_ids = torch.cat(users), torch.cat(targets)
            flat_groups = [g for part in groups for g in part]
            exclude = torch.zeros(self.num_items, dtype=torch.bool)
            exclude[0] = True  # padding
            totals = {f"recall@{k}": 0.0 for k in self.cfg.ks}
            for as_of in sorted(set(flat_groups), key=str):
                rows = torch.tensor([i for i, g in enumerate(flat_groups) if g == as_of], dtype=torch.int64)
                items = self._catalogue(as_of, self.lum is not None)
                part = recall_at_k(user_vecs[rows], items, target_ids[rows], ks=tuple(self.cfg.ks), exclude=exclude)
                for key, value in part.items():
                    totals[key] += value * rows.numel()
        self.model.train()
        n = user_vecs.shape[0]
        return {**{k: v / n for k, v in totals.items()}, "count": float(n)}

    def result_extras(self) -> dict[str, Any]:
        user_w, item_w = self.input_widths
        return {"model": "two_tower", "lum": self.lum is not None, "user_input_width": user_w, "item_input_width": item_w}


def run_retrieve(cfg: RetrieveConfig, max_epochs: int | None = None, max_steps: int | None = None,
                 samples: RankingSamples | None = None) -> dict[str, Any]:
    """Train and evaluate one retrieval run (resuming from `cfg.out` if it holds checkpoints); returns results.json's content."""
    return Retriever(cfg, samples).run(max_epochs=max_epochs, max_steps=max_steps)


def main(args: argparse.Namespace) -> int:
    """`lumrec retrieve CONFIG [key=value ...]`."""
    cfg = load_config(RetrieveConfig, args.config, overrides=args.overrides)
    result = run_retrieve(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return 0
