"""Model averagers for K-AVG and Hier-AVG.

Both averagers move a model's parameters and floating-point buffers into one
contiguous buffer and make every tensor a view into it, so an average is a single
all-reduce on that buffer followed by one in-place division: nothing is copied in
or out. Integer buffers (BatchNorm's ``num_batches_tracked``) are left alone; every
learner takes the same number of steps, so they stay equal without communication.
An average through an outer optimizer (DiLoCo, SlowMo) sends the same buffer in a few
asynchronous pieces instead, so that the outer step of each piece overlaps the transfer
of the next. K-AVG can also average in fragments of the buffer, one at a time in rotation,
each applied a few steps after its asynchronous launch (:mod:`kavg_ray.train.fragments`).

Beside them: the outer optimizer's arithmetic (:mod:`kavg_ray.train.outer`), the clocks
and statistics of every reduction (:mod:`kavg_ray.train.timing`) and compressed payloads
(:mod:`kavg_ray.train.payload`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from kavg_ray.train import collectives
from kavg_ray.train.fragments import FragmentSchedule, StreamingFragments, check_count
from kavg_ray.train.groups import groups_on_node, hier_groups
from kavg_ray.train.outer import (
    OuterOptimizer,
    compressed_update,
    outer_step,
    outer_step_slice,
    pieces,
)
from kavg_ray.train.payload import Payload
from kavg_ray.train.timing import CommStats, collective_timer


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
        check_count("period (K)", period, 1)
        check_count("warmup_steps", warmup_steps, 0)
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
        check_count("local_period (K1)", local_period, 1)
        check_count("global_period (K2)", global_period, 1)
        check_count("group_size (S)", group_size, 1)
        check_count("warmup_steps", warmup_steps, 0)
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
