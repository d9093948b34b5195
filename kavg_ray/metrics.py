"""The names of what a learner reports after each epoch, written once for all three layers.

Training reports exactly :data:`METRIC_KEYS` (kavg_ray.train.loop), the sweep driver keeps
:data:`HISTORY_KEYS` of each report (kavg_ray.launch.progress), and the results store puts
:data:`EPOCH_KEYS` first in history.parquet (kavg_ray.analysis.results). No torch, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: Measured alike by every engine, at every evaluation (each epoch's end, or every
#: ``eval_every_steps`` of a step budget, where ``epoch`` is fractional): the optimizer
#: steps per learner, the samples and tokens (target positions: a text sequence's length,
#: else 1 per sample) of all learners, and per learner samples and tokens per second of
#: training time (compute and communication, no evaluation).
EPOCH_KEYS = (
    "epoch", "step", "samples", "tokens", "rounds", "train_loss", "test_loss", "test_acc",
    "lr", "compute_time_s", "comm_time_s", "wait_time_s", "bytes_communicated", "wall_time_s",
    "samples_per_s", "tokens_per_s",
)  # fmt: skip
#: Hier-AVG's two levels (and whether its groups share a node: 1.0, else 0.0) and the
#: parameter server's counters (zeros or NaN elsewhere). ``K_in_force``: the global period
#: of the steps under way at the evaluation (K, K2 for Hier-AVG; with a ``K_schedule`` the
#: K that the last average opened; NaN for the parameter server); ``averages_taken``: the
#: rounds since the previous evaluation.
ALGORITHM_KEYS = (
    "local_reductions", "global_reductions", "local_comm_time_s", "global_comm_time_s",
    "local_bytes", "global_bytes", "local_on_node", "staleness_mean", "staleness_max",
    "pushes", "applied", "K_in_force", "averages_taken",
)  # fmt: skip
#: Every engine reports exactly these keys, every epoch.
METRIC_KEYS = (*EPOCH_KEYS, "diverged", *ALGORITHM_KEYS)
#: What history.parquet keeps of a report: all but the divergence flag (it becomes the
#: trial's status) and the per-level bytes (bytes_communicated is their sum).
HISTORY_KEYS = tuple(k for k in METRIC_KEYS if k not in ("diverged", "local_bytes", "global_bytes"))
#: A resumed run's first report carries the epochs before its checkpoint under this key.
HISTORY_BEFORE = "history_before"


def is_finite_number(x: Any) -> bool:
    """Whether ``x`` is an int or float that is neither NaN nor infinite."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def divergence_reason(report: Mapping[str, Any]) -> str:
    """Where and how a run diverged, from the report of the epoch that did (the ``error`` of
    a diverged trial's row): ``diverged at epoch 3: train loss nan``. An epoch diverges when
    its mean training loss or the evaluated parameters are not finite (docs/design.md
    section 1); with a finite loss it was the parameters."""
    epoch, loss = report.get("epoch"), report.get("train_loss")
    loss = float(loss) if isinstance(loss, (int, float)) else math.nan
    if math.isfinite(loss):
        return f"diverged at epoch {epoch}: parameters not finite (train loss {loss:.4g})"
    return f"diverged at epoch {epoch}: train loss {loss:g}"
