"""Model averagers for K-AVG and Hier-AVG.

Both averagers move a model's parameters and floating-point buffers into one
contiguous buffer and make every tensor a view into it, so an average is a single
all-reduce on that buffer followed by one in-place division: nothing is copied in
or out. Integer buffers (BatchNorm's ``num_batches_tracked``) are left alone; every
learner takes the same number of steps, so they stay equal without communication.
An average through an outer optimizer (DiLoCo, SlowMo) sends the same buffer in a few
asynchronous pieces instead, so that the outer step of each piece overlaps the transfer
of the next. K-AVG can also average in fragments of the buffer, one at a time in rotation,
each applied a few steps after its asynchronous launch (:class:`StreamingFragments`).
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
from kavg_ray.train.payload import Exchange, Payload

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
    averagers and the stacked (simulated) engine both follow it, through :meth:`advance`
    once per step; a K that changes during training (``K_schedule``) is
    :class:`kavg_ray.train.periods.AdaptiveSchedule`, which keeps state there.
    """

    wants_loss = False  # whether the engine hands every step's loss to observe()

    def __init__(
        self, global_period: int, local_period: int | None = None, warmup_steps: int = 0
    ) -> None:
        self.global_period = global_period
        self.local_period = local_period
        self.warmup_steps = warmup_steps

    @property
    def period_in_force(self) -> int:
        """The global period K of the steps under way (reported as ``K_in_force``)."""
        return self.global_period

    def advance(self, step: int) -> str | None:
        """:meth:`action` of ``step``, called once after each optimizer step, in order."""
        return self.action(step)

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
        v = None if momentum is None else momentum[start : start + OUTER_BLOCK]
        outer_update(outer, a, step, v, first)
        c.copy_(a)


def outer_update(
    outer: OuterOptimizer, a: Tensor, step: Tensor, v: Tensor | None, first: bool
) -> None:
    """One block of an outer step whose delta is ``step`` (overwritten with Nesterov):
    ``torch.optim.SGD``'s momentum arithmetic on ``v`` (None: no momentum; ``first``: not
    yet initialised), then ``a -= lr * step``."""
    if v is not None:
        if first:
            v.copy_(step)
        else:
            torch.add(step, v, alpha=outer.momentum, out=v)  # v = mu v + delta
        step = step.add_(v, alpha=outer.momentum) if outer.nesterov else v
    a.add_(step, alpha=-outer.lr)


def compressed_update(
    outer: OuterOptimizer, base: Tensor, n_params: int, mean: Tensor, momentum: Tensor | None
) -> Tensor | None:
    """After a compressed average (:mod:`kavg_ray.train.payload`): ``base`` (the flat model
    after the last average) moves by the learners' mean change ``mean`` (of ``base - x``,
    dequantized; overwritten): its first ``n_params`` elements through the outer step, the
    floating buffers plainly (``base -= mean``); the plain outer optimizer is ``base -=
    mean`` throughout. Returns the outer momentum."""
    first = not outer.plain and momentum is None and outer.momentum != 0
    if first:
        momentum = torch.empty(n_params, dtype=base.dtype, device=base.device)
    compressed_step(outer, base, n_params, mean, momentum, first)
    return momentum


def compressed_step(
    outer: OuterOptimizer, base: Tensor, cut: int, mean: Tensor, momentum: Tensor | None,
    first: bool,
) -> None:  # fmt: skip
    """:func:`compressed_update` on matching slices (a fragment's): ``base[:cut]`` are
    parameters, stepped with ``momentum`` (allocated, or None without momentum; ``first``:
    not yet initialised), ``base[cut:]`` floating buffers, ``base -= mean``; the plain
    outer optimizer is ``base -= mean`` throughout."""
    if outer.plain:
        base.sub_(mean)
        return
    for start in range(0, cut, OUTER_BLOCK):
        stop = min(start + OUTER_BLOCK, cut)
        v = None if momentum is None else momentum[start:stop]
        outer_update(outer, base[start:stop], mean[start:stop], v, first)
    base[cut:].sub_(mean[cut:])


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
        # A compressed payload (set_payload): what it sends, and the whole flat model after
        # the last global average (its changes travel; the anchor is then a view into it).
        self.payload: Payload | None = None
        self.base: torch.Tensor | None = None
        if not outer.plain:
            self.reset_anchor()

    def reset_anchor(self) -> None:
        """Take the model's parameters as the anchor: call after changing them outside
        training (a broadcast of the initial model); loading a state restores it."""
        if self.payload is not None:
            self.base = self.flat.buffer.clone()
            self.anchor = None if self.outer.plain else self.base[: self.n_params]
        elif not self.outer.plain:
            self.anchor = self.flat.buffer[: self.n_params].clone()

    def set_payload(self, payload: str, error_feedback: bool = False) -> None:
        """Send global averages as ``payload`` (:mod:`kavg_ray.train.payload`; fp32: the
        plain all-reduce, as before), with error feedback or not. Call before training."""
        if payload == "fp32":
            if error_feedback:
                raise ValueError("payload error feedback needs a payload other than fp32")
            return
        if self.flat.dtype != torch.float32:
            raise ValueError(f"a compressed payload needs a float32 model, not {self.flat.dtype}")
        self.payload = Payload(payload, error_feedback, self.flat.buffer.numel(),
                               device=self.flat.device)  # fmt: skip
        self.reset_anchor()

    def _average_compressed(
        self, group: dist.ProcessGroup | None, size: int, stats: CommStats
    ) -> None:
        """A global average of ``payload``: every learner sends its change since the last
        average, ``base - x`` (with an outer optimizer the outer gradient), compressed; the
        mean change moves ``base`` (:func:`compressed_update`) and every learner takes it."""
        start = self._timer.start()
        buf, base = self.flat.buffer, self.base
        mean, nbytes = self.payload.average(torch.sub(base, buf), group, size, buf.device)
        self.outer_momentum = compressed_update(
            self.outer, base, self.n_params, mean, self.outer_momentum
        )
        buf.copy_(base)
        self._timer.stop(start, stats, nbytes)

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
        time, outer step included, counts as communication. A compressed payload goes
        through :meth:`_average_compressed` (P = 1: nothing travels, nothing is quantized)."""
        if self.payload is not None and size > 1:
            self._average_compressed(group, size, stats)
            return
        if size == 1 or self.anchor is None:
            self._reduce(group, size, stats)
            self._apply_outer()
            if self.base is not None:
                self.base.copy_(self.flat.buffer)
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
        if self.payload is not None:
            state["payload"] = {"base": self.base.clone(), **self.payload.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        if self.anchor is not None:
            if "anchor" not in state:
                raise ValueError("the checkpoint has no outer-optimizer anchor")
            self.anchor.copy_(state["anchor"])
            mom = state["outer_momentum"]
            self.outer_momentum = None if mom is None else mom.to(self.anchor.device).clone()
        if self.payload is not None:
            if "payload" not in state:
                raise ValueError("the checkpoint has no compressed-payload state")
            self.base.copy_(state["payload"]["base"])  # the anchor is a view into it
            self.payload.load_state_dict(state["payload"])


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
        fragments, fragment_delay, fragment_alpha: streaming (F, tau, alpha; see
            :class:`StreamingFragments`): F fragments average in rotation, one every K/F
            steps, each launched tau steps before it is applied. The defaults (1, 0, 0.0)
            average the whole model as above; anything else cannot take a warm-up.
        payload, payload_error_feedback: what a global average sends
            (:mod:`kavg_ray.train.payload`): fp32 (the default) is the all-reduce above;
            bf16, fp16, fp8, int8 or int4 send every learner's change since the last
            average (with an outer optimizer, the outer gradient ``x0 - x_i``) compressed,
            optionally with error feedback; with fragments, each fragment's change
            travels so (:class:`StreamingFragments`).
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
        fragments: int = 1,
        fragment_delay: int = 0,
        fragment_alpha: float = 0.0,
        payload: str = "fp32",
        payload_error_feedback: bool = False,
    ) -> None:
        _check_count("period (K)", period, 1)
        _check_count("warmup_steps", warmup_steps, 0)
        super().__init__(model, OuterOptimizer(outer_lr, outer_momentum, nesterov))
        self.period = period
        self.process_group = process_group
        self.world_size = _group_size(process_group)
        self.stats = CommStats()
        self.schedule = AveragingSchedule(period, warmup_steps=warmup_steps)
        self.streaming: StreamingFragments | None = None
        if (fragments, fragment_delay, fragment_alpha) != (1, 0, 0.0):
            self.stream(fragments, fragment_delay, fragment_alpha)
        self.set_payload(payload, payload_error_feedback)

    def stream(self, fragments: int, delay: int = 0, alpha: float = 0.0) -> None:
        """Average in F = ``fragments`` fragments (:class:`StreamingFragments`), on the
        schedule counted from step 1: call it before the first step. The constructor calls
        it for non-default fragment settings."""
        if self.step_count:
            raise ValueError("stream() is called before the first step")
        if self.schedule.warmup_steps:
            raise ValueError("fragments, fragment_delay and fragment_alpha take no warmup_steps")
        schedule = FragmentSchedule(self.period, fragments, delay)
        self.streaming = StreamingFragments(
            self, schedule, alpha, self.process_group, self.world_size, self.stats
        )

    def step(self) -> bool:
        """Count one optimizer step; average if it is a multiple of K. Returns whether it did.

        Streaming (:meth:`stream`): with H = K/F, after step s the fragment
        ``(s/H - 1) mod F`` is applied when H divides s, its average launched after step
        ``s - tau``; returns whether a fragment average was applied."""
        self.step_count += 1
        if self.streaming is not None:
            return self.streaming.after_step(self.step_count)
        if self.schedule.advance(self.step_count) == "global":
            self.average()
            return True
        return False

    def use_schedule(self, schedule: AveragingSchedule) -> None:
        """Average on ``schedule`` from now on: a K that changes during training
        (:class:`kavg_ray.train.periods.AdaptiveSchedule`); not with fragments."""
        if self.streaming is not None:
            raise ValueError("a K_schedule other than constant takes no fragments")
        self.schedule = schedule

    def average(self) -> None:
        """Replace every model in the group by the group's average (through the outer
        optimizer when there is one), now."""
        self._average_with_outer(self.process_group, self.world_size, self.stats)

    @property
    def in_sync(self) -> bool:
        """True when the last step was an averaging step (all models equal)."""
        if self.streaming is not None:
            return self.streaming.in_sync(self.step_count)
        return self.schedule.in_sync(self.step_count)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.streaming is not None:
            state["fragments"] = self.streaming.state_dict()
        if hasattr(self.schedule, "state_dict"):  # an adaptive K (K_schedule)
            state["K_schedule"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.streaming is not None:
            if "fragments" not in state:
                raise ValueError("the checkpoint has no fragment state (fragments: 1 run?)")
            self.streaming.load_state_dict(state["fragments"], self.step_count)
        if hasattr(self.schedule, "load_state_dict"):
            if "K_schedule" not in state:
                raise ValueError("the checkpoint has no K_schedule state (a fixed-K run?)")
            self.schedule.load_state_dict(state["K_schedule"], self.flat.device)

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


# --------------------------------------------------------------------------------------------
# Streaming fragments (Streaming DiLoCo; torchft's DiLoCo with model_fragments)


def fragment_bounds(sizes: Sequence[int], fragments: int, total: int) -> list[tuple[int, int]]:
    """The (start, stop) ranges of the flat buffer that make ``fragments`` fragments.

    ``sizes`` are the parameters' element counts in the buffer's order (the model's
    ``parameters()``); ``total`` is the buffer's length, parameters and floating buffers.
    Fragment i ends at the parameter boundary nearest to ``i * n / F`` (n the parameters'
    elements; the lower on a tie), later than the previous one and leaving a parameter for
    each fragment after it. The floating buffers ``[n, total)`` join the last fragment.
    """
    _check_count("fragments", fragments, 1)
    if fragments > len(sizes):
        raise ValueError(
            f"fragments={fragments} but the model has only {len(sizes)} parameter tensors: "
            "a fragment is at least one parameter"
        )
    cuts = [0]
    for size in sizes:
        cuts.append(cuts[-1] + size)
    n = cuts[-1]
    ends, last = [], 0
    for i in range(1, fragments):
        allowed = range(last + 1, len(sizes) - (fragments - i) + 1)
        last = min(allowed, key=lambda j: (abs(cuts[j] * fragments - i * n), j))
        ends.append(cuts[last])
    starts = [0, *ends]
    return list(zip(starts, [*ends, total], strict=True))


class FragmentSchedule:
    """When each fragment's average is launched and when it is applied.

    Steps are counted from 1. With H = K / F (``period / fragments``), the n-th fragment
    average (n = 1, 2, ...) is applied after step ``n H`` and belongs to fragment
    ``(n - 1) mod F``: fragments 0, 1, ..., F - 1 in rotation, one every H steps, so each
    averages every K steps. It is launched ``delay`` (tau) steps earlier, after step
    ``n H - tau`` (tau = 0: launched and applied after the same step). This is the order
    of torchft's ``DiLoCo`` with ``sync_every=K``, ``model_fragments`` of F and
    ``fragment_sync_delay=tau``. F = 1, tau = 0 is K-AVG's K, 2K, 3K, ...
    """

    def __init__(self, period: int, fragments: int = 1, delay: int = 0) -> None:
        _check_count("period (K)", period, 1)
        _check_count("fragments", fragments, 1)
        _check_count("fragment_delay", delay, 0)
        if period % fragments:
            raise ValueError(f"fragments F={fragments} must divide K={period}")
        if delay >= period // fragments:
            raise ValueError(
                f"fragment_delay={delay} must be below K/F={period // fragments}: a fragment's "
                "average is applied before the next one is launched"
            )
        self.period, self.fragments, self.delay = period, fragments, delay
        self.interval = period // fragments  # H

    def applies(self, step: int) -> int | None:
        """The fragment whose average is applied after step ``step``, or None."""
        if step < 1 or step % self.interval:
            return None
        return (step // self.interval - 1) % self.fragments

    def launches(self, step: int) -> int | None:
        """The fragment whose average is launched after step ``step``, or None."""
        return self.applies(step + self.delay) if step >= 1 else None

    def in_flight(self, step: int) -> int | None:
        """The fragment whose average was launched after a step <= ``step`` and is applied
        after a later one (what a checkpoint after ``step`` must keep), or None."""
        due = (step // self.interval + 1) * self.interval  # the next apply after `step`
        if self.delay and due - self.delay <= step:
            return self.applies(due)
        return None


@dataclass
class _Pending:
    """A fragment average launched and not yet applied."""

    fragment: int
    reduced: Tensor | None  # the learners' fragment as launched: the group's sum, or mean
    divisor: int  # divide ``reduced`` by this for the mean (1 where the collective averaged)
    work: Any = None  # the asynchronous all-reduce, None once waited for
    launch_seconds: float = 0.0  # host-timed share of the launch
    nbytes: int = 0  # what this learner handed in (a compressed fragment's payload bytes)
    exchange: Exchange | None = None  # a compressed payload's average (``reduced`` None)


class StreamingFragments:
    """The fragment averages of a :class:`KAvgAverager` (``fragments``, ``fragment_delay``,
    ``fragment_alpha``; docs/design.md section 9).

    Launch (after step ``n H - tau``): fragment f's slice of the flat buffer is copied and
    the copy all-reduced asynchronously (tau > 0) while training goes on. Apply (after step
    ``n H``): wait for it; the mean m of the launched slices is the new global fragment,
    or, with an outer optimizer, one outer step of fragment f's own anchor slice and
    momentum along ``anchor - m`` gives it (floating buffers, in the last fragment, take m
    plainly). The learner's fragment becomes ``lerp(global, local, alpha)``: alpha = 0
    takes the global fragment, discarding the tau local steps made on it since the launch;
    alpha > 0 keeps that share of the learner's own fragment (torchft's
    ``fragment_update_alpha``). The arithmetic of F = 1, tau = 0, alpha = 0 is that of
    ``_Averager._average_with_outer`` (plain: ``_reduce``), element for element.

    With a compressed payload (P > 1) what a launch sends is the fragment's change since
    its last apply, ``base_f - x_f`` (with an outer optimizer its outer gradient), through
    the shard scheme of :class:`Payload` on the fragment's slice (blocks, shards and
    error-feedback residual of that slice): the launch quantizes and starts the first
    all-to-all asynchronously (:meth:`Payload.launch`); the apply waits for it, sums,
    requantizes and runs the second all-to-all (:meth:`Payload.finish`: it needs the
    first's result, so it is not overlapped), then moves ``base_f`` by the mean change
    (:func:`compressed_step`). F = 1, tau = 0, alpha = 0 is
    ``_Averager._average_compressed``, bit for bit.
    """

    def __init__(
        self, averager: _Averager, schedule: FragmentSchedule, alpha: float,
        group: dist.ProcessGroup | None, size: int, stats: CommStats,
    ) -> None:  # fmt: skip
        if not 0 <= alpha <= 1:
            raise ValueError(f"fragment_alpha must be in [0, 1], got {alpha}")
        self.avg, self.schedule, self.alpha = averager, schedule, alpha
        self.group, self.size, self.stats = group, size, stats
        flat = averager.flat
        sizes = [p.numel() for p in flat.model.parameters()]
        self.bounds = fragment_bounds(sizes, schedule.fragments, flat.buffer.numel())
        self.started = [False] * schedule.fragments  # outer momentum initialised, per fragment
        self.pending: _Pending | None = None

    def after_step(self, step: int) -> bool:
        """Launch and apply what the schedule says follows step ``step``; returns whether a
        fragment average was applied."""
        launch, apply = self.schedule.launches(step), self.schedule.applies(step)
        if launch is not None:
            self.launch(launch)
        if apply is not None:
            self.apply(apply)
        return apply is not None

    def fragment_bytes(self, fragment: int) -> int:
        a, b = self.bounds[fragment]
        return (b - a) * self.avg.flat.buffer.element_size()

    def launch(self, fragment: int) -> None:
        """Copy fragment ``fragment``'s slice and start its all-reduce (asynchronous)."""
        if self.pending is not None:
            raise RuntimeError("a fragment average is still in flight")
        start = time.perf_counter()
        a, b = self.bounds[fragment]
        dev = self.avg.flat.device
        if self.avg.payload is not None and self.size > 1:
            change = torch.sub(self.avg.base[a:b], self.avg.flat.buffer[a:b])
            ex = self.avg.payload.launch(change, self.group, self.size, dev, a)
            self.pending = _Pending(fragment, None, 1, None, time.perf_counter() - start,
                                    sum(ex.sizes), ex)  # fmt: skip
            return
        reduced = self.avg.flat.buffer[a:b].clone()
        if self.size == 1:
            self.pending = _Pending(fragment, reduced, 1)
            return
        nccl = collectives.has_average(self.group, dev)
        op = dist.ReduceOp.AVG if nccl else dist.ReduceOp.SUM
        work = collectives.all_reduce(reduced, dev, op, self.group, async_op=True)
        self.pending = _Pending(fragment, reduced, 1 if nccl else self.size, work,
                                time.perf_counter() - start)  # fmt: skip

    def apply(self, fragment: int) -> None:
        """Wait for fragment ``fragment``'s launched average and apply it (see the class)."""
        pending = self.pending
        if pending is None or pending.fragment != fragment:
            raise RuntimeError(f"fragment {fragment}'s average was not launched")
        timer = self.avg._timer
        start = timer.start()
        if pending.work is not None:
            pending.work.wait()
        if pending.exchange is not None:
            mean, _ = self.avg.payload.finish(pending.exchange, self.group, self.size,
                                              self.avg.flat.device)  # fmt: skip
            self._merge_compressed(fragment, mean)
        else:
            self._merge(fragment, pending.reduced, pending.divisor)
        self.pending = None
        nbytes = pending.nbytes if pending.exchange is not None else self.fragment_bytes(fragment)
        if self.size == 1:
            self.stats.count += 1
        elif isinstance(timer, _HostTimer):
            self.stats.add(pending.launch_seconds + time.perf_counter() - start, nbytes)
        else:
            timer.stop(start, self.stats, nbytes)

    def _momentum_slice(self, fragment: int, a: int, cut: int) -> tuple[Tensor | None, bool]:
        """Fragment ``fragment``'s outer momentum (elements ``[a, a + cut)``; None without
        momentum) and whether its first step is still to come (then it starts now)."""
        avg = self.avg
        if avg.outer.momentum == 0:
            return None, False
        if avg.outer_momentum is None:
            avg.outer_momentum = torch.zeros_like(avg.anchor)
        first = not self.started[fragment]
        self.started[fragment] = True
        return avg.outer_momentum[a : a + cut], first

    def _merge_compressed(self, fragment: int, mean: Tensor) -> None:
        """The global fragment ``base_f`` moved by the compressed mean change ``mean``
        (:func:`compressed_step`), mixed into the learner's by alpha."""
        avg, (a, b) = self.avg, self.bounds[fragment]
        cut = max(0, min(b, avg.n_params) - a)
        mom, first = (None, False) if avg.outer.plain else self._momentum_slice(fragment, a, cut)
        base, local = avg.base[a:b], avg.flat.buffer[a:b]
        compressed_step(avg.outer, base, cut, mean, mom, first)
        local.copy_(torch.lerp(base, local, self.alpha) if self.alpha else base)

    def _merge(self, fragment: int, reduced: Tensor, divisor: int) -> None:
        """The global fragment from ``reduced`` (the outer step where there is one), mixed
        into the learner's by alpha."""
        avg, (a, b) = self.avg, self.bounds[fragment]
        cut = min(b, avg.n_params) - a  # reduced[:cut]: parameters; reduced[cut:]: buffers
        if avg.anchor is not None and cut > 0:
            first = not self.started[fragment] and avg.outer.momentum != 0
            if avg.outer.momentum != 0 and avg.outer_momentum is None:
                avg.outer_momentum = torch.zeros_like(avg.anchor)
            mom = avg.outer_momentum
            outer_step_slice(avg.outer, avg.anchor[a : a + cut], reduced[:cut],
                             None if mom is None else mom[a : a + cut], first,
                             1.0 / divisor)  # fmt: skip
            self.started[fragment] = True
            if divisor != 1 and b - a > cut:
                reduced[cut:].div_(divisor)
        elif divisor != 1:
            reduced.div_(divisor)
        if avg.base is not None:  # a compressed payload at P = 1: nothing travelled
            avg.base[a:b].copy_(reduced)
        local = avg.flat.buffer[a:b]
        if self.alpha:
            reduced.lerp_(local, self.alpha)
        local.copy_(reduced)

    def in_sync(self, step: int) -> bool:
        """Every learner holds the same model after step ``step``: only with one fragment,
        alpha 0, right after it was applied."""
        return (
            self.schedule.fragments == 1 and self.alpha == 0
            and self.schedule.applies(step) is not None
        )  # fmt: skip

    def state_dict(self) -> dict:
        """Which fragments' outer momentum has started, and the average in flight (waited
        for: its reduced slice is kept, so a resume applies it when due)."""
        pending = self.pending
        out: dict = {"started": list(self.started), "pending": None}
        if pending is not None:
            if pending.work is not None:
                pending.work.wait()
                pending.work = None
            ex = pending.exchange
            out["pending"] = {
                "fragment": pending.fragment, "divisor": pending.divisor,
                "reduced": None if ex is not None else pending.reduced.clone(),
                "launch_seconds": pending.launch_seconds, "nbytes": pending.nbytes,
                "exchange": None if ex is None else ex.state_dict(),
            }  # fmt: skip
        return out

    def load_state_dict(self, state: dict, step: int) -> None:
        """Restore :meth:`state_dict`'s state at step ``step`` (the averager's count)."""
        started = list(state["started"])
        if len(started) != self.schedule.fragments:
            raise ValueError(
                f"the checkpoint has {len(started)} fragments, this run {self.schedule.fragments}"
            )
        self.started = [bool(s) for s in started]
        raw, due = state["pending"], self.schedule.in_flight(step)
        if (raw is None) != (due is None) or (raw is not None and raw["fragment"] != due):
            raise ValueError(
                f"the checkpoint's fragment average in flight ({raw and raw['fragment']}) is "
                f"not the one the schedule has in flight after step {step} ({due})"
            )
        self.pending = None
        if raw is not None:
            dev, ex = self.avg.flat.device, raw.get("exchange")
            reduced = None if ex is not None else raw["reduced"].to(dev).clone()
            exchange = None if ex is None else Exchange.from_state(ex, dev)
            self.pending = _Pending(raw["fragment"], reduced, int(raw["divisor"]), None,
                                    float(raw["launch_seconds"]), int(raw.get("nbytes", 0)),
                                    exchange)  # fmt: skip
