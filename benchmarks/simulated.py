"""Throughput of the simulated backend beside P real gloo processes running the same loop.

``simulated``: the stacked engine (``kavg_ray.train.stacked``, via ``kavg_ray.train.train``):
all P learners stacked in this process
(``--sim-threads`` intra-op threads each run; default 1 and 2).
``gloo``: P spawned processes joined by a gloo group on 127.0.0.1, each calling
the process-group engine (``kavg_ray.train.train``) with one thread (as
``tests/distributed.py`` does).

Both run the same config (K-AVG, K = 4, batch 16 per learner, the same epochs, seeds and
mini-batches). samples/s is ``samples / wall_time_s`` of the last report: the training loop
with its averages and the per-epoch evaluations, without process start, imports, data
loading and model building. ``gloo e2e`` is the whole gloo run from spawn to join, start-up
included. A gloo run that does not finish within ``--real-timeout`` seconds (spawn to join)
is stopped and shown as such.

Usage: python benchmarks/simulated.py [--P 8,32] [--workloads digits-mlp,digits-cnn]
       [--sim-threads 1,2] [--real-timeout 120]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kavg_ray.config import RunConfig  # noqa: E402
from kavg_ray.train import train  # noqa: E402

K = 4
BATCH = 16
LR = 0.05
SEED = 0
WORKLOADS = {"digits-mlp": ("digits", "mlp"), "digits-cnn": ("digits", "cnn")}
EPOCHS = {8: 6, 32: 12}  # P=32 takes 2 steps per epoch on digits with batch 16


def make_config(workload: str, P: int) -> RunConfig:
    dataset, model = WORKLOADS[workload]
    doc = {
        "name": "bench",
        "workload": {
            "dataset": dataset,
            "model": model,
            "epochs": EPOCHS.get(P, 6),
            "batch_size": BATCH,
            "lr": {"initial": LR},
        },
        "K": K,
        "P": P,
        "seed": SEED,
    }
    return RunConfig.model_validate(doc)


def run_sim(cfg: RunConfig, threads: int) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return train(cfg.model_copy(update={"backend": "simulated"}), lambda m, s: None)
    finally:
        torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, port: int, doc: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    metrics = train(
        RunConfig.model_validate(doc), lambda m, s: None, rank=rank, world_size=world
    )
    if rank == 0:
        Path(out).write_text(json.dumps(metrics))
    dist.barrier()
    dist.destroy_process_group()


def run_real(cfg: RunConfig, timeout: float) -> tuple[dict | None, float]:
    """(rank 0's last metrics or None when stopped at the timeout, seconds spawn to join)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "metrics.json")
        start = time.perf_counter()
        ctx = mp.start_processes(
            _rank_entry,
            args=(cfg.P, _free_port(), cfg.model_dump(mode="json"), out),
            nprocs=cfg.P,
            join=False,
            start_method="spawn",
        )
        deadline = start + timeout
        finished = False
        while time.perf_counter() < deadline:
            if ctx.join(timeout=1.0):
                finished = True
                break
        elapsed = time.perf_counter() - start
        if not finished:
            for proc in ctx.processes:  # only the processes this run started
                if proc.is_alive():
                    proc.terminate()
            for proc in ctx.processes:
                proc.join()
            return None, elapsed
        return json.loads(Path(out).read_text()), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--P", default="8,32")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--sim-threads", default="1,2")
    parser.add_argument("--real-timeout", type=float, default=120.0)
    args = parser.parse_args()
    ps = [int(p) for p in args.P.split(",")]
    workloads = args.workloads.split(",")
    sim_threads = [int(t) for t in args.sim_threads.split(",")]

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, load average at start {os.getloadavg()[0]:.1f}"
    )
    rows = []
    for workload in workloads:
        for P in ps:
            cfg = make_config(workload, P)
            run_sim(make_config(workload, P).model_copy(), sim_threads[0])  # warm-up
            sims = {t: run_sim(cfg, t) for t in sim_threads}
            real, elapsed = run_real(cfg, args.real_timeout)
            for t, m in sims.items():
                sim_rate = m["samples"] / m["wall_time_s"]
                if real is None:
                    real_rate = ratio = None
                else:
                    real_rate = real["samples"] / real["wall_time_s"]
                    ratio = sim_rate / real_rate
                rows.append((workload, P, cfg.workload.epochs, m["samples"], t, sim_rate,
                             real_rate, ratio, elapsed, real is None,
                             m["test_acc"], real["test_acc"] if real else None))  # fmt: skip
            print(f"# done {workload} P={P}", file=sys.stderr, flush=True)

    print(
        "| workload | P | epochs | samples | simulated threads | simulated samples/s "
        "| gloo P procs samples/s | simulated / gloo | gloo e2e s | test_acc sim / gloo |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for wl, P, ep, n, t, sim_rate, real_rate, ratio, elapsed, stopped, acc_s, acc_r in rows:
        real_txt = f"{real_rate:,.0f}" if real_rate else "-"
        ratio_txt = f"{ratio:.1f}x" if ratio else "-"
        e2e = f"> {elapsed:.0f} (stopped)" if stopped else f"{elapsed:.1f}"
        acc = f"{acc_s:.3f} / {acc_r:.3f}" if acc_r is not None else f"{acc_s:.3f} / -"
        print(
            f"| {wl} | {P} | {ep} | {n} | {t} | {sim_rate:,.0f} | {real_txt} | {ratio_txt} "
            f"| {e2e} | {acc} |"
        )
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
