"""The knowledge store: LUM's answers `o_q` per (user, condition) and item-token embeddings `e_i`, per as-of day.

- ``conditions``: ``Condition`` and the one parser of condition strings and pairs;
- ``partitions``: the layout (one folder per as-of day, manifest last) and the point-in-time rule;
- ``store``: ``KnowledgeWriter`` / ``write_knowledge``, atomic per partition;
- ``reading`` and ``lookup``: ``load_knowledge`` -> ``KnowledgeLookup`` (vectorised, checked);
- ``join``: ``PointInTimeKnowledge``, which partition each sample day reads, with its checks;
- ``redis_store``: ``publish_partition`` (a partition to Redis, atomically, versioned) and
  ``RedisKnowledge`` (a ``KnowledgeSource`` reading it); ``redis_local``: ``local_redis_server``.
  Imported on first use of their names (the Redis client costs ~0.1-0.2 s to import).

    >>> import tempfile, numpy as np
    >>> store = tempfile.mkdtemp()
    >>> _ = write_knowledge(store, "2026-01-02", "v1", [7, 9], ["scenario=1", "scenario=2"],
    ...                     np.zeros((2, 2, 3), np.float32), [1, 2], np.ones((2, 3), np.float32))
    >>> latest_as_of(store, "2026-01-03"), load_knowledge(store, "2026-01-02").num_users
    ('2026-01-02', 2)
"""

import importlib

from lumrec.knowledge.conditions import Condition, ConditionLike, format_condition, parse_condition, parse_conditions
from lumrec.knowledge.join import CANDIDATE_FEATURES, PointInTimeKnowledge, day_to_ds
from lumrec.knowledge.lookup import KnowledgeLookup, NoKnowledge
from lumrec.knowledge.partitions import (
    ITEM_SCHEMA,
    ITEMS_FILE,
    KNOWLEDGE_MANIFEST,
    USER_SCHEMA,
    USERS_FILE,
    KnowledgeManifest,
    knowledge_days,
    latest_as_of,
    partition_dir,
    read_manifest,
)
from lumrec.knowledge.reading import load_knowledge
from lumrec.knowledge.store import KnowledgeWriter, write_knowledge

# Name -> module, imported on first access (PEP 562), so importing lumrec.knowledge does not import redis.
_LAZY = {
    "KnowledgeUnavailable": "redis_store",
    "RedisKnowledge": "redis_store",
    "RedisKnowledgeConfig": "redis_store",
    "RequestKnowledge": "redis_store",
    "publish_partition": "redis_store",
    "published_versions": "redis_store",
    "LocalRedis": "redis_local",
    "local_redis_server": "redis_local",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CANDIDATE_FEATURES",
    "Condition",
    "ConditionLike",
    "ITEMS_FILE",
    "ITEM_SCHEMA",
    "KNOWLEDGE_MANIFEST",
    "KnowledgeLookup",
    "KnowledgeManifest",
    "KnowledgeUnavailable",
    "KnowledgeWriter",
    "LocalRedis",
    "NoKnowledge",
    "PointInTimeKnowledge",
    "RedisKnowledge",
    "RedisKnowledgeConfig",
    "RequestKnowledge",
    "USERS_FILE",
    "USER_SCHEMA",
    "day_to_ds",
    "format_condition",
    "knowledge_days",
    "latest_as_of",
    "load_knowledge",
    "local_redis_server",
    "parse_condition",
    "parse_conditions",
    "partition_dir",
    "publish_partition",
    "published_versions",
    "read_manifest",
    "write_knowledge",
]
