"""How long an average took: the statistics of one kind of reduction (:class:`CommStats`)
and the two clocks that time a collective, the host's on CPU and CUDA events on a GPU
(:func:`collective_timer`). The averagers (:mod:`kavg_ray.train.averaging`) and streaming
fragments (:mod:`kavg_ray.train.fragments`) count every reduction here."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from kavg_ray.train import collectives

# CUDA-timed reductions whose events are still unread: past this many, the ones already
# finished (``Event.query()``, which never blocks) are read, so a long epoch holds few events.
PENDING_EVENTS = 64


@dataclass
class CommStats:
    """What one kind of reduction has cost so far.

    The ``seconds`` of a reduction are the collective's own time on this learner, the
    division or outer step after it included (see :class:`HostTimer` and
    :class:`CudaEventTimer` for how each device measures it). They start when this learner
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


class HostTimer:
    """Times a collective on CPU tensors with the host clock: ``perf_counter`` around the
    call, which returns once the reduction is done (gloo computes on the host)."""

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, start: float, stats: CommStats, nbytes: int) -> None:
        stats.add(time.perf_counter() - start, nbytes)


class CudaEventTimer:
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


def collective_timer(device: torch.device) -> HostTimer | CudaEventTimer:
    """How the averages of a model on ``device`` are timed: CUDA events on a GPU, the host
    clock elsewhere."""
    return CudaEventTimer(device) if device.type == "cuda" else HostTimer()
