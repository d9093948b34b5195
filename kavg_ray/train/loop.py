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

    def train_steps(
        self, epoch: int, first: int, end: int, lrs: list[float]
    ) -> tuple[float, float]:
        """Train steps [first, end) of ``epoch`` (the epoch's batches, in order), step i at
        rate ``lrs[i - first]``; returns (summed training loss, steps) of this process's
        learners. Consecutive calls continue an epoch; a call that starts inside an epoch
        this engine has not begun (a resumed run) draws that epoch's earlier steps' random
        augmentation first, so that the rest is as in the uninterrupted run."""

    def evaluate(self) -> EvalSums:
        """Test sums of the averaged model over this process's slice of the test set."""

    def all_reduce(self, totals: torch.Tensor) -> torch.Tensor:
        """Sum a float64 vector over the processes of the run (identity for one process)."""

    def comm_metrics(self, compute_time_s: float) -> dict:
        """rounds, compute/comm times, bytes and the per-algorithm keys of METRIC_KEYS."""

    def comm_seconds(self) -> float:
        """Seconds this process has spent communicating so far (the collectives' own time;
        called after :meth:`synchronize`, so device-timed ones can be read without a wait)."""

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
        "local_on_node": math.nan, "staleness_mean": math.nan, "staleness_max": math.nan,
        "pushes": 0, "applied": 0, "K_in_force": math.nan,
    }  # fmt: skip


class Budget:
    """A run's optimizer steps per learner and where it evaluates (docs/design.md section 1,
    "Budget"): ``workload.epochs`` whole epochs, evaluated at each epoch's end, or
    ``workload.steps`` optimizer steps, evaluated every ``eval_every_steps`` and at the end.
    Steps are counted from 0 over the whole run; step s is step ``s % steps_per_epoch`` of
    epoch ``s // steps_per_epoch``, whose batches are those of that epoch."""

    def __init__(self, cfg: RunConfig, steps_per_epoch: int) -> None:
        wl = cfg.workload
        self.lr, self.steps_per_epoch = wl.lr, steps_per_epoch
        if wl.steps is None:
            self.total, self.every = wl.epochs * steps_per_epoch, steps_per_epoch
        else:
            self.total, self.every = wl.steps, wl.eval_every_steps or wl.steps

    def next_evaluation(self, step: int) -> int:
        """The step count at the evaluation after ``step`` steps have been taken."""
        return min(self.total, (step // self.every + 1) * self.every)

    def pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """Steps [start, stop) as (epoch, first, end) ranges of steps within epochs."""
        spe, out = self.steps_per_epoch, []
        while start < stop:
            epoch, first = divmod(start, spe)
            end = min(spe, first + stop - start)
            out.append((epoch, first, end))
            start += end - first
        return out

    def rates(self, epoch: int, first: int, end: int) -> list[float]:
        """The learning rates of steps [first, end) of ``epoch`` (LRConfig.at_step)."""
        base = epoch * self.steps_per_epoch
        return [self.lr.at_step(base + i, self.total, self.steps_per_epoch)
                for i in range(first, end)]  # fmt: skip


def run_epochs(
    cfg: RunConfig, engine: Engine, report: ReportFn, resume: dict | None = None
) -> dict:
    """Train ``cfg``'s budget on ``engine``, evaluating and reporting at each of its
    evaluation points (:class:`Budget`: every epoch, or every ``eval_every_steps``);
    returns the last evaluation's metrics."""
    rec = Recorder(cfg, engine, resume)
    finished = rec.replay_if_finished(report)
    if finished is not None:
        return finished
    engine.begin(resumed=resume is not None)
    budget, metrics = rec.budget, {}
    while rec.step < budget.total:
        stop = budget.next_evaluation(rec.step)
        comm_before = engine.comm_seconds()
        loss_sum = steps = 0.0
        t0 = time.perf_counter()
        for epoch, first, end in budget.pieces(rec.step, stop):
            lrs = budget.rates(epoch, first, end)
            loss, n = engine.train_steps(epoch, first, end, lrs)
            loss_sum, steps = loss_sum + loss, steps + n
        engine.synchronize()  # the one device wait per evaluation; CUDA-event times after it
        # compute_time_s: the wall clock less the collectives' own time.
        compute = time.perf_counter() - t0 - (engine.comm_seconds() - comm_before)
        rec.add_steps(stop - rec.step, compute)
        metrics = rec.epoch_metrics(lrs[-1], loss_sum, steps, engine.evaluate())
        rec.report(report, metrics)
        if metrics["diverged"]:
            break
    return metrics


class Recorder:
    """A run's counters, history, metrics and checkpoints, the same for every engine."""

    def __init__(self, cfg: RunConfig, engine: Engine, resume: dict | None) -> None:
        self.cfg, self.engine = cfg, engine
        self.budget = Budget(cfg, engine.steps_per_epoch)
        self.counters = {
            "epoch": 0, "step": 0, "samples": 0, "compute_time_s": 0.0, "wall_time_s": 0.0,
        }  # fmt: skip
        self.history: list[dict] = []
        if resume is not None:
            engine.load_state_dict(resume.get("engine", {}))
            restore_random_states(resume, engine.device)
            self.counters = dict(resume["counters"])
            # A checkpoint from before step counting ended an epoch.
            self.counters.setdefault("step", self.counters["epoch"] * engine.steps_per_epoch)
            self.history = list(resume["history"])
        self.replay = list(self.history)  # evaluations the next report hands over
        self.start = time.perf_counter() - self.counters["wall_time_s"]

    @property
    def epoch(self) -> int:
        return self.counters["epoch"]

    @property
    def step(self) -> int:
        return self.counters["step"]

    def replay_if_finished(self, report: ReportFn) -> dict | None:
        """A resumed run that had ended reports its last evaluation once; None: train on."""
        h = self.history
        if h and (self.step >= self.budget.total or h[-1].get("diverged")):
            report({**h[-1], HISTORY_BEFORE: h[:-1]}, None)
            return h[-1]
        return None

    def add_epoch(self, compute_time_s: float) -> None:
        """Count one whole epoch of steps (a packed point's)."""
        self.add_steps(self.engine.steps_per_epoch, compute_time_s)

    def add_steps(self, steps: int, compute_time_s: float) -> None:
        """Count ``steps`` optimizer steps of every learner, trained in ``compute_time_s``."""
        c, wl = self.counters, self.cfg.workload
        c["compute_time_s"] += compute_time_s
        c["samples"] += steps * wl.batch_size * wl.grad_accum * self.engine.learners
        c["step"] += steps
        c["epoch"] = c["step"] // self.engine.steps_per_epoch

    def epoch_metrics(self, lr: float, loss_sum: float, steps: float, ev: EvalSums) -> dict:
        """The evaluation's metrics: sums reduced over learners, then the engine's comm
        figures and the throughput."""
        totals = torch.tensor(
            [loss_sum, steps, ev.loss_sum, ev.correct, ev.count, 0.0 if ev.finite else 1.0],
            dtype=torch.float64,
        )
        totals = self.engine.all_reduce(totals)
        train_loss = totals[0].item() / totals[1].item()
        test_acc = totals[3].item() / totals[4].item() if ev.has_accuracy else math.nan
        self.counters["wall_time_s"] = time.perf_counter() - self.start
        c = self.counters
        # A step budget's evaluations fall inside epochs: its epoch is fractional.
        epoch = c["step"] / self.budget.steps_per_epoch if self.cfg.workload.steps else c["epoch"]
        tokens = c["samples"] * getattr(self.engine, "tokens_per_sample", 1)
        metrics = {
            "epoch": epoch,
            "step": c["step"],
            "samples": c["samples"],
            "tokens": tokens,
            "train_loss": train_loss,
            "test_loss": totals[2].item() / totals[4].item(),
            "test_acc": test_acc,
            "lr": lr,
            "wall_time_s": c["wall_time_s"],
            "diverged": bool(totals[5].item() > 0) or not math.isfinite(train_loss),
            **self.engine.comm_metrics(c["compute_time_s"]),
        }
        before = self.history[-1]["rounds"] if self.history else 0
        metrics["averages_taken"] = metrics["rounds"] - before
        # Per learner: its share of the samples over its training time (no evaluation).
        seconds = metrics["compute_time_s"] + metrics["comm_time_s"]
        share = 1.0 / self.engine.learners / seconds if seconds > 0 else math.nan
        metrics["samples_per_s"] = c["samples"] * share
        metrics["tokens_per_s"] = tokens * share
        return metrics

    def report(self, report: ReportFn, metrics: dict) -> None:
        """Report one trained epoch with this learner's checkpoint."""
        self.history.append(metrics)
        state = {
            "engine": self.engine.state_dict(),
            **random_states(self.engine.device),
            "counters": dict(self.counters),
            "history": list(self.history),
        }
        paused = time.perf_counter()
        report({**metrics, HISTORY_BEFORE: self.replay} if self.replay else metrics, state)
        self.exclude(time.perf_counter() - paused)
        self.replay = []

    def exclude(self, seconds: float) -> None:
        """Stop the clock for ``seconds`` spent reporting (a checkpoint write, Ray's report,
        which waits for the controller's poll). The checkpoint holds the clock as it was
        before its report, so without this a resumed run would miss one report's time that
        the uninterrupted run counts (docs/design.md section 5, ``wall_time_s``)."""
        self.start += seconds


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
    """One progress line per evaluation."""
    wl = cfg.workload
    where = f"step {m['step']}/{wl.steps}" if wl.steps else f"epoch {m['epoch']}/{wl.epochs}"
    return (
        f"{where}  test_acc {m['test_acc']:.4f}  "
        f"test_loss {m['test_loss']:.4f}  train_loss {m['train_loss']:.4f}  lr {m['lr']:g}  "
        f"rounds {m['rounds']}  comm {m['comm_time_s']:.2f}s  wall {m['wall_time_s']:.1f}s"
        + ("  DIVERGED" if m.get("diverged") else "")
    )
