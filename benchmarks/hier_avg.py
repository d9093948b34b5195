"""Hier-AVG at P = 4 on gloo: a local average (S = 2) beside a global one.

Prints, from one run, the median time of
- a local average inside a group of S = 2 (HierAvgAverager.average_local),
- a global average over all P = 4 (HierAvgAverager.average),
- the floor of the local one: a raw all_reduce of the same bytes inside the group
  plus one in-place division,
- a K-AVG average at P = 2 (KAvgAverager over a 2-rank group), which the local
  average over S = 2 should cost about as much as.

    python benchmarks/hier_avg.py [--model resnet18] [--reps 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kavg_ray.train.averaging import HierAvgAverager, KAvgAverager
from kavg_ray.train.models import build_model


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    # Every rank must agree on one figure: take the slowest rank's median.
    t = torch.tensor([statistics.median(times)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() * 1e3


def _worker(rank: int, world: int, port: int, model_name: str, reps: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build_model(model_name, (3, 32, 32), 10)
    hier = HierAvgAverager(model, local_period=1, global_period=2, group_size=2)
    pair = dist.new_group([0, 1])  # a 2-learner K-AVG, for comparison
    raw = torch.empty_like(hier.flat.buffer)

    def floor() -> None:
        dist.all_reduce(raw, group=hier.local_group)
        raw.div_(2)

    results = {
        "local average (S=2)": _median_ms(hier.average_local, reps),
        "floor: raw all_reduce in group + div": _median_ms(floor, reps),
        "global average (P=4)": _median_ms(hier.average, reps),
    }
    if rank < 2:
        kavg = KAvgAverager(build_model(model_name, (3, 32, 32), 10), period=1, process_group=pair)
        t = _median_ms_group(kavg.average, reps, pair)
    else:
        t = 0.0
    t_all = torch.tensor([t])
    dist.all_reduce(t_all, op=dist.ReduceOp.MAX)
    results["K-AVG average at P=2"] = t_all.item()
    if rank == 0:
        out.update(results, nbytes=hier.flat.nbytes)
    dist.barrier()
    dist.destroy_process_group()


def _median_ms_group(fn, reps: int, group: dist.ProcessGroup) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier(group=group)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(4, port, args.model, args.reps, out), nprocs=4, join=True)
        out = dict(out)
    nbytes = out.pop("nbytes")
    print(f"{args.model}, {nbytes / 1e6:.1f} MB per average, gloo, P=4, median of {args.reps}")
    floor = out["floor: raw all_reduce in group + div"]
    for name, ms in out.items():
        print(f"{name:40s} {ms:8.1f} ms   {ms / floor:5.2f}x local floor")


if __name__ == "__main__":
    main()
