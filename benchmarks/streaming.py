"""How much of a streamed fragment's average ``fragment_delay`` hides behind computation.

P = 2 gloo learners on 127.0.0.1 (one thread each) train a wide MLP on random batches with
``KAvgAverager(model, K, fragments=F, fragment_delay=tau)`` (docs/design.md section 9,
"Streaming fragments"). The model is wide and the batch small, so that one fragment's
average takes longer than one step: that is printed first (one fragment's average at tau
= 0 against one step without averaging). Every tau in ``--delays`` runs in turn, in
rounds (the order rotates every round, so load from elsewhere hits all alike), each run
``--steps`` steps after ``--warmup`` steps; the table sums rank 0's runs per tau.

Per fragment average, measured in the same run:
  total    the average's whole collective time: from the start of its launch (the copy and
           the asynchronous all-reduce) to the all-reduce's completion (a callback on the
           work's future, run on gloo's thread once it holds the GIL: up to Python's 5 ms
           switch interval late), less the benchmark's own registration of that callback,
           plus the apply's own work after the wait (the division and the merge); at
           tau = 0 this is the exposed time, up to that lateness.
  exposed  what ``comm_time_s`` reports (``averager.stats.seconds``): the launch's host
           time and the apply (the wait, the division, the merge).
  hidden   1 - exposed / total. The tau = 0 row, where nothing can hide, reads the
           instrument's own error: time outside the averager's clocks (the wrappers'
           calls, the callback's GIL, descheduling under load).
  saved    1 - exposed / exposed at tau = 0: what the delay took off each average's
           exposed time (the transfer itself slows while it competes with computation).
And steps/s: the run's steps over its wall time (training, averages and all).

``--payload int8`` (or another) streams compressed fragments: the launch quantizes and
starts the first all-to-all asynchronously, the apply waits for it and runs the sum, the
requantization and the second all-to-all; ``total`` then runs from the launch to the first
all-to-all's completion, plus the whole apply after that wait.

Usage: python benchmarks/streaming.py [--width 2048] [--depth 4] [--batch 4] [--K 8]
       [--fragments 2] [--delays 0,1,3] [--steps 48] [--warmup 8] [--rounds 3]
       [--payload fp32]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kavg_ray.train.averaging import KAvgAverager  # noqa: E402
from kavg_ray.train.fragments import StreamingFragments  # noqa: E402
from kavg_ray.train.payload import PAYLOADS  # noqa: E402

WORLD = 2


def _model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(width, width) for _ in range(depth)]
    return nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())], nn.Linear(width, 10))


def _instrument(stream: StreamingFragments, records: list[dict]) -> None:
    """Time every launch to its all-reduce's completion, and every apply."""
    launch, apply = stream.launch, stream.apply

    def timed_launch(fragment: int) -> None:
        rec = {"start": time.perf_counter()}
        launch(fragment)
        rec["launched"] = time.perf_counter()
        pending = stream.pending  # compressed: the first all-to-all is the one in flight
        work = pending.work if pending.exchange is None else pending.exchange.work
        if work is None:
            rec["done"] = time.perf_counter()
        else:
            work.get_future().then(lambda _f: rec.__setitem__("done", time.perf_counter()))
        rec["registered"] = time.perf_counter()  # the callback's cost: not the average's
        records.append(rec)

    def timed_apply(fragment: int) -> None:
        rec = records[-1]
        rec["apply"] = time.perf_counter()
        apply(fragment)
        rec["end"] = time.perf_counter()

    stream.launch, stream.apply = timed_launch, timed_apply


def _total(r: dict) -> float:
    """One average's whole time: launch to the all-reduce's completion, less the part of
    the callback's registration it spans, plus the apply's work after the wait."""
    extra = max(0.0, min(r["done"], r["registered"]) - r["launched"])
    return r["done"] - r["start"] - extra + r["end"] - max(r["done"], r["apply"])


def _run(args: argparse.Namespace, rank: int, tau: int | None) -> dict:
    """``args.warmup + args.steps`` steps; tau None: no averaging (the bare step)."""
    model = _model(args.width, args.depth)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    avg, records = None, []
    if tau is not None:
        avg = KAvgAverager(model, args.K, payload=args.payload)
        avg.stream(args.fragments, tau, 0.0)  # F = 1, tau = 0 too: through the same code
        _instrument(avg.streaming, records)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(64, args.batch, args.width, generator=gen)
    y = torch.randint(0, 10, (64, args.batch), generator=gen)
    dist.barrier()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            dist.barrier()
            start, first = time.perf_counter(), len(records)
            seconds, count = (0.0, 0) if avg is None else (avg.stats.seconds, avg.stats.count)
        loss = F.cross_entropy(model(x[step % 64]), y[step % 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if avg is not None:
            avg.step()
    wall = time.perf_counter() - start
    done = [r for r in records[first:] if "end" in r]
    total = sum(_total(r) for r in done)
    exposed = 0.0 if avg is None else avg.stats.seconds - seconds
    if avg is not None and avg.stats.count - count != len(done):
        raise RuntimeError("the timed averages and the averager's count disagree")
    return {"wall": wall, "steps": args.steps, "averages": len(done), "total": total,
            "exposed": exposed}  # fmt: skip


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    runs: dict = {"bare": [], **{tau: [] for tau in args.delays}}
    order = list(args.delays)
    for r in range(args.rounds):
        runs["bare"].append(_run(args, rank, None))
        for tau in order[r % len(order):] + order[: r % len(order)]:
            runs[tau].append(_run(args, rank, tau))
    if rank == 0:
        torch.save(runs, out)
    dist.barrier()


def _summary(runs: dict) -> str:
    bare = runs.pop("bare")
    step_ms = 1000 * sum(r["wall"] for r in bare) / sum(r["steps"] for r in bare)
    rows = [f"one step without averaging: {step_ms:.1f} ms",
            "tau  averages  total ms/avg  exposed ms/avg  hidden   saved  steps/s"]  # fmt: skip
    per = {tau: sum(r["exposed"] for r in rs) / sum(r["averages"] for r in rs)
           for tau, rs in runs.items()}  # fmt: skip
    for tau, rs in runs.items():
        n = sum(r["averages"] for r in rs)
        total, exposed = sum(r["total"] for r in rs), sum(r["exposed"] for r in rs)
        sps = sum(r["steps"] for r in rs) / sum(r["wall"] for r in rs)
        saved = f"{1 - per[tau] / per[0]:>6.1%}" if 0 in per else "     -"
        rows.append(f"{tau:>3}  {n:>8}  {1000 * total / n:>12.1f}  {1000 * exposed / n:>14.1f}"
                    f"  {1 - exposed / total:>6.1%}  {saved}  {sps:>7.2f}")  # fmt: skip
    return "\n".join(rows)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = {"width": 2048, "depth": 4, "batch": 4, "K": 8, "fragments": 2, "steps": 48,
                "warmup": 8, "rounds": 3}  # fmt: skip
    for name, default in defaults.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--delays", default="0,1,3")
    p.add_argument("--payload", default="fp32", choices=PAYLOADS)
    args = p.parse_args(argv)
    try:
        args.delays = [int(d) for d in args.delays.split(",")]
    except ValueError:
        p.exit(2, f"--delays must be integers separated by commas, got {args.delays!r}\n")
    H = args.K // max(args.fragments, 1)
    if min(args.width, args.depth, args.batch, args.K, args.fragments, args.steps,
           args.rounds) < 1 or args.warmup < 0 or args.K % args.fragments:  # fmt: skip
        p.exit(2, "sizes, K, fragments, steps and rounds must be >= 1, and fragments divide K\n")
    if any(not 0 <= d < H for d in args.delays) or len(set(args.delays)) != len(args.delays):
        p.exit(2, f"--delays must be distinct and in [0, K/F = {H})\n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    params = sum(p.numel() for p in _model(args.width, args.depth).parameters())
    print(f"P = {WORLD} gloo learners, MLP {args.depth} x {args.width} ({params / 1e6:.1f}M "
          f"parameters, {4 * params / args.fragments / 1e6:.0f} MB a fragment), batch "
          f"{args.batch}, K = {args.K}, F = {args.fragments}, payload {args.payload}; "
          f"{args.rounds} rounds of "
          f"{args.steps} steps per tau", flush=True)  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "runs.pt")
        mp.spawn(_worker, args=(port, args, out), nprocs=WORLD, join=True)
        runs = torch.load(out, weights_only=False)
    print(_summary(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
