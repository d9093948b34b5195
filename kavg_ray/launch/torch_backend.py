"""Ray Train's torch backend with the process group's sockets on the node's Ray address.

Ray Train's own (``TorchConfig``, ``_TorchBackend.on_start``) has every worker call
``init_process_group("env://")`` with rank 0's node address and a free port: torch then
starts rank 0's rendezvous store on every interface, and gloo listens on the address the
host name resolves to. :class:`KavgTorchConfig` is ``TorchConfig`` with an ``on_start``
that does the same steps (Ray's distributed environment variables, NCCL's async error
handling, one group of ``backend``), but each worker first pins gloo to the address Ray
uses for its node, and rank 0's store listens on that address only
(:mod:`kavg_ray.train.rendezvous`). Ray's node address is 127.0.0.1 on a local Ray (kavg
starts it in single-machine mode) and on cluster/local.sh: nothing then listens beyond
the loopback. On a cluster it is the address the nodes reach each other by.

Everything else (the context manager that sets the CUDA device, shutdown) is Ray's.
The private parts of Ray used here are listed in kavg_ray.launch.ray_private.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from kavg_ray.train import rendezvous

#: What Ray Train sets for NCCL unless the user chose (ray.train.torch.config).
NCCL_ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
NCCL_BLOCKING_WAIT_ENV = "TORCH_NCCL_BLOCKING_WAIT"


def node_address() -> str:
    """The address Ray uses for this worker's node."""
    return ray.util.get_node_ip_address()


def _listen() -> tuple[str, int]:
    """On rank 0: bind the store's socket on this node's Ray address."""
    host = node_address()
    return host, rendezvous.listen(host)


def _setup(backend: str, world_rank: int, world_size: int, master: str, port: int,
           timeout_s: float) -> str | None:  # fmt: skip
    """On every worker: gloo pinned to this node's Ray address, then the default group.
    Returns gloo's interface (None: no interface holds the address)."""
    interface = rendezvous.pin_gloo(node_address())
    if "nccl" in backend and not (
        NCCL_ERROR_HANDLING_ENV in os.environ or NCCL_BLOCKING_WAIT_ENV in os.environ
    ):
        os.environ[NCCL_ERROR_HANDLING_ENV] = "1"  # fail a timed-out collective, as Ray does
    rendezvous.init_group(
        backend, world_rank, world_size, master, port, timedelta(seconds=timeout_s)
    )
    return interface


class KavgTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        backend = backend_config.backend or "gloo"
        master, port = worker_group.execute_single(0, _listen)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([
            worker_group.execute_single_async(
                rank, _setup, backend=backend, world_rank=rank, world_size=len(worker_group),
                master=master, port=port, timeout_s=backend_config.timeout_s,
            )
            for rank in range(len(worker_group))
        ])  # fmt: skip


@dataclass
class KavgTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group listens on the node's Ray address only."""

    @property
    def backend_cls(self) -> type:
        return KavgTorchBackend
