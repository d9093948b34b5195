"""Run a function in P spawned processes joined by a gloo process group on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, done_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fn(rank, world, *args)
    dist.barrier()
    # Every assertion of this rank has passed: say so outside gloo, wait until every
    # rank has, then leave without running gloo's C++ teardown. That teardown can abort
    # a rank ("terminate called without an active exception") when a peer's sockets
    # close under it, which would fail a test whose checks all passed.
    Path(done_dir, f"rank-{rank}").touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(done_dir)) < world and time.monotonic() < deadline:
        time.sleep(0.01)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable, world: int, *args: Any) -> None:
    """Call fn(rank, world, *args) on `world` gloo ranks; a failing rank fails the caller.

    A rank that dies by a signal after every rank has finished its checks does not
    fail the caller: the checks are what the test is about.
    """
    with tempfile.TemporaryDirectory(prefix="kavg-ranks-") as done_dir:
        try:
            mp.spawn(
                _entry, args=(world, _free_port(), done_dir, fn, args), nprocs=world, join=True
            )
        except mp.ProcessExitedException:
            if len(os.listdir(done_dir)) < world:
                raise
