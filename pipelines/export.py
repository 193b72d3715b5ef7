"""`lumrec export RUN OUT [--checkpoint best|latest]`: a trained run as an AOTInductor serving bundle.

A ranking run (``lumrec rank``) becomes a ranker bundle; a retrieval run (``lumrec retrieve``) a
two-tower bundle (its user and item towers). The job rebuilds the model from RUN/config.json (tables
sized from the data set's manifest, the LUM width from its LUM join config, the item statistics'
width from `sizes.item_stats`), loads the chosen checkpoint's weights after verifying its digests
(``lumrec.checkpoint``), wraps it for plain-tensor requests (``lumrec.modules.serving.export``),
exports it with dynamic batch and history, compiles it with AOTInductor and writes the bundle
(``lumrec.modules.serving.bundle``) into a temporary folder beside OUT, renamed to OUT when whole.
The package is then loaded and checked against the eager model on a random example (parity.pt).
Prints one JSON line: bundle, model, version, parameters, compile seconds, max parity error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lumrec.checkpoint import CheckpointError, CheckpointManager, load_verified_weights, tensor_digest
from lumrec.config import load_config, to_dict
from lumrec.data.dataset import Dataset
from lumrec.data.ranking.features import context_keys, vocab_size
from lumrec.data.ranking.item_stats import ItemStatsJoin
from lumrec.data.ranking.reading import item_categories, read_behaviours
from lumrec.errors import CheckpointLoadError, UserError, writing
from lumrec.modules.lum_join import LUMJoin
from lumrec.modules.ranking.builder import build_ranker
from lumrec.modules.ranking.registry import ranker_spec
from lumrec.modules.serving.bundle import (
    BUNDLE_FORMAT,
    ITEMS_FILE,
    MANIFEST,
    MODEL_FILE,
    PARITY_FILE,
    check_parity,
)
from lumrec.modules.serving.m_falcon_bundle import DEFAULT_MICRO_BATCH, M_FALCON_KIND, MFalconBundle, write_m_falcon_files
from lumrec.modules.serving.export import RANKER_INPUTS, RankerServing, TowerServing, compile_package, export_program, load_package
from lumrec.pipelines.rank_config import RankConfig
from lumrec.tracking import count_parameters

# The registrar lives with the others (light: `lumrec --help` does not import this job).
from lumrec.pipelines.commands import register_export  # noqa: E402,F401

log = logging.getLogger("lumrec.export")

__all__ = ["export_run", "main", "register_export"]

_CANDIDATE_KEYS = ["item_id", "category_id"]  # every ranker's candidate ids (lumrec.modules.ranking.builder.ranker_parts)
# Backbones torch.export cannot trace, served eagerly instead: HSTU's jagged attention
# (lumrec.modules.ops.build_attention_layout) loops in Python over length buckets whose number and sizes
# it reads from the data, so a traced graph's structure would depend on each batch; and serving it wants
# M-FALCON (the history encoded once per request) anyway. Its bundle holds the weights (kind hstu_m_falcon).
SERVED_EAGERLY = {"hstu"}


def main(args: argparse.Namespace) -> int:
    """`lumrec export RUN OUT [--checkpoint best|latest]`."""
    print(json.dumps(export_run(args.run, args.out, args.checkpoint)))
    return 0


def export_run(run: str | Path, out: str | Path, checkpoint: str = "best") -> dict[str, Any]:
    """Export run folder `run` to bundle folder `out` (which must not exist); returns the summary line's fields."""
    run, out = Path(run), Path(out)
    config_file = run / "config.json"
    if not config_file.is_file():
        raise UserError(f"{config_file}: no run config; RUN must be a `lumrec rank` or `lumrec retrieve` run folder")
    if out.exists():
        raise UserError(f"{out}: already exists; a bundle is written whole into a new folder (remove it or choose another)")
    if checkpoint not in ("best", "latest"):
        raise UserError(f"--checkpoint: {checkpoint!r}; choose best or latest")
    raw = json.loads(config_file.read_text())
    if "ks" in raw and "model" not in raw:
        from lumrec.pipelines.retrieve import RetrieveConfig  # a retrieve run (its job is only needed here)

        cfg = load_config(RetrieveConfig, config_file)
        builder = lambda tmp: _two_tower_bundle(run, cfg, checkpoint, tmp)  # noqa: E731
    else:
        cfg = load_config(RankConfig, config_file)
        builder = lambda tmp: _ranker_bundle(run, cfg, checkpoint, tmp)  # noqa: E731
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with writing(tmp):
            tmp.mkdir(parents=True)
        summary = builder(tmp)
        if out.exists():
            raise UserError(f"{out}: appeared while exporting; the bundle is left unwritten")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"bundle": str(out), **summary}


# -- shared pieces -------------------------------------------------------------------------------


def _data(run: Path, data_path: str) -> Dataset:
    """The run's data set (its `data` key, relative to the working folder as when the run was trained)."""
    data = Dataset(data_path)
    try:
        data.read_meta()
    except Exception as err:  # noqa: BLE001 - any failure to read the manifest means the path is wrong here
        raise UserError(f"{run / 'config.json'}: key data: cannot read the data set {data_path!r} ({err}); "
                        "run the export from the folder the run was trained in") from None
    return data


def _load_weights(run: Path, model: nn.Module, which: str) -> dict[str, Any]:
    """Load `which` (best / latest) checkpoint of `run` into `model` (digests verified); its step, folder and weight digest."""
    root = run / ("best" if which == "best" else "checkpoints")
    try:
        step, _ = CheckpointManager(root).newest_valid()
        load_verified_weights(CheckpointManager(root).step_dir(step), model)
    except CheckpointError as err:
        raise CheckpointLoadError(f"--checkpoint {which}: {err}") from None
    folder = CheckpointManager(root).step_dir(step)
    return {"which": which, "step": int(step), "folder": str(folder.resolve()), "digest": tensor_digest(model.state_dict())}


def _item_category(data: Dataset, num_items: int) -> np.ndarray:
    """Each item id's primary category (items table, else behaviours), as training samples take it."""
    seqs = read_behaviours(data).seqs
    category, _ = item_categories(data, seqs)
    out = np.zeros(num_items, np.int64)
    n = min(len(category), num_items)
    out[:n] = category[:n]
    return out


def _lum_manifest(join: LUMJoin) -> dict[str, Any]:
    fc = join.feature_config
    return {"store": join.cfg.store, "conditions": [list(c) for c in fc.conditions],
            "candidate_condition_feature": fc.candidate_condition_feature, "candidate_condition_key": fc.candidate_condition_key,
            "features": list(fc.features), "normalize": bool(fc.normalize), "dim": int(join.dim),
            "output_width": int(join.output_dim), "user_width": int(join.user_width())}


def _version(run: Path, ckpt: dict[str, Any]) -> str:
    return f"{run.resolve().name}@{ckpt['which']}-step{ckpt['step']}-{ckpt['digest'][:12]}"


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    with writing(folder / MANIFEST):
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _export_and_check(wrapper: nn.Module, example: tuple, parity_inputs: tuple, package: Path, parity: Path) -> tuple[float, float]:
    """Export `wrapper`, compile it to `package`, save the parity example and check the package on it: (compile s, max error)."""
    with torch.no_grad():
        expected = wrapper(*parity_inputs)
    try:
        program = export_program(wrapper, example)
    except Exception as err:  # noqa: BLE001 - torch.export raises many types; a backbone it cannot trace is a user's choice
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{package.name}: torch.export cannot trace this model ({type(err).__name__}: {first}); "
                        "see docs/export.md for what a backbone must avoid") from err
    seconds = compile_package(program, package)
    with writing(parity):
        torch.save({"inputs": list(parity_inputs), "outputs": expected}, parity)
    error = check_parity(load_package(package), parity)
    return seconds, error


# -- rankers -------------------------------------------------------------------------------------


def _ranker_bundle(run: Path, cfg: RankConfig, which: str, tmp: Path) -> dict[str, Any]:
    spec = ranker_spec(cfg.model)
    if cfg.sizes.list_keys:
        raise UserError(f"{run / 'config.json'}: key sizes.list_keys: item list features are not exported yet; "
                        "export a run without list keys")
    data = _data(run, cfg.data)
    vocab = dict(data.read_meta().vocab_sizes)
    num_items = vocab_size(vocab, "item_id")
    stats = ItemStatsJoin(cfg.data, cfg.sizes.item_stats, num_items) if cfg.sizes.item_stats else None
    lum = LUMJoin(cfg.lum) if cfg.lum is not None else None
    model, _ = build_ranker(cfg.model, cfg.sizes, vocab, stats.width if stats else 0, lum.output_dim if lum else 0)
    ckpt = _load_weights(run, model, which)
    model.eval()
    context = context_keys(cfg.sizes.context_keys, vocab)
    history = list(cfg.sizes.history_keys)
    wrapper = RankerServing(model, context, _CANDIDATE_KEYS, history, stats.width if stats else 0,
                            lum.output_dim if lum else 0, timestamps=spec.timestamps)
    items: dict[str, np.ndarray] = {"category_id": _item_category(data, num_items)}
    stats_manifest = None
    if stats is not None:
        if not stats.tables:
            raise UserError(f"{cfg.data}/item_stats: no day of item statistics to serve")
        day = max(stats.tables)
        items["item_stats"] = stats.tables[day].numpy()
        stats_manifest = {"columns": list(stats.columns), "day": str(np.datetime64(day, "D"))}
    with writing(tmp / ITEMS_FILE):
        np.savez(tmp / ITEMS_FILE, **items)
    example = wrapper.example(batch=8, history=6, vocab=vocab)
    parity_inputs = wrapper.example(batch=5, history=7, seed=1, vocab=vocab)
    kind, extra = "ranker", {}
    if cfg.model in SERVED_EAGERLY:
        kind, extra = M_FALCON_KIND, {"sizes": to_dict(cfg.sizes), "micro_batch": DEFAULT_MICRO_BATCH}
        write_m_falcon_files(model, wrapper, parity_inputs, tmp)
        seconds, error = 0.0, 0.0  # checked below, once the manifest is written
    else:
        seconds, error = _export_and_check(wrapper, example, parity_inputs, tmp / MODEL_FILE, tmp / PARITY_FILE)
    version = _version(run, ckpt)
    parameters = count_parameters(model)
    _write_manifest(tmp, {
        "format": BUNDLE_FORMAT, "kind": kind, "model": cfg.model, "run": str(run.resolve()), "checkpoint": ckpt,
        "version": version, "inputs": list(RANKER_INPUTS), "context_keys": context,
        "context_vocab": {k: vocab_size(vocab, k) for k in context},
        "candidate_keys": list(_CANDIDATE_KEYS), "history_keys": history, "vocab": vocab, "num_items": num_items,
        "num_users": int(vocab.get("user_id", 0)), "max_history": cfg.train.max_history, "timestamps": spec.timestamps,
        "dense_dim": stats.width if stats else 0, "item_stats": stats_manifest,
        "lum": _lum_manifest(lum) if lum else None, "parameters": parameters, "compile_seconds": round(seconds, 2),
        "parity_max_error": error, "torch": torch.__version__, "created": dt.datetime.now(dt.timezone.utc).isoformat(), **extra,
    })
    if kind == M_FALCON_KIND:  # M-FALCON against one pass per candidate on the parity example
        error = MFalconBundle(tmp, check=True).parity_error
        manifest = json.loads((tmp / MANIFEST).read_text())
        _write_manifest(tmp, {**manifest, "parity_max_error": error})
    return {"model": cfg.model, "version": version, "parameters": parameters, "compile_seconds": round(seconds, 2),
            "parity_max_error": error}


# -- two towers ----------------------------------------------------------------------------------


def _two_tower_bundle(run: Path, cfg: Any, which: str, tmp: Path) -> dict[str, Any]:
    from lumrec.pipelines.retrieve import build_two_tower

    data = _data(run, cfg.data)
    vocab = dict(data.read_meta().vocab_sizes)
    num_items = vocab_size(vocab, "item_id")
    lum = LUMJoin(cfg.lum) if cfg.lum is not None else None
    user_w, item_w = (lum.user_width(), lum.dim + 1) if lum else (0, 0)
    model, _ = build_two_tower(cfg.sizes, vocab, user_w, item_w)
    ckpt = _load_weights(run, model, which)
    model.eval()
    context = context_keys(cfg.sizes.context_keys, vocab)
    user = TowerServing(model.user_tower, context, list(cfg.sizes.history_keys), user_w)
    item = TowerServing(model.item_tower, ["item_id", "category_id"], [], item_w)
    with writing(tmp / ITEMS_FILE):
        np.savez(tmp / ITEMS_FILE, category_id=_item_category(data, num_items))
    seconds = error = 0.0
    for name, tower in (("user", user), ("item", item)):
        s, e = _export_and_check(tower, tower.example(8, 5, vocab=vocab), tower.example(5, 4, seed=1, vocab=vocab),
                                 tmp / f"{name}_tower.pt2", tmp / f"parity_{name}.pt")
        seconds, error = seconds + s, max(error, e)
    version = _version(run, ckpt)
    parameters = count_parameters(model)
    _write_manifest(tmp, {
        "format": BUNDLE_FORMAT, "kind": "two_tower", "model": "two_tower", "run": str(run.resolve()), "checkpoint": ckpt,
        "version": version, "user_keys": context, "history_keys": list(cfg.sizes.history_keys),
        "item_keys": ["item_id", "category_id"], "vocab": vocab, "num_items": num_items, "max_history": cfg.train.max_history,
        "output_dim": int(cfg.sizes.output_dim), "lum": _lum_manifest(lum) if lum else None, "parameters": parameters,
        "compile_seconds": round(seconds, 2), "parity_max_error": error, "torch": torch.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(),
    })
    return {"model": "two_tower", "version": version, "parameters": parameters, "compile_seconds": round(seconds, 2),
            "parity_max_error": error}

