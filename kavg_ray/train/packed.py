"""Packed simulated runs: several grid points of one workload and P, stacked in one process.

A *pack* is a list of K-AVG / Hier-AVG run configs with ``backend: simulated`` that share
everything that shapes a step's tensors: the data set, the model, the loss, P, the batch
size and the epochs (:func:`pack_key`). They may differ in K (S, K1, K2), seed, learning
rate and its schedule, momentum, weight decay, inner optimizer, sampling, outer optimizer,
warm-up and streaming fragments (``fragments``, ``fragment_delay``, ``fragment_alpha``).

Each point is a :class:`~kavg_ray.train.stacked.StackedEngine` whose learners are P rows of
one ``(points x P, N)`` stack. Every local step draws each point's mini-batches with the
point's own seed (``epoch_indices``, augmentation streams), runs the forward and backward
passes of all ``points x P`` learners as one batched call, and then lets each point apply its
own optimizer step and average on its own schedule (:meth:`StackedEngine.apply_step`, the
code of a run alone). Each point starts from the model its seed builds, and is evaluated
on its own averaged model. So a point's rows are those of the point run alone: the same
arithmetic, with the batched kernels over more learners (losses equal to rounding).
Dropout draws different masks per learner, not the same masks as a run alone.

A point that diverges is reported once (``diverged``) and not again; its rows keep
training with the others (its NaNs stay in its own rows) and are never evaluated again.
``wall_time_s`` and ``compute_time_s`` of a packed point are the pack's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import torch

from kavg_ray.config import RunConfig
from kavg_ray.train.loop import Recorder
from kavg_ray.train.stacked import (
    GIB,
    StackedEngine,
    StackedLearners,
    _input_spec,
    _train_batch,
    available_memory_bytes,
    check_planned_gpu,
    memory_parts,
)
from kavg_ray.train.workload import Data, ModelBuilder, load_data

# What may differ between the points of one pack (everything else must be equal).
PER_POINT = {
    "name", "K", "S", "K1", "K2", "seed", "outer", "warmup_steps", "target_accuracy", "theory",
    "failure", "algorithm", "fragments", "fragment_delay", "fragment_alpha",
    "K_schedule", "K_factor", "K_min", "K_max", "K_interval", "payload",
    "payload_error_feedback",
}  # fmt: skip
PER_POINT_WORKLOAD = {"lr", "momentum", "weight_decay", "optimizer", "betas", "eps", "sampling"}
# report(point index, metrics, done): done when the point has its last row.
PackReportFn = Callable[[int, dict, bool], None]


def pack_key(cfg: RunConfig) -> str:
    """What the points of one pack share: the config without its per-point settings."""
    doc = cfg.model_dump(mode="json", exclude=PER_POINT)
    for key in PER_POINT_WORKLOAD:
        doc["workload"].pop(key)
    return json.dumps(doc, sort_keys=True)


def _check_pack(cfgs: Sequence[RunConfig]) -> None:
    if not cfgs:
        raise ValueError("a pack needs at least one run")
    keys = {pack_key(c) for c in cfgs}
    if len(keys) > 1:
        raise ValueError("the runs of a pack must share workload, P, batch size and epochs")
    for c in cfgs:
        if c.backend != "simulated" or c.algorithm not in ("kavg", "hier_avg"):
            raise ValueError(f"a pack runs simulated kavg and hier_avg, not {c.trial_name()}")


def pack_memory_bytes(cfgs: Sequence[RunConfig], *, build: ModelBuilder | None = None) -> int:
    """Estimated peak bytes of a pack: every point's stacked learners and outer state, one
    evaluation at a time, one data set (the terms of ``stacked.estimate_memory_bytes``)."""
    input_shape, classes, data_bytes, dtype = _input_spec(cfgs[0])
    total = evaluation = 0
    for c in cfgs:
        learner, ev, outer = memory_parts(c, input_shape, classes, build=build, input_dtype=dtype)
        total += c.P * learner + outer
        evaluation = max(evaluation, ev)
    return total + evaluation + data_bytes


def split_packs(
    cfgs: Sequence[RunConfig], budget_bytes: int, *, build: ModelBuilder | None = None
) -> list[list[RunConfig]]:
    """``cfgs`` (one pack key) cut, in order, into packs whose estimate fits ``budget_bytes``.

    Raises ValueError when one point alone does not fit.
    """
    packs: list[list[RunConfig]] = []
    for cfg in cfgs:
        if packs and pack_memory_bytes([*packs[-1], cfg], build=build) <= budget_bytes:
            packs[-1].append(cfg)
            continue
        need = pack_memory_bytes([cfg], build=build)
        if need > budget_bytes:
            raise ValueError(
                f"simulated P={cfg.P} {cfg.workload.model} needs ~{need / GIB:.1f} GiB; the "
                f"device has {budget_bytes / GIB:.1f} GiB available. Lower P or batch_size, "
                "or run with backend: ray"
            )
        packs.append([cfg])
    return packs


class PackedEngine:
    """The points of one pack, their learners in one stack (see the module docstring)."""

    def __init__(
        self, cfgs: Sequence[RunConfig], device: torch.device, *,
        build: ModelBuilder | None = None, check: bool = True,
    ) -> None:  # fmt: skip
        _check_pack(cfgs)
        if check:
            check_planned_gpu(cfgs[0], device)
            need, have = pack_memory_bytes(cfgs, build=build), available_memory_bytes(device)
            if need > have:
                raise ValueError(
                    f"a pack of {len(cfgs)} simulated runs needs ~{need / GIB:.1f} GiB; the "
                    f"device ({device}) has {have / GIB:.1f} GiB available: split it"
                )
        self.cfgs, self.device, self.P = list(cfgs), device, cfgs[0].P
        data = _data_on(load_data(cfgs[0]), device)
        first = StackedEngine(cfgs[0], device, build=build, data=data, check=False)
        # The stack of every learner of the pack; point i holds rows [i P, (i + 1) P).
        self.stack = StackedLearners(first.model, len(cfgs) * self.P)
        self.points = [first] + [
            StackedEngine(
                c, device, build=build, data=data, check=False,
                out=self.stack.flat[i * self.P : (i + 1) * self.P],
            )  # fmt: skip
            for i, c in enumerate(cfgs[1:], start=1)
        ]
        for i, point in enumerate(self.points):
            # The first point's rows hold its model already (the stack was built from it).
            _rebind(point.stacked, self.stack, slice(i * self.P, (i + 1) * self.P))
        self.data = data
        self.steps_per_epoch = first.steps_per_epoch

    def train_steps(
        self, epoch: int, first: int, end: int, lrs: Sequence[Sequence[float]]
    ) -> list[tuple[float, float]]:
        """Steps [first, end) of ``epoch`` of every point (``lrs``: each point's rates of
        those steps); per point (loss sum, steps)."""
        stack, P, data = self.stack, self.P, self.data
        plans = [p.epoch_plan(epoch, first) for p in self.points]
        loss_sum = torch.zeros(len(self.points) * P, device=self.device)
        for i, step in enumerate(range(first, end)):
            x = torch.cat([_train_batch(data, batches[step], gens) for batches, gens in plans])
            y = torch.cat([data.train_y[batches[step]] for batches, _ in plans])
            grads, losses = self.points[0].gradients(stack, x, y)
            for n, (point, rates) in enumerate(zip(self.points, lrs, strict=True)):
                rows = slice(n * P, (n + 1) * P)
                point.apply_step({k: g[rows] for k, g in grads.items()}, rates[i], losses[rows])
            loss_sum += losses
        steps = float((end - first) * P)
        return [(loss_sum[n * P : (n + 1) * P].double().sum().item(), steps)
                for n in range(len(self.points))]  # fmt: skip

    def synchronize(self) -> None:
        self.points[0].synchronize()


def _data_on(data: Data, device: torch.device) -> Data:
    """The data set's tensors on ``device`` (a DataLoader data set reads onto it)."""
    if hasattr(data, "train_x"):
        for name in ("train_x", "train_y", "test_x", "test_y"):
            setattr(data, name, getattr(data, name).to(device))
    else:
        data.device = device
    return data


def _rebind(point: StackedLearners, stack: StackedLearners, rows: slice) -> None:
    """Make a point's named views (parameters, buffers) its rows of the pack's stack."""
    point.flat = stack.flat[rows]
    point.params = {n: v[rows] for n, v in stack.params.items()}
    point.float_buffers = {n: v[rows] for n, v in stack.float_buffers.items()}
    point.int_buffers = {n: v[rows] for n, v in stack.int_buffers.items()}


def run_pack(
    cfgs: Sequence[RunConfig],
    report: PackReportFn,
    *,
    device: torch.device | None = None,
    build: ModelBuilder | None = None,
) -> list[dict]:
    """Train a pack; ``report(i, metrics, done)`` per point per epoch, as each is known.

    Returns each point's last metrics. The metrics are those of ``run_epochs`` (the keys of
    ``METRIC_KEYS``); a point's reports end with its last epoch or its divergence.
    """
    device = torch.device("cpu") if device is None else device
    engine = PackedEngine(cfgs, device, build=build)
    recs = [Recorder(c, p, None) for c, p in zip(cfgs, engine.points, strict=True)]
    last: list[dict] = [{} for _ in cfgs]
    done = [False] * len(cfgs)
    budget = recs[0].budget  # the points share their budget (pack_key)
    step = 0
    while step < budget.total:
        stop = budget.next_evaluation(step)
        t0 = time.perf_counter()
        sums = [(0.0, 0.0)] * len(cfgs)
        for epoch, first, end in budget.pieces(step, stop):
            lrs = [rec.budget.rates(epoch, first, end) for rec in recs]
            part = engine.train_steps(epoch, first, end, lrs)
            sums = [(a + c, b + d) for (a, b), (c, d) in zip(sums, part, strict=True)]
        engine.synchronize()
        compute = time.perf_counter() - t0
        for i in (i for i in range(len(cfgs)) if not done[i]):
            recs[i].add_steps(stop - step, compute)
            metrics = recs[i].epoch_metrics(lrs[i][-1], *sums[i], engine.points[i].evaluate())
            recs[i].history.append(metrics)
            done[i] = bool(metrics["diverged"]) or stop >= budget.total
            last[i] = metrics
            paused = time.perf_counter()
            report(i, metrics, done[i])
            spent = time.perf_counter() - paused
            for rec in recs:  # reporting is no training time (Recorder.exclude)
                rec.exclude(spent)
        step = stop
        if all(done):
            break
    return last
