"""A factory data set read through a DataLoader against the same set held in memory (P = 1).

The workload is a dataset factory of CIFAR-sized images (float32 3x32x32, 10 classes;
``cifar_like`` below, served item by item like any map-style torch Dataset) and the
built-in ``cnn``, batch 32, K = 4, trained by ``kavg_ray.train.train``. ``memory``: the
data set is under ``workload.in_memory_mb`` and is collated once into tensors (a batch is
an index); ``loader-wN``: ``in_memory_mb: 0`` sends it through a DataLoader with N worker
processes and a batch sampler over the learner's ``epoch_indices``. Both train on the same
batches (tests/train/test_own_workload.py); the figure is samples/s of the batch loops
(the ``compute_time_s`` that run_epochs reports), the median over alternating runs.

Clocks: ``wall`` (the default) is the throughput a learner sees, loading included; it needs
a quiet machine with a core to spare for the workers. ``cpu`` is the learner thread's CPU
time (``time.thread_time``), which other processes barely disturb: what the data path costs
the learner itself, with the workers' own CPU time (and any wait for them) left out.

``--data-only`` times the data path alone: one epoch of batches from ``train_batches``
(no model), per batch, on both clocks, for the learner thread.

Usage: python benchmarks/dataloader.py [--reps 5] [--workers 0,1,2] [--threads 1]
       [--clock wall|cpu] [--data-only]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset as TorchDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # the factory below imports as dataloader:cifar_like

import kavg_ray.train.loop as loop  # noqa: E402
from kavg_ray.config import RunConfig  # noqa: E402
from kavg_ray.train import train  # noqa: E402

N_TRAIN, N_TEST = 2048, 256


class CifarLike(TorchDataset):
    """Seeded float32 3x32x32 images and labels, one item at a time."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 32, 32, generator=gen)
        self.targets = torch.randint(10, (n,), generator=gen)  # lets cnn know the classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])


def cifar_like() -> tuple[CifarLike, CifarLike]:
    """The dataset factory: (train, test)."""
    return CifarLike(N_TRAIN, 1), CifarLike(N_TEST, 2)


def run(workers: int | None, epochs: int) -> float:
    """Samples/s of one run: ``workers`` None holds the data in memory."""
    workload = {
        "dataset": "dataloader:cifar_like", "model": "cnn", "epochs": epochs,
        "batch_size": 32, "lr": {"initial": 0.05},
    }  # fmt: skip
    if workers is not None:
        workload.update(in_memory_mb=0.0, num_workers=workers)
    cfg = RunConfig.model_validate({"name": "bench", "workload": workload, "K": 4, "P": 1})
    metrics = train(cfg, lambda m, s: None)
    return metrics["samples"] / metrics["compute_time_s"]


def data_only(variants: list[int | None], reps: int) -> None:
    """Per-batch cost of the data path alone (no model) on the learner thread."""
    from kavg_ray.train.data import epoch_indices
    from kavg_ray.train.loader import factory_data

    train_set, test_set = cifar_like()
    idx = epoch_indices(N_TRAIN, 32, 0, 1, 0, 0)
    print("| data path | learner CPU ms/batch (median) | wall ms/batch (median) |")
    print("| --- | --- | --- |")
    for v in variants:
        limit, workers = (1e9, 0) if v is None else (0.0, v)
        data = factory_data("x", train_set, test_set, "classification", limit, workers)
        cpu, wall = [], []
        for _ in range(reps + 1):  # the first pass starts the workers: left out
            t_cpu, t_wall = time.thread_time(), time.perf_counter()
            for _x, _y in data.train_batches(idx, torch.Generator()):
                pass
            cpu.append((time.thread_time() - t_cpu) / len(idx) * 1e3)
            wall.append((time.perf_counter() - t_wall) / len(idx) * 1e3)
        name = "in memory" if v is None else f"DataLoader, num_workers={v}"
        print(f"| {name} | {statistics.median(cpu[1:]):.3f} | {statistics.median(wall[1:]):.3f} |")


class _ThreadClock:
    """Stands in for the ``time`` module of kavg_ray.train.loop: perf_counter is the
    thread's CPU time."""

    def perf_counter(self) -> float:
        return time.thread_time()

    def __getattr__(self, name: str):  # everything else: the real time module
        return getattr(time, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the learner")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--data-only", action="store_true", help="time the data path alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants: list[int | None] = [None] + [int(w) for w in args.workers.split(",")]
    if args.data_only:
        data_only(variants, args.reps)
        return 0
    if args.clock == "cpu":
        loop.time = _ThreadClock()
    for v in variants:
        run(v, 1)  # warm-up
    rates: dict[int | None, list[float]] = {v: [] for v in variants}
    for rep in range(args.reps):
        order = variants if rep % 2 == 0 else variants[::-1]
        for v in order:
            rates[v].append(run(v, args.epochs))
    memory = statistics.median(rates[None])
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} torch {torch.__version__}, "
          f"{args.clock} clock, {args.threads} learner thread(s), {args.reps} reps x "
          f"{args.epochs} epochs of {N_TRAIN} images")  # fmt: skip
    print("| data path | samples/s (median) | / in memory | runs |")
    print("| --- | --- | --- | --- |")
    for v in variants:
        name = "in memory" if v is None else f"DataLoader, num_workers={v}"
        med = statistics.median(rates[v])
        runs = " ".join(f"{r:.0f}" for r in rates[v])
        print(f"| {name} | {med:.0f} | {med / memory:.3f} | {runs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
