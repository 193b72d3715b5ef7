"""Plug LUM knowledge into torchrec's own, unmodified DLRM (LUM step 3).

    knowledge (as of day D-1)  --LUMFeatureModule-->  lum features per impression
    dense = [item statistics | lum features];  sparse = KJT(user_id, item_id, category_id, scenario, query_id)
    torchrec.models.dlrm.DLRM + DLRMTrain, trained on day D, evaluated (AUC, NE) on day D+1

The data is lumrec's synthetic log (``lumrec.data.synthetic.generate``). The knowledge source
here is a stand-in for a trained LUM's stored query outputs, computed from the log itself: the
user's output under condition `category_id=c` (or `scenario=s`) is the mean content vector of
the items they clicked under that condition before day D, and an item's vector is its content
vector. Pass any other ``KnowledgeSource`` (e.g. step 2's store) through ``main(knowledge=...)``.
The DLRM only sees wider dense features: nothing in torchrec changes.

    .venv/bin/python examples/plug_into_torchrec_dlrm.py       # DLRM with and without LUM features; prints both AUCs and its time
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lumrec.data.dataset import Dataset
from lumrec.data.schema import ACTION_CLICK
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.knowledge import latest_as_of, load_knowledge
from lumrec.modules.lum_features import KnowledgeSource, LUMFeatureConfig, LUMFeatureModule, candidates_kjt, lum_dense_input
from lumrec.ranking_metrics import RankingMetrics

SPARSE_KEYS = ["user_id", "item_id", "category_id", "scenario", "query_id"]
STAT_COLUMNS = ["f_ctr_7d", "f_log_impressions_7d", "f_popularity"]
EMBEDDING_DIM = 8


def _ids(column: pa.ChunkedArray) -> torch.Tensor:
    """An Arrow id column as a (writable) int64 tensor."""
    return torch.from_numpy(column.to_numpy().astype(np.int64))


class ClickHistoryKnowledge:
    """A stand-in KnowledgeSource from click history: o_q = mean content of the items clicked under condition q."""

    def __init__(
        self, user_tables: dict[str, tuple[torch.Tensor, torch.Tensor]], item_vectors: torch.Tensor, item_known: torch.Tensor
    ) -> None:
        self.dim = int(item_vectors.shape[1])
        self.user_tables = user_tables  # feature -> (vectors [U, V, dim], known [U, V])
        self.items, self.item_known = item_vectors, item_known

    @classmethod
    def from_clicks(cls, clicks: pa.Table, content: torch.Tensor, num_users: int, vocab: dict[str, int]) -> "ClickHistoryKnowledge":
        """Mean clicked content per (user, category_id) and per (user, scenario); items: their content (id 0 missing)."""
        users = _ids(clicks["user_id"])
        clicked = content[_ids(clicks["item_id"])]
        tables = {}
        for feature in ("category_id", "scenario"):
            values = _ids(clicks[feature])
            size = vocab[feature]
            flat = users * size + values
            sums = torch.zeros(num_users * size, content.shape[1]).index_add_(0, flat, clicked)
            counts = torch.zeros(num_users * size).index_add_(0, flat, torch.ones(len(flat)))
            vec = (sums / counts.clamp(min=1).unsqueeze(1)).view(num_users, size, -1)
            tables[feature] = (vec, (counts > 0).view(num_users, size))
        known = torch.ones(content.shape[0], dtype=torch.bool)
        known[0] = False
        return cls(tables, content, known)

    def user_vectors(self, user_ids: torch.Tensor, feature: str, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored vectors [B, N, dim] and missing [B, N]; unknown features, users or values are missing."""
        b, n = values.shape
        if feature not in self.user_tables:
            return torch.zeros(b, n, self.dim), torch.ones(b, n, dtype=torch.bool)
        vec, known = self.user_tables[feature]
        u = user_ids.view(-1, 1).expand(b, n)
        ok = (u >= 0) & (u < vec.shape[0]) & (values >= 0) & (values < vec.shape[1])
        u, v = u.clamp(0, vec.shape[0] - 1), values.clamp(0, vec.shape[1] - 1)
        missing = ~(ok & known[u, v])
        return vec[u, v], missing

    def item_vectors(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Content vectors [..., dim] and missing [...]."""
        ok = (item_ids >= 0) & (item_ids < self.items.shape[0])
        ids = item_ids.clamp(0, self.items.shape[0] - 1)
        return self.items[ids], ~(ok & self.item_known[ids])


def _day_tensors(data: Dataset, ds: str, num_items: int) -> dict[str, torch.Tensor]:
    """One day's impressions as tensors, with the item statistics of that day (computed before it) joined in."""
    imp = data.read_days("impressions", ds, ds, columns=["user_id", "item_id", "scenario", "query_id", "category_id", "label"])
    stats = data.read_days("item_stats", ds, ds, columns=["item_id", *STAT_COLUMNS])
    table = np.zeros((num_items, len(STAT_COLUMNS)), dtype=np.float32)
    table[stats["item_id"].to_numpy()] = np.stack([stats[c].to_numpy() for c in STAT_COLUMNS], axis=1)
    out = {k: _ids(imp[k]) for k in SPARSE_KEYS}
    out["label"] = torch.from_numpy(imp["label"].to_numpy().astype(np.float32))
    out["stats"] = torch.from_numpy(table)[out["item_id"]]
    return out


def _batch(day: dict[str, torch.Tensor], rows: torch.Tensor, lum: LUMFeatureModule | None) -> Batch:
    """A torchrec `Batch`: dense = [item stats | LUM features], sparse = one id per key."""
    n = rows.numel()
    sparse = KeyedJaggedTensor.from_lengths_sync(
        SPARSE_KEYS, torch.cat([day[k][rows] for k in SPARSE_KEYS]), torch.ones(n * len(SPARSE_KEYS), dtype=torch.int32)
    )
    dense = day["stats"][rows]
    if lum is not None:
        # One candidate per impression; the candidate-condition query reads the impression's category.
        kt = lum(day["user_id"][rows], candidates_kjt(day["item_id"][rows], condition_values=day["category_id"][rows]))
        dense = lum_dense_input(dense, kt)
    return Batch(dense_features=dense, sparse_features=sparse, labels=day["label"][rows])


def _train_and_eval(
    name: str, vocab: dict[str, int], train_day: dict, eval_day: dict, lum_train: LUMFeatureModule | None,
    lum_eval: LUMFeatureModule | None, args: argparse.Namespace,
) -> dict[str, float]:
    torch.manual_seed(args.seed)
    tables = [
        EmbeddingBagConfig(name=f"t_{k}", embedding_dim=EMBEDDING_DIM, num_embeddings=vocab[k], feature_names=[k]) for k in SPARSE_KEYS
    ]
    dense_in = len(STAT_COLUMNS) + (lum_train.output_dim if lum_train is not None else 0)
    model = DLRMTrain(
        DLRM(
            embedding_bag_collection=EmbeddingBagCollection(tables=tables),
            dense_in_features=dense_in,
            dense_arch_layer_sizes=[32, EMBEDDING_DIM],
            over_arch_layer_sizes=[32, 1],
        )
    )
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    n = train_day["label"].numel()
    step, loss = 0, torch.tensor(float("nan"))
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=g)
        for lo in range(0, n, args.batch_size):
            loss, _ = model(_batch(train_day, order[lo : lo + args.batch_size], lum_train))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % args.log_every == 0:
                print(f"[{name}] epoch {epoch} step {step}: loss {loss.item():.4f}")
    model.eval()
    metrics = RankingMetrics()
    with torch.no_grad():
        m = eval_day["label"].numel()
        for lo in range(0, m, 4096):
            _, (_, logits, labels) = model(_batch(eval_day, torch.arange(lo, min(lo + 4096, m)), lum_eval))
            metrics.update(torch.sigmoid(logits), labels)
    out = metrics.compute()
    out.update(final_train_loss=float(loss.detach()), steps=float(step), dense_in_features=float(dense_in))
    print(f"[{name}] {step} steps, dense_in_features={dense_in}: eval AUC {out['auc']:.4f}, NE {out['ne']:.4f}, "
          f"calibration {out['calibration']:.3f}")
    return out


def _store_knowledge(store: Path) -> Callable[[str], KnowledgeSource]:
    """Knowledge usable on day ds from step 2's store: the newest partition strictly before ds."""

    def for_day(ds: str) -> KnowledgeSource:
        as_of = latest_as_of(store, ds)
        if as_of is None:
            raise SystemExit(f"{store}: no complete knowledge partition before {ds}")
        return load_knowledge(store, as_of)

    return for_day


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (sizes kept small so the example runs in seconds on one core)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=None, help="folder to write the synthetic dataset to (default: a temp folder)")
    p.add_argument("--num-users", type=int, default=2000)
    p.add_argument("--num-items", type=int, default=500)
    p.add_argument("--impressions-per-user-day", type=float, default=15.0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--no-baseline", action="store_true", help="train only the DLRM with LUM features")
    p.add_argument("--store", type=Path, default=None,
                   help="a knowledge store written by `lumrec query` over the same --data, with scenario and "
                        "category_id conditions (default: a click-history stand-in)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, knowledge: Callable[[str], KnowledgeSource] | None = None) -> dict[str, dict[str, float]]:
    """Run the example; `knowledge(ds)` may supply the knowledge usable on day `ds` (default: click-history stand-in)."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.store is not None and knowledge is None:
        knowledge = _store_knowledge(args.store)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp) / "synth"
        synth = SynthConfig(seed=args.seed, num_users=args.num_users, num_items=args.num_items, num_days=3,
                            impressions_per_user_day=args.impressions_per_user_day)
        meta = generate(root, synth)
        data = Dataset(root)
        vocab = meta.vocab_sizes
        days = data.days("impressions")
        _, train_ds, eval_ds = days  # day 0 is history only
        items = data.read_table("items", columns=["item_id", "content"])
        content = torch.zeros(vocab["item_id"], synth.content_dim)
        content[_ids(items["item_id"])] = torch.from_numpy(
            np.stack(items["content"].to_numpy(zero_copy_only=False)).astype(np.float32, copy=True)
        )

        def stand_in(ds: str) -> KnowledgeSource:
            # Point in time: knowledge used on day ds comes only from behaviours before ds.
            columns = ["user_id", "item_id", "scenario", "category_id", "action"]
            clicks = data.read_days("behaviours", None, days[days.index(ds) - 1], columns=columns)
            clicks = clicks.filter(pa.compute.equal(clicks["action"], ACTION_CLICK))
            return ClickHistoryKnowledge.from_clicks(clicks, content, vocab["user_id"], vocab)

        source = knowledge or stand_in
        config = LUMFeatureConfig(conditions=[("scenario", 1), ("scenario", 2)], candidate_condition_feature="category_id")
        lum_train, lum_eval = LUMFeatureModule(config, source(train_ds)), LUMFeatureModule(config, source(eval_ds))
        print(f"data: {meta.extra['counts']['impressions']} impressions over {days}; train on {train_ds}, evaluate on {eval_ds} "
              f"(oracle AUC {meta.extra['oracle_auc']['all']}); LUM features: {list(lum_train.key_dims())}")
        train_day, eval_day = _day_tensors(data, train_ds, vocab["item_id"]), _day_tensors(data, eval_ds, vocab["item_id"])
        results = {"lum": _train_and_eval("dlrm+lum", vocab, train_day, eval_day, lum_train, lum_eval, args)}
        if not args.no_baseline:
            results["baseline"] = _train_and_eval("dlrm", vocab, train_day, eval_day, None, None, args)
            print(f"LUM features: AUC {results['baseline']['auc']:.4f} -> {results['lum']['auc']:.4f}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
