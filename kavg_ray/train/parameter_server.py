"""The asynchronous baselines of the K-AVG paper (section 4.1): Downpour and EAMSGD.

A :class:`ParameterServer` holds the central model as one flat float32 numpy array and a
version counter (+1 per applied update). It is a plain class: a test uses it directly in
one process (it is thread-safe), and a run makes it a Ray actor
(:func:`kavg_ray.launch.ray_train.start_server`),
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

Per-epoch metrics carry the keys of :data:`kavg_ray.train.loop.METRIC_KEYS`, with
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

from kavg_ray.config import RunConfig, is_factory
from kavg_ray.train.averaging import FlatModel
from kavg_ray.train.data import LearnerEpochs, steps_per_epoch
from kavg_ray.train.loop import EngineBase, empty_comm_metrics
from kavg_ray.train.workload import (
    EvalSums,
    Recipe,
    build_optimizer,
    build_workload,
    evaluate_sums,
    load_data,
    model_builder,
    seed_dropout,
    tokens_per_sample,
)

STATE_FORMAT = "parameter-server-1"


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
    """The run's seeded initial model as one flat float32 array (built as the engines do)."""
    data = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = model_builder(cfg)(data.input_shape, data.num_classes)
    return FlatModel(model).buffer.detach().numpy().copy()


class ServerClient:
    """Calls a ParameterServer's methods by name: the object itself, or anything with the
    same blocking methods (a multiprocessing proxy; a Ray actor wrapped by
    kavg_ray.launch.ray_train, so nothing here imports ray)."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def __call__(self, method: str, *args: Any) -> Any:
        return getattr(self._server, method)(*args)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _load(buffer: torch.Tensor, arr: np.ndarray) -> None:
    """Copy a (possibly read-only) numpy array into a flat tensor."""
    arr = np.asarray(arr, dtype=np.float32).reshape(-1)
    if buffer.device.type == "cpu":
        buffer.numpy()[:] = arr
    else:
        buffer.copy_(torch.from_numpy(arr.copy()))


class ParameterServerEngine(EngineBase):
    """This process's learner of a Downpour or EAMSGD run, talking to ``server``."""

    def __init__(
        self, cfg: RunConfig, rank: int, world_size: int, device: torch.device, server: Any
    ) -> None:
        if cfg.algorithm not in ("downpour", "eamsgd"):
            raise ValueError(f"the parameter server runs downpour and eamsgd, not {cfg.algorithm}")
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.server = ServerClient(server)
        self.downpour = cfg.algorithm == "downpour"
        self.workload = build_workload(cfg, device)
        self.flat = FlatModel(self.workload.model)
        if self.flat.dtype != torch.float32:
            raise ValueError(f"the parameter server holds float32; the model is {self.flat.dtype}")
        self.params = list(self.workload.model.parameters())
        self.n_params = sum(p.numel() for p in self.params)
        size, mine = self.server("size"), self.flat.buffer.numel()
        if size != mine:
            raise ValueError(f"the server holds {size} values; this model has {mine}")
        seed_dropout(cfg, rank)
        self.learners = world_size
        self.recipe = Recipe(cfg, device)
        self.steps_per_epoch = steps_per_epoch(
            self.workload.data.n_train, self.recipe.step_batch, world_size
        )
        self.tokens_per_sample = tokens_per_sample(self.workload.data)
        self.epochs = LearnerEpochs(
            self.workload.data, self.recipe.step_batch, rank, world_size, cfg.seed,
            cfg.workload.sampling, device,
        )  # fmt: skip
        self.acc = torch.zeros_like(self.flat.buffer) if self.downpour else None
        self.momentum_buf: torch.Tensor | None = None
        # workload.optimizer "module:function": the factory's optimizer steps the local
        # model in place of the built-in SGD; Downpour pushes what it moved.
        self.optimizer = (
            build_optimizer(cfg, self.params) if is_factory(cfg.workload.optimizer) else None
        )
        self.alpha = 0.0 if self.downpour else cfg.beta / world_size
        self.c = {
            "step": 0, "comm_time_s": 0.0, "bytes": 0, "rounds": 0, "pulled_version": 0,
        }  # fmt: skip
        self.snap: dict[str, Any] = {}
        self.resumed_server: dict | None = None

    # -- talking to the server ----------------------------------------------------------

    def _call(self, method: str, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = self.server(method, *args)
        self.c["comm_time_s"] += time.perf_counter() - t0
        return out

    def _pull(self) -> None:
        self.c["pulled_version"], center = self._call("pull")
        _load(self.flat.buffer, center)
        self.c["bytes"] += self.flat.nbytes

    def _push(self) -> None:
        self._call("push", _to_numpy(self.acc), self.c["pulled_version"])
        self.acc.zero_()
        self.c["bytes"] += self.flat.nbytes
        self.c["rounds"] += 1

    def _exchange(self) -> None:
        buf = self.flat.buffer
        self.c["pulled_version"], center = self._call(
            "elastic", _to_numpy(buf), self.alpha, self.c["pulled_version"]
        )
        before = torch.from_numpy(np.array(center, dtype=np.float32)).to(self.device)
        buf.sub_((buf - before) * self.alpha)
        self.c["bytes"] += 2 * self.flat.nbytes
        self.c["rounds"] += 1

    # -- the engine protocol ------------------------------------------------------------

    def begin(self, resumed: bool) -> None:
        if resumed and self.rank == 0:
            self.server("load_state", self.resumed_server)
        if self.world_size > 1:
            dist.barrier()  # rank 0 has restored the server before anyone talks to it
        if not resumed:
            self._pull()  # every learner starts from the center

    def train_steps(
        self, epoch: int, first: int, end: int, lrs: list[float]
    ) -> tuple[float, float]:
        cfg, data = self.cfg, self.workload.data
        batches, gen = self.epochs.at(epoch, first)
        loss_sum = torch.zeros((), device=self.device)
        for lr, (x, y) in zip(lrs, data.train_batches(batches[first:end], gen), strict=True):
            loss_sum += self._local_step(x, y, lr)
            self.c["step"] += 1
            t = self.c["step"]
            if self.downpour:
                if t % cfg.push_period == 0:
                    self._push()
                if t % cfg.fetch_period == 0:
                    self._pull()
            elif t % cfg.tau == 0:
                self._exchange()
        return loss_sum.item(), float(end - first)

    def _local_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """One local step on the flat buffer: SGD (heavy-ball for Downpour, Nesterov for
        EAMSGD), or the optimizer factory's step."""
        wl, flat, n = self.cfg.workload, self.flat.buffer, self.n_params
        has_buffers = flat.numel() > n  # floating buffers (BatchNorm statistics) follow
        buffers_before = flat[n:].clone() if self.downpour and has_buffers else None
        if self.recipe.plain:
            loss = self.workload.loss(self.workload.model(x), y)
            for p in self.params:
                p.grad = None
            loss.backward()
        else:
            for p in self.params:
                p.grad = None
            loss = self.recipe.backward(self.workload.model, self.workload.loss, x, y)
            self.recipe.clip_gradients(self.params)
        with torch.no_grad():
            delta = self._factory_step(lr) if self.optimizer is not None else None
        if delta is not None:
            if self.downpour:
                self.acc[:n] += delta
                if has_buffers:
                    self.acc[n:] += flat[n:] - buffers_before
            return loss.detach()
        with torch.no_grad():
            g = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                 for p in self.params]
            )  # fmt: skip
            if wl.weight_decay:
                g += flat[:n] * wl.weight_decay
            if wl.momentum:
                if self.momentum_buf is None:
                    self.momentum_buf = g.clone()
                else:
                    self.momentum_buf.mul_(wl.momentum).add_(g)
                g = g + self.momentum_buf * wl.momentum if not self.downpour else self.momentum_buf
            delta = g * (-lr)
            flat[:n] += delta
            if self.downpour:
                self.acc[:n] += delta
                if has_buffers:
                    self.acc[n:] += flat[n:] - buffers_before
        return loss.detach()

    def _factory_step(self, lr: float) -> torch.Tensor:
        """The factory optimizer's step at rate ``lr`` (the parameters are views of the flat
        buffer); returns how far it moved the parameters."""
        before = self.flat.buffer[: self.n_params].clone()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return self.flat.buffer[: self.n_params] - before

    def evaluate(self) -> EvalSums:
        """The central model's test sums, read when every learner has ended the epoch."""
        # Every learner has finished (and pushed) this epoch: the server is quiet until
        # the all-reduce of the metrics lets the first learner into the next epoch.
        if self.world_size > 1:
            dist.barrier()
        flat, data, model = self.flat.buffer, self.workload.data, self.workload.model
        finite = bool(torch.isfinite(flat).all().item())
        if self.rank == 0:
            self.snap = self.server("snapshot", True)
            center = self.snap["params"]
        else:
            _, center = self.server("pull")  # evaluation: not counted as communication
        local = flat.clone()
        _load(flat, center)
        finite = finite and bool(torch.isfinite(flat).all().item())
        idx = torch.arange(self.rank, data.n_test, self.world_size, device=self.device)
        sums = evaluate_sums(model, model, data, idx, self.workload.loss)
        flat.copy_(local)
        sums.finite = finite
        return sums

    def comm_seconds(self) -> float:
        return self.c["comm_time_s"]

    def comm_metrics(self, compute_time_s: float) -> dict:
        """Per-learner means of time and bytes, all learners' rounds, rank 0's server stats."""
        snap, c = self.snap, self.c
        totals = torch.tensor(
            [
                compute_time_s, c["comm_time_s"], float(c["bytes"]), float(c["rounds"]),
                snap.get("staleness_mean", 0.0), snap.get("staleness_max", 0.0),
                snap.get("pushes", 0), snap.get("applied", 0),
            ],
            dtype=torch.float64,
        )  # fmt: skip
        totals = self.all_reduce(totals)
        w = self.world_size
        rounds = int(totals[3].item())
        return {
            **empty_comm_metrics(),
            "rounds": rounds,
            "compute_time_s": totals[0].item() / w,
            "comm_time_s": totals[1].item() / w,
            "wait_time_s": math.nan,  # server calls are not collectives: no last arrival
            "bytes_communicated": round(totals[2].item() / w),
            "global_reductions": rounds,
            "global_comm_time_s": totals[1].item() / w,
            "staleness_mean": totals[4].item(),
            "staleness_max": totals[5].item(),
            "pushes": int(totals[6].item()),
            "applied": int(totals[7].item()),
        }

    def state_dict(self) -> dict:
        state = {
            "format": STATE_FORMAT,
            "algorithm": self.cfg.algorithm,
            "local": self.flat.buffer.detach().cpu().clone(),
            "acc": None if self.acc is None else self.acc.cpu().clone(),
            "momentum": None if self.momentum_buf is None else self.momentum_buf.cpu().clone(),
            "counters": dict(self.c),
        }
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.rank == 0:
            state["server"] = {
                "params": np.array(self.snap["params"], dtype=np.float32),
                **{k: self.snap[k] for k in ("version", "pushes", "applied")},
            }
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT or state.get("algorithm") != self.cfg.algorithm:
            raise ValueError(f"checkpoint is not a {self.cfg.algorithm} learner's")
        self.flat.buffer.copy_(state["local"])
        if self.acc is not None:
            self.acc.copy_(state["acc"])
        if state["momentum"] is not None:
            self.momentum_buf = state["momentum"].to(self.device)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.c = dict(state["counters"])
        self.resumed_server = state.get("server")
