"""Training throughput of the epoch loop against a bare hand-written torch loop (P = 1).

``ours`` calls ``kavg_ray.train.train`` (the epoch loop) in-process (P = 1, K = 4, no
torch.distributed) and reads the ``compute_time_s`` it reports: the time inside the
per-epoch batch loops only (no model build, no data loading, no per-epoch evaluation).
``bare`` is the loop a user would write by hand on the same model (same seed), the same
in-memory tensors, the same mini-batches (``kavg_ray.train.data.epoch_indices``), batch size,
learning rate and SGD: index, forward, cross-entropy, zero_grad, backward, step; no
averager, no loss bookkeeping, no evaluation. Its clock covers the same span (the batch
loops). Runs alternate ours/bare; the table shows the median samples/s of each.

Workloads:
  digits-mlp  the tiny MLP on 8x8 digits, batch 16: per-step overhead dominates.
  digits-cnn  the small CNN on 8x8 digits, batch 64: compute dominates.
  fake32-cnn  the CNN on a synthetic CIFAR-shaped set (uint8 3x32x32, CIFAR normalization and
              random crop + flip, as CIFAR-10 is served), batch 32: the image path. The bare
              loop does the same prepare + augment per batch. Supplied by monkeypatching
              ``kavg_ray.train.workload.load_dataset``.
  text-gpt    the small causal transformer (gpt, default sizes) on the seeded character
              corpus (text, sequences of 64), batch 16: the language-model path. The bare
              loop flattens (B, T, vocab) logits for the cross-entropy as a user would.

With ``--recipe lm`` both loops train the language-model recipe (issue #26): bf16 autocast
for the forward and loss, gradients clipped to global norm 1.0, and a learning rate set
before every step by a 10-step warm-up into a cosine decay to lr/10. Ours gets it from the
config keys (``precision``, ``grad_clip``, ``lr.schedule``); the bare loop is written by
hand with ``torch.autocast``, ``clip_grad_norm_`` and the same formula.

With ``--device cuda`` both loops keep model and data on GPU 0 (``train(..., device=)``
for ours); the clock is then the wall clock, read after ``torch.cuda.synchronize()`` (ours:
the epoch loop synchronizes before it reads its clock).

Usage: python benchmarks/loop.py [--reps 5] [--workloads digits-mlp,digits-cnn,fake32-cnn,text-gpt]
       [--threads 1] [--clock cpu|wall] [--device cpu|cuda] [--recipe plain|lm]
"""

from __future__ import annotations

import argparse
import atexit
import functools
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kavg_ray.train.loop as loop  # noqa: E402
import kavg_ray.train.workload as wl_module  # noqa: E402
from kavg_ray.config import RunConfig  # noqa: E402
from kavg_ray.train import train  # noqa: E402
from kavg_ray.train.data import (  # noqa: E402
    CIFAR10_MEAN,
    CIFAR10_STD,
    Dataset,
    augment_generator,
    epoch_indices,
    load_dataset,
    random_crop_flip,
    steps_per_epoch,
)
from kavg_ray.train.models import build_model  # noqa: E402

SEED = 0
K = 4
LR = 0.05
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = time.perf_counter  # set by main()
DEVICE = torch.device("cpu")  # set by main()
RECIPE = "plain"  # set by main(): plain | lm
WARMUP, CLIP, MIN_LR = 10, 1.0, LR / 10


class _ClockShim:
    """Stands in for the ``time`` module inside kavg_ray.train.loop during a ``--clock cpu`` run."""

    def __init__(self) -> None:
        self.calls = 0

    def perf_counter(self) -> float:
        self.calls += 1
        return clock()

    def __getattr__(self, name: str):  # everything else: the real time module
        return getattr(time, name)


@dataclass(frozen=True)
class Workload:
    name: str
    dataset: str  # what the config says; "fake32" is served through the monkeypatch
    model: str
    batch_size: int
    epochs: int


WORKLOADS = {
    "digits-mlp": Workload("digits-mlp", "digits", "mlp", 16, 40),
    "digits-cnn": Workload("digits-cnn", "digits", "cnn", 64, 8),
    "fake32-cnn": Workload("fake32-cnn", "fake32", "cnn", 32, 2),
    "text-gpt": Workload("text-gpt", "text", "gpt", 16, 1),
}


@functools.cache
def fake32() -> Dataset:
    """1024 + 256 random uint8 3x32x32 images, 10 classes, served like CIFAR-10."""
    gen = torch.Generator().manual_seed(1234)
    n_train, n_test = 1024, 256
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (n_train + n_test,), generator=gen)
    return Dataset(
        name="fake32",
        train_x=x[:n_train].contiguous(),
        train_y=y[:n_train].contiguous(),
        test_x=x[n_train:].contiguous(),
        test_y=y[n_train:].contiguous(),
        num_classes=10,
        input_shape=(3, 32, 32),
        task="classification",
        augment=functools.partial(
            random_crop_flip,
            padding=4,
            fill=tuple(-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD, strict=True)),
        ),
        norm_mean=CIFAR10_MEAN,
        norm_std=CIFAR10_STD,
    )


@functools.cache
def _empty_cifar_dir() -> str:
    root = tempfile.mkdtemp(prefix="kavg-bench-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    os.mkdir(os.path.join(root, "cifar-10-batches-py"))
    return root


def get_data(wl: Workload) -> Dataset:
    return fake32() if wl.dataset == "fake32" else load_dataset(wl.dataset)


def run_ours(wl: Workload) -> tuple[float, float]:
    """(training seconds, samples) of one kavg_ray.train.train call."""
    workload = {
        "dataset": wl.dataset,
        "model": wl.model,
        "epochs": wl.epochs,
        "batch_size": wl.batch_size,
        "lr": {"initial": LR},
    }
    if wl.dataset == "fake32":
        # fake32 rides on "cifar10" (an image data set for the config's checks) with an empty
        # data folder; the patched loader below serves the fake set and ignores the rest.
        workload.update(dataset="cifar10", data_dir=_empty_cifar_dir())
    if RECIPE == "lm":
        workload.update(precision="bf16", grad_clip=CLIP, lr={
            "initial": LR, "schedule": "cosine", "warmup_steps": WARMUP, "min_lr": MIN_LR,
        })  # fmt: skip
    doc = {"name": "bench", "workload": workload, "K": K, "P": 1, "seed": SEED}
    cfg = RunConfig.model_validate(doc)
    original = wl_module.load_dataset
    if wl.dataset == "fake32":
        wl_module.load_dataset = lambda *a, **k: fake32()
    # run_epochs times its batch loops with time.perf_counter(); route that to our clock.
    shim, real_time = _ClockShim(), loop.time
    loop.time = shim
    try:
        metrics = train(cfg, lambda m, s: None, device=DEVICE)
    finally:
        wl_module.load_dataset = original
        loop.time = real_time
    if shim.calls == 0:
        raise RuntimeError("kavg_ray.train.loop no longer calls time.perf_counter(); fix the shim")
    return metrics["compute_time_s"], float(metrics["samples"])


@dataclass
class BareRun:
    """What a hand-written loop sets up before its clock starts."""

    data: Dataset
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    steps: int  # per epoch
    train_x: torch.Tensor
    train_y: torch.Tensor
    image: bool
    text: bool  # token sequences: logits (B, T, vocab)


def bare_setup(wl: Workload) -> BareRun:
    data = get_data(wl)
    torch.manual_seed(SEED)
    model = build_model(wl.model, data.input_shape, data.num_classes).to(DEVICE)
    train_x, train_y = data.train_x.to(DEVICE), data.train_y.to(DEVICE)
    return BareRun(
        data, model, torch.optim.SGD(model.parameters(), lr=LR),
        steps_per_epoch(data.n_train, wl.batch_size, 1), train_x, train_y,
        train_x.dtype == torch.uint8, train_x.dtype == torch.int64,
    )  # fmt: skip


def run_bare(wl: Workload) -> tuple[float, float]:
    """(training seconds, samples) of the hand-written loop."""
    run = bare_setup(wl)
    data, model, opt, steps = run.data, run.model, run.opt, run.steps
    train_x, train_y, image, text = run.train_x, run.train_y, run.image, run.text
    seconds = 0.0
    for epoch in range(wl.epochs):
        batches = epoch_indices(data.n_train, wl.batch_size, 0, 1, epoch, SEED)
        gen = augment_generator(SEED, epoch, 0)
        t0 = clock()
        if image:
            for idx in batches:
                x = data.augment(data.prepare(train_x[idx]), gen)
                loss = F.cross_entropy(model(x), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        elif text:
            for idx in batches:
                loss = F.cross_entropy(model(train_x[idx]).flatten(0, 1), train_y[idx].flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        else:
            for idx in batches:
                loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        seconds += clock() - t0
    return seconds, float(wl.epochs * steps * wl.batch_size)


def recipe_lr(step: int, total: int) -> float:
    """The bare loop's own warm-up and cosine, as a user writes them."""
    progress = min(1.0, max(0.0, (step - WARMUP) / max(1, total - WARMUP)))
    lr = MIN_LR + (LR - MIN_LR) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (step + 1) / WARMUP if step < WARMUP else lr


def run_bare_recipe(wl: Workload) -> tuple[float, float]:
    """(training seconds, samples) of the hand-written loop with the lm recipe."""
    run = bare_setup(wl)
    data, model, opt, steps = run.data, run.model, run.opt, run.steps
    train_x, train_y, image, text = run.train_x, run.train_y, run.image, run.text
    seconds, step = 0.0, 0
    for epoch in range(wl.epochs):
        batches = epoch_indices(data.n_train, wl.batch_size, 0, 1, epoch, SEED)
        gen = augment_generator(SEED, epoch, 0)
        t0 = clock()
        for idx in batches:
            for group in opt.param_groups:
                group["lr"] = recipe_lr(step, steps * wl.epochs)
            x, y = train_x[idx], train_y[idx]
            if image:
                x = data.augment(data.prepare(x), gen)
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                out = model(x)
                loss = F.cross_entropy(out.flatten(0, 1), y.flatten()) if text else (
                    F.cross_entropy(out, y))  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            step += 1
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        seconds += clock() - t0
    return seconds, float(wl.epochs * steps * wl.batch_size)


def bench(wl: Workload, reps: int) -> dict:
    get_data(wl)  # load once outside the clock (load_digits is cached by the OS after)
    bare_fn = run_bare_recipe if RECIPE == "lm" else run_bare
    run_ours(wl)  # warm-up: first-call costs (allocator, oneDNN primitives) for both
    bare_fn(wl)
    ours, bare = [], []
    for rep in range(reps):
        # alternate which goes first, so a slow spell from elsewhere hits both alike
        order = (run_ours, bare_fn) if rep % 2 == 0 else (bare_fn, run_ours)
        for fn in order:
            seconds, samples = fn(wl)
            (ours if fn is run_ours else bare).append(samples / seconds)
    return {
        "workload": wl,
        "ours": statistics.median(ours),
        "bare": statistics.median(bare),
        "ours_all": ours,
        "bare_all": bare,
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        "| workload | model | batch | epochs/run | ours samples/s | bare samples/s | ours/bare "
        "| ours runs | bare runs |",
        "|" + " --- |" * 9,
    ]
    for r in rows:
        wl = r["workload"]
        lines.append(
            f"| {wl.name} | {wl.model} | {wl.batch_size} | {wl.epochs} | {r['ours']:.0f} "
            f"| {r['bare']:.0f} | {r['ours'] / r['bare']:.3f} "
            f"| {' '.join(f'{v:.0f}' for v in r['ours_all'])} "
            f"| {' '.join(f'{v:.0f}' for v in r['bare_all'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="runs of each loop per workload")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="cpu",
        help="cpu: this thread's CPU time (robust on a shared machine; exact with --threads 1); "
        "wall: time.perf_counter",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="tensors on")
    parser.add_argument(
        "--recipe", choices=("plain", "lm"), default="plain",
        help="lm: bf16 autocast, clip 1.0, warm-up + cosine (see above)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.device == "cuda" and (args.clock != "wall" or not torch.cuda.is_available()):
        parser.error("--device cuda needs --clock wall and a visible CUDA device")
    names = [n for n in args.workloads.split(",") if n]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or args.reps < 1 or args.threads < 1:
        parser.error(f"unknown workload(s) {unknown}; valid: {', '.join(WORKLOADS)}")
    torch.set_num_threads(args.threads)
    global clock, DEVICE, RECIPE
    RECIPE = args.recipe
    clock = CLOCKS[args.clock]
    DEVICE = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")

    print(
        f"# loop: P=1, K={K}, lr={LR}, SGD without momentum, recipe {args.recipe}, "
        f"{args.threads} torch thread(s), "
        f"{args.reps} alternating runs each, median samples/s, {args.clock} clock, "
        f"on {torch.cuda.get_device_name(0) if args.device == 'cuda' else 'cpu'}"
    )
    print(
        "# throughput = training samples / time inside the batch loops on that clock (ours: "
        "the epoch loop's compute_time_s; bare: the same span); per-epoch evaluation excluded"
    )
    print(
        f"# torch {torch.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}"
    )
    start = time.perf_counter()
    rows = [bench(WORKLOADS[n], args.reps) for n in names]
    print(format_table(rows))
    print(
        f"# total {time.perf_counter() - start:.0f} s, load average at end {os.getloadavg()[0]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
