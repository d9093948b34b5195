"""The packed simulated backend on one device: samples/s, peak memory, the ceiling.

For each model (vgg16, resnet18) and P (8, 32, 128) on CIFAR-shaped random data (3 x 32 x
32, 10 classes, batch B per learner), and a few K:

- ``one-by-one``: each K alone, its P learners stacked (kavg_ray.train.stacked);
- ``packed``: all the K in one pack, ``len(K) x P`` learners in one stack
  (kavg_ray.train.packed); ``x`` is its speed-up over the one-by-one runs together;
- ``ceiling``: one model trained with torch.optim.SGD at batch ``P x B`` on the same device:
  the same samples per step without the learner axis; ``stacked/ceiling`` divides the
  one-by-one samples/s by it.

samples/s: local steps x learners x B over the time of one epoch of ``--steps`` local steps,
after one untimed epoch (warm-up: kernels chosen, memory allocated). Peak memory (CUDA):
``torch.cuda.max_memory_allocated`` over the packed epoch, beside
``kavg_ray.train.packed.pack_memory_bytes`` (the sum of ``stacked.estimate_memory_bytes``
over the points, one data set). On a CPU the peak is not measured (``-``).

No Ray. It needs torch and the kavg_ray package with its config module, which imports
pydantic and PyYAML (pure Python: carry them to a GPU box that lacks them); the run
configs are kavg_ray's RunConfig, validated as a sweep's are.

Usage: python benchmarks/gpu.py [--models vgg16,resnet18] [--P 8,32,128] [--K 1,4,16]
       [--batch 32] [--steps 10] [--out FILE.json]
       python benchmarks/gpu.py --cpu-smoke      # tiny sizes on the CPU (a test)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kavg_ray.config import RunConfig  # noqa: E402
from kavg_ray.train.models import build_model  # noqa: E402
from kavg_ray.train.packed import PackedEngine, pack_memory_bytes  # noqa: E402

GIB = 2**30


def random_cifar(n_train: int, n_test: int = 64, seed: int = 0) -> tuple:
    """A CIFAR-shaped data set of random images and labels (the dataset factory)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def run_config(model: str, P: int, K: int, B: int, steps: int, device: torch.device) -> RunConfig:
    """A simulated K-AVG run whose one epoch is ``steps`` local steps of P learners."""
    return RunConfig.model_validate({
        "workload": {
            "dataset": "benchmarks.gpu:random_cifar",
            "dataset_args": {"n_train": steps * P * B}, "model": model, "epochs": 2,
            "batch_size": B, "lr": {"initial": 0.01}, "momentum": 0.9,
            "in_memory_mb": 1e6,
        },
        "backend": "simulated", "K": K, "P": P,
        "resources": {"use_gpu": device.type == "cuda"},
    })  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pack(cfgs: list[RunConfig], device: torch.device) -> tuple[float, int | None]:
    """Seconds of one epoch of the pack (after one untimed epoch), and the peak bytes."""
    engine = PackedEngine(cfgs, device, check=False)
    spe = engine.steps_per_epoch
    lrs = [[c.workload.lr.initial] * spe for c in cfgs]
    engine.train_steps(0, 0, spe, lrs)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    engine.train_steps(1, 0, spe, lrs)
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, peak


def time_ceiling(model_name: str, batch: int, steps: int, device: torch.device) -> float:
    """Seconds of ``steps`` SGD steps of one model at batch ``batch`` (after one warm step)."""
    torch.manual_seed(0)
    model = build_model(model_name, (3, 32, 32), 10).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - t0


def measure(model: str, P: int, ks: list[int], B: int, steps: int, device: torch.device) -> dict:
    """One row: one-by-one, packed and ceiling samples/s of ``model`` at ``P``."""
    cfgs = [run_config(model, P, k, B, steps, device) for k in ks]
    per_point = steps * P * B
    alone = [time_pack([c], device)[0] for c in cfgs]
    packed_s, peak = time_pack(cfgs, device)
    ceiling_s = time_ceiling(model, P * B, steps, device)
    one_by_one = len(cfgs) * per_point / sum(alone)
    return {
        "model": model, "P": P, "K": ks, "batch": B, "steps": steps,
        "one_by_one_samples_s": one_by_one,
        "packed_samples_s": len(cfgs) * per_point / packed_s,
        "packed_speedup": sum(alone) / packed_s,
        "ceiling_samples_s": per_point / ceiling_s,
        "stacked_over_ceiling": one_by_one / (per_point / ceiling_s),
        "peak_bytes": peak, "estimate_bytes": pack_memory_bytes(cfgs),
    }  # fmt: skip


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def table(rows: list[dict]) -> str:
    head = (f"{'model':9} {'P':>4} {'K':>10} {'one-by-one/s':>13} {'packed/s':>10} {'x':>5} "
            f"{'ceiling/s':>10} {'stk/ceil':>8} {'peak GiB':>9} {'est GiB':>8}")  # fmt: skip
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['model']:9} {r['P']:>4} {','.join(map(str, r['K'])):>10} "
            f"{r['one_by_one_samples_s']:>13.1f} {r['packed_samples_s']:>10.1f} "
            f"{r['packed_speedup']:>5.2f} {r['ceiling_samples_s']:>10.1f} "
            f"{r['stacked_over_ceiling']:>8.2f} {_gib(r['peak_bytes']):>9} "
            f"{_gib(r['estimate_bytes']):>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg16,resnet18")
    ap.add_argument("--P", default="8,32,128")
    ap.add_argument("--K", default="1,4,16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="cnn, P=2, K=1,2, batch 2, 2 steps, on the CPU")  # fmt: skip
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
        models, ps, ks, B, steps = ["cnn"], [2], [1, 2], 2, 2
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --cpu-smoke on a CPU")
        device = torch.device("cuda")
        models = args.models.split(",")
        ps = [int(p) for p in args.P.split(",")]
        ks = [int(k) for k in args.K.split(",")]
        B, steps = args.batch, args.steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device: {device} ({name or 'cpu'}), torch {torch.__version__}")
    rows = []
    for model in models:
        for P in ps:
            rows.append(measure(model, P, ks, B, steps, device))
            print(table(rows[-1:]).splitlines()[1] if len(rows) > 1 else table(rows), flush=True)
    print()
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
