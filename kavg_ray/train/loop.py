"""The one epoch loop, shared by every engine (backend).

:func:`run_epochs` trains a run's epochs on an :class:`Engine`: per epoch it sets the
learning rate, lets the engine train one epoch of local steps (averaging as its algorithm
says), evaluates, reduces the sums over learners and reports one metrics dict with the keys
of :data:`METRIC_KEYS`, together with a checkpoint of this learner.

**Reports and the replay protocol.** ``report(metrics, state)`` is called once per epoch.
``state`` is this learner's checkpoint (pass it back as ``resume=`` to continue the run) or
``None`` when nothing new was trained. A resumed run hands the epochs before its checkpoint
to its first report, under the key ``history_before`` (:data:`HISTORY_BEFORE`), so whoever
collects the reports ends up with every epoch exactly once; a resumed run that had already
ended reports its last epoch once, carrying the others, and trains nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

import torch

from kavg_ray.config import RunConfig
from kavg_ray.metrics import HISTORY_BEFORE, METRIC_KEYS  # noqa: F401 - METRIC_KEYS: the engines' contract
from kavg_ray.train import collectives
from kavg_ray.train.workload import EvalSums

# report(metrics, state): state is this learner's checkpoint, or None when nothing new
# was trained (a replay of finished epochs).
ReportFn = Callable[[dict, dict | None], None]


class Engine(Protocol):
    """One backend: how the learners of this process train, evaluate and checkpoint."""

    learners: int  # P: the learners of the whole run
    steps_per_epoch: int  # local steps of each learner per epoch

    def begin(self, resumed: bool) -> None:
        """Called once before the first epoch this process trains."""

    def train_epoch(self, epoch: int, lr: float) -> tuple[float, float]:
        """Train one epoch; returns (summed training loss, steps) of this process's learners."""

    def evaluate(self) -> EvalSums:
        """Test sums of the averaged model over this process's slice of the test set."""

    def all_reduce(self, totals: torch.Tensor) -> torch.Tensor:
        """Sum a float64 vector over the processes of the run (identity for one process)."""

    def comm_metrics(self, compute_time_s: float) -> dict:
        """rounds, compute/comm times, bytes and the per-algorithm keys of METRIC_KEYS."""

    def comm_seconds(self) -> float:
        """Seconds this process has spent communicating so far."""

    def synchronize(self) -> None:
        """Wait for the device to finish queued work (timing)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class EngineBase:
    """What the engines share: the processes of the run and the device of this one."""

    world_size: int = 1  # processes of the run (1: every learner is in this one)
    device: torch.device = torch.device("cpu")

    def begin(self, resumed: bool) -> None:
        """Nothing to do before the first epoch, unless an engine says otherwise."""

    def all_reduce(self, totals: torch.Tensor) -> torch.Tensor:
        """Sum over the run's processes, on this process's device (where the run's
        collectives are: NCCL takes no host tensor); the identity for one process."""
        if self.world_size > 1:
            totals = totals.to(self.device)
            collectives.all_reduce(totals, self.device)
        return totals

    def synchronize(self) -> None:
        """Wait for queued device work, so that the clock measures it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def empty_comm_metrics() -> dict:
    """The algorithm-specific keys of METRIC_KEYS for an engine that has none of them."""
    return {
        "wait_time_s": 0.0, "local_reductions": 0, "global_reductions": 0,
        "local_comm_time_s": 0.0, "global_comm_time_s": 0.0, "local_bytes": 0, "global_bytes": 0,
        "staleness_mean": math.nan, "staleness_max": math.nan, "pushes": 0, "applied": 0,
    }  # fmt: skip


def run_epochs(
    cfg: RunConfig, engine: Engine, report: ReportFn, resume: dict | None = None
) -> dict:
    """Train ``cfg``'s epochs on ``engine``; returns the last epoch's metrics."""
    rec = Recorder(cfg, engine, resume)
    finished = rec.replay_if_finished(report)
    if finished is not None:
        return finished
    engine.begin(resumed=resume is not None)
    metrics: dict = {}
    for epoch in range(rec.epoch, cfg.workload.epochs):
        lr = cfg.workload.lr.at_epoch(epoch)
        comm_before = engine.comm_seconds()
        t0 = time.perf_counter()
        loss_sum, steps = engine.train_epoch(epoch, lr)
        engine.synchronize()
        compute = time.perf_counter() - t0 - (engine.comm_seconds() - comm_before)
        rec.add_epoch(compute)
        metrics = rec.epoch_metrics(lr, loss_sum, steps, engine.evaluate())
        rec.report(report, metrics)
        if metrics["diverged"]:
            break
    return metrics


class Recorder:
    """A run's counters, history, metrics and checkpoints, the same for every engine."""

    def __init__(self, cfg: RunConfig, engine: Engine, resume: dict | None) -> None:
        self.cfg, self.engine = cfg, engine
        self.counters = {"epoch": 0, "samples": 0, "compute_time_s": 0.0, "wall_time_s": 0.0}
        self.history: list[dict] = []
        if resume is not None:
            engine.load_state_dict(resume.get("engine", {}))
            restore_random_states(resume, engine.device)
            self.counters = dict(resume["counters"])
            self.history = list(resume["history"])
        self.replay = list(self.history)  # epochs the next report hands over
        self.start = time.perf_counter() - self.counters["wall_time_s"]

    @property
    def epoch(self) -> int:
        return self.counters["epoch"]

    def replay_if_finished(self, report: ReportFn) -> dict | None:
        """A resumed run that had ended reports its last epoch once; None: train on."""
        h = self.history
        if h and (self.epoch >= self.cfg.workload.epochs or h[-1].get("diverged")):
            report({**h[-1], HISTORY_BEFORE: h[:-1]}, None)
            return h[-1]
        return None

    def add_epoch(self, compute_time_s: float) -> None:
        c = self.counters
        c["compute_time_s"] += compute_time_s
        c["samples"] += self.engine.steps_per_epoch * self.cfg.workload.batch_size * (
            self.engine.learners
        )
        c["epoch"] += 1

    def epoch_metrics(self, lr: float, loss_sum: float, steps: float, ev: EvalSums) -> dict:
        """The epoch's metrics: sums reduced over learners, then the engine's comm figures."""
        totals = torch.tensor(
            [loss_sum, steps, ev.loss_sum, ev.correct, ev.count, 0.0 if ev.finite else 1.0],
            dtype=torch.float64,
        )
        totals = self.engine.all_reduce(totals)
        train_loss = totals[0].item() / totals[1].item()
        test_acc = totals[3].item() / totals[4].item() if ev.has_accuracy else math.nan
        self.counters["wall_time_s"] = time.perf_counter() - self.start
        c = self.counters
        return {
            "epoch": c["epoch"],
            "samples": c["samples"],
            "train_loss": train_loss,
            "test_loss": totals[2].item() / totals[4].item(),
            "test_acc": test_acc,
            "lr": lr,
            "wall_time_s": c["wall_time_s"],
            "diverged": bool(totals[5].item() > 0) or not math.isfinite(train_loss),
            **self.engine.comm_metrics(c["compute_time_s"]),
        }

    def report(self, report: ReportFn, metrics: dict) -> None:
        """Report one trained epoch with this learner's checkpoint."""
        self.history.append(metrics)
        state = {
            "engine": self.engine.state_dict(),
            **random_states(self.engine.device),
            "counters": dict(self.counters),
            "history": list(self.history),
        }
        report({**metrics, HISTORY_BEFORE: self.replay} if self.replay else metrics, state)
        self.replay = []


def random_states(device: torch.device) -> dict:
    """This process's random states for a checkpoint: the CPU generator's, and on a GPU
    the device's (dropout draws there)."""
    states = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def restore_random_states(states: dict, device: torch.device) -> None:
    """Restore :func:`random_states`. A checkpoint loaded onto the worker's device holds
    them there; the generators take host tensors."""
    torch.set_rng_state(states["rng"].cpu())
    if device.type == "cuda" and "cuda_rng" in states:
        torch.cuda.set_rng_state(states["cuda_rng"].cpu(), device)


def format_progress(cfg: RunConfig, m: dict) -> str:
    """One progress line per epoch."""
    return (
        f"epoch {m['epoch']}/{cfg.workload.epochs}  test_acc {m['test_acc']:.4f}  "
        f"test_loss {m['test_loss']:.4f}  train_loss {m['train_loss']:.4f}  lr {m['lr']:g}  "
        f"rounds {m['rounds']}  comm {m['comm_time_s']:.2f}s  wall {m['wall_time_s']:.1f}s"
        + ("  DIVERGED" if m.get("diverged") else "")
    )
