"""Streaming fragments (Streaming DiLoCo; torchft's ``DiLoCo`` with ``model_fragments``).

K-AVG's average sent in F fragments of consecutive layers, in rotation, each launched
``fragment_delay`` steps before it is applied (:class:`FragmentSchedule`). The real
learners' side is :class:`StreamingFragments`, which ``KAvgAverager(fragments=F, ...)``
(:mod:`kavg_ray.train.averaging`) installs; the simulated engine's is
``kavg_ray.train.stacked.StackedFragments``. docs/design.md section 9, "Streaming
fragments".
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from kavg_ray.train import collectives
from kavg_ray.train.outer import compressed_step, outer_step_slice
from kavg_ray.train.payload import Exchange
from kavg_ray.train.timing import CommStats, HostTimer


def check_count(name: str, value: object, least: int) -> None:
    """Refuse (ValueError) a count that is not an integer >= ``least``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def fragment_bounds(sizes: Sequence[int], fragments: int, total: int) -> list[tuple[int, int]]:
    """The (start, stop) ranges of the flat buffer that make ``fragments`` fragments.

    ``sizes`` are the parameters' element counts in the buffer's order (the model's
    ``parameters()``); ``total`` is the buffer's length, parameters and floating buffers.
    Fragment i ends at the parameter boundary nearest to ``i * n / F`` (n the parameters'
    elements; the lower on a tie), later than the previous one and leaving a parameter for
    each fragment after it. The floating buffers ``[n, total)`` join the last fragment.
    """
    check_count("fragments", fragments, 1)
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
        check_count("period (K)", period, 1)
        check_count("fragments", fragments, 1)
        check_count("fragment_delay", delay, 0)
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

    def check_checkpoint(self, started: list, pending: int | None, step: int) -> list[bool]:
        """Refuse (ValueError) a checkpoint taken at ``step`` whose fragment count or
        fragment in flight (``pending``) is not this schedule's; returns ``started`` (which
        fragments' outer momentum has begun) as booleans."""
        if len(started) != self.fragments:
            raise ValueError(
                f"the checkpoint has {len(started)} fragments, this run {self.fragments}"
            )
        due = self.in_flight(step)
        if pending != due:
            raise ValueError(
                f"the checkpoint's fragment average in flight ({pending}) is not the one the "
                f"schedule has in flight after step {step} ({due})"
            )
        return [bool(s) for s in started]


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
        self, averager: Any, schedule: FragmentSchedule, alpha: float,
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
        elif isinstance(timer, HostTimer):
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
        raw = state["pending"]
        self.started = self.schedule.check_checkpoint(
            list(state["started"]), None if raw is None else raw["fragment"], step
        )
        self.pending = None
        if raw is not None:
            dev, ex = self.avg.flat.device, raw.get("exchange")
            reduced = None if ex is not None else raw["reduced"].to(dev).clone()
            exchange = None if ex is None else Exchange.from_state(ex, dev)
            self.pending = _Pending(raw["fragment"], reduced, int(raw["divisor"]), None,
                                    float(raw["launch_seconds"]), int(raw.get("nbytes", 0)),
                                    exchange)  # fmt: skip
