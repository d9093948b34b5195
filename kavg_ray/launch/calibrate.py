"""`kavg calibrate`: time averages over N Ray Train workers and fit a network profile.

The workers are a Ray Train ``TorchTrainer`` with N workers, the backend a training run
would use (gloo on CPU, NCCL on GPU). Every worker times the operation K-AVG's averager
performs for one average (kavg_ray.train.averaging: one all-reduce of a flat float32 buffer,
plus one in-place division by N on gloo, which has no average operation) for each size,
after a warm-up, at least ``repeats`` times and, for small sizes, as often as fits in
about half a second (the same count on every worker). Before each timed average the
workers meet at a barrier or, with a gap (``--gap-ms``), compute for that long, as
learners average after their local steps.

A repeat's time is the shortest worker's: every worker leaves the all-reduce at about the
same moment, so the shortest time runs from the moment the last one arrived: the
transfer alone, estimated as a trial's transfer is (its ``comm_time_s`` less
``wait_time_s``, see kavg_ray.train.timing.CommStats). A size's time is the mean repeat: a
run's communication time is the sum of its averages, and small all-reduces have a long
tail that a median hides (2-core machine, 38 kB: median 1.0 ms, mean 1.9 ms,
benchmarks/latency_gap.py). The driver fits alpha and beta of the ring all-reduce cost
(kavg_ray.analysis.costmodel.fit_alpha_beta) to those times over every N given, and writes the
profile ``--network FILE`` reads.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from kavg_ray.analysis.costmodel import Fit, Link, Network, fit_alpha_beta, write_profile
from kavg_ray.errors import BadInputError, KavgError

DEFAULT_SIZES = "4k,64k,1M,8M,32M"
MAX_REPEATS = 1000  # timed averages per size at most
# Computation before each timed average: an all-reduce right after local steps costs more
# than one back to back (2-core machine, 4 kB at P = 2: about 1.0 ms back to back, 1.5 ms
# after 2 ms, 2.6 ms after 20 ms); 2 ms predicted Ray trials best there
# (benchmarks/costmodel_ray/validation.txt).
DEFAULT_GAP_S = 0.002
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_sizes(text: str) -> list[int]:
    """Byte sizes from ``4k,64k,1M`` (decimal k, M, G; an optional trailing B), each a
    positive multiple of 4 bytes after rounding (float32 elements), sorted, unique."""
    sizes: set[int] = set()
    for part in (text or "").split(","):
        m = _SIZE_RE.match(part)
        if not m:
            raise BadInputError(f"bad size {part.strip()!r} in --sizes: use e.g. 4k,64k,1M,32M")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()]) // 4 * 4
        if not 4 <= n <= 4 * 10**9:
            raise BadInputError(f"size {part.strip()!r} in --sizes must be 4 B to 4 GB")
        sizes.add(n)
    if len(sizes) < 2:
        raise BadInputError("--sizes needs at least two different sizes to fit alpha and beta")
    return sorted(sizes)


def _compute_for(seconds: float, work: Any) -> None:
    """Keep this rank busy with matrix products of ``work`` for ``seconds`` (a learner's
    local steps before its average)."""
    import time

    import torch

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        work @ work
        if work.is_cuda:
            torch.cuda.synchronize(work.device)


def _timed_average(buf: Any, gap_s: float, work: Any) -> float:
    """Seconds of one average of ``buf`` (what K-AVG's averager does), after ``gap_s`` of
    computation or, with no gap, a barrier."""
    import time

    import torch
    import torch.distributed as dist

    if gap_s > 0:
        _compute_for(gap_s, work)
    else:
        dist.barrier()
    start = time.perf_counter()
    if dist.get_backend() == dist.Backend.NCCL:
        dist.all_reduce(buf, op=dist.ReduceOp.AVG)
        torch.cuda.synchronize(buf.device)
    else:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        buf.div_(dist.get_world_size())
    return time.perf_counter() - start


def time_averages(
    sizes: Sequence[int],
    repeats: int,
    warmup: int = 2,
    min_seconds: float = 0.5,
    gap_s: float = 0.0,
) -> list[float]:
    """Mean seconds of one average of each size over the default process group.

    Call on every rank of an initialised torch.distributed group; every rank returns
    the same list (per repeat, the shortest rank's time: the transfer after the last
    rank arrived). A size is timed ``max(repeats, min_seconds / warm-up time)`` times
    (at most ``MAX_REPEATS``), the count agreed by all ranks. ``gap_s`` > 0: before each
    timed average every rank computes (matrix products) for that long instead of meeting
    at a barrier, as a learner averages after its local steps.
    """
    import math

    import torch
    import torch.distributed as dist

    nccl = dist.get_backend() == dist.Backend.NCCL
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    work = torch.ones(64, 64, device=device)
    means = []
    for n in sizes:
        buf = torch.ones(n // 4, dtype=torch.float32, device=device)
        warm = max(_timed_average(buf, gap_s, work) for _ in range(max(1, warmup)))
        count = torch.tensor(
            [min(MAX_REPEATS, max(repeats, math.ceil(min_seconds / max(warm + gap_s, 1e-6))))],
            dtype=torch.float64, device=device,
        )  # fmt: skip
        dist.all_reduce(count, op=dist.ReduceOp.MAX)  # every rank runs as many
        times = torch.tensor([_timed_average(buf, gap_s, work) for _ in range(int(count.item()))],
                             dtype=torch.float64, device=device)  # fmt: skip
        dist.all_reduce(times, op=dist.ReduceOp.MIN)
        means.append(float(times.mean()))
    return means


def _worker_loop(config: dict) -> None:
    """Ray Train worker: time the averages; rank 0 hands them to the driver's collector."""
    import ray
    import ray.train
    import torch

    torch.set_num_threads(max(1, int(config["threads"])))
    times = time_averages(config["sizes"], config["repeats"], gap_s=config["gap_s"])
    if ray.train.get_context().get_world_rank() == 0:
        ray.get(config["collector"].put.remote(times))


def _measure(
    P: int, sizes: list[int], repeats: int, use_gpu: bool, cpus: float, gap_s: float
) -> list[float]:
    """Times of one average per size over ``P`` Ray Train workers (one TorchTrainer run)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kavg_ray.launch.torch_backend import KavgTorchConfig

    @ray.remote(num_cpus=0)
    class Collector:
        def __init__(self) -> None:
            self.times: list[float] | None = None

        def put(self, times: list[float]) -> None:
            self.times = times

        def get(self) -> list[float] | None:
            return self.times

    collector = Collector.remote()
    per_worker = {"CPU": cpus, **({"GPU": 1.0} if use_gpu else {})}
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="kavg-calibrate-") as storage:
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={
                "sizes": sizes,
                "repeats": repeats,
                "gap_s": gap_s,
                "collector": collector,
                "threads": cpus,
            },  # fmt: skip
            torch_config=KavgTorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=P, use_gpu=use_gpu, resources_per_worker=per_worker
            ),
            run_config=RunConfig(name=f"calibrate-P{P}-{stamp}", storage_path=storage),
        )
        trainer.fit()
    times = ray.get(collector.get.remote())
    if times is None:
        raise KavgError(f"calibration over P={P} workers ended without timings")
    return times


def calibrate(
    P_values: Sequence[int],
    sizes: Sequence[int],
    *,
    address: str | None = None,
    repeats: int = 10,
    use_gpu: bool = False,
    cpus_per_worker: float | None = None,
    gap_s: float = DEFAULT_GAP_S,
    echo: Callable[[str], Any] = print,
) -> tuple[Fit, dict[str, Any]]:
    """Time averages over each P in ``P_values`` and fit alpha and beta; (fit, details).
    ``gap_s``: computation before each timed average (see :func:`time_averages`)."""
    import ray

    from kavg_ray.launch.sweep import connect  # loopback-only local Ray, as sweeps start

    connected_here = connect(address)  # True: this call started or joined Ray
    samples: list[tuple[int, float, float]] = []
    try:
        total_cpu = float(ray.cluster_resources().get("CPU", 1.0))
        for P in P_values:
            cpus = cpus_per_worker or min(1.0, total_cpu / P)
            echo(f"[kavg] calibrate: P={P}, {len(sizes)} sizes x {repeats} repeats, "
                 f"{'nccl' if use_gpu else 'gloo'}, {cpus:g} CPU per worker")  # fmt: skip
            times = _measure(P, list(sizes), repeats, use_gpu, cpus, gap_s)
            samples += [(P, float(n), t) for n, t in zip(sizes, times, strict=True)]
    except KavgError:
        raise
    except Exception as exc:
        raise KavgError(f"calibration failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if connected_here:
            ray.shutdown()
    where = address or "local (127.0.0.1)"
    backend = "nccl" if use_gpu else "gloo"
    details = calibration_details(where, backend, P_values, repeats, samples, gap_s)
    return fit_alpha_beta(samples), details


def calibration_details(
    where: str,
    backend: str,
    P_values: Sequence[int],
    repeats: int,
    samples: Sequence[tuple[int, float, float]],
    gap_s: float = 0.0,
) -> dict[str, Any]:
    """What a profile records of its calibration: where and how, and the raw timings."""
    return {
        "address": where,
        "backend": backend,
        "P": list(P_values),
        "repeats": repeats,
        "gap_s": gap_s,
        "measurements": [{"P": p, "nbytes": int(n), "seconds": t} for p, n, t in samples],
    }


def profile_of(fit: Fit, details: dict[str, Any], name: str) -> Network:
    """The network profile of a calibration (fit, its residuals and the raw timings)."""
    created = _dt.datetime.now(tz=_dt.timezone.utc).isoformat(timespec="seconds")
    extra = {"calibration": {**details, "created": created, "rms_rel_error": fit.rms_rel_error}}
    source = f"kavg calibrate, {details['backend']} over P={details['P']}, {details['address']}"
    return Network(name, Link(fit.alpha, fit.beta), None, source, extra)


def format_fit(fit: Fit) -> str:
    """The fit and its residuals, as lines of text."""
    lines = [
        f"alpha = {fit.alpha * 1e6:.4g} us   beta = {fit.beta / 1e9:.4g} GB/s   "
        f"rms relative residual = {fit.rms_rel_error:.3f}",
        f"{'P':>3} {'bytes':>12} {'measured s':>12} {'fit s':>12} {'residual':>9}",
    ]
    for r in fit.residuals.to_dict("records"):
        lines.append(
            f"{r['P']:>3} {int(r['nbytes']):>12,} {r['measured_s']:>12.6f} "
            f"{r['predicted_s']:>12.6f} {r['rel_error']:>+9.1%}"
        )
    return "\n".join(lines)


def write_calibration(path: str, fit: Fit, details: dict[str, Any], name: str | None) -> str:
    """Write the profile file of a calibration; its path."""
    stem = os.path.splitext(os.path.basename(path))[0] or "calibrated"
    return str(write_profile(path, profile_of(fit, details, name or stem)))
