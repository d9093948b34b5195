"""Pick a run's engine from the algorithm table and train it."""

from __future__ import annotations

from typing import Any

import torch

from kavg_ray.config import ALGORITHMS, RunConfig
from kavg_ray.train.loop import Engine, ReportFn, run_epochs


def build_engine(
    cfg: RunConfig, rank: int, world_size: int, device: torch.device, server: Any = None,
    node_rank: int = 0,
) -> Engine:
    """The engine of ``cfg``: stacked learners for ``backend: simulated``, else the
    algorithm's own (process group, or parameter server talking to ``server``).
    ``node_rank``: this learner's node (Hier-AVG's groups share a node)."""
    spec = ALGORITHMS[cfg.algorithm]
    if cfg.backend == "simulated":
        from kavg_ray.train.stacked import StackedEngine

        return StackedEngine(cfg, device)
    if spec.needs_server:
        if server is None:
            raise ValueError(f"algorithm {cfg.algorithm} needs a parameter server")
        from kavg_ray.train.parameter_server import ParameterServerEngine

        return ParameterServerEngine(cfg, rank, world_size, device, server)
    from kavg_ray.train.process_group import ProcessGroupEngine

    return ProcessGroupEngine(cfg, rank, world_size, device, node_rank)


def train(
    cfg: RunConfig,
    report: ReportFn,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    resume: dict | None = None,
    server: Any = None,
    node_rank: int = 0,
) -> dict:
    """Train this process's part of ``cfg``; returns the last epoch's metrics.

    ``report(metrics, state)`` is called once per epoch (see :mod:`kavg_ray.train.loop`).
    """
    device = torch.device("cpu") if device is None else device
    engine = build_engine(cfg, rank, world_size, device, server, node_rank)
    return run_epochs(cfg, engine, report, resume)
