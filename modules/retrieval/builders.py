"""The built-in pre-training models' builders: SASRec, HSTU and HSTU-large (presets), LUM.

Each is registered by name in ``retrieval.registry``; tables are sized from the dataset manifest.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping

from lumrec.config import from_dict
from lumrec.data.dataset import DatasetMeta
from lumrec.data.tokens import CONSTANT_CONDITION_KEY, condition_key
from lumrec.modules.retrieval.hstu_retrieval import HSTURetrieval, HSTURetrievalConfig, hstu_preset
from lumrec.modules.retrieval.lum import LUM, LUMConfig
from lumrec.modules.retrieval.registry import ModelBuilder, register_model
from lumrec.modules.retrieval.sasrec import SASRec, SASRecConfig
from lumrec.modules.retrieval.sequence_model import SequentialRecommender
from lumrec.modules.layers.token_encoder import ItemFeatureLookup, token_encoder_config_from_dataset


def _num_items(meta: DatasetMeta) -> int:
    if "item_id" not in meta.vocab_sizes:
        raise KeyError("dataset manifest declares no vocabulary size for 'item_id'")
    return int(meta.vocab_sizes["item_id"])


def _config(cls: type, model_config: dict[str, Any], max_len: int) -> Any:
    """`cls` from the config dict, with max_len defaulting to the data's."""
    values = dict(model_config)
    if "max_len" in {f for f in cls.__dataclass_fields__}:
        values.setdefault("max_len", max_len)
    return from_dict(cls, values, source="pretrain config", prefix="model_config")


@register_model("sasrec")
def _build_sasrec(model_config, meta, data, token_config, max_len) -> SequentialRecommender:
    return SASRec(_config(SASRecConfig, model_config, max_len), _num_items(meta))


def _hstu_values(preset: str, model_config: dict[str, Any], max_len: int) -> dict[str, Any]:
    """The preset's values with the config's keys on top, `hstu` merged key by key; hstu.max_len defaults to the data's."""
    values = asdict(hstu_preset(preset))
    layer = {k: v for k, v in values.pop("hstu").items() if k != "max_len"}
    layer["max_len"] = max_len
    values.update(model_config)
    given = model_config.get("hstu", {})
    # A non-mapping `hstu` goes through unmerged, so that from_dict names the key in its error.
    values["hstu"] = {**layer, **given} if isinstance(given, Mapping) else given
    return values


def _build_hstu_preset(preset: str) -> ModelBuilder:
    def build(model_config, meta, data, token_config, max_len) -> SequentialRecommender:
        config = from_dict(HSTURetrievalConfig, _hstu_values(preset, model_config, max_len),
                           source="pretrain config", prefix="model_config")
        return HSTURetrieval(config, _num_items(meta))

    return build


register_model("hstu")(_build_hstu_preset("hstu"))
register_model("hstu-large")(_build_hstu_preset("hstu-large"))


@register_model("lum")
def _build_lum(model_config, meta, data, token_config, max_len) -> SequentialRecommender:
    """LUM over [condition, item] tokens; tables derived from the dataset's vocabularies."""
    values = dict(model_config)
    embedding_dim = values.pop("embedding_dim", None)  # table width; default d_model rounded up to a multiple of 4
    config = _config(LUMConfig, values, max_len)
    dim = embedding_dim or -(-config.d_model // 4) * 4
    if token_config.condition_features:
        cond_keys = [condition_key(f) for f in token_config.condition_features]
        sources = {condition_key(f): f for f in token_config.condition_features}
    else:
        cond_keys, sources = [CONSTANT_CONDITION_KEY], {CONSTANT_CONDITION_KEY: "const"}
    item_keys = list(token_config.item_features)
    sources.update({k: k for k in item_keys})
    encoder = token_encoder_config_from_dataset(meta.vocab_sizes, cond_keys, item_keys, sources, dim, config.d_model)
    items = data.read_table("items")
    lookup = ItemFeatureLookup.from_items_table(items, item_keys, _num_items(meta))
    return LUM(config, encoder, lookup)
