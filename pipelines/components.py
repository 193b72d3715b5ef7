"""torchx components of lumrec's jobs: pretrain, query, rank and daily, on any torchx scheduler.

    source .venv/bin/activate      # dist.ddp starts `torchrun`, which must be on PATH
    torchx run -s local_cwd pipelines/components.py:daily --ds 2026-01-08 -j 1x1
    torchx run -s local_cwd pipelines/components.py:pretrain --config configs/ml1m_hstu.yaml -j 1x1 -- train.epochs=3
    torchx run -s kubernetes -cfg namespace=recsys,queue=default pipelines/components.py:daily \
        --image REGISTRY/lumrec:TAG --config configs/daily_prod.yaml --ds 2026-01-08 -j 2x8 \
        --mounts type=volume,src=lumrec-data,dst=/data,type=volume,src=lumrec-runs,dst=/runs
    torchx run -s slurm -cfg partition=train,time=12:00:00 pipelines/components.py:daily \
        --config configs/daily_prod.yaml --ds 2026-01-08 -j 2x8

The image is the repository's ``Dockerfile`` (the pinned CPU stack; a GPU image needs the
CUDA build of torch and fbgemm-gpu). Slurm ignores ``--image`` and runs in the working directory.

Each component is torchx's own ``dist.ddp`` (torchrun: one process per rank, rendezvous, env
vars RANK / WORLD_SIZE / LOCAL_RANK) around ``python -m lumrec.cli JOB CONFIG [key=value ...]``,
so a job is the same command on a laptop and on a cluster; only the scheduler and -j change.
Extra ``key=value`` arguments at the end override the config (the CLI's syntax); torchx needs
this file without ``from __future__ import annotations`` (it decodes the real type hints).
"""


import shutil
import sys
from typing import Dict, List, Optional

import torchx
import torchx.specs as specs
from torchx.components import dist

__all__ = ["daily", "pretrain", "query", "rank"]


def _job(
    name: str,
    config: str,
    overrides: tuple[str, ...],
    j: str,
    image: str,
    cpu: int,
    gpu: int,
    memMB: int,
    env: Optional[Dict[str, str]],
    max_retries: int,
    mounts: Optional[List[str]],
) -> specs.AppDef:
    """`python -m lumrec.cli NAME CONFIG OVERRIDES...` under torchrun with `j` = NODESxPROCS ranks."""
    # torchrun sets OMP_NUM_THREADS=1 per rank when it is unset, with a warning banner on every start;
    # setting the same value here keeps the behaviour and drops the banner (a job's train.threads still rules).
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    if shutil.which("torchrun") is None:
        # dist.ddp runs `bash -c "torchrun ..."`: local schedulers inherit this PATH (images bring their own).
        print("lumrec: `torchrun` is not on PATH, so a local_cwd / local_docker job cannot start it; "
              "activate the environment first (source .venv/bin/activate)", file=sys.stderr)
    return dist.ddp(
        name, config, *overrides,
        m="lumrec.cli",
        name=f"lumrec-{name}",
        image=image,
        j=j,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        env=env,
        max_retries=max_retries,
        mounts=mounts,
    )


def daily(
    *overrides: str,
    ds: str = "",
    start: str = "",
    end: str = "",
    config: str = "configs/daily_synthetic.yaml",
    j: str = "1x1",
    image: str = torchx.IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """The daily pipeline (continue pre-training, query, rank, next-day eval) for one day or a range; complete days are skipped.

    Args:
        overrides: DailyConfig overrides key.sub=value (after --)
        ds: the day YYYY-MM-DD (or give start and end)
        start: first day of a range
        end: last day of a range
        config: YAML file with DailyConfig keys
        j: NODESxPROCS_PER_NODE, torchrun's layout
        image: container image (local_cwd and slurm: ignored, the working directory is used)
        cpu: CPUs per node (replica)
        gpu: GPUs per node (replica)
        memMB: memory per node (replica) in MB
        env: extra environment variables
        max_retries: restarts of a failed job (each resumes where the last stopped)
        mounts: scheduler mounts, e.g. type=bind,src=/data,dst=/data
    """
    days = [f"ds={ds}"] if ds else []
    if start or end:
        days += [f"start={start}", f"end={end}"]
    return _job("daily", config, (*days, *overrides), j, image, cpu, gpu, memMB, env, max_retries, mounts)


def pretrain(
    *overrides: str,
    config: str = "configs/ml1m_hstu.yaml",
    j: str = "1x1",
    image: str = torchx.IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Step 1: pre-train SASRec, HSTU or LUM (resumes from the run's last checkpoint).

    Args:
        overrides: PretrainConfig overrides key.sub=value (after --)
        config: YAML file with PretrainConfig keys
        j: NODESxPROCS_PER_NODE, torchrun's layout
        image: container image (local_cwd and slurm: ignored, the working directory is used)
        cpu: CPUs per node (replica)
        gpu: GPUs per node (replica)
        memMB: memory per node (replica) in MB
        env: extra environment variables
        max_retries: restarts of a failed job (each resumes where the last stopped)
        mounts: scheduler mounts
    """
    return _job("pretrain", config, overrides, j, image, cpu, gpu, memMB, env, max_retries, mounts)


def query(
    *overrides: str,
    config: str = "configs/query_synthetic.yaml",
    as_of_ds: str = "",
    j: str = "1x1",
    image: str = torchx.IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Step 2: grouped knowledge query of one day into the knowledge store.

    Args:
        overrides: QueryConfig overrides key.sub=value (after --)
        config: YAML file with QueryConfig keys
        as_of_ds: the day the knowledge is as of
        j: NODESxPROCS_PER_NODE, torchrun's layout
        image: container image (local_cwd and slurm: ignored, the working directory is used)
        cpu: CPUs per node (replica)
        gpu: GPUs per node (replica)
        memMB: memory per node (replica) in MB
        env: extra environment variables
        max_retries: restarts of a failed job
        mounts: scheduler mounts
    """
    day = (f"as_of_ds={as_of_ds}",) if as_of_ds else ()
    return _job("query", config, (*day, *overrides), j, image, cpu, gpu, memMB, env, max_retries, mounts)


def rank(
    *overrides: str,
    config: str = "configs/rank_synthetic.yaml",
    j: str = "1x1",
    image: str = torchx.IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Step 3: train and evaluate a ranking model with or without LUM features (resumes automatically).

    Args:
        overrides: RankConfig overrides key.sub=value (after --)
        config: YAML file with RankConfig keys
        j: NODESxPROCS_PER_NODE, torchrun's layout
        image: container image (local_cwd and slurm: ignored, the working directory is used)
        cpu: CPUs per node (replica)
        gpu: GPUs per node (replica)
        memMB: memory per node (replica) in MB
        env: extra environment variables
        max_retries: restarts of a failed job (each resumes where the last stopped)
        mounts: scheduler mounts
    """
    return _job("rank", config, overrides, j, image, cpu, gpu, memMB, env, max_retries, mounts)
