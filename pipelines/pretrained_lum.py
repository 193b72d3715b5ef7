"""A pre-training run's LUM, rebuilt from the run folder (config.json) with a checkpoint's weights, for inference.

    loaded = load_pretrained_lum("runs/lum")            # best checkpoint if there is one, else latest
    loaded.model, loaded.model_version                  # eval-mode LUM, "<run>/<kind>/step-NNNNNNNN@<digest>"

`<digest>` is the first 12 hex digits of the SHA-256 of the weights (`lumrec.checkpoint.tensor_digest`):
equal weights, equal version. Given a run folder, the newest checkpoint of the kind that verifies is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lumrec.checkpoint import CheckpointManager, load_verified_weights, tensor_digest
from lumrec.config import from_dict
from lumrec.data.dataset import Dataset, DatasetMeta
from lumrec.data.tokens import TokenConfig
from lumrec.modules.retrieval.lum import LUM
from lumrec.modules.retrieval.registry import build_model
from lumrec.pipelines.pretrain_config import PretrainConfig

__all__ = ["LoadedLUM", "load_pretrained_lum"]

_STEP_RE = re.compile(r"^step-(\d{8})$")


@dataclass
class LoadedLUM:
    """A pre-trained LUM with what was needed to build it."""

    model: LUM
    data: Dataset
    meta: DatasetMeta
    token_config: TokenConfig
    checkpoint: Path  # the step-NNNNNNNN folder loaded
    model_version: str


def _pick_checkpoint(path: Path, kind: str) -> tuple[Path, Path]:
    """(run folder, verified step folder) for a run folder + kind, or for a step folder given directly."""
    step = _STEP_RE.match(path.name)
    if step:
        CheckpointManager(path.parent, keep=0).verify(int(step.group(1)))
        return path.parent.parent, path
    if kind not in ("auto", "best", "latest"):
        raise ValueError(f"query: checkpoint_kind must be 'auto', 'best' or 'latest', got {kind!r}")
    managers = {"best": CheckpointManager(path / "best", keep=0), "latest": CheckpointManager(path / "checkpoints", keep=0)}
    present = [name for name, manager in managers.items() if manager.candidates()]
    choice = ("best" if "best" in present else "latest") if kind == "auto" else kind
    if choice not in present:
        raise FileNotFoundError(
            f"{path}: no complete {'checkpoint' if kind == 'auto' else kind + ' checkpoint'} "
            f"(looked in {path / 'best'} and {path / 'checkpoints'})"
        )
    step, _ = managers[choice].newest_valid()  # newer ones that do not verify are logged and skipped
    return path, managers[choice].step_dir(step)


def load_pretrained_lum(checkpoint: str | Path, kind: str = "auto", data_path: str | None = None) -> LoadedLUM:
    """Rebuild a pretrain run's LUM from its config.json and load a checkpoint's weights (eval mode)."""
    run_dir, step_dir = _pick_checkpoint(Path(checkpoint), kind)
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: not found; checkpoint {step_dir} must sit in a pretrain run folder (out/)")
    cfg = from_dict(PretrainConfig, json.loads(config_path.read_text()), source=str(config_path))
    data = Dataset(data_path or cfg.data.path)
    meta = data.read_meta()
    token_config = TokenConfig(condition_features=list(cfg.data.condition_features), item_features=list(cfg.data.item_features))
    model = build_model(cfg.model, cfg.model_config, meta, data, token_config, cfg.data.max_len)
    if not isinstance(model, LUM):
        raise ValueError(f"{config_path}: knowledge querying needs a LUM, but this run trained model {cfg.model!r}")
    load_verified_weights(step_dir, model)  # _pick_checkpoint verified it (newest_valid)
    model.eval()
    # The digest is the weights' own: equal weights give equal versions (file digests are not:
    # DCP's .metadata records the save's temporary folder and a random save id).
    version = f"{run_dir.name}/{step_dir.parent.name}/{step_dir.name}@{tensor_digest(model.state_dict())[:12]}"
    return LoadedLUM(model, data, meta, token_config, step_dir, version)
