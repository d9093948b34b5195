"""Time per model average: KAvgAverager against the floor and the alternatives.

P gloo processes on 127.0.0.1 (one thread each) average a model repeatedly. For every
(model, P) the methods are timed round-robin (one repetition of each in turn, so a burst of
load from elsewhere hits all of them alike; the order rotates every round), with a
``dist.barrier()`` before every timed repetition; the tables show rank 0's median (and
minimum) per method.

Methods:
  ours      ``KAvgAverager.average()``: one all_reduce(SUM) of the flat buffer that holds
            every parameter and floating buffer, then one in-place div_.
  floor     one all_reduce of a separate flat buffer of the same size + one in-place div_.
  allreduce the same all_reduce alone (no division), for reference.
  torch     ``PeriodicModelAverager(period=1).average_parameters(model.parameters())``
            on an ordinary (not flattened) copy of the model: parameters only, it
            concatenates them into a fresh buffer, divides, all-reduces and re-points them.
  per-tensor one all_reduce + one div_ per parameter tensor (parameters only).
  outer     ``KAvgAverager(..., outer_lr=0.7, outer_momentum=0.9, nesterov=True).average()``
            (DiLoCo's outer step): the flat buffer all-reduced in up to 8 asynchronous
            pieces, each piece's outer SGD step (on the flat anchor, block by block, and
            the copy back into the parameters) run while the later pieces travel. Its
            extra memory (anchor and outer momentum: two parameter-sized buffers) is
            printed as "outer MB".
  outer-serial the same arithmetic without the overlap: ours, then the whole outer step.

With ``--device cuda`` every process keeps its model and buffers on GPU 0 and gloo
all-reduces the CUDA tensors (through host memory: NCCL cannot put two ranks on one GPU),
with a ``torch.cuda.synchronize()`` before each clock is read; the outer step then runs at
the GPU's memory bandwidth.

With ``--payloads fp32,bf16,fp16,fp8,int8,int4`` it times compressed averages instead
(``KAvgAverager(model, 1, payload=...)``, kavg_ray.train.payload): each learner's change
since the last average (a fresh random one, made outside the clock, before every
repetition) quantized in blocks of 256 with a float32 scale, an all-to-all of the quantized
shards, a float32 sum, the mean requantized and gathered. The table gives each payload's
median ms against fp32's (the plain all-reduce) and the bytes a learner hands in per
average (``bytes_communicated`` / averages, the cost model's ``payload_bytes``).

Usage: python benchmarks/averaging.py [--reps 30] [--models resnet18,vgg16]
       [--world-sizes 2,4] [--device cpu|cuda] [--out FILE.json]
       [--payloads fp32,bf16,fp16,fp8,int8,int4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kavg_ray.train.averaging import KAvgAverager  # noqa: E402
from kavg_ray.train.models import build_model  # noqa: E402
from kavg_ray.train.payload import PAYLOADS  # noqa: E402

WARMUP = 3
METHODS = ("ours", "floor", "allreduce", "torch", "per-tensor", "outer", "outer-serial")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _methods(
    name: str, world: int, device: torch.device
) -> tuple[dict[str, Callable[[], None]], dict[str, int]]:
    """The averaging callables for one model, and the bytes each one all-reduces."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    def model() -> torch.nn.Module:
        return build_model(name, (3, 32, 32), 10).to(device)

    torch.manual_seed(0)  # every rank builds the same model, so averages are idempotent
    ours_model = model()
    averager = KAvgAverager(ours_model, period=1)
    flat_nbytes = averager.flat.nbytes

    torch.manual_seed(0)
    outer = KAvgAverager(model(), 1, outer_lr=0.7, outer_momentum=0.9, nesterov=True)
    outer.average()  # the first outer step allocates the momentum: the rest reuse it
    torch.manual_seed(0)
    serial = KAvgAverager(model(), 1, outer_lr=0.7, outer_momentum=0.9, nesterov=True)
    serial.average()

    def outer_serial() -> None:  # the averager's two steps before they were overlapped
        serial._reduce(None, world, serial.stats)
        serial._apply_outer()

    outer_extra = sum(t.numel() * t.element_size() for t in (outer.anchor, outer.outer_momentum))

    floor_buf = averager.flat.buffer.clone()
    plain_buf = torch.zeros_like(averager.flat.buffer)  # sums of zeros stay finite

    torch.manual_seed(0)
    ref_model = model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_avg = PeriodicModelAverager(period=1, warmup_steps=0)
    for p in ref_model.parameters():  # torch averages only parameters that have a gradient
        p.grad = torch.zeros_like(p)
    param_nbytes = sum(p.numel() * p.element_size() for p in ref_model.parameters())

    torch.manual_seed(0)
    tensor_model = model()
    tensors = [p.data for p in tensor_model.parameters()]

    def floor() -> None:
        dist.all_reduce(floor_buf, op=dist.ReduceOp.SUM)
        floor_buf.div_(world)

    def allreduce() -> None:
        dist.all_reduce(plain_buf, op=dist.ReduceOp.SUM)

    def torch_method() -> None:
        torch_avg.average_parameters(ref_model.parameters())

    def per_tensor() -> None:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(world)

    methods = {
        "ours": averager.average,
        "floor": floor,
        "allreduce": allreduce,
        "torch": torch_method,
        "per-tensor": per_tensor,
        "outer": outer.average,
        "outer-serial": outer_serial,
    }
    nbytes = {
        "ours": flat_nbytes,
        "floor": flat_nbytes,
        "allreduce": flat_nbytes,
        "torch": param_nbytes,
        "per-tensor": param_nbytes,
        "outer": flat_nbytes,
        "outer-serial": flat_nbytes,
        "outer_extra": outer_extra,
    }
    return methods, nbytes


def _worker(
    rank: int, world: int, port: int, models: list[str], reps: int, out_path: str, device: str
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for name in models:
        methods, nbytes = _methods(name, world, dev)
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for rep in range(WARMUP + reps):
            shift = rep % len(METHODS)  # rotate the order: no method always runs first
            for method in METHODS[shift:] + METHODS[:shift]:
                dist.barrier()
                t0 = time.perf_counter()
                methods[method]()
                if cuda:
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
                if rep >= WARMUP:
                    times[method].append(elapsed)
        results.append(
            {
                "model": name,
                "P": world,
                "device": device,
                "median_ms": {m: 1000 * statistics.median(times[m]) for m in METHODS},
                "min_ms": {m: 1000 * min(times[m]) for m in METHODS},
                "nbytes": nbytes,
            }
        )
        del methods
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.barrier()  # leave together: gloo aborts a peer whose connections vanish
    dist.destroy_process_group()


def _payload_times(
    name: str, world: int, reps: int, payloads: list[str], dev: torch.device
) -> dict:
    """Rank's median and minimum ms, and bytes per average, of each payload's average."""
    averagers = {}
    for p in payloads:
        torch.manual_seed(0)
        averagers[p] = KAvgAverager(build_model(name, (3, 32, 32), 10).to(dev), 1, payload=p)
    noise = torch.Generator(device=dev).manual_seed(dist.get_rank())
    times: dict[str, list[float]] = {p: [] for p in payloads}
    for rep in range(WARMUP + reps):
        shift = rep % len(payloads)
        for p in payloads[shift:] + payloads[:shift]:
            buf = averagers[p].flat.buffer  # a learner's change since the last average
            buf.add_(torch.randn(buf.numel(), generator=noise, device=dev), alpha=1e-3)
            dist.barrier()
            t0 = time.perf_counter()
            averagers[p].average()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if rep >= WARMUP:
                times[p].append(time.perf_counter() - t0)
    return {
        "model": name, "P": world, "device": str(dev),
        "elements": averagers[payloads[0]].flat.buffer.numel(),
        "median_ms": {p: 1000 * statistics.median(times[p]) for p in payloads},
        "min_ms": {p: 1000 * min(times[p]) for p in payloads},
        "bytes": {p: averagers[p].stats.bytes // averagers[p].stats.count for p in payloads},
    }  # fmt: skip


def _payload_worker(
    rank: int, world: int, port: int, models: list[str], reps: int, out_path: str, device: str,
    payloads: list[str],
) -> None:  # fmt: skip
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = [_payload_times(name, world, reps, payloads, torch.device(device)) for name in models]
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def run(
    models: list[str], world_sizes: list[int], reps: int, device: str = "cpu",
    payloads: list[str] | None = None,
) -> list[dict]:  # fmt: skip
    """The rows of every (model, P): the methods' times, or with ``payloads`` theirs."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in world_sizes:
            out = os.path.join(tmp, f"P{world}.json")
            worker, extra = (_worker, ()) if payloads is None else (_payload_worker, (payloads,))
            mp.spawn(
                worker,
                args=(world, _free_port(), models, reps, out, device, *extra),
                nprocs=world,
                join=True,
            )
            rows += json.loads(Path(out).read_text())
    return rows


def format_payload_table(rows: list[dict], stat: str = "median_ms") -> str:
    """One line per (model, P, payload): ms, its ratio to fp32's, bytes and their ratio."""
    lines = ["| model | P | payload | ms | x fp32 | MB per average | x fp32 bytes |",
             "|" + " --- |" * 7]  # fmt: skip
    for r in rows:
        ms, nbytes = r[stat], r["bytes"]
        base_ms, base_bytes = ms.get("fp32"), nbytes.get("fp32")
        for p in ms:
            ratio = f"{ms[p] / base_ms:.2f}" if base_ms else "-"
            bratio = f"{nbytes[p] / base_bytes:.3f}" if base_bytes else "-"
            lines.append(f"| {r['model']} | {r['P']} | {p} | {ms[p]:.1f} | {ratio} "
                         f"| {nbytes[p] / 1e6:.3f} | {bratio} |")  # fmt: skip
    return "\n".join(lines)


def format_table(rows: list[dict], stat: str = "median_ms") -> str:
    head = (
        "| model | P | MB ours | MB torch | ours | floor | allreduce | torch | per-tensor "
        "| outer | outer-serial | ours/floor | ours/torch | outer/ours | serial/ours | outer MB |"
    )
    lines = [head, "|" + " --- |" * 16]
    for r in rows:
        ms = r[stat]
        lines.append(
            f"| {r['model']} | {r['P']} | {r['nbytes']['ours'] / 1e6:.3f} "
            f"| {r['nbytes']['torch'] / 1e6:.3f} | "
            + " | ".join(f"{ms[m]:.1f}" for m in METHODS)
            + f" | {ms['ours'] / ms['floor']:.2f} | {ms['ours'] / ms['torch']:.2f}"
            + f" | {ms['outer'] / ms['ours']:.2f} | {ms['outer-serial'] / ms['ours']:.2f}"
            + f" | {r['nbytes']['outer_extra'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per method")
    parser.add_argument("--models", default="resnet18,vgg16", help="comma-separated models")
    parser.add_argument("--world-sizes", default="2,4", help="comma-separated values of P")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="tensors on")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--payloads", default=None,
                        help="time compressed averages of these payloads instead "
                        "(comma-separated: fp32,bf16,fp16,fp8,int8,int4)")  # fmt: skip
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    worlds = [int(p) for p in args.world_sizes.split(",") if p]
    if args.reps < 1 or not models or any(p < 2 for p in worlds):
        parser.error("need --reps >= 1, at least one model, and world sizes >= 2")
    payloads = None if args.payloads is None else [p for p in args.payloads.split(",") if p]
    if payloads is not None and (not payloads or set(payloads) - set(PAYLOADS)):
        parser.error(f"--payloads: a comma-separated list of {', '.join(PAYLOADS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    gpu = f", {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""

    print(
        f"# averaging: gloo on 127.0.0.1, tensors on {args.device}{gpu}, 1 thread per "
        f"process, {WARMUP} warm-up + "
        f"{args.reps} timed reps per method (rotating round-robin, barrier before each), "
        f"rank 0's times"
    )
    print(
        f"# torch {torch.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}"
    )
    start = time.perf_counter()
    rows = run(models, worlds, args.reps, args.device, payloads)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    if payloads is not None:
        print("## median ms per average, by payload")
        print(format_payload_table(rows, "median_ms"))
        print("## best (minimum) ms per average")
        print(format_payload_table(rows, "min_ms"))
        print(f"# total {time.perf_counter() - start:.0f} s, load average at end "
              f"{os.getloadavg()[0]:.2f}")  # fmt: skip
        return 0
    print("## median ms per average")
    print(format_table(rows, "median_ms"))
    print("## best (minimum) ms per average, for reference on a shared machine")
    print(format_table(rows, "min_ms"))
    print(
        "# ours/floor/allreduce move every parameter + floating buffer (BatchNorm running "
        "mean/var) in one flat buffer (MB ours);\n"
        "# torch (PeriodicModelAverager) and per-tensor move parameters only (MB torch)."
    )
    print(
        f"# total {time.perf_counter() - start:.0f} s, load average at end {os.getloadavg()[0]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
