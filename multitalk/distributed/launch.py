"""Start a local group of ranks (one process each) without Ray: tests and benchmarks.

``spawn_ranks(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in
``world_size`` processes that share an initialised default process group (gloo on CPU,
nccl with one GPU per rank when ``backend="nccl"``). The rendezvous port is chosen free at
runtime, never fixed, so parallel test runs do not collide.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable, world_size: int, port: int, backend: str, threads: int, args: tuple) -> None:
    # Each rank gets a share of the cores: oversubscribed BLAS threads make CPU runs crawl.
    torch.set_num_threads(threads)
    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no network needed
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Callable, world_size: int, *args, backend: str = "gloo", threads_per_rank: int = 1) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; raises if any rank fails.

    ``fn`` must be importable by name (a module-level function) for the spawn start method.
    """
    port = free_port()
    mp.spawn(_rank_main, args=(fn, world_size, port, backend, threads_per_rank, args), nprocs=world_size, join=True)
