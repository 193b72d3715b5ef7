"""The README's demo job: synthetic logs -> statistics -> LUM condition/item tokens -> packed jagged batches."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from lumrec.data.batches import make_jagged_batch
from lumrec.data.dataset import Dataset
from lumrec.data.packing import epoch_plan, padding_waste
from lumrec.data.sequences import sequences_from_dataset
from lumrec.data.stats import dataset_stats, format_stats
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.data.tokens import TokenConfig, build_lum_tokens, item_dense_matrix

log = logging.getLogger("lumrec.demo")


@dataclasses.dataclass
class DemoConfig:
    """What the demo generates and how it tokenises and packs."""

    out: str = "out/demo"
    max_len: int = 256
    rows_per_batch: int = 32
    condition_features: tuple[str, ...] = ("scenario", "query_id")
    seed: int = 0


def ensure_synthetic(root: Path, config: SynthConfig) -> Dataset:
    """Generate the synthetic logs into `root` unless a dataset made with the same config is there."""
    data = Dataset(root)
    if data.manifest_path.exists() and data.read_meta().extra.get("config") == dataclasses.asdict(config):
        log.info("reusing synthetic logs in %s (same config)", root)
        return data
    log.info("generating synthetic logs into %s", root)
    generate(root, config, progress=True)
    return data


def describe_batch(batch, dense_names: list[str]) -> str:
    """A few lines on what one packed batch holds."""
    kjt = batch.kjt
    lines = [
        f"packed batch: {batch.num_rows} rows, {batch.num_segments} user sequences, {batch.num_tokens} tokens "
        f"(longest sequence {batch.max_seq_len()})",
        f"  KeyedJaggedTensor: stride {kjt.stride()} tokens, keys {kjt.keys()}",
    ]
    for key, jt in kjt.to_dict().items():
        lengths = jt.lengths()
        lines.append(f"    {key:<18} {int((lengths > 0).sum()):>6} tokens with an id, {int(lengths.sum()):>6} ids")
    types = batch.token_type
    lines.append(f"  token types: {int((types == 0).sum())} condition, {int((types == 1).sum())} item")
    if batch.dense is not None:
        lines.append(f"  dense features: {tuple(batch.dense.shape)} ({', '.join(dense_names[:4])}, ...)")
    lines.append(f"  offsets[:6] {batch.offsets[:6].tolist()}  segment_ids[:6] {batch.segment_ids[:6].tolist()}")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, synth: SynthConfig) -> dict:
    """Run the demo and return its key figures."""
    t0 = time.perf_counter()
    root = Path(cfg.out) / "data"
    data = ensure_synthetic(root, synth)
    print(format_stats(dataset_stats(root)))

    seqs = sequences_from_dataset(data)
    tok_cfg = TokenConfig(condition_features=list(cfg.condition_features))
    tokens = build_lum_tokens(seqs, tok_cfg)
    items = data.read_table("items")
    # Point-in-time: the newest item statistics describe the days before it.
    last_day = data.days("item_stats")[-1]
    stats = data.read_days("item_stats", start=last_day, end=last_day).drop(["ds"])
    num_items = data.read_meta().vocab_sizes["item_id"]
    content, content_names = item_dense_matrix(items, ["content"], num_items)
    stat_matrix, stat_names = item_dense_matrix(stats, None, num_items)
    dense = np.concatenate([stat_matrix, content], axis=1)
    print(f"\nsequences: {len(seqs)} users, {seqs.num_events} events; "
          f"LUM tokens: {tokens.num_tokens} ([c, i] per event; condition = {', '.join(cfg.condition_features)})")

    plan = epoch_plan(tokens.offsets, tokens.token_type, cfg.max_len, shuffle_seed=cfg.seed)
    batch = make_jagged_batch(tokens, plan.rows(0, cfg.rows_per_batch), dense_table=dense)
    print(describe_batch(batch, stat_names + content_names))

    kept = plan.lengths
    waste_packed = padding_waste(plan.row_lengths(), cfg.max_len)
    waste_padded = padding_waste(kept[kept > 0], cfg.max_len)
    print(f"\npadding waste at max_len {cfg.max_len}: padded {waste_padded:.1%}, packed {waste_packed:.1%} "
          f"({len(kept)} sequences in {plan.num_rows} packed rows)")
    figures = {
        "events": int(seqs.num_events), "users": len(seqs), "tokens": int(tokens.num_tokens),
        "packed_rows": int(plan.num_rows), "waste_padded": round(float(waste_padded), 4),
        "waste_packed": round(float(waste_packed), 4), "wall_s": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(figures))
    return figures


def main(args: argparse.Namespace) -> int:
    """`lumrec demo`: run the demo with command-line overrides of the synthetic config."""
    from lumrec.cli import dataclass_overrides

    cfg = DemoConfig(out=args.out, max_len=args.max_len)
    synth = dataclasses.replace(SynthConfig(), **dataclass_overrides(args, SynthConfig))
    run_demo(cfg, synth)
    return 0
