"""Adaptive periods in the K_opt tables: a schedule as a candidate beside the fixed K
(docs/design.md section 11, "A schedule against the best fixed K").

A trial whose ``K_schedule`` is not ``constant`` is a candidate of its own, labelled by its
schedule, first period and the parameters it set: ``adacomm(K0=4)``,
``stagewise(K0=2,K_factor=3)``. It shares its group with the fixed-K trials (the same
default group keys) but never counts as the fixed K equal to its K0: ``K_opt`` stays the
best *fixed* K. Per group :func:`schedule_comparison` then sets the best schedule (its mean
score over seeds) against the best fixed K on the seeds they share: the paired difference
schedule minus fixed with its 90% bootstrap interval, how often the schedule wins the paired
resamples of the seeds, and a verdict from :mod:`~kavg_ray.analysis.confidence`:

- ``single seed``: either side has fewer than two seeds;
- ``clear``: one side wins at least 0.8 of the resamples (the credible set of the two is
  one candidate);
- ``inconclusive``: otherwise.

Diverged seeds count against their candidate as in ``results.kopt_table``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from kavg_ray.analysis import confidence

#: The schedule's own columns of a trial row, in label order (none: left out).
SCHEDULE_PARAMS = ("K_factor", "K_min", "K_max", "K_interval")
#: What :func:`schedule_comparison` adds to a K_opt table.
SCHEDULE_COLUMNS = [
    "best_schedule", "best_fixed_K", "schedule_vs_fixed", "schedule_vs_fixed_lo",
    "schedule_vs_fixed_hi", "freq_schedule_wins", "schedule_verdict", "schedule_line",
]  # fmt: skip


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and v is not pd.NA


def _int_text(v: Any) -> str:
    f = float(v)
    return str(int(f)) if f.is_integer() else str(v)


def candidate_label(row: pd.Series | dict) -> str | None:
    """The candidate a trial row stands for: None for a fixed K, else its schedule's label,
    e.g. ``adacomm(K0=4,K_interval=50)``."""
    kind = row.get("K_schedule")
    if not _present(kind) or str(kind) in ("constant", ""):
        return None
    params = [f"{k}={_int_text(row[k])}" for k in SCHEDULE_PARAMS if _present(row.get(k))]
    return f"{kind}(" + ",".join([f"K0={_int_text(row['K'])}", *params]) + ")"


def candidate_labels(trials: pd.DataFrame) -> pd.Series:
    """:func:`candidate_label` of every row (None where the frame has no ``K_schedule``)."""
    if "K_schedule" not in trials.columns:
        return pd.Series([None] * len(trials), index=trials.index, dtype=object)
    return trials.apply(candidate_label, axis=1).astype(object)


def _best(means: dict[Any, tuple[float, int]], sign: float) -> Any:
    """The candidate with the best mean (ties: the first in sorted order)."""
    order = sorted(means, key=lambda c: (str(type(c)), c))
    best = order[0]
    for c in order[1:]:
        if sign * means[c][0] > sign * means[best][0] and not _tied(means[c][0], means[best][0]):
            best = c
    return best


def _tied(a: float, b: float) -> bool:
    return abs(a - b) <= confidence.TIE_RTOL * max(1.0, abs(a), abs(b))


def _means(values: pd.Series, keys: pd.Series) -> dict[Any, tuple[float, int]]:
    out = {}
    for c, vals in values.groupby(keys.to_numpy(), sort=True):
        ordered = sorted(float(v) for v in vals)
        out[c] = (math.fsum(ordered) / len(ordered), len(ordered))
    return out


def compare_group(
    values: pd.Series, usable: pd.Series, g: pd.DataFrame, labels: pd.Series, sign: float,
    n_boot: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """One group's :data:`SCHEDULE_COLUMNS` (``values``/``usable``: its scores and the rows
    that count, as ``results.group_values`` gives them)."""
    sched, fixed = usable & labels.notna(), usable & labels.isna()
    out: dict[str, Any] = {c: "" for c in SCHEDULE_COLUMNS}
    out.update({c: float("nan") for c in SCHEDULE_COLUMNS[2:6]})
    out["best_fixed_K"] = pd.NA
    if not sched.any() or not fixed.any():
        if labels.notna().any():
            out["schedule_line"] = "no usable " + ("fixed K" if sched.any() else "schedule")
        return out
    best_s = _best(_means(values[sched], labels[sched]), sign)
    best_f = _best(_means(values[fixed], g.loc[fixed, "K"]), sign)
    rows_s = sched & (labels == best_s)
    rows_f = fixed & (g["K"] == best_f)
    pick = rows_s | rows_f
    seeds = g.loc[pick, "seed"] if "seed" in g.columns else pd.Series(range(len(g)), g.index)[pick]
    units = [(float("inf") if not _present(s) else s, 0) for s in seeds]
    cols = [1 if rows_s[i] else 0 for i in g.index[pick]]
    _, matrix = confidence.paired_matrix(list(values[pick]), cols, units)
    freq, idx, _ = confidence.paired_bootstrap(matrix, n_boot, np.random.default_rng(seed), sign)
    d, lo, hi = confidence.paired_difference(matrix, 1, 0, idx)
    cset, _ = confidence.credible_set([0, 1], freq)
    n = min(int(rows_s.sum()), int(rows_f.sum()))
    verdict = "single seed" if n < 2 else ("clear" if len(cset) == 1 else "inconclusive")
    out.update(
        best_schedule=best_s, best_fixed_K=best_f, schedule_vs_fixed=d, schedule_vs_fixed_lo=lo,
        schedule_vs_fixed_hi=hi, freq_schedule_wins=float(freq[1]), schedule_verdict=verdict,
        schedule_line=_line(best_s, best_f, d, lo, hi, sign, verdict),
    )  # fmt: skip
    return out


def _line(best_s: str, best_f: Any, d: float, lo: float, hi: float, sign: float,
          verdict: str) -> str:  # fmt: skip
    """``adacomm(K0=4) beats K=8 by 0.012 (90%: +0.004 to +0.020; clear)``."""
    if math.isnan(d):
        return f"{best_s} and K={_int_text(best_f)} share no seed"
    if _tied(d, 0.0) or d == 0:
        word = "ties with"
    else:
        word = "beats" if sign * d > 0 else "trails"
    return (f"{best_s} {word} K={_int_text(best_f)} by {abs(d):.4g} "
            f"(difference {d:+.4g}, 90%: {lo:+.4g} to {hi:+.4g}; {verdict})")  # fmt: skip


def comparison_columns(
    trials: pd.DataFrame, keys: list[str], labels: pd.Series, score_group: Any, sign: float,
    n_boot: int, seed: int,
) -> pd.DataFrame:  # fmt: skip
    """:data:`SCHEDULE_COLUMNS` for each group of ``keys`` that has a fixed-K trial, in the
    order of ``results.kopt_table``'s rows (its groups of the fixed-K trials, sorted).
    ``score_group(g)`` gives a group's (values, usable) (``results.group_values``)."""
    if keys:
        gid = trials.groupby(keys, sort=True, dropna=False).ngroup()
    else:
        gid = pd.Series(0, index=trials.index)
    rows = []
    for gi in sorted(gid[labels.isna()].unique()):
        g = trials[gid == gi]
        values, usable = score_group(g)
        rows.append(compare_group(values, usable, g, labels.loc[g.index], sign, n_boot, seed))
    return pd.DataFrame(rows, columns=SCHEDULE_COLUMNS)
