"""Ranking / retrieval training samples from a lumrec dataset, with point-in-time behaviour histories.

Three protocols (``RankingSampleConfig.protocol``), documented exactly in docs/ranking_data.md:

- ``explicit_ratings``: every rated behaviour is a sample, label = rating >= threshold, split by time;
- ``implicit_next_item``: every next item is a positive plus sampled unseen negatives (DIN / SIM),
  split leave-one-out (last event test, second last validation);
- ``impressions``: every logged impression with its label, split by day range.

A sample's history is its user's behaviours with ``ts`` strictly before the sample's ``ts``.
Each user's behaviours are stored once (a ``UserSequences``); a sample keeps only
``(user_row, history_length)``, its history being the first ``history_length`` events of
that user, so samples of one user share their prefix instead of copying it.

This module is the public API; the pieces live in ``lumrec.data.ranking``.
"""

from lumrec.data.ranking.config import PROTOCOLS, SPLITS, TEST, TRAIN, VALID, RankingSampleConfig
from lumrec.data.ranking.negatives import sample_negatives
from lumrec.data.ranking.protocols import build_ranking_samples
from lumrec.data.ranking.reading import Behaviours, history_lengths, read_behaviours
from lumrec.data.ranking.samples import (
    CANDIDATE_KEYS,
    DEFAULT_HISTORY_KEYS,
    HISTORY_KEYS,
    RankingBatchLoader,
    RankingSampleBatch,
    RankingSamples,
)
from lumrec.data.ranking.split import time_split

__all__ = [
    "Behaviours",
    "CANDIDATE_KEYS",
    "DEFAULT_HISTORY_KEYS",
    "HISTORY_KEYS",
    "PROTOCOLS",
    "RankingBatchLoader",
    "RankingSampleBatch",
    "RankingSampleConfig",
    "RankingSamples",
    "SPLITS",
    "TEST",
    "TRAIN",
    "VALID",
    "build_ranking_samples",
    "history_lengths",
    "read_behaviours",
    "sample_negatives",
    "time_split",
]
