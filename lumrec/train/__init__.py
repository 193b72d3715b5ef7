"""The resumable training loop shared by lumrec's jobs."""

from lumrec.train.epoch_job import EpochJob, RankState, seed_everything

__all__ = ["EpochJob", "RankState", "seed_everything"]
