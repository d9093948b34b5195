"""Fixed per-trial overhead of a kavg trial beside a trivial TorchTrainer.fit().

All run in one Ray session, in turn, P workers each:
- trivial: a TorchTrainer whose workers report one empty metric and return;
- kavg: `kavg_ray.launch.ray_train.make_trainer` for one epoch of digits/mlp, whose one report
  carries the learners' checkpoint; its overhead is the fit's wall time minus the time
  the worker loop itself measured (training, averaging and evaluation of that epoch);
- kavg, no checkpoint: the same with `failure.checkpoint_every_epochs: 0`, which splits
  the checkpoint's cost from the rest of the start-up (Train V2 returns no metrics
  without a checkpoint, so the worker loop time of the kavg fit of the same repetition
  is subtracted).

    python benchmarks/sweep.py [--reps 3] [--P 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import ray
import ray.train
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

from kavg_ray.config import RunConfig
from kavg_ray.launch.ray_train import make_trainer
from kavg_ray.launch.sweep import connect


def _trivial_loop(config: dict) -> None:
    ray.train.report({"epoch": 1})


def trivial_fit(P: int, storage: str, name: str) -> float:
    trainer = TorchTrainer(
        _trivial_loop,
        scaling_config=ScalingConfig(num_workers=P, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage),
    )
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def kavg_fit(P: int, storage: str, name: str, checkpoint: bool = True) -> tuple[float, float]:
    cfg = RunConfig.model_validate(
        {
            "workload": {"dataset": "digits", "model": "mlp", "epochs": 1, "batch_size": 16},
            "K": 4,
            "P": P,
            "resources": {"cpus_per_worker": 0.5},
            "failure": {"checkpoint_every_epochs": 1 if checkpoint else 0},
        }
    )
    trainer = make_trainer(cfg, storage, name)
    start = time.perf_counter()
    result = trainer.fit()
    total = time.perf_counter() - start
    # Train V2 keeps metrics only beside checkpoints: without one, Result.metrics is None.
    return total, (result.metrics or {}).get("wall_time_s", math.nan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--P", type=int, default=2)
    args = parser.parse_args()
    connect(None)
    trivial, kavg, bare, loop = [], [], [], []
    with tempfile.TemporaryDirectory() as storage:
        trivial_fit(args.P, storage, "warmup")  # first fit pays for worker imports
        for i in range(args.reps):
            trivial.append(trivial_fit(args.P, storage, f"trivial-{i}"))
            total, inner = kavg_fit(args.P, storage, f"kavg-{i}")
            kavg.append(total - inner)
            loop.append(inner)
            total_bare, _ = kavg_fit(args.P, storage, f"bare-{i}", checkpoint=False)
            bare.append(total_bare - inner)  # the same epoch of work as the kavg fit
            print(
                f"rep {i}: trivial fit {trivial[-1]:.2f}s  kavg fit {total:.2f}s "
                f"(worker loop {inner:.2f}s, overhead {kavg[-1]:.2f}s)  "
                f"no-checkpoint overhead {bare[-1]:.2f}s",
                flush=True,
            )
    t, k, b = (statistics.median(x) for x in (trivial, kavg, bare))
    print(f"\nP={args.P}, median of {args.reps}:")
    print(f"{'trivial TorchTrainer.fit()':34s} {t:7.2f} s")
    print(f"{'kavg trial overhead':34s} {k:7.2f} s   (worker loop {statistics.median(loop):.2f} s)")
    print(f"{'kavg overhead, no checkpoint':34s} {b:7.2f} s")
    print(f"{'ratio kavg / trivial':34s} {k / t:7.2f}   (target <= 1.25)")
    print(f"{'ratio no-checkpoint / trivial':34s} {b / t:7.2f}")


if __name__ == "__main__":
    main()
