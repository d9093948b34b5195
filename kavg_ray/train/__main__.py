"""`torchrun --nproc-per-node P -m kavg_ray.train CONFIG.yaml`: one run without Ray."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

from kavg_ray.errors import ConfigError
from kavg_ray.train import collectives, rendezvous
from kavg_ray.train.groups import node_rank_from_env
from kavg_ray.train.loop import format_progress
from kavg_ray.train.run import train

USAGE = "usage: torchrun --nproc-per-node P -m kavg_ray.train CONFIG.yaml"


def main(argv: list[str] | None = None) -> int:
    """Train CONFIG on the processes torchrun started (one learner each); exit code."""
    from kavg_ray.config import ALGORITHMS, load_run

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        cfg = load_run(argv[0])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ALGORITHMS[cfg.algorithm].needs_server:
        print(f"error: {cfg.algorithm} needs a parameter server: run it with kavg train",
              file=sys.stderr)  # fmt: skip
        return 2
    use_cuda = cfg.resources.use_gpu and torch.cuda.is_available()
    if "RANK" in os.environ:
        timeout = datetime.timedelta(seconds=cfg.resources.nccl_timeout_s)
        # The store (unless torchrun's agent hosts it) and gloo keep to MASTER_ADDR.
        rendezvous.init_from_env(collectives.backend(use_cuda), timeout)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if world != cfg.workers:
        print(f"error: config asks for {cfg.workers} learner processes but {world} run",
              file=sys.stderr)  # fmt: skip
        return 2
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    def report(metrics: dict, state: dict | None) -> None:
        if rank == 0:
            print(format_progress(cfg, metrics), flush=True)

    train(cfg, report, rank=rank, world_size=world, device=device,
          node_rank=node_rank_from_env())  # fmt: skip
    if dist.is_initialized():
        dist.barrier()  # leave together: gloo aborts a peer whose connections vanish
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
