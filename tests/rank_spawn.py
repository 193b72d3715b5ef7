"""Shared by the multi-rank tests: torchrun-style env vars, spawning gloo ranks, and a process without those vars."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.multiprocessing as mp

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port free on this host right now (the rendezvous port of a spawned group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def become_rank(rank: int, world: int, port: int) -> None:
    """In a spawned child: the env vars torchrun would set, and one torch thread (ranks share 2 cores)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def spawn_ranks(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int = 2) -> Any:
    """Start `fn(rank, *args)` in `nprocs` processes; join them with `join_ranks`."""
    # spawn, not fork: a forked child can deadlock on the parent's thread pools / gloo state.
    return mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")


def join_ranks(procs: Any, start: float, timeout_s: float, what: str) -> None:
    """Wait for the ranks (re-raising a rank's failure); fail the test after `timeout_s` from `start`."""
    while not procs.join(timeout=1.0):  # raises if a rank failed
        if time.monotonic() > start + timeout_s:
            for p in procs.processes:
                p.terminate()
            pytest.fail(f"{what} did not finish in {timeout_s:.0f} s")


@contextlib.contextmanager
def without_rank_env() -> Iterator[None]:
    """This process without torchrun's env vars while the block runs (the plain 1-process path)."""
    saved = {v: os.environ.pop(v) for v in ENV_VARS if v in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def fused_tables(module: Any) -> Iterator[None]:
    """For the block, `module.fused_params_for` gives fbgemm's fused CPU kernel (EXACT_ROWWISE_ADAGRAD) to the
    sharding call (a torch.device) and keeps RowwiseAdamW's settings where asked by name ("cpu"): tables on fused
    kernels, as on CUDA with fbgemm's CUDA build, whose PARTIAL_ROWWISE_ADAM has no CPU kernel."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    original = module.fused_params_for

    def fused(device: Any, lr: float, **kwargs: Any) -> dict[str, Any]:
        if isinstance(device, str):
            return original(device, lr, **kwargs)
        return {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": float(lr), "eps": float(kwargs.get("eps", 1e-8))}

    module.fused_params_for = fused
    try:
        yield
    finally:
        module.fused_params_for = original
