"""Small all-reduces after a pause: does what precedes an average change what it costs?

P spawned gloo processes on 127.0.0.1 (one thread each) time one average (all_reduce(SUM)
+ div_) of an mlp-sized buffer (38,440 B, the digits mlp) after an untimed barrier, with
one of these before the barrier, interleaved repetition by repetition:

  none      nothing: back-to-back averages, as ``kavg calibrate`` times them
  step      one SGD step of the mlp (batch 16): an average of K-AVG at K = 1
  steps4    four SGD steps: K = 4
  sleep1ms  time.sleep(0.001): the process idles
  busy1ms   1 ms of small matrix products: the core stays busy

Prints rank 0's median, 10th and 90th percentiles and mean per mode: a run's
communication time is the sum of its averages, so the mean is what adds up.

Usage: python benchmarks/latency_gap.py [--P 2,4] [--reps 300]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kavg_ray.train.models import build_model  # noqa: E402

MODES = ("none", "step", "steps4", "sleep1ms", "busy1ms")


def _worker(rank: int, world: int, port: int, reps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net = build_model("mlp", (1, 8, 8), 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    buf = torch.ones(38440 // 4)
    a = torch.randn(64, 64)

    def sgd(n: int) -> None:
        for _ in range(n):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def busy() -> None:
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            a @ a

    before = {"none": lambda: None, "step": lambda: sgd(1), "steps4": lambda: sgd(4),
              "sleep1ms": lambda: time.sleep(0.001), "busy1ms": busy}  # fmt: skip
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(reps + 5):
        for mode in MODES:
            before[mode]()
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            buf.div_(world)
            if rep >= 5:
                times[mode].append(time.perf_counter() - t0)
    if rank == 0:
        for mode, t in times.items():
            t.sort()
            print(f"P={world} {mode:9s} median {statistics.median(t) * 1e3:7.3f} ms   "
                  f"p10 {t[len(t) // 10] * 1e3:7.3f} ms   p90 {t[len(t) * 9 // 10] * 1e3:7.3f} ms"
                  f"   mean {statistics.fmean(t) * 1e3:7.3f} ms", flush=True)  # fmt: skip
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--P", default="2,4")
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    print(
        f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}"
    )
    for world in (int(p) for p in args.P.split(",")):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.spawn(_worker, args=(world, port, args.reps), nprocs=world)
        except mp.ProcessExitedException:
            pass  # ranks leave with os._exit after the last barrier


if __name__ == "__main__":
    main()
