"""Warm start: a ranker with LUM inputs from an existing DLRM's parameters, and LUM's token encoder from its tables.

Parameter warm start (LUM step 3, "plug into the model you already have"): the new model is the
old one with LUM features appended to its dense input, so exactly the Linear layers that read that
input are wider. ``warm_start`` copies every tensor whose (mapped) name and shape match and, for a
Linear whose ``in_features`` grew (found by shape, not by name), copies the old columns and sets
the new ones to zero:

    W_old [out, in_old]  ->  W_new [out, in_old + lum_dim] = [W_old | 0]

so the warm-started model's first predictions equal the old model's for any LUM values, and the
zero columns learn from the first step (their gradient is `delta x_lum^T`, not zero). This needs
the new columns to be one block at the END of the layer's input, which is where ``EmbeddingMLP``,
``DIN``, ``SIM``, the two-tower towers and ``lum_dense_input`` (torchrec's DLRM) put LUM features;
``WarmStartConfig.widen_at`` names another column for a model that inserts them elsewhere.

Feature warm-up (the LUM paper's other warm start): ``token_encoder_config_from_tables`` declares
LUM's token encoder with an existing DLRM's tables (names, sizes, dims), and
``copy_table_weights`` initialises them from the DLRM's trained tables.

Both work on unsharded modules (before ``DistributedModelParallel``); the optimizer starts afresh.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from iopath.common.file_io import g_pathmgr
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from lumrec.checkpoint import META_FILE, CheckpointError, CheckpointManager, UnsafeCheckpointError, load_dcp, read_metadata
from lumrec.config import ConfigError
from lumrec.modules.warm_start_config import WarmStartConfig, WarmStartError
from lumrec.data.tokens import CONSTANT_CONDITION_KEY, condition_key
from lumrec.modules.layers.token_encoder import CONSTANT_VOCAB, FeatureTableConfig, TokenEncoderConfig

__all__ = [
    "WarmStartError",
    "WarmStartConfig",
    "Widened",
    "Skipped",
    "WarmStartReport",
    "load_source_state",
    "warm_start",
    "warm_start_from",
    "embedding_tables",
    "token_encoder_config_from_tables",
    "copy_table_weights",
]

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class Widened:
    """A Linear weight whose input grew: old columns copied, `zero_columns` = [start, stop) set to zero."""

    name: str
    source_name: str
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    zero_columns: tuple[int, int]


@dataclass
class Skipped:
    """A source tensor that was not copied, and why (`target_name` None: it maps to nothing in the target)."""

    source_name: str
    target_name: str | None
    reason: str


@dataclass
class WarmStartReport:
    """What `warm_start` did: copied and widened target names, skipped source tensors, target tensors no source reached."""

    copied: list[str] = field(default_factory=list)
    widened: list[Widened] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def untouched(self) -> list[str]:
        """Target tensors that kept their fresh initialisation (missing ones and the targets of skipped ones)."""
        done = set(self.copied) | {w.name for w in self.widened}
        skipped = [s.target_name for s in self.skipped if s.target_name is not None and s.target_name not in done]
        return sorted(set(self.missing) | set(skipped))

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"warm start: {len(self.copied)} copied, {len(self.widened)} widened "
            f"({', '.join(f'{w.name} cols {w.zero_columns[0]}:{w.zero_columns[1]} = 0' for w in self.widened) or '-'}), "
            f"{len(self.skipped)} skipped, {len(self.missing)} missing"
        )


# -- source loading -------------------------------------------------------------------------------


def _checkpoint_tensors(folder: Path, key: str) -> dict[str, torch.Tensor]:
    """The tensors under `key` of a DCP checkpoint folder, read without a model to load into."""

    metadata = read_metadata(folder)  # without running code from the folder
    paths = metadata.planner_data or {}
    state: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for flat, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue
        # DCP flattens {"model": {"a.b": t}} to "model.a.b"; planner_data keeps the nested path.
        path = paths.get(flat)
        if path is not None:
            if len(path) < 2 or str(path[0]) != key:
                continue
            name = ".".join(str(p) for p in path[1:])
        elif flat.startswith(key + "."):
            name = flat[len(key) + 1 :]
        else:
            continue
        state[flat] = torch.empty(meta.size, dtype=meta.properties.dtype)
        names[flat] = name
    if not state:
        tops = sorted({str((paths.get(k) or k.split("."))[0]) for k in metadata.state_dict_metadata})
        raise WarmStartError(f"{folder}: checkpoint has no tensors under {key!r} (checkpoint_key); it has {tops}")
    load_dcp(state, folder, no_dist=True)
    return {names[flat]: t for flat, t in state.items()}


def load_source_state(source: str | os.PathLike, checkpoint_key: str = "model") -> dict[str, torch.Tensor]:
    """A flat {name: tensor} state dict from a CheckpointManager folder (root or step) or a torch.save file; errors name the path."""
    try:
        path = Path(g_pathmgr.get_local_path(str(source)))
    except Exception as err:  # iopath raises various errors for unknown URIs
        raise WarmStartError(f"warm start source {source}: cannot resolve path: {err}") from None
    if not path.exists():
        raise WarmStartError(f"warm start source {path}: no such file or folder")
    if path.is_dir():
        step = _STEP_DIR.match(path.name)
        if step is not None:
            folder, manager, number = path, CheckpointManager(path.parent, keep=0), int(step.group(1))
        else:
            manager = CheckpointManager(path, keep=0)
            if not manager.candidates():
                raise WarmStartError(
                    f"warm start source {path}: not a checkpoint folder (no complete step-NNNNNNNN with {META_FILE} inside)"
                )
            folder, number = path, None
        try:
            if number is None:  # a root folder: its newest checkpoint that verifies (newer damaged ones logged)
                number, _ = manager.newest_valid()
                folder = manager.step_dir(number)
            else:
                manager.verify(number)
            return _checkpoint_tensors(folder, checkpoint_key)
        except (WarmStartError, UnsafeCheckpointError):
            raise  # a planted checkpoint is named as such, not as a damaged one
        except CheckpointError as err:
            raise WarmStartError(f"warm start source {folder}: unreadable checkpoint: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WarmStartError(f"warm start source {path}: not a torch.save'd state dict: {type(err).__name__}: {err}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get(checkpoint_key), Mapping):
        obj = obj[checkpoint_key]
    if not isinstance(obj, Mapping):
        raise WarmStartError(f"warm start source {path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WarmStartError(f"warm start source {path}: holds no tensors (keys: {sorted(map(str, obj))[:10]})")
    return state


# -- parameter warm start ---------------------------------------------------------------------------


def _linear_weights(module: nn.Module) -> set[str]:
    """State-dict names of every nn.Linear weight in `module` (shared modules under each of their names)."""
    return {f"{name}.weight" if name else "weight" for name, m in module.named_modules(remove_duplicate=False) if isinstance(m, nn.Linear)}


def warm_start(target: nn.Module, source_state: Mapping[str, torch.Tensor], cfg: WarmStartConfig | None = None) -> WarmStartReport:
    """Copy `source_state` into `target` by (mapped) name: equal shapes as is, widened Linear inputs with zero new columns.

    Example::

        >>> old = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> new = nn.Sequential(nn.Linear(3 + 4, 2), nn.ReLU(), nn.Linear(2, 1))  # 4 LUM features appended
        >>> report = warm_start(new, old.state_dict())
        >>> report.copied, [(w.name, w.zero_columns) for w in report.widened]
        (['0.bias', '2.weight', '2.bias'], [('0.weight', (3, 7))])
        >>> x, lum = torch.rand(5, 3), torch.rand(5, 4)
        >>> torch.allclose(new(torch.cat([x, lum], 1)), old(x))
        True
    """
    cfg = cfg or WarmStartConfig()
    where = cfg.source or "<state dict>"
    target_state = target.state_dict(keep_vars=True)
    linears = _linear_weights(target)
    report = WarmStartReport()
    plan: list[tuple[str, torch.Tensor, tuple[int, int] | None]] = []  # (target name, source tensor, zero columns)
    problems: list[str] = []
    reached: dict[str, str] = {}
    for source_name, src in source_state.items():
        name = cfg.target_name(source_name)
        if cfg.excluded(source_name, name):
            report.skipped.append(Skipped(source_name, name if name in target_state else None, "excluded"))
            if name in target_state:
                reached.setdefault(name, source_name)
            continue
        if not isinstance(src, torch.Tensor):
            report.skipped.append(Skipped(source_name, None, f"not a tensor ({type(src).__name__})"))
            continue
        if name not in target_state:
            reason = f"no target tensor named {name!r}"
            report.skipped.append(Skipped(source_name, None, reason))
            problems.append(f"{source_name}: {reason}")
            continue
        if name in reached:
            raise WarmStartError(f"warm start from {where}: source tensors {reached[name]!r} and {source_name!r} both map to {name!r}")
        reached[name] = source_name
        dst = target_state[name]
        old, new = tuple(src.shape), tuple(dst.shape)
        if old == new:
            plan.append((name, src, None))
        elif name in linears and len(old) == 2 and len(new) == 2 and old[0] == new[0] and old[1] < new[1]:
            start = cfg.new_columns_at(name, old[1])
            plan.append((name, src, (start, start + new[1] - old[1])))
        else:
            reason = f"shape {list(old)} in the source vs {list(new)} in the target is not a Linear input widening"
            report.skipped.append(Skipped(source_name, name, reason))
            problems.append(f"{name}: {reason}")
    if problems and cfg.strict_shapes:
        raise WarmStartError(
            f"warm start from {where} (strict_shapes): {len(problems)} tensor(s) cannot be carried over: "
            + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")
            + ". Map names with name_map, skip them with exclude, or set strict_shapes: false."
        )
    with torch.no_grad():
        for name, src, zero in plan:
            dst = target_state[name]
            if dst.device.type == "meta":
                raise WarmStartError(f"{name}: the target is on the meta device; warm start the materialised model")
            src = src.to(device=dst.device)
            if zero is None:
                dst.copy_(src)
                report.copied.append(name)
                continue
            start, stop = zero
            dst[:, :start].copy_(src[:, :start])
            dst[:, start:stop].zero_()
            dst[:, stop:].copy_(src[:, start:])
            report.widened.append(Widened(name, reached[name], tuple(src.shape), tuple(dst.shape), zero))
    report.missing = [n for n in target_state if n not in reached]
    log.info("%s (from %s)", report.summary(), where)
    return report


def warm_start_from(target: nn.Module, cfg: WarmStartConfig) -> WarmStartReport:
    """`warm_start` from `cfg.source` (a checkpoint folder or a torch.save file)."""
    if not cfg.source:
        raise ConfigError("WarmStartConfig: key 'source' is empty; give a checkpoint folder or a torch.save file")
    return warm_start(target, load_source_state(cfg.source, cfg.checkpoint_key), cfg)


# -- feature warm-up: LUM's token encoder from a DLRM's tables ----------------------------------------------

Table = BaseEmbeddingConfig | FeatureTableConfig


def _collections(module: nn.Module) -> list[tuple[str, list[BaseEmbeddingConfig], dict[str, nn.Parameter]]]:
    """Every (Embedding|EmbeddingBag)Collection in `module`: (its name, table configs, table name -> weight)."""
    found = []
    for name, m in module.named_modules():
        if isinstance(m, EmbeddingBagCollection):
            found.append((name, list(m.embedding_bag_configs()), {n: b.weight for n, b in m.embedding_bags.items()}))
        elif isinstance(m, EmbeddingCollection):
            found.append((name, list(m.embedding_configs()), {n: e.weight for n, e in m.embeddings.items()}))
    return found


def embedding_tables(module: nn.Module) -> list[BaseEmbeddingConfig]:
    """The torchrec table declarations of every embedding collection in `module` (e.g. a DLRM), in module order."""
    return [c for _, configs, _ in _collections(module) for c in configs]


def _table_weights(module: nn.Module, what: str) -> dict[str, tuple[str, nn.Parameter]]:
    """Table name -> (collection path, weight) of `module`; one name in two collections is an error naming both."""
    out: dict[str, tuple[str, nn.Parameter]] = {}
    for path, _, weights in _collections(module):
        for name, weight in weights.items():
            if name in out:
                raise ValueError(f"{what}: table {name!r} is in two collections ({out[name][0]!r} and {path!r}); names must be unique")
            out[name] = (path, weight)
    return out


def _declaration(table: Table) -> tuple[str, int, int, list[str]]:
    if isinstance(table, (BaseEmbeddingConfig, FeatureTableConfig)):
        return table.name, int(table.num_embeddings), int(table.embedding_dim), list(table.feature_names)
    raise TypeError(
        f"token_encoder_config_from_tables: a table must be a torchrec EmbeddingBagConfig/EmbeddingConfig or a "
        f"FeatureTableConfig/TableConfig, got {type(table).__name__}"
    )


def token_encoder_config_from_tables(
    tables: Sequence[Table],
    item_features: Sequence[str],
    condition_features: Sequence[str],
    d_model: int,
    dense_dim: int = 0,
) -> TokenEncoderConfig:
    """LUM's token encoder declared with an existing DLRM's tables: same names, sizes and dims, looked up by token keys.

    Item token key `f` (e.g. `item_id`) and condition token key `cond_<f>` (``lumrec.data.tokens``)
    look up the DLRM table whose `feature_names` hold `f`, so `category_id` and `cond_category_id`
    share the DLRM's category table. DLRM tables no token feature uses are left out, as are their
    other keys (`user_id`, `hist_item_id`, ...). No condition features: the constant condition key
    `cond_const` gets a 2-row table `t_const`. The token encoder SUM-pools whatever the DLRM's pooling.
    """
    declared = [_declaration(t) for t in tables]
    owner: dict[str, str] = {}
    for name, _, _, features in declared:
        for f in features:
            if f in owner:
                raise ValueError(f"token_encoder_config_from_tables: feature {f!r} is looked up by tables {owner[f]!r} and {name!r}")
            owner[f] = name
    keys_of: dict[str, list[str]] = {}
    for kind, features, to_key in (("item", item_features, str), ("condition", condition_features, condition_key)):
        for f in features:
            if f not in owner:
                raise ValueError(
                    f"token_encoder_config_from_tables: {kind} feature {f!r} has no table among the DLRM's; "
                    f"tables look up {sorted(owner)}"
                )
            keys_of.setdefault(owner[f], []).append(to_key(f))
    out = [FeatureTableConfig(name, rows, dim, keys_of[name]) for name, rows, dim, _ in declared if name in keys_of]
    if not out:
        raise ValueError("token_encoder_config_from_tables: item_features is empty")
    condition_keys = [condition_key(f) for f in condition_features]
    if not condition_keys:
        const = "t_const"
        if const in {d[0] for d in declared}:
            raise ValueError(f"token_encoder_config_from_tables: no condition features, and the DLRM already has a table {const!r}")
        condition_keys = [CONSTANT_CONDITION_KEY]
        out.append(FeatureTableConfig(const, CONSTANT_VOCAB, out[0].embedding_dim, condition_keys))
    return TokenEncoderConfig(out, condition_keys, list(item_features), dense_dim=dense_dim, d_model=d_model)


def copy_table_weights(dlrm_module: nn.Module, token_encoder: nn.Module) -> list[str]:
    """Initialise `token_encoder`'s tables (any module holding them, e.g. a LUM) from `dlrm_module`'s tables of the same name.

    Returns the names copied; a same-named table of another shape is an error naming it, and so is
    copying nothing (no table names in common).
    """
    source = _table_weights(dlrm_module, "copy_table_weights (DLRM)")
    target = _table_weights(token_encoder, "copy_table_weights (token encoder)")
    copied = []
    with torch.no_grad():
        for name, (_, dst) in target.items():
            if name not in source:
                continue
            src = source[name][1]
            if src.shape != dst.shape:
                raise ValueError(
                    f"copy_table_weights: table {name!r} is {list(src.shape)} in the DLRM but {list(dst.shape)} in the token encoder"
                )
            dst.copy_(src.detach().to(device=dst.device, dtype=dst.dtype))
            copied.append(name)
    if not copied:
        raise ValueError(f"copy_table_weights: no table names in common; DLRM {sorted(source)}, token encoder {sorted(target)}")
    return copied
