"""The names of what a learner reports after each epoch, written once for all three layers.

Training reports exactly :data:`METRIC_KEYS` (kavg_ray.train.loop), the sweep driver keeps
:data:`HISTORY_KEYS` of each report (kavg_ray.launch.progress), and the results store puts
:data:`EPOCH_KEYS` first in history.parquet (kavg_ray.analysis.results). No torch, no Ray.
"""

from __future__ import annotations

import math
from typing import Any

#: Measured alike by every engine, every epoch.
EPOCH_KEYS = (
    "epoch", "samples", "rounds", "train_loss", "test_loss", "test_acc", "lr",
    "compute_time_s", "comm_time_s", "wait_time_s", "bytes_communicated", "wall_time_s",
)  # fmt: skip
#: Hier-AVG's two levels and the parameter server's counters (zeros or NaN elsewhere).
ALGORITHM_KEYS = (
    "local_reductions", "global_reductions", "local_comm_time_s", "global_comm_time_s",
    "local_bytes", "global_bytes", "staleness_mean", "staleness_max", "pushes", "applied",
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
