"""How sure a K_opt is: the paired bootstrap over seeds, credible sets and verdicts
(docs/design.md section 11, "How sure is K_opt").

Seed s gives every K the same initial model and the same data order, so the scores of one
seed are *paired* across K: a seed that is good for one K tends to be good for all. The
bootstrap therefore resamples seeds jointly. A group's scores form a matrix, one row per
seed (a pairing unit) and one column per K (ascending), NaN where that seed has no usable
score for that K. Each of ``n_boot`` resamples draws the rows with replacement
(``rng.integers(0, n_rows, size=(n_boot, n_rows))``, one draw for the whole group); a K's
resampled mean is the mean of its drawn non-NaN values (summed in sorted order, so the
same values give the same mean whatever their order); a K none of whose drawn rows has a
value sits that resample out. The best ``sign * mean`` wins the resample; K whose means
tie (a relative :data:`TIE_RTOL`) split its vote equally, so a group's frequencies sum to 1.

From the frequencies: the **credible set**, the fewest K whose frequencies add up to at
least :data:`CREDIBLE_MASS` (taken by frequency, largest first; equal frequencies: the
smaller K first), and the **verdict** (:func:`verdict`).

This module imports neither torch, ray nor the rest of kavg: numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Means equal up to this relative difference tie (the rule of results.kopt_table).
TIE_RTOL = 1e-12
#: The bootstrap mass a credible set holds at least.
CREDIBLE_MASS = 0.8
#: A credible set of up to this many neighbouring K is "narrow".
NARROW_MAX_K = 3
#: The two-sided interval of the paired difference against K = 1.
INTERVAL = (0.05, 0.95)
VERDICTS = ("clear", "narrow", "inconclusive", "single seed")
_CHUNK_ELEMENTS = 4_000_000  # drawn values sorted at a time (32 MB of float64)


def paired_matrix(
    values: Sequence[float], ks: Sequence[float], units: Sequence[object]
) -> tuple[list[float], np.ndarray]:
    """``(K ascending, matrix)``: ``matrix[i, j]`` is the value of pairing unit i (a seed;
    rows in the order of the units, sorted) at K ``ks_sorted[j]``, NaN where there is none.
    Two values for one (unit, K) are refused: make the units distinct first."""
    k_list = sorted(set(ks))
    u_list = sorted(set(units), key=_sort_key)
    col = {k: j for j, k in enumerate(k_list)}
    row = {u: i for i, u in enumerate(u_list)}
    out = np.full((len(u_list), len(k_list)), np.nan)
    for v, k, u in zip(values, ks, units, strict=True):
        i, j = row[u], col[k]
        if not np.isnan(out[i, j]):
            raise ValueError(f"two values for unit {u!r} at K={k}")
        out[i, j] = float(v)
    return k_list, out


def _sort_key(u: object) -> tuple:
    return u if isinstance(u, tuple) else (u,)


def resample_means(matrix: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``(n_boot, n_K)``: each column's mean over the rows drawn in each row of ``idx``
    (non-NaN values only, summed in sorted order); NaN where no drawn row has a value."""
    out = np.empty((idx.shape[0], matrix.shape[1]))
    step = max(1, _CHUNK_ELEMENTS // max(1, idx.shape[1] * matrix.shape[1]))
    for start in range(0, idx.shape[0], step):  # in chunks: n_boot may be 10^6
        drawn = np.sort(matrix[idx[start : start + step]], axis=1)  # NaN sorts last
        present = ~np.isnan(drawn)
        count = present.sum(axis=1)
        total = np.where(present, drawn, 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + step] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out


def votes(means: np.ndarray, sign: float) -> np.ndarray:
    """``(n_boot, n_K)``: each resample's vote, 1 for its best K, split among tied K."""
    score = sign * means
    best = np.nanmax(score, axis=1, keepdims=True)
    scale = np.maximum(1.0, np.maximum(np.abs(score), np.abs(best)))
    with np.errstate(invalid="ignore"):
        tied = (np.abs(score - best) <= TIE_RTOL * scale) & ~np.isnan(score)
    return tied / tied.sum(axis=1, keepdims=True)


def paired_bootstrap(
    matrix: np.ndarray, n_boot: int, rng: np.random.Generator, sign: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(freq, idx, means)``: each K's share of the resamples it wins, the rows drawn
    (``(n_boot, n_rows)``) and the resampled means (``(n_boot, n_K)``). Every row needs a
    value somewhere (each resample then has a winner)."""
    n_rows = matrix.shape[0]
    if n_rows < 1 or np.isnan(matrix).all(axis=1).any():
        raise ValueError("every row of the matrix needs at least one value")
    idx = rng.integers(0, n_rows, size=(n_boot, n_rows))
    means = resample_means(matrix, idx)
    return votes(means, sign).mean(axis=0), idx, means


def unpaired_bootstrap(
    samples: Sequence[Sequence[float]], n_boot: int, rng: np.random.Generator, sign: float = 1.0
) -> np.ndarray:
    """Each K's share of wins when every K's values are resampled on their own (for j in
    order ``rng.integers(0, n_j, size=(n_boot, n_j))``): what the pairing is compared with."""
    means = np.empty((n_boot, len(samples)))
    for j, vals in enumerate(samples):
        arr = np.asarray(vals, dtype=float)
        idx = rng.integers(0, len(arr), size=(n_boot, len(arr)))
        means[:, j] = np.sort(arr[idx], axis=1).sum(axis=1) / len(arr)
    return votes(means, sign).mean(axis=0)


def paired_difference(
    matrix: np.ndarray, j: int, j_ref: int, idx: np.ndarray
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of column j minus column j_ref over the rows that have both:
    the mean over all such rows, and the :data:`INTERVAL` quantiles of its resampled means
    (the resamples ``idx`` that drew such a row). NaN without a common row."""
    d = matrix[:, j] - matrix[:, j_ref]
    if np.isnan(d).all():
        return (float("nan"),) * 3
    point = float(np.sort(d[~np.isnan(d)]).sum() / np.count_nonzero(~np.isnan(d)))
    boot = resample_means(d[:, None], idx)[:, 0]
    boot = boot[~np.isnan(boot)]
    lo, hi = np.quantile(boot, INTERVAL) if len(boot) else (float("nan"),) * 2
    return point, float(lo), float(hi)


def credible_set(
    ks: Sequence[float], freq: Sequence[float], mass: float = CREDIBLE_MASS
) -> tuple[list[float], float]:
    """The fewest K whose frequencies sum to at least ``mass`` (largest frequency first;
    equal frequencies: smaller K first), ascending, and the mass they hold."""
    order = sorted(range(len(ks)), key=lambda j: (-float(freq[j]), ks[j]))
    chosen, total = [], 0.0
    for j in order:
        chosen.append(ks[j])
        total += float(freq[j])
        if total >= mass - 1e-9:
            break
    return sorted(chosen), min(total, 1.0)


def verdict(credible: Sequence[float], ks_tried: Sequence[float], n_seeds: int) -> str:
    """``single seed`` when K_opt has fewer than two seeds; else ``clear`` when the
    credible set is one K, ``narrow`` when it is up to :data:`NARROW_MAX_K` neighbouring K
    (adjacent among the K tried), else ``inconclusive``."""
    if n_seeds < 2:
        return "single seed"
    if len(credible) == 1:
        return "clear"
    tried = sorted(ks_tried)
    pos = sorted(tried.index(k) for k in credible)
    if len(pos) <= NARROW_MAX_K and pos[-1] - pos[0] == len(pos) - 1:
        return "narrow"
    return "inconclusive"


def format_credible(ks: Sequence[float], total: float) -> str:
    """``"64, 128 (0.86)"``."""
    return ", ".join(_k(k) for k in ks) + f" ({total:.2f})"


def _k(k: float) -> str:
    return str(int(k)) if float(k).is_integer() else str(k)
