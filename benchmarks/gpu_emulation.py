"""The GPU check of issue #25: NCCL at P = 1, ranks sharing one GPU, event-timed averages.

Parts (``--parts``, all by default):

  p1       NCCL at P = 1 through the torchrun entry point, for K-AVG, DiLoCo and the
           simulated backend: ``python -m kavg_ray.train CONFIG.yaml`` (digits, mlp,
           ``--epochs``) with the environment torchrun gives its one process (RANK=0,
           WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1, a free MASTER_PORT), so that it
           creates kavg's process group, ``cpu:gloo,cuda:nccl``, with model and data on
           cuda:0 (on a CPU the group is gloo). ``--torchrun`` starts it through
           ``python -m torch.distributed.run --standalone --nproc-per-node 1`` instead (one
           more interpreter per run). A run passes when it exits 0 after one progress line
           per epoch. At P = 1 no collective runs (a group of one averages nothing and
           the metric sums are not reduced): the run checks the group's creation, the
           device paths and the exit barrier, not NCCL's transfers.
  emulate  P = 2 and P = 4 processes (``--P``) on the one GPU, each in a process group
           registered for CUDA tensors only (``--backend cuda:gloo``: NCCL refuses two ranks
           on one GPU, gloo carries CUDA tensors through host memory), train ``--epochs``
           of K-AVG, DiLoCo and Hier-AVG (S = 2) through the real engine and epoch loop
           (``kavg_ray.train.run.build_engine``, ``kavg_ray.train.loop.run_epochs``). A
           host tensor handed to a collective there ends the run with "No backend type
           associated with device type cpu" (each P also checks that the group does refuse
           one). After training, every rank scales its model by 1 + rank / 8 and averages
           once: every rank must then hold the mean of the ranks' models, bit for bit at
           P = 2 (a + b, then / 2), within float rounding at P = 4 (gloo's order of the
           sum). Hier-AVG checks its local average (the mean of the rank's group) as well.
  timing   in the same processes, an average of ``--time-model`` (KAvgAverager, P ranks)
           measured three ways, side by side, ``--reps`` times each, every one after
           queued work on the stream (matrix products, not waited for):
             event     the averager's own time: CUDA events on the stream around the
                       collective, read after the reps (what comm_time_s holds);
             synced    torch.cuda.synchronize(); perf_counter(); average;
                       torch.cuda.synchronize(); perf_counter();
             unsynced  perf_counter(); average; torch.cuda.synchronize(); perf_counter():
                       the timing before issue #25, which counts the queued work.
           "event (synced reps)" is the averager's own time of the synced averages. event
           should match synced and stay below unsynced. On a CPU every time is the host
           clock (the averager's perf_counter for event).

bf16 against fp32 step times are gpu_session.sh's loop_cuda and loop_cuda_lm steps
(benchmarks/loop.py --recipe lm).

No Ray: torch and kavg_ray (whose config module needs pydantic and PyYAML). Ranks leave
with os._exit after a final collective, as tests/distributed.py does (gloo's teardown can
abort a rank whose peers have gone). Exit 1 when a check fails.

Usage: python benchmarks/gpu_emulation.py [--device cuda|cpu] [--backend cuda:gloo]
       [--P 2,4] [--epochs 2] [--reps 10] [--time-model resnet18] [--parts p1,emulate]
       [--out FILE.json]
       python benchmarks/gpu_emulation.py --cpu-smoke   (or SMOKE=1): on the CPU, with
       cpu:gloo standing in for the one-device group, small settings (a test:
       tests/test_gpu_script.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kavg_ray.config import RunConfig  # noqa: E402
from kavg_ray.train import collectives  # noqa: E402
from kavg_ray.train.averaging import KAvgAverager  # noqa: E402
from kavg_ray.train.loop import run_epochs  # noqa: E402
from kavg_ray.train.models import build_model  # noqa: E402
from kavg_ray.train.run import build_engine  # noqa: E402
from kavg_ray.train.timing import CommStats  # noqa: E402

DILOCO = {"lr": 0.7, "momentum": 0.9, "nesterov": True}
P1_RUNS = {
    "kavg": {"K": 4, "P": 1},
    "diloco": {"K": 4, "P": 1, "outer": DILOCO},
    "simulated": {"K": 4, "P": 2, "backend": "simulated"},
}
EMULATED_RUNS = {
    "kavg": {"K": 2},
    "diloco": {"K": 2, "outer": DILOCO},
    "hier_avg": {"algorithm": "hier_avg", "S": 2, "K1": 1, "K2": 2},
}
WARMUP = 2
REFUSAL = "No backend type associated with device type cpu"


def run_doc(epochs: int, cuda: bool, **algorithm: object) -> dict:
    """A digits run config (mlp, batch 16) with ``algorithm``'s keys."""
    return {
        "workload": {"dataset": "digits", "model": "mlp", "epochs": epochs, "batch_size": 16,
                     "lr": {"initial": 0.1}},
        "seed": 0,
        "resources": {"use_gpu": cuda, "cpus_per_worker": 1},
        **algorithm,
    }  # fmt: skip


# ------------------------------------------------------------------------------- p1


def p1_runs(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Each P1_RUNS config through kavg_ray.train in one process of a process group."""
    rows = []
    path_env = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path_env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = []
    for name, algorithm in P1_RUNS.items():
        path = tmp / f"p1-{name}.yaml"  # JSON is YAML
        path.write_text(json.dumps(run_doc(args.epochs, args.device == "cuda", **algorithm)))
        cmd = [sys.executable, "-m", "kavg_ray.train", str(path)]
        if args.torchrun:
            cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                        "-m"]  # fmt: skip
        else:
            env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(env), cwd=tmp)  # fmt: skip
        started.append((name, proc, time.perf_counter()))
        if not args.p1_parallel:
            rows.append(_p1_row(args, *started.pop()))
    return rows + [_p1_row(args, *run) for run in started]


def _p1_row(args: argparse.Namespace, name: str, proc: subprocess.Popen, t0: float) -> dict:
    """Wait for one p1 run; its row."""
    try:
        stdout, stderr = proc.communicate(timeout=args.p1_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    lines = [ln for ln in stdout.splitlines() if ln.startswith("epoch ")]
    ok = proc.returncode == 0 and len(lines) == args.epochs
    if not ok:
        print(f"--- p1 {name}: rc {proc.returncode}\n{stdout[-2000:]}{stderr[-3000:]}")
    return {"part": "p1", "run": name, "P": 1, "device": args.device,
            "backend": collectives.backend(args.device == "cuda"), "rc": proc.returncode,
            "epochs": len(lines), "last": lines[-1] if lines else "", "seconds": seconds,
            "ok": ok}  # fmt: skip


# ---------------------------------------------------------------------------- ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _together(device: torch.device) -> None:
    """A barrier of device tensors (``dist.barrier`` takes a host tensor, which a group
    for CUDA tensors only refuses), then the stream drained."""
    t = torch.ones(1, device=device)
    collectives.all_reduce(t, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _host_tensor_refused(backend: str) -> bool | None:
    """Whether the group refuses a host tensor (None when it has a backend for them)."""
    if "cpu:" in backend or ":" not in backend:
        return None
    try:
        dist.all_reduce(torch.zeros(1))
    except RuntimeError as exc:
        return REFUSAL in str(exc)
    return False


def _train_run(name: str, doc: dict, rank: int, world: int, device: torch.device,
               out: Path) -> dict:  # fmt: skip
    """One run through the engine and loop, then the mean checks (tensors saved to out)."""
    cfg = RunConfig.model_validate(doc)
    engine = build_engine(cfg, rank, world, device)
    t0 = time.perf_counter()
    metrics = run_epochs(cfg, engine, lambda m, s: None)
    seconds = time.perf_counter() - t0
    avg = engine.averager
    buf = avg.flat.buffer
    tag = f"{name}-P{world}"
    with torch.no_grad():
        buf.mul_(1 + rank / 8)
    torch.save(buf.cpu().clone(), out / f"{tag}-global-before-{rank}.pt")
    avg._reduce(None, world, CommStats())  # the plain average: one collective over all
    torch.save(buf.cpu().clone(), out / f"{tag}-global-after-{rank}.pt")
    local = getattr(avg, "local_group", None)
    group = list(range(world))
    if cfg.algorithm == "hier_avg":
        if local is not None:
            group = dist.get_process_group_ranks(local)
        with torch.no_grad():
            buf.mul_(1 + rank / 8)
        torch.save(buf.cpu().clone(), out / f"{tag}-local-before-{rank}.pt")
        avg.average_local()
        torch.save(buf.cpu().clone(), out / f"{tag}-local-after-{rank}.pt")
    keys = ("rounds", "test_acc", "train_loss", "comm_time_s", "compute_time_s",
            "wait_time_s", "local_reductions", "global_reductions", "diverged")  # fmt: skip
    return {"part": "emulate", "run": name, "P": world, "rank": rank, "group": group,
            "epochs": metrics["epoch"], "seconds": seconds,
            **{k: metrics[k] for k in keys}}  # fmt: skip


def _timing(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    """An average of the timing model, timed three ways after queued work (module doc)."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(args.time_model, (3, 32, 32), 10).to(device)
    avg = KAvgAverager(model, period=1)
    n = 4096 if cuda else 64
    work = torch.randn(n, n, device=device)

    def queue() -> None:  # work the averager's clock must not count
        for _ in range(args.queued):
            torch.mm(work, work)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    synced, unsynced = [], []
    for _ in range(WARMUP + args.reps):
        _together(device)
        queue()
        avg.average()  # event: the averager's own time
        _together(device)
        queue()
        sync()
        t0 = time.perf_counter()
        avg.average()
        sync()
        synced.append(time.perf_counter() - t0)
        _together(device)
        queue()
        t0 = time.perf_counter()
        avg.average()
        sync()
        unsynced.append(time.perf_counter() - t0)
    avg.resolve_times()
    own = avg.stats.unsettled  # three per rep, in order: event, synced, unsynced
    assert len(own) == 3 * (WARMUP + args.reps), len(own)

    def ms(xs: list[float]) -> float:
        return 1000 * statistics.median(xs[WARMUP:])

    return {"part": "timing", "P": world, "rank": rank, "model": args.time_model,
            "timer": "cuda-event" if cuda else "host", "nbytes": avg.flat.nbytes,
            "queued_matmuls": args.queued, "reps": args.reps,
            "event_ms": ms(own[0::3]), "event_ms_of_synced": ms(own[1::3]),
            "event_ms_of_unsynced": ms(own[2::3]), "synced_ms": ms(synced),
            "unsynced_ms": ms(unsynced)}  # fmt: skip


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=args.collective_timeout)
    dist.init_process_group(args.backend, rank=rank, world_size=world, timeout=timeout)
    outdir = Path(out)
    try:
        rows = []
        for name, algorithm in EMULATED_RUNS.items():
            doc = run_doc(args.epochs, device.type == "cuda", P=world, **algorithm)
            rows.append(_train_run(name, doc, rank, world, device, outdir))
        if args.reps > 0:
            rows.append(_timing(args, rank, world, device))
        refused = _host_tensor_refused(args.backend)
        for row in rows:
            row.update(device=str(device), backend=args.backend, host_tensor_refused=refused)
        (outdir / f"rows-{rank}.json").write_text(json.dumps(rows))
        _together(device)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # Every rank has written its rows: leave without gloo's C++ teardown.
    (outdir / f"done-{rank}").touch()
    deadline = time.monotonic() + 60
    while len(list(outdir.glob("done-*"))) < world and time.monotonic() < deadline:
        time.sleep(0.01)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _max_err(before: list[torch.Tensor], after: torch.Tensor) -> float:
    mean = torch.stack(before).sum(0) / len(before)
    return float((after.double() - mean.double()).abs().max())


def emulate(args: argparse.Namespace, world: int, tmp: Path) -> list[dict]:
    """P ranks on the one device: their rows (rank 0's, with the mean checks)."""
    out = tmp / f"P{world}"
    out.mkdir()
    # A CPU run forks (nothing to re-import: the smoke test's time); CUDA needs spawn.
    method = "spawn" if args.device == "cuda" else "fork"
    try:
        mp.start_processes(_rank, args=(world, _free_port(), args, str(out)), nprocs=world,
                           join=True, start_method=method)  # fmt: skip
    except mp.ProcessExitedException:
        if len(list(out.glob("done-*"))) < world:
            raise
    ranks = [json.loads((out / f"rows-{r}.json").read_text()) for r in range(world)]
    rows = []
    for i, row in enumerate(ranks[0]):
        if row["part"] == "emulate":
            tag = f"{row['run']}-P{world}"
            for level in ("global", "local"):
                if not (out / f"{tag}-{level}-after-0.pt").exists():
                    continue
                before = [torch.load(out / f"{tag}-{level}-before-{r}.pt") for r in range(world)]
                after = [torch.load(out / f"{tag}-{level}-after-{r}.pt") for r in range(world)]
                members = ranks[0][i]["group"] if level == "local" else list(range(world))
                err = _max_err([before[r] for r in members], after[0])
                same = all(torch.equal(after[r], after[0]) for r in members)
                row[f"{level}_mean_max_abs_err"] = err
                row[f"{level}_members_equal"] = same
            row["comm_time_s_ranks"] = [ranks[r][i]["comm_time_s"] for r in range(world)]
        rows.append(row)
    return rows


def checks(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """What failed, one line each (empty: all passed)."""
    bad = []
    for r in rows:
        where = f"{r['part']} {r.get('run', r.get('model'))} P={r['P']}"
        if r["part"] == "p1" and not r["ok"]:
            bad.append(f"{where}: rc {r['rc']}, {r['epochs']} of {args.epochs} epochs")
        if r["part"] == "emulate":
            if r["epochs"] != args.epochs or r["diverged"]:
                bad.append(f"{where}: {r['epochs']} epochs, diverged {r['diverged']}")
            for level in ("global", "local"):
                if f"{level}_mean_max_abs_err" not in r:
                    continue
                err, tol = r[f"{level}_mean_max_abs_err"], 0.0 if r["P"] == 2 else 1e-5
                if err > tol or not r[f"{level}_members_equal"]:
                    bad.append(f"{where}: the {level} average is not the mean (err {err:g})")
        if r.get("host_tensor_refused") is False:
            bad.append(f"{where}: the group took a host tensor")
    return bad


def format_rows(rows: list[dict]) -> str:
    lines = []
    p1 = [r for r in rows if r["part"] == "p1"]
    if p1:
        lines += [
            "## P = 1: python -m kavg_ray.train in a one-process group (as torchrun starts it)",
            "| run | backend | rc | epochs | seconds | last line |",
            "|" + " --- |" * 6,
        ]
        lines += [f"| {r['run']} | {r['backend']} | {r['rc']} | {r['epochs']} "
                  f"| {r['seconds']:.1f} | {r['last']} |" for r in p1]  # fmt: skip
    em = [r for r in rows if r["part"] == "emulate"]
    if em:
        lines += ["## P ranks on one device through the engine and loop (rank 0's metrics)",
                  "| run | P | backend | epochs | rounds | test_acc | comm_time_s | "
                  "compute_time_s | wait_time_s | global mean err | local mean err | "
                  "host tensor refused |", "|" + " --- |" * 12]  # fmt: skip
        for r in em:
            loc = r.get("local_mean_max_abs_err")
            lines.append(
                f"| {r['run']} | {r['P']} | {r['backend']} | {r['epochs']} | {r['rounds']} "
                f"| {r['test_acc']:.4f} | {r['comm_time_s']:.4f} | {r['compute_time_s']:.3f} "
                f"| {r['wait_time_s']:.4f} | {r['global_mean_max_abs_err']:.2g} "
                f"| {'-' if loc is None else f'{loc:.2g}'} | {r['host_tensor_refused']} |"
            )
    tm = [r for r in rows if r["part"] == "timing"]
    if tm:
        lines += ["## one average, median ms of rank 0 after queued work: event (the "
                  "averager's own time) beside synced and unsynced host clocks",
                  "| model | P | MB | timer | queued matmuls | event | event (synced reps) "
                  "| synced | unsynced (before #25) | event/synced |",
                  "|" + " --- |" * 10]  # fmt: skip
        lines += [f"| {r['model']} | {r['P']} | {r['nbytes'] / 1e6:.2f} | {r['timer']} "
                  f"| {r['queued_matmuls']} | {r['event_ms']:.3f} | {r['event_ms_of_synced']:.3f} "
                  f"| {r['synced_ms']:.3f} | {r['unsynced_ms']:.3f} "
                  f"| {r['event_ms'] / r['synced_ms']:.2f} |" for r in tm]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument(
        "--backend",
        default=None,
        help="the emulated group's backend (default: cuda:gloo, on cpu cpu:gloo)",
    )
    ap.add_argument("--P", default="2,4", help="comma-separated process counts to emulate")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10, help="timed averages per way (0: none)")
    ap.add_argument("--time-model", default="resnet18")
    ap.add_argument("--queued", type=int, default=8, help="matrix products queued per average")
    ap.add_argument("--parts", default="p1,emulate", help="p1 and/or emulate (with timing)")
    ap.add_argument("--torchrun", action="store_true", help="p1 through torchrun's launcher")
    ap.add_argument("--p1-parallel", action="store_true", help="start the p1 runs together")
    ap.add_argument("--p1-timeout", type=float, default=180.0)
    ap.add_argument("--collective-timeout", type=float, default=120.0)
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="CPU, cpu:gloo, 1 epoch, 2 reps of a small model, the p1 runs together (also SMOKE=1)",
    )
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.cpu_smoke or os.environ.get("SMOKE") == "1":
        args.device, args.epochs, args.reps, args.time_model, args.queued = "cpu", 1, 2, "cnn", 2
        args.p1_parallel, args.backend = True, None  # the one-device group: cpu:gloo
    if args.backend is None:
        args.backend = f"{args.device}:gloo"
    parts = {p for p in args.parts.split(",") if p}
    worlds = [int(p) for p in args.P.split(",") if p]
    if not parts <= {"p1", "emulate"} or any(p < 2 for p in worlds) or args.epochs < 1:
        ap.error("--parts takes p1,emulate; --P values >= 2; --epochs >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible (--cpu-smoke runs on a CPU)")
    gpu = f", {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""
    print(
        f"# gpu_emulation: device {args.device}{gpu}, emulated group {args.backend}, "
        f"P {worlds}, {args.epochs} epochs, {args.reps} timed reps of {args.time_model}"
    )
    print(f"# torch {torch.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}")  # fmt: skip
    start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kavg-gpu-emulation-") as tmp:
        if "p1" in parts:
            rows += p1_runs(args, Path(tmp))
        if "emulate" in parts:
            for world in worlds:
                rows += emulate(args, world, Path(tmp))
    print(format_rows(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    bad = checks(rows, args)
    for line in bad:
        print(f"FAIL {line}")
    print(
        f"# {'all checks passed' if not bad else f'{len(bad)} checks failed'}; total "
        f"{time.perf_counter() - start:.0f} s, load average at end {os.getloadavg()[0]:.2f}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
