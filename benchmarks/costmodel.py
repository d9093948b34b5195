"""Validation and a worked example of the communication cost model (kavg_ray.analysis.costmodel).

``validate``: real K-AVG averages in P spawned processes joined by a gloo group on
127.0.0.1 (as tests/distributed.py does; no Ray), each learner taking SGD steps on random
data with the project's KAvgAverager, for an mlp-sized (digits) and a resnet18-sized
(CIFAR-10) model, P in {2, 4} and several K. Each trial's measured ``comm_time_s``
(KAvgAverager.stats.seconds, rank 0) is compared with rounds x the ring all-reduce cost
of a network profile written by ``kavg calibrate``. With ``--sync`` every learner waits at
an untimed barrier before each average, so the measured time is the transfer alone,
without the wait for the slowest learner that the model leaves out.

``calibrate``: the timings of ``kavg calibrate`` (kavg_ray.launch.calibrate.time_averages)
taken in P spawned gloo processes on 127.0.0.1 instead of Ray Train workers, fitted and
written as the same profile file: for a machine without Ray (the GPU box).

``sweep``: the same comparison for the trials of a stored sweep that ``kavg sweep run``
ran (Ray Train learners, as a user runs them): each trial's ``comm_time_s``, its
``wait_time_s`` for the last learner, and the transfer (their difference) against the
profile's ``predicted_comm_time_s``. ``fake-cifar10`` writes random images in CIFAR-10's
format for the resnet18 spec of ``benchmarks/costmodel_ray/``.

``twin``: runs a sweep spec of simulated-backend points in this process, one after the
other (``kavg_ray.train.run.train``, no Ray), and writes them to a results store, so that
``kavg results kopt --by time --network`` can be asked about them.

Usage:
  python benchmarks/costmodel.py calibrate --P 2 --P 4 [--sizes 4k,64k,1M,8M,32M]
         [--repeats 8] [--gap-ms MS] --out PROFILE.json
  python benchmarks/costmodel.py validate --profile PROFILE.json [--out FILE.json]
  python benchmarks/costmodel.py sweep SWEEP --storage DIR --profile PROFILE.json [--out F]
  python benchmarks/costmodel.py fake-cifar10 DIR [--per-batch 64] [--test 32]
  python benchmarks/costmodel.py twin SPEC.yaml --storage DIR [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kavg_ray.analysis import costmodel  # noqa: E402
from kavg_ray.train.models import model_bytes  # noqa: E402

MODELS = {"mlp": ((1, 8, 8), 10), "resnet18": ((3, 32, 32), 10)}


def _sizer(model: str, dataset: str, workload: Any) -> int:
    """predict_sweep's sizer: the built-in models at their default sizes."""
    return model_bytes(model, dataset, (workload or {}).get("synthetic"))

PLAN = [  # (model, P, K values, local steps, batch size)
    ("mlp", 2, (1, 4, 16), 256, 16),
    ("mlp", 4, (1, 4, 16), 256, 16),
    ("resnet18", 2, (1, 4, 16), 32, 8),
    ("resnet18", 4, (1, 4, 16), 32, 8),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _learner(rank: int, world: int, port: int, model: str, K: int, steps: int, B: int,
             sync: bool, out: str) -> None:  # fmt: skip
    import torch
    import torch.distributed as dist

    from kavg_ray.train.averaging import KAvgAverager
    from kavg_ray.train.models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    shape, classes = MODELS[model]
    net = build_model(model, shape, classes)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    avg = KAvgAverager(net, period=K)
    x, y = torch.randn(B, *shape), torch.randint(0, classes, (B,))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sync and step % K == 0:
            dist.barrier()  # untimed: the average then starts with every learner present
        avg.step()
    wall = time.perf_counter() - start
    avg.settle_waits()
    if rank == 0:
        row = {"model": model, "P": world, "K": K, "steps": steps, "batch_size": B,
               "rounds": avg.stats.count, "model_bytes": avg.flat.nbytes,
               "comm_time_s": avg.stats.seconds, "wait_time_s": avg.stats.wait_seconds,
               "wall_time_s": wall, "sync": sync}  # fmt: skip
        Path(out).write_text(json.dumps(row))
    dist.barrier()
    # Leave without gloo's C++ teardown, which can abort a rank whose peers already left
    # (tests/distributed.py does the same).
    sys.stdout.flush()
    os._exit(0)


def _timer(rank: int, world: int, port: int, sizes: list[int], repeats: int, gap_s: float,
           out: str) -> None:  # fmt: skip
    import torch
    import torch.distributed as dist

    from kavg_ray.launch.calibrate import time_averages

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    times = time_averages(sizes, repeats, gap_s=gap_s)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def _spawn_for_json(fn, P: int, *args) -> Any:
    """Run ``fn(rank, P, port, *args, out)`` in P spawned processes; what rank 0 wrote
    to ``out`` as JSON (ranks leave with os._exit, which spawn may report as a failure)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        try:
            mp.spawn(fn, args=(P, _free_port(), *args, out), nprocs=P)
        except mp.ProcessExitedException:
            if not os.path.exists(out):
                raise
        return json.loads(Path(out).read_text())


def calibrate(P_values: list[int], sizes_text: str, repeats: int, gap_s: float, out: str) -> None:
    """Time averages over each P in spawned gloo processes; fit and write the profile."""
    from kavg_ray.launch.calibrate import (
        calibration_details,
        format_fit,
        parse_sizes,
        write_calibration,
    )

    sizes = parse_sizes(sizes_text)
    samples = []
    for P in P_values:
        times = _spawn_for_json(_timer, P, sizes, repeats, gap_s)
        samples += [(P, float(n), t) for n, t in zip(sizes, times, strict=True)]
    fit = costmodel.fit_alpha_beta(samples)
    where = f"spawned processes on {socket.gethostname()} (127.0.0.1)"
    details = calibration_details(where, "gloo", P_values, repeats, samples, gap_s)
    print(format_fit(fit))
    print(f"wrote {write_calibration(out, fit, details, None)}")


def run_trial(model: str, P: int, K: int, steps: int, B: int, sync: bool = False) -> dict:
    """One K-AVG trial in P spawned gloo processes; rank 0's measured row."""
    return _spawn_for_json(_learner, P, model, K, steps, B, sync)


def _per_p_links(net: costmodel.Network) -> dict[int, costmodel.Link]:
    """alpha and beta fitted to each P's timings alone (from the profile's calibration)."""
    meas = (net.extra.get("calibration") or {}).get("measurements") or []
    out = {}
    for P in sorted({m["P"] for m in meas}):
        fit = costmodel.fit_alpha_beta(
            [(m["P"], m["nbytes"], m["seconds"]) for m in meas if m["P"] == P]
        )
        print(f"P={P} alone: alpha {fit.alpha * 1e6:.1f} us, {fit.beta / 1e9:.3f} GB/s, "
              f"rms residual {fit.rms_rel_error:.2f}")  # fmt: skip
        out[P] = fit.link()
    return out


def _add_ratios(row: dict, tag: str, predicted: float) -> None:
    """The prediction of ``row``'s communication, and its ratio to the measured time with
    and without the wait for the last learner."""
    row[f"predicted_comm_s_{tag}"] = predicted
    row[f"ratio_{tag}"] = predicted / row["comm_time_s"]
    row[f"ratio_transfer_{tag}"] = predicted / row["measured_transfer_time_s"]


def validate(profile: str, out: str | None, sync: bool = False) -> list[dict]:
    """Every trial of PLAN: measured comm_time_s against rounds x all-reduce cost."""
    net = costmodel.parse_network(profile)
    per_p = _per_p_links(net)
    rows = []
    for model, P, ks, steps, B in PLAN:
        for K in ks:
            row = run_trial(model, P, K, steps, B, sync)
            row["measured_transfer_time_s"] = row["comm_time_s"] - row["wait_time_s"]
            for tag, link in (("joint", net.inter), ("perP", per_p.get(P))):
                if link is not None:
                    pred = row["rounds"] * costmodel.allreduce_time(P, row["model_bytes"], link)
                    _add_ratios(row, tag, pred)
            rows.append(row)
            print(
                f"{model:9s} P={P} K={K:2d} rounds={row['rounds']:3d} n={row['model_bytes']:>9d} B "
                f"comm {row['comm_time_s']:.4f}s wait {row['wait_time_s']:.4f}s | ratio to "
                f"comm: joint {row['ratio_joint']:.2f} per-P {row.get('ratio_perP', math.nan):.2f}"
                f" | to comm - wait: joint {row['ratio_transfer_joint']:.2f} "
                f"per-P {row.get('ratio_transfer_perP', math.nan):.2f}",
                flush=True,
            )
    if out:
        doc = {"profile": net.to_dict(), "trials": rows, "load_avg": os.getloadavg()}
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    return rows


def _setting(trial: dict) -> str:
    if trial["algorithm"] == "hier_avg":
        return f"S={int(trial['S'])} K1={int(trial['K1'])} K2={int(trial['K2'])}"
    return f"K={int(trial['K'])}"


def compare_sweep(sweep: str, storage: str, profile: str, out: str | None) -> list[dict]:
    """The K-AVG and Hier-AVG trials of a stored sweep (``kavg sweep run``, Ray Train
    learners): measured averaging time, its wait for the last learner, and the profile's
    prediction, from the joint fit and from the fits of the trial's own P (and S)."""
    net = costmodel.parse_network(profile)
    per_p = _per_p_links(net)
    joint = costmodel.predict_sweep(sweep, storage, net, target=1.0, model_bytes=_sizer)
    own = {}  # (P, S): predictions with the links fitted to P (global) and S (local) alone
    for P, S in {(int(t["P"]), int(costmodel._num(t.get("S"), 1))) for _, t in joint.iterrows()}:
        if P in per_p:
            local = per_p.get(S) if S > 1 else None
            n = costmodel.Network(f"P={P} fit", per_p[P], local, "", {})
            own[P, S] = costmodel.predict_sweep(
                sweep, storage, n, target=1.0, model_bytes=_sizer
            )
    rows = []
    for i, trial in joint.iterrows():
        if trial["algorithm"] not in ("kavg", "hier_avg") or trial["status"] != "completed":
            continue
        if trial["P"] < 2:
            continue
        row = {k: trial.get(k) for k in ("trial_id", "algorithm", "model", "P", "K", "S", "K1",
                                         "K2", "rounds", "local_reductions", "model_bytes",
                                         "comm_time_s", "wait_time_s", "measured_transfer_time_s")}
        row = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}
        key = (int(row["P"]), int(costmodel._num(row.get("S"), 1)))
        for tag, frame in (("joint", joint), ("perP", own.get(key))):
            if frame is not None:
                _add_ratios(row, tag, float(frame.loc[i, "predicted_comm_time_s"]))
        rows.append(row)
        print(f"{row['model']:9s} P={row['P']} {_setting(row):16s} rounds={row['rounds']:4d} "
              f"comm {row['comm_time_s']:.4f}s wait {row['wait_time_s']:.4f}s | ratio to comm "
              f"{row['ratio_joint']:.2f} | to comm - wait: joint {row['ratio_transfer_joint']:.2f}"
              f" per-P {row.get('ratio_transfer_perP', math.nan):.2f}", flush=True)  # fmt: skip
    if out:
        doc = {"sweep": sweep, "profile": net.to_dict(), "trials": rows,
               "load_avg": os.getloadavg()}  # fmt: skip
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    return rows


def compare_sweeps(sweeps: list[str], storage: str, profiles: list[str], out: str | None) -> None:
    """:func:`compare_sweep` for every sweep and profile; per profile, how many trials'
    predicted/measured transfer fall inside the target 0.75..1.33 (joint and per-P fit)."""
    docs = []
    for profile in profiles:
        rows = []
        for sweep in sweeps:
            print(f"# {sweep} against {profile}")
            rows += compare_sweep(sweep, storage, profile, None)
        inside = {tag: sum(0.75 <= r.get(f"ratio_transfer_{tag}", 0) <= 1.33 for r in rows)
                  for tag in ("joint", "perP")}  # fmt: skip
        print(f"{profile}: inside 0.75..1.33: {inside['joint']} of {len(rows)} (joint fit), "
              f"{inside['perP']} of {len(rows)} (per-P fit)\n")
        docs.append({"profile": profile, "sweeps": sweeps, "trials": rows, "inside": inside})
    if out:
        Path(out).write_text(json.dumps(docs, indent=2) + "\n")


def fake_cifar10(root: str, per_batch: int, n_test: int) -> None:
    """Random images in CIFAR-10's own on-disk format (for timing runs of resnet18 here,
    where the real set cannot be downloaded)."""
    import pickle

    import numpy as np

    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        doc = {b"data": rng.randint(0, 256, size=(n, 3072)).astype(np.uint8),
               b"labels": rng.randint(0, 10, size=n).tolist()}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(doc))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    print(f"wrote {5 * per_batch} training and {n_test} test images under {folder}")


def twin(spec: str, storage: str, epochs: int | None) -> None:
    """Run a sweep spec's simulated points in this process into ``storage``."""
    import yaml

    from kavg_ray.analysis.results import ResultsStore
    from kavg_ray.config import load_sweep
    from kavg_ray.launch.sweep import trial_row
    from kavg_ray.train.run import train

    sweep = load_sweep(spec)
    store = ResultsStore(storage)
    points = sweep.points()
    name = points[0].name
    store.write_spec(name, yaml.safe_load(Path(spec).read_text()))
    for cfg in points:
        if epochs is not None:
            cfg = cfg.model_copy(update={"workload": cfg.workload.model_copy(
                update={"epochs": epochs})})  # fmt: skip
        history: list[dict] = []
        t0 = time.perf_counter()
        train(cfg, lambda m, _s, h=history: h.extend([*m.get("history_before", []), m]))
        hist = [{k: v for k, v in h.items() if k != "history_before"} for h in history]
        status = "diverged" if hist and hist[-1].get("diverged") else "completed"
        tid = cfg.trial_name()
        store.upsert_trial(name, trial_row(name, tid, cfg, hist, status), hist)
        print(f"{tid}: {status} acc {hist[-1]['test_acc']:.4f} in {time.perf_counter() - t0:.1f}s",
              flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--P", type=int, action="append", required=True)
    c.add_argument("--sizes", default="4k,64k,1M,8M,32M")
    c.add_argument("--repeats", type=int, default=8)
    c.add_argument("--gap-ms", type=float, default=2.0, help="computation before each average")
    c.add_argument("--out", required=True)
    v = sub.add_parser("validate")
    v.add_argument("--profile", required=True)
    v.add_argument("--out", default=None)
    v.add_argument("--sync", action="store_true", help="barrier (untimed) before each average")
    s = sub.add_parser("sweep", help="compare a stored sweep's trials with the profile")
    s.add_argument("sweep", nargs="+")
    s.add_argument("--storage", required=True)
    s.add_argument("--profile", required=True, action="append", help="repeatable")
    s.add_argument("--out", default=None)
    f = sub.add_parser("fake-cifar10", help="random images in CIFAR-10's format")
    f.add_argument("root")
    f.add_argument("--per-batch", type=int, default=64)
    f.add_argument("--test", type=int, default=32)
    t = sub.add_parser("twin")
    t.add_argument("spec")
    t.add_argument("--storage", required=True)
    t.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    if args.cmd == "calibrate":
        calibrate(args.P, args.sizes, args.repeats, args.gap_ms / 1e3, args.out)
    elif args.cmd == "validate":
        validate(args.profile, args.out, args.sync)
    elif args.cmd == "sweep":
        compare_sweeps(args.sweep, args.storage, args.profile, args.out)
    elif args.cmd == "fake-cifar10":
        fake_cifar10(args.root, args.per_batch, args.test)
    else:
        twin(args.spec, args.storage, args.epochs)


if __name__ == "__main__":
    main()
