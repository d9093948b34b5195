"""The outer optimizer of an average (DiLoCo, SlowMo) and its arithmetic on flat buffers:
the anchor's step along ``anchor - mean`` with ``torch.optim.SGD``'s arithmetic, block by
block (:func:`outer_step_slice`), the same step on a compressed average's change
(:func:`compressed_step`), and the pieces an outer average is sent in (:func:`pieces`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
