"""Per-trial metrics for the Ray dashboard and Prometheus (`ray.util.metrics`).

Rank 0 of every trial records, after each epoch, a few gauges tagged with the sweep
and trial names. Ray exports them on each node's metrics export port (and to the
dashboard's Grafana panels) with a ``ray_`` prefix, e.g. ``ray_kavg_test_accuracy``:

=================================  ====================================================
``kavg_test_accuracy``             test accuracy after the last epoch
``kavg_test_loss``                 test loss after the last epoch
``kavg_train_loss``                mean training loss of the last epoch
``kavg_epoch``                     epochs finished
``kavg_rounds``                    averages (rounds) so far
``kavg_local_averages``            local (group) averages so far: Hier-AVG; 0 for K-AVG
``kavg_global_averages``           global averages (all P learners) so far
``kavg_averaging_time_seconds``    seconds spent averaging so far (``comm_time_s``)
``kavg_wait_time_seconds``         seconds of it spent waiting for the last learner
                                   (``wait_time_s``)
``kavg_time_per_average_seconds``  mean wall time of one average so far
``kavg_bytes_averaged``            bytes averaged so far (per learner)
``kavg_samples_per_second``        samples per second in the last epoch (all learners)
``kavg_epochs_total``              counter: epochs finished (Prometheus adds ``_total``)
=================================  ====================================================

Tags: ``sweep`` (the config's name), ``trial`` (its trial name, e.g. ``K4-P2-s0``), ``K``
(the communication period reported as K in the trial rows: K, K2 for Hier-AVG, ...) and
``P`` (learners), so that a chart's legend can name K and P without parsing trial names.
``cluster/grafana/kavg.json`` is a Grafana dashboard with a panel per metric.

Without Ray, or in a process where Ray is not initialized (`torchrun`, plain tests),
``record_epoch`` does nothing; it never raises into the training loop.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

log = logging.getLogger(__name__)

TAG_KEYS = ("sweep", "trial", "K", "P")
GAUGES: dict[str, str] = {
    "kavg_test_accuracy": "K-AVG trial: test accuracy after the last epoch",
    "kavg_test_loss": "K-AVG trial: test loss after the last epoch",
    "kavg_train_loss": "K-AVG trial: mean training loss of the last epoch",
    "kavg_epoch": "K-AVG trial: epochs finished",
    "kavg_rounds": "K-AVG trial: averages (rounds) so far",
    "kavg_local_averages": "K-AVG trial: local (group) averages so far, 0 without groups",
    "kavg_global_averages": "K-AVG trial: global averages (all learners) so far",
    "kavg_averaging_time_seconds": "K-AVG trial: seconds spent averaging so far",
    "kavg_wait_time_seconds": "K-AVG trial: seconds waiting for the last learner so far",
    "kavg_time_per_average_seconds": "K-AVG trial: mean seconds per average so far",
    "kavg_bytes_averaged": "K-AVG trial: bytes averaged so far, per learner",
    "kavg_samples_per_second": "K-AVG trial: samples per second in the last epoch",
}
COUNTERS: dict[str, str] = {"kavg_epochs": "K-AVG trial: epochs finished (counter)"}
METRIC_NAMES = (*GAUGES, *COUNTERS)

_metrics: dict[str, Any] | None = None
_last: dict[str, tuple[float, float]] = {}  # trial -> (samples, wall time) at the last epoch
_failed = False


def _ray_ready() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and bool(getattr(ray, "is_initialized", lambda: False)())


def _get() -> dict[str, Any]:
    global _metrics
    if _metrics is None:
        from ray.util.metrics import Counter, Gauge

        made: dict[str, Any] = {n: Gauge(n, d, tag_keys=TAG_KEYS) for n, d in GAUGES.items()}
        made.update({n: Counter(n, d, tag_keys=TAG_KEYS) for n, d in COUNTERS.items()})
        _metrics = made
    return _metrics


def epoch_values(metrics: dict, previous: tuple[float, float] | None) -> dict[str, float]:
    """The gauge values of one epoch's metrics (``previous``: samples, wall at the last one)."""
    rounds = float(metrics.get("rounds") or 0)
    comm = float(metrics.get("comm_time_s") or 0.0)
    samples = float(metrics.get("samples") or 0)
    wall = float(metrics.get("wall_time_s") or 0.0)
    s0, w0 = previous or (0.0, 0.0)
    # An engine without groups (K-AVG) reports no local averages and may leave out the
    # global count: there every average is global, so the rounds are the global averages.
    glob = metrics.get("global_reductions")
    values = {
        "kavg_test_accuracy": metrics.get("test_acc"),
        "kavg_test_loss": metrics.get("test_loss"),
        "kavg_train_loss": metrics.get("train_loss"),
        "kavg_epoch": metrics.get("epoch"),
        "kavg_rounds": rounds,
        "kavg_local_averages": metrics.get("local_reductions") or 0,
        "kavg_global_averages": rounds if glob is None else glob,
        "kavg_averaging_time_seconds": comm,
        # NaN where no learner waits at a collective (parameter server): not recorded.
        "kavg_wait_time_seconds": metrics.get("wait_time_s"),
        "kavg_time_per_average_seconds": comm / rounds if rounds else 0.0,
        "kavg_bytes_averaged": metrics.get("bytes_communicated"),
        "kavg_samples_per_second": (samples - s0) / (wall - w0) if wall > w0 else 0.0,
    }
    out = {}
    for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def trial_tags(cfg: Any) -> dict[str, str]:
    """The tags of trial ``cfg``'s metrics (``TAG_KEYS``; Ray wants string values)."""
    period = cfg.period
    return {
        "sweep": str(cfg.name),
        "trial": cfg.trial_name(),
        "K": "" if period is None else str(period),
        "P": str(cfg.P),
    }


def record_epoch(cfg: Any, metrics: dict) -> None:
    """Record one epoch of trial ``cfg`` (call on rank 0); a no-op where Ray is not running."""
    global _failed
    if _failed or not _ray_ready():
        return
    try:
        tags = trial_tags(cfg)
        trial = tags["trial"]
        made = _get()
        for name, value in epoch_values(metrics, _last.get(trial)).items():
            made[name].set(value, tags=tags)
        made["kavg_epochs"].inc(1.0, tags=tags)
        _last[trial] = (float(metrics.get("samples") or 0), float(metrics.get("wall_time_s") or 0))
    except Exception as exc:  # metrics must never break training
        _failed = True
        log.warning("kavg metrics disabled in this process: %s", exc)
