"""Model averagers for K-AVG and Hier-AVG.

Both averagers move a model's parameters and floating-point buffers into one
contiguous buffer and make every tensor a view into it, so an average is a single
all-reduce on that buffer followed by one in-place division: nothing is copied in
or out. Integer buffers (BatchNorm's ``num_batches_tracked``) are left alone; every
learner takes the same number of steps, so they stay equal without communication.
An average through an outer optimizer (DiLoCo, SlowMo) sends the same buffer in a few
asynchronous pieces instead, so that the outer step of each piece overlaps the transfer
of the next.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kavg_ray.train import collectives
from kavg_ray.train.groups import groups_on_node, hier_groups

# CUDA-timed reductions whose events are still unread: past this many, the ones already
# finished (``Event.query()``, which never blocks) are read, so a long epoch holds few events.
PENDING_EVENTS = 64


@dataclass
class CommStats:
    """What one kind of reduction has cost so far.

    The ``seconds`` of a reduction are the collective's own time on this learner, the
    division or outer step after it included (see :class:`_HostTimer` and
    :class:`_CudaEventTimer` for how each device measures it). They start when this learner
    reaches the collective and end when the reduction is done, so they hold the wait for
    the last learner to arrive as well as the transfer. ``wait_seconds`` is that wait,
    settled by the averager's ``settle_waits``: every learner leaves a collective at about
    the same moment, so the last to arrive took the shortest time (the transfer alone),
    and a learner's wait is its time less that shortest one.

    A reduction timed by CUDA events counts (``count``, ``bytes``) at once, but its
    seconds join ``seconds`` only when :meth:`resolve` reads its events; :meth:`settle`
    and :meth:`totals` read them first, and so does the averager's ``resolve_times``.
    """

    count: int = 0
    seconds: float = 0.0
    bytes: int = 0
    wait_seconds: float = 0.0
    unsettled: list[float] = field(default_factory=list, repr=False)  # times since the last settle
    pending: deque = field(default_factory=deque, repr=False)  # (start, end) CUDA events unread

    def add(self, seconds: float, nbytes: int) -> None:
        """Count one timed reduction."""
        self.count += 1
        self.seconds += seconds
        self.bytes += nbytes
        self.unsettled.append(seconds)

    def add_pending(self, start: Any, end: Any, nbytes: int) -> None:
        """Count one reduction timed by two recorded CUDA events; :meth:`resolve` adds its
        seconds later, once the device has passed ``end``."""
        self.count += 1
        self.bytes += nbytes
        self.pending.append((start, end))
        if len(self.pending) > PENDING_EVENTS:
            self.resolve(finished_only=True)

    def resolve(self, finished_only: bool = False) -> None:
        """Add the seconds of the reductions whose events are unread, in order. Reading an
        event the device has not reached waits for it; ``finished_only`` stops there
        instead, so that it never blocks."""
        while self.pending:
            start, end = self.pending[0]
            if finished_only and not end.query():
                return
            end.synchronize()  # at once when the device is past it (the epoch's end)
            seconds = start.elapsed_time(end) / 1000.0
            self.pending.popleft()
            self.seconds += seconds
            self.unsettled.append(seconds)

    def totals(self) -> dict:
        """count, seconds, bytes and wait_seconds (what a checkpoint keeps)."""
        self.resolve()
        return {k: getattr(self, k) for k in ("count", "seconds", "bytes", "wait_seconds")}

    def settle(self, group: dist.ProcessGroup | None, device: torch.device) -> None:
        """Add the waits of the reductions timed since the last call, which ran over
        ``group``: collective, called by every member at the same point."""
        self.resolve()
        if not self.unsettled:
            return
        times = torch.tensor(self.unsettled, dtype=torch.float64, device=device)
        collectives.all_reduce(times, device, dist.ReduceOp.MIN, group)
        self.wait_seconds += max(0.0, sum(self.unsettled) - float(times.sum()))
        self.unsettled.clear()


class FlatModel:
    """A model whose parameters and floating buffers are views into one flat buffer."""

    def __init__(self, model: nn.Module) -> None:
        tensors = [p for p in model.parameters()]
        buffer_slots = [
            (mod, name, buf)
            for mod in model.modules()
            for name, buf in mod._buffers.items()
            if buf is not None and buf.is_floating_point()
        ]
        tensors += [buf for _, _, buf in buffer_slots]
        if not tensors:
            raise ValueError("the model has no parameters or floating-point buffers to average")
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            raise ValueError(
                f"the model must live on one device, found {sorted(map(str, devices))}"
            )
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1:
            raise ValueError(
                "parameters and floating buffers must share one dtype, "
                f"found {sorted(map(str, dtypes))}"
            )
        (self.device,) = devices
        (self.dtype,) = dtypes
        if not self.dtype.is_floating_point:
            raise ValueError(f"cannot average tensors of dtype {self.dtype}")

        total = sum(t.numel() for t in tensors)
        self.buffer = torch.empty(total, dtype=self.dtype, device=self.device)
        offset = 0
        views = []
        for t in tensors:
            view = self.buffer[offset : offset + t.numel()].view_as(t)
            view.copy_(t.detach())
            views.append(view)
            offset += t.numel()
        n_params = len(tensors) - len(buffer_slots)
        with torch.no_grad():
            for p, view in zip(model.parameters(), views[:n_params], strict=True):
                p.data = view
        for (mod, name, _), view in zip(buffer_slots, views[n_params:], strict=True):
            mod._buffers[name] = view
        self.model = model

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def is_intact(self) -> bool:
        """True while every parameter still points into the flat buffer (no `.to()` since)."""
        start = self.buffer.data_ptr()
        end = start + self.nbytes
        return all(start <= p.data_ptr() < end for p in self.model.parameters())


class AveragingSchedule:
    """Which optimizer steps end with an average, and over whom.

    Steps are counted from 1. During a warm-up of W steps (post-local SGD) every step ends
    with a global average. After it, with s = step - W: a global average (all learners) when
    s is a multiple of ``global_period``; otherwise a local one (inside each group) when
    ``local_period`` is set and divides s; otherwise none. K-AVG is ``global_period=K``;
    Hier-AVG is ``global_period=K2, local_period=K1``; W = 0 gives K, 2K, 3K, ... The real
    averagers and the stacked (simulated) engine both follow it.
    """

    def __init__(
        self, global_period: int, local_period: int | None = None, warmup_steps: int = 0
    ) -> None:
        self.global_period = global_period
        self.local_period = local_period
        self.warmup_steps = warmup_steps

    def action(self, step: int) -> str | None:
        """"global", "local" or None: what follows optimizer step ``step``."""
        if step <= self.warmup_steps:
            return "global"
        s = step - self.warmup_steps
        if s % self.global_period == 0:
            return "global"
        if self.local_period is not None and s % self.local_period == 0:
            return "local"
        return None

    def in_sync(self, step: int) -> bool:
        """True when every learner holds the same model after step ``step``."""
        return self.action(step) == "global"


@dataclass(frozen=True)
class OuterOptimizer:
    """The outer optimizer applied at global averages (DiLoCo, SlowMo); defaults: none.

    The averaged change ``delta = anchor - mean`` is taken as the anchor's gradient with
    ``torch.optim.SGD``'s arithmetic (no dampening, no weight decay).
    """

    lr: float = 1.0  # outer learning rate (> 0)
    momentum: float = 0.0  # outer momentum, in [0, 1)
    nesterov: bool = False  # Nesterov momentum (needs momentum > 0)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"outer lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("outer Nesterov needs outer momentum > 0")

    @property
    def plain(self) -> bool:
        """True for plain averaging (lr 1, no momentum): no anchor is kept."""
        return self.lr == 1.0 and self.momentum == 0.0


# Elements per block of an outer step: a block's anchor, mean, momentum and delta (4 MB in
# float32) stay in cache while the step's five operations run over them. Measured on the
# 2-core development machine for resnet18's 11.2M parameters: 13 ms a step at 2**18, 16 ms
# at 2**16, 20 ms at 2**21 and 54 ms unblocked (benchmarks/RESULTS.md).
OUTER_BLOCK = 1 << 18
# An outer average all-reduces the parameters in up to this many pieces of at least
# OUTER_BLOCK elements, asynchronously, and steps each piece while the next ones travel.
OUTER_PIECES = 8


def outer_step(
    outer: OuterOptimizer, anchor: Tensor, current: Tensor, momentum: Tensor | None
) -> Tensor | None:
    """One outer SGD step of ``anchor`` along ``anchor - current``; returns the momentum.

    ``current`` holds the learners' mean parameters (flat); on return both ``anchor`` and
    ``current`` hold the new anchor. The arithmetic is ``torch.optim.SGD``'s; the step runs
    block by block so each block is read from memory once.
    """
    first = momentum is None and outer.momentum != 0
    if first:
        momentum = torch.empty_like(anchor)
    outer_step_slice(outer, anchor, current, momentum, first)
    return momentum


def outer_step_slice(
    outer: OuterOptimizer,
    anchor: Tensor,
    current: Tensor,
    momentum: Tensor | None,
    first: bool,
    scale: float = 1.0,
) -> None:
    """:func:`outer_step` on matching slices of the flat buffers; ``momentum`` is allocated
    (or None without momentum), ``first`` says whether it still has to be initialised. The
    mean is ``scale * current`` (a sum and 1/P: the division rides on the first operation)."""
    scratch = torch.empty(min(OUTER_BLOCK, anchor.numel()), dtype=anchor.dtype,
                          device=anchor.device)  # fmt: skip
    for start in range(0, anchor.numel(), OUTER_BLOCK):
        a, c = anchor[start : start + OUTER_BLOCK], current[start : start + OUTER_BLOCK]
        step = torch.sub(a, c, alpha=scale, out=scratch[: a.numel()])  # delta = a - mean
        if momentum is not None:
            v = momentum[start : start + OUTER_BLOCK]
            if first:
                v.copy_(step)
            else:
                torch.add(step, v, alpha=outer.momentum, out=v)  # v = mu v + delta
            step = step.add_(v, alpha=outer.momentum) if outer.nesterov else v
        a.add_(step, alpha=-outer.lr)
        c.copy_(a)


def pieces(n_params: int, total: int) -> list[tuple[int, int]]:
    """The (start, stop) pieces of an outer average: the parameters in up to
    ``OUTER_PIECES`` near-equal pieces of at least ``OUTER_BLOCK`` elements (one for a small
    model), then the floating buffers, if any, as one piece."""
    count = max(1, min(OUTER_PIECES, n_params // OUTER_BLOCK))
    bounds = [n_params * i // count for i in range(count + 1)]
    out = [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    return out + ([(n_params, total)] if total > n_params else [])


class _HostTimer:
    """Times a collective on CPU tensors with the host clock: ``perf_counter`` around the
    call, which returns once the reduction is done (gloo computes on the host)."""

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, start: float, stats: CommStats, nbytes: int) -> None:
        stats.add(time.perf_counter() - start, nbytes)


class _CudaEventTimer:
    """Times a collective on CUDA tensors with two CUDA events recorded on the current
    stream around it, read later (:meth:`CommStats.resolve`).

    The start event fires when the device has run this learner's queued forward, backward
    and optimizer work, the end event when the reduction and what follows it in the
    averager (division, outer step) are done: the time is the collective's own, from this
    learner's arrival on the device. NCCL waits for the other learners inside its kernel,
    so that wait is in it, measured from device arrivals, and ``settle`` splits it off as on
    CPU. With gloo on CUDA tensors (``cuda:gloo``) the host blocks in the collective and
    the stream then waits for gloo's copy back; the events hold the same span.

    Nothing here waits for the device: recording an event does not. The events are read at
    the epoch's end, after the loop's one ``torch.cuda.synchronize`` per epoch (its clock
    needs it; the epoch's ``.item()`` reads would wait as long), so reading them waits for
    nothing; beyond ``PENDING_EVENTS`` unread ones, only finished ones are read. The stalls
    that remain on an average's path are the collective's own: gloo's blocking host wait,
    and none for NCCL.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _record(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self) -> Any:
        return self._record()

    def stop(self, start: Any, stats: CommStats, nbytes: int) -> None:
        stats.add_pending(start, self._record(), nbytes)


def collective_timer(device: torch.device) -> _HostTimer | _CudaEventTimer:
    """How the averages of a model on ``device`` are timed: CUDA events on a GPU, the host
    clock elsewhere."""
    return _CudaEventTimer(device) if device.type == "cuda" else _HostTimer()


def _group_size(group: dist.ProcessGroup | None) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


class _Averager:
    """Shared machinery: the flat buffer, timing, and the step counter."""

    def __init__(self, model: nn.Module, outer: OuterOptimizer) -> None:
        self.flat = FlatModel(model)
        self.step_count = 0
        self._scratch: torch.Tensor | None = None
        self._timer = collective_timer(self.flat.device)
        self.outer = outer
        self.n_params = sum(p.numel() for p in model.parameters())
        # The model after the last global average, and the outer momentum: flat buffers
        # beside the model's, so an outer step is a few whole-buffer operations.
        self.anchor: torch.Tensor | None = None
        self.outer_momentum: torch.Tensor | None = None
        if not outer.plain:
            self.reset_anchor()

    def reset_anchor(self) -> None:
        """Take the model's parameters as the anchor: call after changing them outside
        training (a broadcast of the initial model); loading a state restores it."""
        if not self.outer.plain:
            self.anchor = self.flat.buffer[: self.n_params].clone()

    def _apply_outer(self) -> None:
        """After a global average: the outer step on the anchor, then every learner = anchor."""
        if self.anchor is None:
            return
        params = self.flat.buffer[: self.n_params]
        self.outer_momentum = outer_step(self.outer, self.anchor, params, self.outer_momentum)

    def _average_with_outer(
        self, group: dist.ProcessGroup | None, size: int, stats: CommStats
    ) -> None:
        """A global average through the outer optimizer, the transfer and the outer step
        overlapped: every piece (:func:`pieces`) is all-reduced asynchronously, and each
        piece's outer step runs as soon as it has arrived, while later pieces travel. Its
        time, outer step included, counts as communication."""
        if size == 1 or self.anchor is None:
            self._reduce(group, size, stats)
            self._apply_outer()
            return
        start = self._timer.start()
        buf, n, outer = self.flat.buffer, self.n_params, self.outer
        dev = self.flat.device
        nccl = collectives.has_average(group, dev)
        op = dist.ReduceOp.AVG if nccl else dist.ReduceOp.SUM
        parts = pieces(n, buf.numel())
        works = [collectives.all_reduce(buf[a:b], dev, op, group, async_op=True)
                 for a, b in parts]  # fmt: skip
        first = self.outer_momentum is None and outer.momentum != 0
        if first:
            self.outer_momentum = torch.empty_like(self.anchor)
        mom = self.outer_momentum
        scale = 1.0 if nccl else 1.0 / size  # gloo has no AVG: the pieces arrive as sums
        for (a, b), work in zip(parts, works, strict=True):
            work.wait()
            if b > n:  # the floating buffers: plainly averaged
                if not nccl:
                    buf[a:b].div_(size)
                continue
            outer_step_slice(outer, self.anchor[a:b], buf[a:b],
                             None if mom is None else mom[a:b], first, scale)  # fmt: skip
        self._timer.stop(start, stats, self.flat.nbytes)

    def _reduce(self, group: dist.ProcessGroup | None, size: int, stats: CommStats) -> None:
        if size == 1:
            stats.count += 1
            return
        start = self._timer.start()
        buf = self.flat.buffer
        dev = self.flat.device
        if collectives.has_average(group, dev):
            collectives.all_reduce(buf, dev, dist.ReduceOp.AVG, group)
        else:
            # gloo has no AVG: sum, then one in-place division.
            collectives.all_reduce(buf, dev, dist.ReduceOp.SUM, group)
            buf.div_(size)
        self._timer.stop(start, stats, self.flat.nbytes)

    def resolve_times(self) -> None:
        """Read the CUDA events of the averages timed so far into their statistics (on a
        GPU, call once the device has passed them, as the epoch loop does after its
        synchronisation; nothing to do on CPU)."""
        for stats in self.comm_levels().values():
            stats.resolve()

    @contextmanager
    def global_average(self) -> Iterator[None]:
        """Hold the average of all learners for a moment (to evaluate it), then restore.

        Costs one all-reduce when the learners are not in sync; it is not counted
        in the algorithm's communication. Uses the one extra model-sized buffer.
        """
        world = _group_size(None)
        if self.in_sync or world == 1:
            yield
            return
        if self._scratch is None:
            self._scratch = torch.empty_like(self.flat.buffer)
        self._scratch.copy_(self.flat.buffer)
        collectives.all_reduce(self.flat.buffer, self.flat.device)
        self.flat.buffer.div_(world)
        try:
            yield
        finally:
            self.flat.buffer.copy_(self._scratch)

    def state_dict(self) -> dict:
        state: dict = {"step_count": self.step_count}
        if self.anchor is not None:
            state["anchor"] = self.anchor.clone()
            mom = self.outer_momentum
            state["outer_momentum"] = None if mom is None else mom.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        if self.anchor is not None:
            if "anchor" not in state:
                raise ValueError("the checkpoint has no outer-optimizer anchor")
            self.anchor.copy_(state["anchor"])
            mom = state["outer_momentum"]
            self.outer_momentum = None if mom is None else mom.to(self.anchor.device).clone()


def _check_count(name: str, value: object, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


class KAvgAverager(_Averager):
    """K-step model averaging (K-AVG), optionally with an outer optimizer and a warm-up.

    Call :meth:`step` once after every ``optimizer.step()``. The P models in
    ``process_group`` are replaced by their average after optimizer steps
    K, 2K, 3K, ... counted from construction (never after step 1 unless K = 1).
    K = 1 is synchronous parallel SGD; a group of one learner never communicates.
    With ``warmup_steps=W`` (post-local SGD) the models average after every one of the
    first W steps, then after steps W + K, W + 2K, ...

    With an outer optimizer (``outer_lr != 1`` or ``outer_momentum > 0``; DiLoCo is
    ``outer_lr=0.7, outer_momentum=0.9, nesterov=True``) every learner keeps the anchor x0,
    the model after the last average. An average then takes ``delta = x0 - mean(x_i)`` as
    the gradient of x0 for one ``torch.optim.SGD(lr, momentum, nesterov)`` step and sets
    every learner's parameters to the new x0; floating buffers are averaged plainly. The
    outer state is the same on every learner: it costs memory, no communication. With the
    defaults no anchor is kept and an average is one all-reduce.

    Args:
        model: the learner's model, on one device, all floating tensors of one dtype.
            Its parameters and floating buffers become views into one buffer:
            build the optimizer before or after, but do not move the model afterwards.
        period: K, the number of local steps between averages (>= 1).
        process_group: the group to average over (default: the world).
        outer_lr, outer_momentum, nesterov: the outer optimizer (see above).
        warmup_steps: W, steps that each end with an average before the period starts.
    """

    def __init__(
        self,
        model: nn.Module,
        period: int,
        process_group: dist.ProcessGroup | None = None,
        *,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        nesterov: bool = False,
        warmup_steps: int = 0,
    ) -> None:
        _check_count("period (K)", period, 1)
        _check_count("warmup_steps", warmup_steps, 0)
        super().__init__(model, OuterOptimizer(outer_lr, outer_momentum, nesterov))
        self.period = period
        self.process_group = process_group
        self.world_size = _group_size(process_group)
        self.stats = CommStats()
        self.schedule = AveragingSchedule(period, warmup_steps=warmup_steps)

    def step(self) -> bool:
        """Count one optimizer step; average if it is a multiple of K. Returns whether it did."""
        self.step_count += 1
        if self.schedule.action(self.step_count) == "global":
            self.average()
            return True
        return False

    def average(self) -> None:
        """Replace every model in the group by the group's average (through the outer
        optimizer when there is one), now."""
        self._average_with_outer(self.process_group, self.world_size, self.stats)

    @property
    def in_sync(self) -> bool:
        """True when the last step was an averaging step (all models equal)."""
        return self.schedule.in_sync(self.step_count)

    def settle_waits(self) -> None:
        """Split the averages since the last call into transfer and wait (``stats``):
        one small all-reduce, so every learner calls it at the same point."""
        self.stats.settle(self.process_group, self.flat.device)

    def comm_levels(self) -> dict[str, CommStats]:
        """The statistics per level of averaging: K-AVG's every average is global."""
        return {"global": self.stats}


class HierAvgAverager(_Averager):
    """Hierarchical averaging (Hier-AVG) over the default process group.

    The P learners form P/S groups of S ranks that share a node
    (:func:`kavg_ray.train.groups.hier_groups` from ``node_of_rank``; by default every
    learner is on one node and the groups are consecutive ranks). Call :meth:`step` once
    after every ``optimizer.step()``. After steps that are multiples of
    ``global_period`` (K2) all P learners average; after the other multiples of
    ``local_period`` (K1) each group averages inside itself. K2 must be a
    multiple of K1. S = 1 or K1 = K2 is K-AVG with K = K2; S = P is K-AVG with K = K1.
    The outer optimizer and the warm-up are :class:`KAvgAverager`'s: the outer step applies
    at global averages (local averages stay plain), and the warm-up's averages are global.

    ``node_of_rank[r]`` is rank r's node (every rank passes the same list); a node whose
    learner count S does not divide is refused unless ``across_nodes`` (``hier_groups:
    any``). ``groups`` holds the groups, ``groups_on_node`` whether each stayed on a node.

    Every rank creates every subgroup, in the same order, as torch requires.
    """

    def __init__(
        self,
        model: nn.Module,
        local_period: int,
        global_period: int,
        group_size: int,
        *,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        nesterov: bool = False,
        warmup_steps: int = 0,
        node_of_rank: Sequence[int] | None = None,
        across_nodes: bool = False,
    ) -> None:
        _check_count("local_period (K1)", local_period, 1)
        _check_count("global_period (K2)", global_period, 1)
        _check_count("group_size (S)", group_size, 1)
        _check_count("warmup_steps", warmup_steps, 0)
        if global_period % local_period:
            raise ValueError(
                f"global_period K2={global_period} must be a multiple of "
                f"local_period K1={local_period}"
            )
        world = _group_size(None)
        if group_size > world or world % group_size:
            raise ValueError(
                f"group_size S={group_size} must divide the number of learners P={world}"
            )
        super().__init__(model, OuterOptimizer(outer_lr, outer_momentum, nesterov))
        self.local_period = local_period
        self.global_period = global_period
        self.group_size = group_size
        self.world_size = world
        self.local_group: dist.ProcessGroup | None = None
        nodes = [0] * world if node_of_rank is None else list(node_of_rank)
        self.groups = hier_groups(nodes, group_size, across_nodes)
        self.groups_on_node = groups_on_node(self.groups, nodes)
        if 1 < group_size < world:
            rank = dist.get_rank()
            for ranks in self.groups:
                group = dist.new_group(ranks)
                if rank in ranks:
                    self.local_group = group
        self.local_stats = CommStats()
        self.global_stats = CommStats()
        self.schedule = AveragingSchedule(global_period, local_period, warmup_steps)

    def step(self) -> str | None:
        """Count one optimizer step; returns "global", "local" or None for what it did."""
        self.step_count += 1
        action = self.schedule.action(self.step_count)
        if action == "global":
            self.average()
        elif action == "local":
            self.average_local()
        return action

    def average(self) -> None:
        """Average over all P learners (through the outer optimizer when there is one), now."""
        self._average_with_outer(None, self.world_size, self.global_stats)

    def average_local(self) -> None:
        """Average inside this learner's group of S, now."""
        if self.group_size == self.world_size:
            self._reduce(None, self.world_size, self.local_stats)
        elif self.group_size == 1:
            self.local_stats.count += 1
        else:
            self._reduce(self.local_group, self.group_size, self.local_stats)

    @property
    def in_sync(self) -> bool:
        return self.schedule.in_sync(self.step_count)

    def settle_waits(self) -> None:
        """Split the reductions since the last call into transfer and wait (global ones
        over all P, local ones inside each group): collective, every learner calls it at
        the same point."""
        self.global_stats.settle(None, self.flat.device)
        self.local_stats.settle(self.local_group, self.flat.device)  # S = 1: none timed

    def comm_levels(self) -> dict[str, CommStats]:
        """The statistics per level of averaging: inside each group, and over all P."""
        return {"local": self.local_stats, "global": self.global_stats}

    @property
    def stats(self) -> CommStats:
        """Local and global reductions together (their CUDA events read first)."""
        self.resolve_times()
        return CommStats(
            self.local_stats.count + self.global_stats.count,
            self.local_stats.seconds + self.global_stats.seconds,
            self.local_stats.bytes + self.global_stats.bytes,
            self.local_stats.wait_seconds + self.global_stats.wait_seconds,
        )
