"""The asynchronous baselines of the K-AVG paper (section 4.1): Downpour and EAMSGD.

A :class:`ParameterServer` holds the central model as one flat float32 numpy array and a
version counter (+1 per applied update). It is a plain class: a test uses it directly in
one process (it is thread-safe), and a run makes it a Ray actor (:func:`start_server`),
whose methods then run one at a time in the order the calls arrive. Updates are applied
the moment they arrive: there is no barrier between learners.

**Staleness** of an update: the number of updates the server applied after the pushing
learner last pulled (Downpour) or last exchanged (EAMSGD) and before this one, i.e. the
server's version at apply time minus the version the learner last saw. It is 0 for one
learner with ``push_period == fetch_period``; with ``push_period < fetch_period`` the
learner's own earlier pushes since its pull count too.

**Downpour** (Dean et al., 2012): every ``fetch_period`` steps a learner replaces its local
model by the central one; it takes local SGD steps on its own mini-batches and adds each
step's update (``-lr * grad``, and the change of any floating buffer such as BatchNorm's
running statistics) to an accumulator, which it pushes every ``push_period`` steps; the
server applies ``center += accumulator``. A fetch does not discard un-pushed updates: they
are pushed at the next push. After step t a learner first pushes (t % push_period == 0),
then pulls (t % fetch_period == 0); it pulls once before its first step. With P = 1 and
``push_period == fetch_period == 1`` this is sequential SGD, bit for bit.

**EAMSGD** (Zhang, Choromanska and LeCun, 2015): each learner keeps its own model x_i and
momentum (``workload.momentum``, Nesterov as in that paper); after every ``tau`` local steps
it exchanges with the center x~ at the moving rate alpha = beta / P: atomically in the
server, x~ += alpha (x_i - x~) and the pre-update x~ is returned, and the learner sets
x_i -= alpha (x_i - x~) with that x~. Every learner starts from the center.

Both run plain SGD locally (with momentum and weight decay as ``torch.optim.SGD`` defines
them; Downpour's momentum is heavy-ball). **Epochs**: the learners run asynchronously within
an epoch and meet at its end (a barrier, then one all-reduce of the metrics), where rank 0
reads the server's epoch statistics and every learner evaluates the *central* model on its
slice of the test set. Nothing is pushed while that happens, so the metrics and the
checkpoint see one consistent server state.

Per-epoch metrics carry the keys of :func:`kavg_ray.worker.run_training`, with
``rounds`` = pushes (Downpour) or exchanges (EAMSGD) of all learners together so far,
and per learner (the mean over learners, like K-AVG's per-learner figures)
``compute_time_s``/``comm_time_s``, the time outside/inside server calls, and
``bytes_communicated``, the bytes it moved to and from the server (a pull or a push moves
the model's size, an exchange twice that; evaluation pulls are not counted), plus
``staleness_mean`` and ``staleness_max`` over this epoch's updates (NaN when there were
none) and the server's cumulative ``pushes`` (received) and ``applied`` counts.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kavg_ray.averaging import FlatModel
from kavg_ray.config import RunConfig
from kavg_ray.data import augment_generator, epoch_indices, load_dataset, steps_per_epoch
from kavg_ray.models import build_model
from kavg_ray.worker import (
    Learner,
    ReportFn,
    evaluate,
    loss_fn,
    replay_finished_run,
    report_epoch,
)

ASGD_ALGORITHMS = ("downpour", "eamsgd")


class ParameterServer:
    """The central model of an asynchronous run: a flat float32 array and a version."""

    def __init__(self, params: Any) -> None:
        self._lock = threading.Lock()
        self._params = np.array(params, dtype=np.float32).reshape(-1)  # a private copy
        self._version = 0
        self._pushes = 0  # updates received (push or elastic exchange)
        self._applied = 0  # updates applied to the center
        self._reset_window()

    def _reset_window(self) -> None:
        self._stale_sum = 0
        self._stale_count = 0
        self._stale_max = 0

    def size(self) -> int:
        """The number of float32 values in the central model."""
        return int(self._params.size)

    def pull(self) -> tuple[int, np.ndarray]:
        """(version, a copy of the central parameters)."""
        with self._lock:
            return self._version, self._params.copy()

    def push(self, update: Any, pulled_version: int) -> int:
        """Downpour: ``center += update`` now; returns the new version."""
        update = np.asarray(update, dtype=np.float32)
        with self._lock:
            self._pushes += 1
            self._check_shape(update)
            self._params += update.reshape(-1)
            return self._count_applied(pulled_version)

    def elastic(self, x: Any, alpha: float, pulled_version: int) -> tuple[int, np.ndarray]:
        """EAMSGD: ``center += alpha (x - center)``; returns (new version, center before)."""
        x = np.asarray(x, dtype=np.float32)
        with self._lock:
            self._pushes += 1
            self._check_shape(x)
            if not 0.0 < alpha < 1.0:
                raise ValueError(f"moving rate alpha must be in (0, 1), got {alpha}")
            before = self._params.copy()
            self._params += np.float32(alpha) * (x.reshape(-1) - before)
            return self._count_applied(pulled_version), before

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Version, cumulative counts and the staleness of the updates since the last reset."""
        with self._lock:
            return self._stats(reset)

    def snapshot(self, reset: bool = False) -> dict[str, Any]:
        """``stats()`` plus a copy of the parameters, taken atomically (for a checkpoint)."""
        with self._lock:
            return {**self._stats(reset), "params": self._params.copy()}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore params, version and counts saved from :meth:`snapshot` (on resume)."""
        params = np.array(state["params"], dtype=np.float32).reshape(-1)
        with self._lock:
            self._check_shape(params)
            self._params = params
            self._version = int(state["version"])
            self._pushes = int(state["pushes"])
            self._applied = int(state["applied"])
            self._reset_window()

    def _stats(self, reset: bool) -> dict[str, Any]:
        n = self._stale_count
        out = {
            "version": self._version,
            "pushes": self._pushes,
            "applied": self._applied,
            "window_updates": n,
            "staleness_mean": self._stale_sum / n if n else math.nan,
            "staleness_max": float(self._stale_max) if n else math.nan,
        }
        if reset:
            self._reset_window()
        return out

    def _check_shape(self, arr: np.ndarray) -> None:
        if arr.size != self._params.size:
            raise ValueError(
                f"update of {arr.size} values for a central model of {self._params.size}"
            )

    def _count_applied(self, pulled_version: int) -> int:
        staleness = self._version - int(pulled_version)
        if staleness < 0:
            raise ValueError(
                f"pulled version {pulled_version} is newer than the server's {self._version}"
            )
        self._version += 1
        self._applied += 1
        self._stale_sum += staleness
        self._stale_count += 1
        self._stale_max = max(self._stale_max, staleness)
        return self._version


def initial_params(cfg: RunConfig) -> np.ndarray:
    """The run's seeded initial model as one flat float32 array (built as the worker does)."""
    wl = cfg.workload
    data = load_dataset(
        wl.dataset, data_dir=wl.data_dir, download=wl.download, seed=cfg.seed,
        synthetic=wl.synthetic,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = build_model(wl.model, data.input_shape, data.num_classes)
    return FlatModel(model).buffer.detach().numpy().copy()


def start_server(cfg: RunConfig) -> Any:
    """A ParameterServer Ray actor holding ``cfg``'s initial model (kill it when done).

    It asks for no CPU, so it fits beside the P learners, and opts out of the calling Tune
    trial's placement group.
    """
    import ray

    actor_cls = ray.remote(ParameterServer).options(num_cpus=0, scheduling_strategy="DEFAULT")
    return actor_cls.remote(initial_params(cfg))


class _Server:
    """Calls a ParameterServer directly, or a Ray actor handle of one and waits."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self._remote = hasattr(getattr(server, "pull", None), "remote")

    def __call__(self, method: str, *args: Any) -> Any:
        fn = getattr(self._server, method)
        if self._remote:
            import ray

            return ray.get(fn.remote(*args))
        return fn(*args)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _load(buffer: torch.Tensor, arr: np.ndarray) -> None:
    """Copy a (possibly read-only) numpy array into a flat tensor."""
    arr = np.asarray(arr, dtype=np.float32).reshape(-1)
    if buffer.device.type == "cpu":
        buffer.numpy()[:] = arr
    else:
        buffer.copy_(torch.from_numpy(arr.copy()))


def run_downpour(
    cfg: RunConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    report: ReportFn,
    server: Any,
    resume: dict | None = None,
) -> dict:
    """One Downpour learner for the configured epochs; returns the last epoch's metrics."""
    if cfg.algorithm != "downpour":
        raise ValueError(f"run_downpour got algorithm {cfg.algorithm}")
    return _run(cfg, rank, world_size, device, report, server, resume)


def run_eamsgd(
    cfg: RunConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    report: ReportFn,
    server: Any,
    resume: dict | None = None,
) -> dict:
    """One EAMSGD learner for the configured epochs; returns the last epoch's metrics."""
    if cfg.algorithm != "eamsgd":
        raise ValueError(f"run_eamsgd got algorithm {cfg.algorithm}")
    return _run(cfg, rank, world_size, device, report, server, resume)


def _run(
    cfg: RunConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    report: ReportFn,
    server: Any,
    resume: dict | None,
) -> dict:
    wl = cfg.workload
    srv = _Server(server)
    downpour = cfg.algorithm == "downpour"
    data = load_dataset(
        wl.dataset, data_dir=wl.data_dir, download=wl.download, seed=cfg.seed,
        synthetic=wl.synthetic,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = build_model(wl.model, data.input_shape, data.num_classes).to(device)
    flat = FlatModel(model)
    if flat.dtype != torch.float32:
        raise ValueError(f"the parameter server holds float32; the model is {flat.dtype}")
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    n_total = flat.buffer.numel()
    has_buffers = n_total > n_params  # floating buffers (BatchNorm statistics) follow
    if srv("size") != n_total:
        raise ValueError(f"the server holds {srv('size')} values; this model has {n_total}")
    for name in ("train_x", "train_y", "test_x", "test_y"):
        setattr(data, name, getattr(data, name).to(device))
    torch.manual_seed(cfg.seed * 1_000_003 + rank)  # dropout differs per learner
    learner = Learner(model, None, None, data, device, rank, world_size)  # for evaluate()
    criterion = loss_fn(data)
    steps = steps_per_epoch(data.n_train, wl.batch_size, world_size)
    nbytes = flat.nbytes
    acc = torch.zeros_like(flat.buffer) if downpour else None
    momentum_buf: torch.Tensor | None = None
    nesterov = not downpour
    alpha = 0.0 if downpour else cfg.beta / world_size
    c: dict[str, Any] = {
        "epoch": 0, "step": 0, "samples": 0, "compute_time_s": 0.0, "comm_time_s": 0.0,
        "bytes": 0, "rounds": 0, "pulled_version": 0, "wall_time_s": 0.0,
    }  # fmt: skip
    history: list[dict] = []
    if resume is not None:
        if resume.get("algorithm") != cfg.algorithm:
            raise ValueError(f"checkpoint is not a {cfg.algorithm} learner's")
        if rank == 0:
            srv("load_state", resume["server"])
        flat.buffer.copy_(resume["local"])
        if acc is not None:
            acc.copy_(resume["acc"])
        if resume["momentum"] is not None:
            momentum_buf = resume["momentum"].to(device)
        torch.set_rng_state(resume["rng"])
        c = dict(resume["counters"])
        history = list(resume["history"])
    if world_size > 1:
        dist.barrier()  # rank 0 has restored the server before anyone talks to it
    replay = list(history)
    finished = replay_finished_run(report, replay, c["epoch"] >= wl.epochs)
    if finished is not None:
        return finished

    def call(method: str, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = srv(method, *args)
        c["comm_time_s"] += time.perf_counter() - t0
        return out

    def pull() -> None:
        c["pulled_version"], center = call("pull")
        _load(flat.buffer, center)
        c["bytes"] += nbytes

    def push() -> None:
        call("push", _to_numpy(acc), c["pulled_version"])
        acc.zero_()
        c["bytes"] += nbytes
        c["rounds"] += 1

    def exchange() -> None:
        c["pulled_version"], center = call(
            "elastic", _to_numpy(flat.buffer), alpha, c["pulled_version"]
        )
        before = torch.from_numpy(np.array(center, dtype=np.float32)).to(device)
        flat.buffer.sub_((flat.buffer - before) * alpha)
        c["bytes"] += 2 * nbytes
        c["rounds"] += 1

    def local_step(idx: torch.Tensor, gen: torch.Generator, lr: float) -> torch.Tensor:
        nonlocal momentum_buf
        x = data.prepare(data.train_x[idx])
        if data.augment is not None:
            x = data.augment(x, gen)
        buffers_before = flat.buffer[n_params:].clone() if downpour and has_buffers else None
        loss = criterion(model(x), data.train_y[idx])
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            g = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                 for p in params]
            )  # fmt: skip
            if wl.weight_decay:
                g += flat.buffer[:n_params] * wl.weight_decay
            if wl.momentum:
                if momentum_buf is None:
                    momentum_buf = g.clone()
                else:
                    momentum_buf.mul_(wl.momentum).add_(g)
                g = g + momentum_buf * wl.momentum if nesterov else momentum_buf
            delta = g * (-lr)
            flat.buffer[:n_params] += delta
            if downpour:
                acc[:n_params] += delta
                if has_buffers:
                    acc[n_params:] += flat.buffer[n_params:] - buffers_before
        return loss.detach()

    if resume is None:
        pull()  # every learner starts from the center
    metrics: dict = {}
    start = time.perf_counter() - c["wall_time_s"]

    for epoch in range(c["epoch"], wl.epochs):
        lr = wl.lr.at_epoch(epoch)
        batches = epoch_indices(
            data.n_train, wl.batch_size, rank, world_size, epoch, cfg.seed, wl.sampling
        ).to(device)
        gen = augment_generator(cfg.seed, epoch, rank)
        comm_before = c["comm_time_s"]
        loss_sum = torch.zeros((), device=device)
        t0 = time.perf_counter()
        for idx in batches:
            loss_sum += local_step(idx, gen, lr)
            c["step"] += 1
            t = c["step"]
            if downpour:
                if t % cfg.push_period == 0:
                    push()
                if t % cfg.fetch_period == 0:
                    pull()
            elif t % cfg.tau == 0:
                exchange()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        c["compute_time_s"] += time.perf_counter() - t0 - (c["comm_time_s"] - comm_before)
        c["samples"] += steps * wl.batch_size * world_size
        c["epoch"] = epoch + 1

        # Every learner has finished (and pushed) this epoch: the server is quiet until
        # the all-reduce below lets the first learner into the next epoch.
        if world_size > 1:
            dist.barrier()
        finite = bool(torch.isfinite(flat.buffer).all().item())
        snap: dict[str, Any] = {}
        if rank == 0:
            snap = srv("snapshot", True)
            center = snap["params"]
        else:
            _, center = srv("pull")  # evaluation: not counted as communication
        local = flat.buffer.clone()
        _load(flat.buffer, center)
        finite = finite and bool(torch.isfinite(flat.buffer).all().item())
        test_loss, correct, count = evaluate(learner)
        flat.buffer.copy_(local)
        totals = torch.tensor(
            [
                loss_sum.item(), float(steps), test_loss, correct, count, 0.0 if finite else 1.0,
                c["compute_time_s"], c["comm_time_s"], float(c["bytes"]), float(c["rounds"]),
                snap.get("staleness_mean", 0.0), snap.get("staleness_max", 0.0),
                snap.get("pushes", 0), snap.get("applied", 0),
            ],
            dtype=torch.float64,
        )  # fmt: skip
        if world_size > 1:
            dist.all_reduce(totals)
        train_loss = totals[0].item() / totals[1].item()
        diverged = bool(totals[5].item() > 0) or not math.isfinite(train_loss)
        c["wall_time_s"] = time.perf_counter() - start
        metrics = {
            "epoch": c["epoch"],
            "samples": c["samples"],
            "rounds": int(totals[9].item()),
            "train_loss": train_loss,
            "test_loss": totals[2].item() / totals[4].item(),
            "test_acc": (
                totals[3].item() / totals[4].item() if data.task == "classification" else math.nan
            ),
            "lr": lr,
            "compute_time_s": totals[6].item() / world_size,
            "comm_time_s": totals[7].item() / world_size,
            "bytes_communicated": round(totals[8].item() / world_size),
            "wall_time_s": c["wall_time_s"],
            "diverged": diverged,
            "staleness_mean": totals[10].item(),
            "staleness_max": totals[11].item(),
            "pushes": int(totals[12].item()),
            "applied": int(totals[13].item()),
        }
        history.append(metrics)
        state = {
            "algorithm": cfg.algorithm,
            "local": flat.buffer.detach().cpu().clone(),
            "acc": None if acc is None else acc.cpu().clone(),
            "momentum": None if momentum_buf is None else momentum_buf.cpu().clone(),
            "rng": torch.get_rng_state(),
            "counters": dict(c),
            "history": list(history),
        }
        if rank == 0:
            state["server"] = {
                "params": np.array(snap["params"], dtype=np.float32),
                **{k: snap[k] for k in ("version", "pushes", "applied")},
            }
        replay = report_epoch(report, metrics, state, replay)
        if diverged:
            break
    return metrics
