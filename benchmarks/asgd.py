"""Parameter-server throughput and staleness against the number of concurrent pushers.

The :class:`kavg_ray.train.parameter_server.ParameterServer` runs as a real Ray actor, created as
:func:`kavg_ray.launch.ray_train.start_server` creates it (``num_cpus=0``, one method at a
time), holding
the flat float32 model (parameters + floating buffers) of ``build_model``:

  mlp       digits-sized: input (1, 8, 8), 10 classes (9,610 values, 38 KB)
  resnet18  CIFAR-sized: input (3, 32, 32), 10 classes (11.2M values, 44.7 MB)

P pusher actors (one Ray worker process each) run the Downpour learner's server traffic
without the training: ``pull()`` -> optional simulated compute (``--compute-ms``, a sleep;
default none) -> ``push(update, pulled_version)`` with a float32 update of the model's size
(one fixed small random array per pusher, serialized by Ray on every call as the learner's
fresh accumulator is), repeated until a shared deadline (a fixed time window per point, all
pushers starting at the same instant). Before each window every pusher does one untimed
pull + push (warm-up); then the server's staleness window is reset with ``stats(reset=True)``
and read back with ``stats()`` when all pushers have returned.

Per (model, P): updates applied in the window (the server's ``applied`` count), wall time
(start instant to the last pusher's return: pushes still in flight at the deadline finish),
applied updates/s, MB/s through the server (pulled + pushed bytes over that wall time), the
mean and max staleness from the server's own statistics, and the mean round-trip time of one
pull and of one push as a pusher sees it (``ray.get`` of the actor call).

The pushers are Ray actors with ``num_cpus=1`` on a local Ray started with
``ray.init(num_cpus=max P)``: these are *logical* CPUs; on a 2-core machine P = 4 and 8 are
oversubscribed (P + 1 busy processes plus the raylet and object store on 2 cores).

Usage: python benchmarks/asgd.py [--models mlp,resnet18] [--pushers 1,2,4,8]
       [--window-mlp 6] [--window-resnet18 10] [--compute-ms 0]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kavg_ray.train.averaging import FlatModel  # noqa: E402
from kavg_ray.train.models import build_model  # noqa: E402
from kavg_ray.train.parameter_server import ParameterServer  # noqa: E402

SEED = 0
MODELS = {"mlp": (1, 8, 8), "resnet18": (3, 32, 32)}
NUM_CLASSES = 10
START_DELAY_S = 1.0  # the shared start instant lies this far after the driver's launch


def initial_params(model: str) -> np.ndarray:
    torch.manual_seed(SEED)
    net = build_model(model, MODELS[model], NUM_CLASSES)
    return FlatModel(net).buffer.detach().numpy().copy()


class Pusher:
    """One simulated Downpour learner: pull -> (compute) -> push, until the deadline."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.update: np.ndarray | None = None

    def set_size(self, n: int) -> int:
        rng = np.random.default_rng(1000 + self.rank)
        self.update = (rng.standard_normal(n) * 1e-6).astype(np.float32)
        return n

    def run(
        self,
        server: Any,
        t_start: float,
        deadline: float,
        compute_s: float,
        max_pushes: int | None = None,
    ) -> dict[str, float]:
        assert self.update is not None
        delay = t_start - time.time()
        if delay > 0:
            time.sleep(delay)
        pushes = 0
        pull_s = push_s = 0.0
        while time.time() < deadline and (max_pushes is None or pushes < max_pushes):
            t0 = time.perf_counter()
            version, params = ray.get(server.pull.remote())
            t1 = time.perf_counter()
            del params
            if compute_s:
                time.sleep(compute_s)
            t2 = time.perf_counter()
            ray.get(server.push.remote(self.update, version))
            t3 = time.perf_counter()
            pull_s += t1 - t0
            push_s += t3 - t2
            pushes += 1
        return {
            "pushes": pushes, "pull_s": pull_s, "push_s": push_s, "end": time.time(),
        }  # fmt: skip


def measure(
    server: Any, pushers: list[Any], window_s: float, compute_s: float, nbytes: int
) -> dict[str, float]:
    # Warm-up: one untimed round trip per pusher, then a fresh staleness window.
    far = time.time() + 3600.0
    ray.get([p.run.remote(server, 0.0, far, compute_s, 1) for p in pushers])
    before = ray.get(server.stats.remote(reset=True))
    t_start = time.time() + START_DELAY_S
    deadline = t_start + window_s
    outs = ray.get([p.run.remote(server, t_start, deadline, compute_s) for p in pushers])
    after = ray.get(server.stats.remote())
    wall = max(o["end"] for o in outs) - t_start
    applied = after["applied"] - before["applied"]
    pushes = sum(o["pushes"] for o in outs)
    if applied != pushes or after["window_updates"] != applied:
        raise RuntimeError(f"server applied {applied}, pushers pushed {pushes}")
    moved = 2 * pushes * nbytes  # one pull and one push of the model per update
    return {
        "applied": applied,
        "wall": wall,
        "rate": applied / wall,
        "mbps": moved / wall / 1e6,
        "stale_mean": after["staleness_mean"],
        "stale_max": after["staleness_max"],
        "pull_ms": 1e3 * sum(o["pull_s"] for o in outs) / max(pushes, 1),
        "push_ms": 1e3 * sum(o["push_s"] for o in outs) / max(pushes, 1),
        "min_share": min(o["pushes"] for o in outs) / max(pushes / len(outs), 1e-9),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,resnet18")
    ap.add_argument("--pushers", default="1,2,4,8")
    ap.add_argument("--window-mlp", type=float, default=6.0, help="seconds per mlp point")
    ap.add_argument("--window-resnet18", type=float, default=10.0, help="seconds per point")
    ap.add_argument("--compute-ms", type=float, default=0.0, help="sleep between pull and push")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    ps = [int(p) for p in args.pushers.split(",") if p]
    windows = {"mlp": args.window_mlp, "resnet18": args.window_resnet18}
    compute_s = args.compute_ms / 1e3
    ncpu = os.cpu_count() or 1

    t_all = time.perf_counter()
    load0 = os.getloadavg()[0]
    compute = f"sleep {args.compute_ms:g} ms" if compute_s else "no compute"
    print(
        "# asgd: ParameterServer as a Ray actor (num_cpus=0, one call at a time); P pusher actors"
        f" loop pull -> {compute} -> push of a float32 update of the model's size, until a"
        " shared deadline"
    )
    print(
        f"# torch {torch.__version__}, ray {ray.__version__}, python {platform.python_version()},"
        f" {ncpu} CPUs, load average at start {load0:.2f}"
    )
    t0 = time.perf_counter()
    ray.init(
        address="local", num_cpus=max(ps), include_dashboard=False,
        logging_level=logging.WARNING, log_to_driver=True,
    )  # fmt: skip
    pusher_cls = ray.remote(Pusher).options(num_cpus=1)
    pushers = [pusher_cls.remote(r) for r in range(max(ps))]
    server_cls = ray.remote(ParameterServer).options(num_cpus=0, scheduling_strategy="DEFAULT")
    rows = []
    setup_s = 0.0
    try:
        for model in models:
            params = initial_params(model)
            nbytes = params.nbytes
            server = server_cls.remote(params)
            n = ray.get(server.size.remote())
            ray.get([p.set_size.remote(n) for p in pushers])
            if not setup_s:
                setup_s = time.perf_counter() - t0
            for p in ps:
                r = measure(server, pushers[:p], windows[model], compute_s, nbytes)
                rows.append((model, nbytes, p, r))
                print(
                    f"#   {model} P={p}: {r['applied']} updates in {r['wall']:.2f} s,"
                    f" load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
            ray.kill(server)
    finally:
        ray.shutdown()

    print(f"# setup (ray.init + {max(ps)} pusher actors + first server) {setup_s:.1f} s")
    print(
        "| model | MB/update | P | window s | updates applied | wall s | updates/s | MB/s in+out"
        " | staleness mean | staleness max | pull ms | push ms | min share |"
    )
    print("| --- " * 13 + "|")
    for model, nbytes, p, r in rows:
        print(
            f"| {model} | {nbytes / 1e6:.3f} | {p} | {windows[model]:g} | {r['applied']}"
            f" | {r['wall']:.2f} | {r['rate']:.1f} | {r['mbps']:.1f}"
            f" | {r['stale_mean']:.2f} | {r['stale_max']:.0f}"
            f" | {r['pull_ms']:.2f} | {r['push_ms']:.2f} | {r['min_share']:.2f} |"
        )
    print(
        "# updates/s = server-applied updates / wall (shared start to last pusher's return);"
        " MB/s in+out = (pulled + pushed bytes) / wall"
    )
    print(
        "# staleness = server version at apply - version the pusher pulled (server's stats);"
        " pull/push ms = mean round trip per call seen by a pusher;"
        " min share = fewest pushes of one pusher / mean per pusher"
    )
    print(
        f"# pushers use logical CPUs (ray.init(num_cpus={max(ps)})): with {ncpu} physical cores,"
        f" P > {max(ncpu - 1, 1)} is oversubscribed (P pushers + server + raylet share {ncpu}"
        " cores)"
    )
    print(
        f"# total {time.perf_counter() - t_all:.0f} s, load average at end {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
