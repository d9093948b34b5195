"""Adaptive averaging periods: K that changes during training (``K_schedule``).

``constant`` keeps K fixed (:class:`~kavg_ray.train.averaging.AveragingSchedule`);
:class:`AdaptiveSchedule` implements the other two:

- **stagewise**: K is multiplied by ``K_factor`` (capped at ``K_max``) whenever the learning
  rate schedule drops, i.e. at the end of step t (counted from 1) when the rate of step
  t + 1 is below the rate of step t (``workload.lr``'s step schedule halves it every N epochs).
- **adacomm** (Wang and Joshi 2019, "AdaComm"): every ``K_interval`` steps, at the end of
  step t = m I, the mean training loss of the interval's steps over all learners, F_m, and
  the rate of step t, lr_m, give ``K = ceil(K0 * sqrt((lr_1 * F_m) / (lr_m * F_1)))``,
  clipped to [K_min, K_max]. The reference (lr_1, F_1) is the first interval's, so the first
  recomputation gives K0 itself. The paper's rule for a changing learning rate scales K0 by
  the square root of the two ratios, which is what this follows; Paddle's adaptive local SGD
  instead takes the root of the ratios times K0 (``ceil(sqrt(ratio * K0))``), recomputes at
  every average from the loss of that one step and the first step's, and clips to [1, 16].
  A non-finite or non-positive loss leaves K unchanged.

**When averaging fires.** Steps are counted from 1. Each of the first W steps
(``warmup_steps``) ends with a global average. After that an average follows step t when
t - s = K_in_force, s being the step of the last average (W, or 0 without a warm-up). At the
end of step t the schedule first updates the *next* K (the lr drop check, or the adacomm
recomputation when I divides t), then decides whether t ends a period; an average takes the
next K as the K in force for the period it opens. A new K thus takes effect at the next
average (at step t itself when t ends a period), never inside a period, and every learner
follows the same sequence: the rates are a function of the step, and adacomm's loss is
reduced over all learners (one all-reduce of two float64 values every I steps, not counted
as communication).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kavg_ray.config import RunConfig
from kavg_ray.train.averaging import AveragingSchedule
from kavg_ray.train.loop import Budget

# reduce(local loss sum, local count) -> (sum, count) over every learner of the run.
ReduceFn = Callable[[torch.Tensor, float], tuple[float, float]]


def adacomm_period(
    K0: int, lr0: float, loss0: float, lr: float, loss: float, K_min: int, K_max: int | None
) -> int:
    """AdaComm's period for the current rate and loss against the reference ones:
    ``ceil(K0 * sqrt(lr0 * loss / (lr * loss0)))`` clipped to [K_min, K_max]."""
    K = math.ceil(K0 * math.sqrt((lr0 * loss) / (lr * loss0)))
    K = max(K_min, K)
    return K if K_max is None else min(K_max, K)


def _local_reduce(total: torch.Tensor, count: float) -> tuple[float, float]:
    return float(total.item()), count


class AdaptiveSchedule(AveragingSchedule):
    """K-AVG's global averages with a K that changes (see the module docstring): stateful,
    so :meth:`advance` must be called once after every optimizer step, in order.

    Args:
        kind: "stagewise" or "adacomm".
        K0: the first period (the run's K).
        lr_at: the rate of 0-based step s (``LRConfig.at_step`` of the run's budget).
        warmup_steps: W, steps that each end with a global average first.
        factor: stagewise's multiplier.
        K_min, K_max: the bounds (K_max None: none).
        interval: adacomm's I, steps between recomputations.
        reduce: sums a learner's (loss sum, count) over all learners (default: this
            process holds every learner).
    """

    def __init__(
        self, kind: str, K0: int, lr_at: Callable[[int], float], *, warmup_steps: int = 0,
        factor: int = 2, K_min: int = 1, K_max: int | None = None, interval: int = 1,
        reduce: ReduceFn | None = None,
    ) -> None:  # fmt: skip
        if kind not in ("stagewise", "adacomm"):
            raise ValueError(f"unknown K_schedule {kind!r}: stagewise or adacomm")
        super().__init__(K0, warmup_steps=warmup_steps)
        self.kind, self.K0, self.lr_at = kind, K0, lr_at
        self.factor, self.K_min, self.K_max, self.interval = factor, K_min, K_max, interval
        self.reduce = reduce or _local_reduce
        self.period = self.next_period = K0  # the K in force; the K the next average opens
        self.last_sync = 0
        self.reference: tuple[float, float] | None = None  # adacomm's (lr_1, F_1)
        self._loss: torch.Tensor | None = None  # this learner's loss sum over the interval
        self._count = 0.0

    @property
    def wants_loss(self) -> bool:
        """Whether the engine must hand every step's loss to :meth:`observe`."""
        return self.kind == "adacomm"

    @property
    def period_in_force(self) -> int:
        return self.period

    def observe(self, loss_sum: torch.Tensor, count: float) -> None:
        """Add one step's summed training loss of ``count`` learners of this process (a
        tensor, kept on its device: no synchronisation)."""
        loss = loss_sum.detach().to(torch.float64)
        self._loss = loss.clone() if self._loss is None else self._loss.add_(loss)
        self._count += count

    def advance(self, step: int) -> str | None:
        """What follows optimizer step ``step``, "global" or None (called once per step)."""
        if self.kind == "stagewise":
            if self.lr_at(step) < self.lr_at(step - 1):
                grown = self.next_period * self.factor
                self.next_period = grown if self.K_max is None else min(self.K_max, grown)
        elif step % self.interval == 0:
            self._recompute(step)
        if step <= self.warmup_steps or step - self.last_sync >= self.period:
            self.last_sync, self.period = step, self.next_period
            return "global"
        return None

    def _recompute(self, step: int) -> None:
        """adacomm at the end of an interval: the interval's mean loss over all learners."""
        if self._loss is None:
            raise RuntimeError("adacomm needs every step's loss (observe) before advance")
        total, count = self.reduce(self._loss, self._count)
        self._loss, self._count = None, 0.0
        loss, lr = total / count, self.lr_at(step - 1)
        if not math.isfinite(loss) or loss <= 0:
            return
        if self.reference is None:
            self.reference = (lr, loss)
            return
        lr0, loss0 = self.reference
        self.next_period = adacomm_period(self.K0, lr0, loss0, lr, loss, self.K_min, self.K_max)

    def action(self, step: int) -> str | None:
        """What follows step ``step`` in the current state, without advancing it."""
        if step <= self.warmup_steps or step == self.last_sync:
            return "global"
        return "global" if step - self.last_sync >= self.period else None

    def in_sync(self, step: int) -> bool:
        """True when step ``step`` (the last one advanced) ended with an average."""
        return step <= self.warmup_steps or step == self.last_sync

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the periods, the last average, the reference and this
        learner's partial interval (a resumed run follows the same K sequence)."""
        return {
            "period": self.period, "next_period": self.next_period, "last_sync": self.last_sync,
            "reference": self.reference,
            "loss": None if self._loss is None else float(self._loss.item()),
            "count": self._count,
        }  # fmt: skip

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        self.period, self.next_period = int(state["period"]), int(state["next_period"])
        self.last_sync = int(state["last_sync"])
        ref = state["reference"]
        self.reference = None if ref is None else (float(ref[0]), float(ref[1]))
        loss = state["loss"]
        self._loss = None if loss is None else torch.tensor(loss, dtype=torch.float64,
                                                            device=device)  # fmt: skip
        self._count = float(state["count"])


def schedule_for(
    cfg: RunConfig, steps_per_epoch: int, reduce: ReduceFn | None = None
) -> AveragingSchedule:
    """The K-AVG schedule of run config ``cfg`` (``kavg_ray.config.RunConfig``): a fixed K,
    or an :class:`AdaptiveSchedule` with the run's rates (``loop.Budget``)."""
    if cfg.K_schedule == "constant":
        return AveragingSchedule(cfg.K, warmup_steps=cfg.warmup_steps)
    budget = Budget(cfg, steps_per_epoch)

    def lr_at(step: int) -> float:
        return budget.lr.at_step(max(0, step), budget.total, steps_per_epoch)

    return AdaptiveSchedule(
        cfg.K_schedule, cfg.K, lr_at, warmup_steps=cfg.warmup_steps,
        factor=cfg.K_factor or 2, K_min=cfg.K_min or 1, K_max=cfg.K_max,
        interval=cfg.K_interval or steps_per_epoch, reduce=reduce,
    )  # fmt: skip
