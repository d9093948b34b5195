"""Run a function in P spawned processes joined by a gloo process group on 127.0.0.1."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fn(rank, world, *args)
    # Every rank leaves together: a rank that tears down gloo while a peer still
    # holds connections to it aborts that peer.
    dist.barrier()
    dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, *args: Any) -> None:
    """Call fn(rank, world, *args) on `world` gloo ranks; a failing rank fails the caller."""
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)
