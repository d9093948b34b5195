"""Closed-form convergence theory of K-AVG (Zhou & Cong, ``papers/k-avg-paper.md``, section 3).

Pure Python (``math`` only) so it can be used by the CLI without importing torch.

Symbols (paper notation -> argument name):

* ``F(w~_1) - F*``  -> ``F_gap``  (>= 0): initial sub-optimality.
* ``L``             -> ``L``      (> 0): Lipschitz constant of the gradient (Assumption 1).
* ``M``             -> ``M``      (>= 0): bound on the stochastic-gradient variance (Assumption 4).
* ``gamma-bar``     -> ``gamma``  (> 0): fixed step size.
* ``B-bar``         -> ``B``      (> 0): per-learner mini-batch size.
* ``K``             -> ``K``      (int >= 1): averaging period (local steps per round).
* ``P``             -> ``P``      (> 0): number of learners.
* ``N``             -> ``N``      (> 0): number of averaging rounds.
* ``delta``         -> ``delta``  (0 < delta < 1): slack constant of condition (3.1).
* ``S = N * K``     -> ``S``      (> 0): budget of Theorem 3.4.

About ``S``: in Theorem 3.4, ``S = N * K`` counts *local SGD steps per learner*
(rounds times steps per round), not samples.  A budget of ``E`` epochs over a data set
of ``D`` samples, shared by ``P`` learners with batch ``B``, is
``S = E * D / (B * P)``; see :func:`steps_from_samples`.

Decisions where the paper is ambiguous or inconsistent (also listed in the docstrings):

1. (3.42) vs (3.47).  Substituting (3.45) into (3.47) gives a last term
   ``3 * eta = L^2 gamma^2 M / (2 B)``, whereas (3.42) prints ``L^2 gamma^2 M / (3 B)``.
   (3.47) is exactly ``B(2) < B(1)`` for the ``B(K)`` of (3.44), so (3.47) is implemented;
   (3.42) as printed is a weaker condition that does not imply ``B(2) < B(1)``.
2. Candidates for K_opt.  (3.44) is only an upper bound on the gradient norm when
   Theorem 3.1's hypotheses hold for that K: condition (3.1) with the given step size, and
   at least one full averaging round, ``N = S / K >= 1`` (Theorem 3.1 is stated for
   ``N`` in the natural numbers).  By default :func:`predict_kopt` and
   :func:`kopt_greater_than_one` only consider such K (``enforce_conditions=True``);
   pass ``enforce_conditions=False`` to optimise the formula (3.44) blindly.
3. ``N`` may be fractional in :func:`kavg_bound`, so that ``kavg_bound(..., N=S/K)``
   reproduces (3.43) for any K, as the paper does when it holds ``S`` fixed.
4. Uniqueness of K_opt.  The paper argues that the minimiser of (3.44) is unique because
   one factor increases and the other decreases; a product of such factors need not be
   unimodal, so :func:`predict_kopt` evaluates every K and breaks ties towards the
   smaller K.
5. Condition (3.1) is checked exactly as written (non-strict inequalities, no tolerance).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, overload

__all__ = [
    "bound_coefficients",
    "bound_curve",
    "bound_factors",
    "bound_table",
    "corollary_stepsize",
    "kavg_bound",
    "kopt_greater_than_one",
    "predict_kopt",
    "stepsize_ok",
    "steps_from_samples",
]


# --------------------------------------------------------------------------- validation


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _positive(name: str, value: Any) -> float:
    out = _real(name, value)
    if out <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return out


def _nonnegative(name: str, value: Any) -> float:
    out = _real(name, value)
    if out < 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return out


def _delta(value: Any) -> float:
    out = _real("delta", value)
    if not 0.0 < out < 1.0:
        raise ValueError(f"delta must satisfy 0 < delta < 1, got {value!r}")
    return out


def _period(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    out = int(value)
    if out < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return out


def _periods(name: str, values: Any) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be an integer >= 1 or a sequence of them, got {values!r}")
    return [_period(name, v) for v in values]


# --------------------------------------------------------------------------- Theorem 3.1


def _stepsize_ok(L: float, gamma: float, K: int, delta: float) -> bool:
    x = L * gamma
    first = x * x * (K + 1) * (K - 2) / 2.0 + x * K
    return first <= 1.0 and x * x <= 1.0 - delta


def stepsize_ok(L: float, gamma: float, K: int, delta: float) -> bool:
    """Whether the step size satisfies both inequalities of condition (3.1).

    (3.1): ``L^2 gamma^2 (K+1)(K-2) / 2 + L gamma K <= 1`` and ``L^2 gamma^2 <= 1 - delta``.
    The left side of the first inequality grows with K (for K >= 1), so the K that pass
    form a prefix ``1..K_max``; at K = 1 the first inequality always holds, hence some K
    passes iff the second one does.  Checked exactly, without a tolerance.
    """
    return _stepsize_ok(
        _positive("L", L), _positive("gamma", gamma), _period("K", K), _delta(delta)
    )


def kavg_bound(
    F_gap: float,
    L: float,
    M: float,
    gamma: float,
    B: float,
    K: int,
    P: float,
    N: float,
    delta: float,
) -> float:
    """Right-hand side of bound (3.2) of Theorem 3.1.

    ``2 F_gap / (N (K-1+delta) gamma)
    + L K gamma M / (B (K-1+delta)) * (K/P + L (2K-1)(K-1) gamma / 6)``.

    The value is a valid bound only where :func:`stepsize_ok` holds; it is returned
    regardless.  ``N`` may be fractional (e.g. ``N = S / K`` as in (3.43)).
    """
    F_gap = _nonnegative("F_gap", F_gap)
    L = _positive("L", L)
    M = _nonnegative("M", M)
    gamma = _positive("gamma", gamma)
    B = _positive("B", B)
    K = _period("K", K)
    P = _positive("P", P)
    N = _positive("N", N)
    delta = _delta(delta)
    denom = K - 1 + delta
    optimisation = 2.0 * F_gap / (N * denom * gamma)
    noise = L * K * gamma * M / (B * denom) * (K / P + L * (2 * K - 1) * (K - 1) * gamma / 6.0)
    return optimisation + noise


def corollary_stepsize(
    F_gap: float, L: float, M: float, B: float, K: int, P: float, N: float
) -> float:
    """Step size (3.23) of Corollary 3.1: ``sqrt(F_gap B P / (L M K^2 N))``.

    It minimises the simplified bound (3.27) over gamma.  Needs ``F_gap > 0`` and
    ``M > 0`` (otherwise the step size would be 0 or infinite).  The result is not
    checked against (3.1); use :func:`stepsize_ok` for that.
    """
    F_gap = _positive("F_gap", F_gap)
    L = _positive("L", L)
    M = _positive("M", M)
    B = _positive("B", B)
    K = _period("K", K)
    P = _positive("P", P)
    N = _positive("N", N)
    return math.sqrt(F_gap * B * P / (L * M * K * K * N))


# --------------------------------------------------------------------------- Theorem 3.4


def steps_from_samples(total_samples: float, B: float, P: float) -> float:
    """Convert a total sample budget (all learners together) into Theorem 3.4's ``S = N K``.

    One round of K-AVG processes ``K * B * P`` samples, so ``S = total_samples / (B P)``.
    """
    return _positive("total_samples", total_samples) / (_positive("B", B) * _positive("P", P))


def bound_coefficients(
    F_gap: float,
    L: float,
    M: float,
    gamma: float,
    B: float,
    P: float,
    S: float,
    delta: float,
) -> tuple[float, float, float]:
    """Coefficients ``(alpha, beta, eta)`` of (3.45).

    ``alpha = 2 F_gap / (S gamma)``, ``beta = L gamma M / (P B)``,
    ``eta = L^2 gamma^2 M / (6 B)``, with ``S = N K`` (local steps per learner, see the
    module docstring).  ``delta`` is validated but does not enter (3.45); it is taken so
    that the signature matches :func:`predict_kopt`.
    """
    F_gap = _nonnegative("F_gap", F_gap)
    L = _positive("L", L)
    M = _nonnegative("M", M)
    gamma = _positive("gamma", gamma)
    B = _positive("B", B)
    P = _positive("P", P)
    S = _positive("S", S)
    _delta(delta)
    alpha = 2.0 * F_gap / (S * gamma)
    beta = L * gamma * M / (P * B)
    eta = L * L * gamma * gamma * M / (6.0 * B)
    return alpha, beta, eta


def _factors(K: int, alpha: float, beta: float, eta: float, delta: float) -> tuple[float, float]:
    return alpha + beta * K + eta * (2 * K - 1) * (K - 1), K / (K - 1 + delta)


def _check_curve_args(alpha: Any, beta: Any, eta: Any, delta: Any) -> tuple[float, ...]:
    return (
        _nonnegative("alpha", alpha),
        _nonnegative("beta", beta),
        _nonnegative("eta", eta),
        _delta(delta),
    )


def bound_factors(
    K: int, alpha: float, beta: float, eta: float, delta: float
) -> tuple[float, float]:
    """The two factors of B(K) in (3.44): ``(alpha + beta K + eta (2K-1)(K-1), K / (K-1+delta))``.

    For K >= 1 the first is non-decreasing (increasing when beta or eta is positive) and
    the second is strictly decreasing, as section 3.4 states.
    """
    K = _period("K", K)
    alpha, beta, eta, delta = _check_curve_args(alpha, beta, eta, delta)
    return _factors(K, alpha, beta, eta, delta)


@overload
def bound_curve(K: int, alpha: float, beta: float, eta: float, delta: float) -> float: ...


@overload
def bound_curve(
    K: Iterable[int], alpha: float, beta: float, eta: float, delta: float
) -> list[float]: ...


def bound_curve(
    K: int | Iterable[int], alpha: float, beta: float, eta: float, delta: float
) -> float | list[float]:
    """B(K) of (3.44): ``(alpha + beta K + eta (2K-1)(K-1)) * K / (K-1+delta)``.

    With the coefficients of :func:`bound_coefficients` this equals (3.43), i.e.
    :func:`kavg_bound` with ``N = S / K``.  ``K`` is an integer >= 1 (returns a float) or
    an iterable of them (returns a list, in order).
    """
    alpha, beta, eta, delta = _check_curve_args(alpha, beta, eta, delta)
    if isinstance(K, numbers.Integral) and not isinstance(K, bool):
        ks: list[int] = [_period("K", K)]
        scalar = True
    else:
        ks = _periods("K", K)
        scalar = False
    values = [math.prod(_factors(k, alpha, beta, eta, delta)) for k in ks]
    return values[0] if scalar else values


def predict_kopt(
    F_gap: float,
    L: float,
    M: float,
    gamma: float,
    B: float,
    P: float,
    S: float,
    delta: float,
    k_max: int = 1024,
    *,
    enforce_conditions: bool = True,
) -> int:
    """Integer minimiser (3.46) of B(K) (3.44) over ``K = 1..k_max``.

    Every K is evaluated (B(K) is not assumed unimodal); ties go to the smaller K.

    With ``enforce_conditions`` (the default) a K is a candidate only if Theorem 3.1
    applies to it: the step size satisfies (3.1) for that K (:func:`stepsize_ok`) and the
    budget holds at least one round, ``K <= S``.  ``ValueError`` is raised when no K in
    ``1..k_max`` qualifies (which happens exactly when ``L^2 gamma^2 > 1 - delta`` or
    ``S < 1``).  With ``enforce_conditions=False`` all of ``1..k_max`` are candidates.
    """
    alpha, beta, eta = bound_coefficients(F_gap, L, M, gamma, B, P, S, delta)
    L, gamma, S, delta = float(L), float(gamma), float(S), float(delta)
    k_max = _period("k_max", k_max)
    best_k = 0
    best = math.inf
    for k in range(1, k_max + 1):
        if enforce_conditions and not (k <= S and _stepsize_ok(L, gamma, k, delta)):
            continue
        value = math.prod(_factors(k, alpha, beta, eta, delta))
        if best_k == 0 or value < best:
            best_k, best = k, value
    if best_k == 0:
        raise ValueError(
            f"no K in 1..{k_max} satisfies the conditions of Theorem 3.1: condition (3.1) "
            f"needs L^2*gamma^2 <= 1 - delta (here L*gamma = {L * gamma:.6g}, "
            f"delta = {delta:.6g}) and a budget of at least one round needs K <= S "
            f"(here S = {S:.6g}); lower gamma, raise S, or pass enforce_conditions=False"
        )
    return best_k


def kopt_greater_than_one(
    F_gap: float,
    L: float,
    M: float,
    gamma: float,
    B: float,
    P: float,
    S: float,
    delta: float,
    *,
    enforce_conditions: bool = True,
) -> bool:
    """Sufficient condition (3.47) for K_opt > 1 (equivalently ``B(2) < B(1)``).

    (3.47): ``(1-delta)/(2 delta) * alpha > (3 delta - 1)/(2 delta) * beta + 3 eta`` with
    alpha, beta, eta of (3.45).  This is (3.42) with its last term corrected to
    ``L^2 gamma^2 M / (2 B)`` (the printed (3.42) has ``/(3 B)``, which does not follow from
    (3.44); see the module docstring).

    With ``enforce_conditions`` (the default) the answer is True only if, in addition,
    K = 1 and K = 2 both satisfy the hypotheses used by :func:`predict_kopt` ((3.1) and
    ``K <= S``), so that True implies ``predict_kopt(..., k_max >= 2) > 1``.
    """
    alpha, beta, eta = bound_coefficients(F_gap, L, M, gamma, B, P, S, delta)
    L, gamma, S, delta = float(L), float(gamma), float(S), float(delta)
    if enforce_conditions and not (
        S >= 2 and _stepsize_ok(L, gamma, 1, delta) and _stepsize_ok(L, gamma, 2, delta)
    ):
        return False
    lhs = (1.0 - delta) / (2.0 * delta) * alpha
    rhs = (3.0 * delta - 1.0) / (2.0 * delta) * beta + 3.0 * eta
    return lhs > rhs


def bound_table(
    F_gap: float,
    L: float,
    M: float,
    gamma: float,
    B: float,
    P: float,
    S: float,
    delta: float,
    ks: Iterable[int],
) -> list[dict[str, Any]]:
    """One row per K in ``ks`` (in order) for ``kavg theory predict``.

    Each row is ``{"K": int, "N": S / K, "bound": B(K) of (3.44), "stepsize_ok": (3.1)}``.
    No K is filtered out; ``N < 1`` marks a K larger than the budget.
    """
    alpha, beta, eta = bound_coefficients(F_gap, L, M, gamma, B, P, S, delta)
    L, gamma, S, delta = float(L), float(gamma), float(S), float(delta)
    rows: list[dict[str, Any]] = []
    for k in _periods("ks", ks):
        rows.append(
            {
                "K": k,
                "N": S / k,
                "bound": math.prod(_factors(k, alpha, beta, eta, delta)),
                "stepsize_ok": _stepsize_ok(L, gamma, k, delta),
            }
        )
    return rows
