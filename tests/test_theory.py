"""Tests for kavg_ray.analysis.theory (paper section 3: (3.1), (3.2), (3.23), (3.44)-(3.47))."""

from __future__ import annotations

import math
import random
from fractions import Fraction as Fr

import pytest

from kavg_ray.analysis import theory

TOL = 1e-12


def close(a: float, b: float | Fr) -> bool:
    return math.isclose(a, float(b), rel_tol=TOL, abs_tol=TOL)


# --------------------------------------------------------------------------- closed forms

# Hand-picked inputs, all exactly representable as binary floats.
F_GAP, L, M, GAMMA, B, P, DELTA = 5, 2, 3, 0.125, 4, 2, 0.5


def test_kavg_bound_hand_value():
    # (3.2) with F_gap=5, L=2, M=3, gamma=1/8, B=4, K=3, P=2, N=10, delta=1/2:
    #   K-1+delta = 5/2
    #   first  = 2*5 / (10 * 5/2 * 1/8)                  = 10 / (25/8)   = 16/5
    #   prefac = 2*3*(1/8)*3 / (4 * 5/2)                 = (9/4) / 10    = 9/40
    #   paren  = 3/2 + 2*(2*3-1)*(3-1)*(1/8)/6           = 3/2 + 5/12    = 23/12
    #   total  = 16/5 + 9/40 * 23/12 = 16/5 + 69/160                     = 581/160
    expected = Fr(16, 5) + Fr(9, 40) * Fr(23, 12)
    assert expected == Fr(581, 160)
    got = theory.kavg_bound(F_GAP, L, M, GAMMA, B, 3, P, 10, DELTA)
    assert close(got, expected)


def test_kavg_bound_k1_is_synchronous_sgd_form():
    # K=1: K-1+delta = delta and the (2K-1)(K-1) term vanishes:
    #   2*5/(10*(1/2)*(1/8)) + 2*1*(1/8)*3/(4*(1/2)) * (1/2 + 0) = 16 + 3/8 * 1/2 = 16 + 3/16
    expected = Fr(2 * 5) / (10 * Fr(1, 2) * Fr(1, 8)) + Fr(2 * 3, 8) / (4 * Fr(1, 2)) * Fr(1, 2)
    assert expected == Fr(259, 16)
    assert close(theory.kavg_bound(F_GAP, L, M, GAMMA, B, 1, P, 10, DELTA), expected)


def test_kavg_bound_terms_scale_as_the_formula_says():
    base = theory.kavg_bound(F_GAP, L, M, GAMMA, B, 3, P, 10, DELTA)
    # M = 0 leaves only the first term 16/5; F_gap = 0 leaves only the second 69/160.
    assert close(theory.kavg_bound(F_GAP, L, 0, GAMMA, B, 3, P, 10, DELTA), Fr(16, 5))
    assert close(theory.kavg_bound(0, L, M, GAMMA, B, 3, P, 10, DELTA), Fr(69, 160))
    # Doubling N halves only the first term.
    assert close(theory.kavg_bound(F_GAP, L, M, GAMMA, B, 3, P, 20, DELTA), Fr(8, 5) + Fr(69, 160))
    assert base > theory.kavg_bound(F_GAP, L, M, GAMMA, B, 3, P, 20, DELTA)


def test_bound_coefficients_hand_values():
    # (3.45) with S=100:
    #   alpha = 2*5/(100*1/8) = 4/5 ; beta = 2*(1/8)*3/(2*4) = 3/32 ; eta = 4*(1/64)*3/(6*4) = 1/128
    alpha, beta, eta = theory.bound_coefficients(F_GAP, L, M, GAMMA, B, P, 100, DELTA)
    assert close(alpha, Fr(4, 5))
    assert close(beta, Fr(3, 32))
    assert close(eta, Fr(1, 128))


def test_bound_curve_hand_values():
    # (3.44) at K=3 with alpha=4/5, beta=3/32, eta=1/128, delta=1/2:
    #   (4/5 + 3*3/32 + (1/128)*5*2) * 3/(5/2) = (4/5 + 9/32 + 5/64) * 6/5 = (371/320)*(6/5)
    first = Fr(4, 5) + 3 * Fr(3, 32) + Fr(1, 128) * 5 * 2
    assert first == Fr(371, 320)
    expected = first * Fr(3) / Fr(5, 2)
    assert close(theory.bound_curve(3, 0.8, 3 / 32, 1 / 128, 0.5), expected)
    # K=1: (alpha + beta) / delta = (4/5 + 3/32) * 2 = 143/80
    assert close(theory.bound_curve(1, 0.8, 3 / 32, 1 / 128, 0.5), Fr(143, 80))
    # Sequence input -> list, in order.
    got = theory.bound_curve([3, 1], 0.8, 3 / 32, 1 / 128, 0.5)
    assert isinstance(got, list) and len(got) == 2
    assert close(got[0], expected) and close(got[1], Fr(143, 80))
    assert theory.bound_curve(range(1, 4), 0.8, 3 / 32, 1 / 128, 0.5)[2] == got[0]
    assert isinstance(theory.bound_curve(2, 0.8, 3 / 32, 1 / 128, 0.5), float)


def test_bound_curve_equals_bound_32_with_n_equal_s_over_k():
    # (3.43): B(K) with the coefficients of (3.45) is (3.2) with N = S / K. Hand case K=3, S=100:
    #   first term 2*5/((100/3)*(5/2)*(1/8)) = 24/25, second term 69/160 (independent of N).
    coeffs = theory.bound_coefficients(F_GAP, L, M, GAMMA, B, P, 100, DELTA)
    assert close(theory.bound_curve(3, *coeffs, DELTA), Fr(24, 25) + Fr(69, 160))
    rng = random.Random(7)
    for _ in range(200):
        args = _random_args(rng)
        K = rng.randint(1, 300)
        coeffs = theory.bound_coefficients(*args)
        F_gap, Lr, Mr, gamma, Br, Pr, S, delta = args
        lhs = theory.bound_curve(K, *coeffs, delta)
        rhs = theory.kavg_bound(F_gap, Lr, Mr, gamma, Br, K, Pr, S / K, delta)
        assert math.isclose(lhs, rhs, rel_tol=1e-12)


def test_corollary_stepsize_hand_value_and_optimality():
    # (3.23) with F_gap=18, B=8, P=2, L=1, M=1, K=3, N=2: sqrt(18*8*2 / (1*1*9*2)) = sqrt(16) = 4
    assert close(theory.corollary_stepsize(18, 1, 1, 8, 3, 2, 2), 4)
    # sqrt(5*4*2 / (2*3*4*10)) = sqrt(40/240) = sqrt(1/6)
    assert close(theory.corollary_stepsize(5, 2, 3, 4, 2, 2, 10), math.sqrt(1 / 6))

    # It minimises f of (3.27) and attains (3.29).
    F_gap, Lc, Mc, Bc, K, Pc, N, delta = 3.0, 1.7, 0.4, 32, 8, 16, 500, 0.3

    def f(g: float) -> float:
        return 2 * F_gap / (N * (K - 1 + delta) * g) + 2 * Lc * K**2 * g * Mc / (
            Pc * Bc * (K - 1 + delta)
        )

    g = theory.corollary_stepsize(F_gap, Lc, Mc, Bc, K, Pc, N)
    assert f(g) < f(g * 1.01) and f(g) < f(g * 0.99)
    f_min = math.sqrt(F_gap * Lc * Mc / (Bc * Pc)) * 4 * K / ((K - 1 + delta) * math.sqrt(N))
    assert math.isclose(f(g), f_min, rel_tol=1e-12)


def test_steps_from_samples():
    # 600 epochs of 50000 samples, B=32, P=8: 3e7 / 256 = 117187.5 local steps per learner
    assert close(theory.steps_from_samples(600 * 50000, 32, 8), Fr(30_000_000, 256))


# --------------------------------------------------------------------------- condition (3.1)


@pytest.mark.parametrize(
    ("Lv", "gamma", "K", "delta", "ok"),
    [
        # K=2: first inequality reads 2*L*gamma <= 1 (the (K-2) term vanishes).
        (1.0, 0.5, 2, 0.5, True),  # 2*0.5 = 1 <= 1, equality; 0.25 <= 0.5
        (1.0, 0.5000001, 2, 0.5, False),  # first fails, second (0.25 <= 0.5) holds
        (2.0, 0.25, 2, 0.5, True),  # depends on L*gamma only
        # K=4: 5 x^2 + 4 x <= 1 with x = L*gamma, i.e. x <= 1/5.
        (1.0, 0.19, 4, 0.5, True),  # 5*0.0361 + 0.76 = 0.9405
        (1.0, 0.21, 4, 0.5, False),  # 5*0.0441 + 0.84 = 1.0605; second holds (0.0441 <= 0.5)
        (10.0, 0.021, 4, 0.5, False),
        # Second inequality x^2 <= 1 - delta, at equality and just beyond (K=2, x=0.5).
        (1.0, 0.5, 2, 0.75, True),  # 0.25 <= 0.25
        (1.0, 0.5, 2, 0.76, False),  # 0.25 > 0.24; first still holds
        # K=1: first inequality is x - x^2 <= 1, always true; only the second matters.
        (1.0, 0.7, 1, 0.5, True),  # 0.49 <= 0.5
        (1.0, 0.71, 1, 0.5, False),  # 0.5041 > 0.5
        (1.0, 0.01, 1, 0.5, True),
        # Large K: (K+1)(K-2)/2 x^2 + K x <= 1.  K=100, x=0.001: 4949*1e-6 + 0.1 <= 1.
        (1.0, 0.001, 100, 0.5, True),
        # K=100, x=0.01: 4949*1e-4 + 1 = 1.4949 > 1.
        (1.0, 0.01, 100, 0.5, False),
    ],
)
def test_stepsize_ok_cases(Lv, gamma, K, delta, ok):
    assert theory.stepsize_ok(Lv, gamma, K, delta) is ok


def test_stepsize_ok_matches_exact_formula_randomly():
    rng = random.Random(3)
    seen = set()
    for _ in range(500):
        Lv = 10 ** rng.uniform(-1, 1)
        gamma = 10 ** rng.uniform(-4, 0) / Lv
        K = rng.randint(1, 64)
        delta = rng.uniform(0.01, 0.99)
        x = Fr(Lv) * Fr(gamma)
        exact = x * x * (K + 1) * (K - 2) / 2 + x * K <= 1 and x * x <= 1 - Fr(delta)
        assert theory.stepsize_ok(Lv, gamma, K, delta) is exact
        seen.add(exact)
    assert seen == {True, False}


# --------------------------------------------------------------------------- monotonicity


def test_bound_factors_hand_values_and_product():
    first, second = theory.bound_factors(3, 0.8, 3 / 32, 1 / 128, 0.5)
    assert close(first, Fr(371, 320))
    assert close(second, Fr(6, 5))
    assert close(first * second, Fr(371, 320) * Fr(6, 5))


def test_factors_are_monotone_as_the_paper_states():
    # Section 3.4: alpha + beta K + eta (2K-1)(K-1) increases, K/(K-1+delta) decreases.
    rng = random.Random(11)
    for _ in range(100):
        alpha = 10 ** rng.uniform(-4, 3)
        beta = 10 ** rng.uniform(-6, 1)
        eta = 10 ** rng.uniform(-8, 0)
        delta = rng.uniform(0.01, 0.99)
        prev = theory.bound_factors(1, alpha, beta, eta, delta)
        for K in range(2, 200):
            cur = theory.bound_factors(K, alpha, beta, eta, delta)
            assert cur[0] > prev[0]
            assert cur[1] < prev[1]
            assert math.isclose(cur[0] * cur[1], theory.bound_curve(K, alpha, beta, eta, delta))
            prev = cur
    # With beta = eta = 0 (M = 0) the first factor is constant, the second still decreases.
    f1 = [theory.bound_factors(K, 2.0, 0.0, 0.0, 0.5) for K in range(1, 20)]
    assert all(a[0] == 2.0 for a in f1)
    assert all(b[1] < a[1] for a, b in zip(f1, f1[1:], strict=False))


# --------------------------------------------------------------------------- K_opt


def _random_args(rng: random.Random) -> tuple:
    delta = rng.uniform(0.02, 0.98)
    Lv = 10 ** rng.uniform(-1, 1)
    # L*gamma in [1e-4, sqrt(1-delta)] so the second inequality of (3.1) holds;
    # the first then admits a prefix of K's of very different lengths.
    x = 10 ** rng.uniform(-4, math.log10(math.sqrt(1 - delta)))
    gamma = x / Lv
    return (
        10 ** rng.uniform(-3, 3),  # F_gap
        Lv,
        10 ** rng.uniform(-3, 3),  # M
        gamma,
        rng.choice([1, 4, 16, 32, 128]),  # B
        rng.choice([1, 2, 8, 32, 128]),  # P
        10 ** rng.uniform(0.5, 6),  # S
        delta,
    )


def _brute_kopt(args: tuple, k_max: int, enforce: bool) -> int | None:
    """Exact (rational) argmin of (3.43) over admissible K, ties to the smaller K."""
    F_gap, Lv, Mv, gamma, Bv, Pv, S, delta = (Fr(a) for a in args)
    best_k, best = None, None
    for K in range(1, k_max + 1):
        x = Lv * gamma
        ok = x * x * (K + 1) * (K - 2) / 2 + x * K <= 1 and x * x <= 1 - delta
        if enforce and not (ok and K <= S):
            continue
        N = S / K
        d = K - 1 + delta
        value = 2 * F_gap / (N * d * gamma) + Lv * K * gamma * Mv / (Bv * d) * (
            Fr(K) / Pv + Lv * (2 * K - 1) * (K - 1) * gamma / 6
        )
        if best is None or value < best:
            best_k, best = K, value
    return best_k


def test_predict_kopt_equals_brute_force_argmin():
    rng = random.Random(2024)
    results = []
    limited_by_31 = 0
    for i in range(200):
        args = _random_args(rng)
        k_max = 1024 if i % 10 == 0 else rng.randint(1, 200)
        enforce = i % 4 != 3
        expected = _brute_kopt(args, k_max, enforce)
        assert expected is not None
        got = theory.predict_kopt(*args, k_max=k_max, enforce_conditions=enforce)
        assert got == expected, (args, k_max, enforce)
        results.append(got)
        if enforce and _brute_kopt(args, k_max, False) != got:
            limited_by_31 += 1
    # The sample must exercise K_opt = 1, interior optima and the (3.1)/budget restriction.
    assert 1 in results
    assert len(set(results)) > 20
    assert limited_by_31 > 5


def test_predict_kopt_ties_go_to_smaller_k():
    # F_gap = 0 and M = 0 make B(K) = 0 for every K: all tie, so K_opt = 1.
    assert theory.predict_kopt(0, 1.0, 0, 0.01, 4, 2, 1000, 0.5, k_max=50) == 1
    # M = 0 alone: B(K) = alpha K/(K-1+delta) strictly decreases -> largest admissible K.
    # With L*gamma = 0.01, (3.1) reads (K+1)(K-2)/2 * 1e-4 + K/100 <= 1, i.e.
    # K^2 + 199 K <= 20002: K = 73 gives 19856, K = 74 gives 20202.
    assert theory.stepsize_ok(1.0, 0.01, 73, 0.5) and not theory.stepsize_ok(1.0, 0.01, 74, 0.5)
    assert theory.predict_kopt(1.0, 1.0, 0, 0.01, 4, 2, 1e6, 0.5, k_max=1024) == 73
    assert theory.predict_kopt(1.0, 1.0, 0, 0.01, 4, 2, 40, 0.5, k_max=1024) == 40  # K <= S
    assert theory.predict_kopt(1.0, 1.0, 0, 0.01, 4, 2, 1e6, 0.5, k_max=30) == 30
    assert (
        theory.predict_kopt(1.0, 1.0, 0, 0.01, 4, 2, 40, 0.5, k_max=1024, enforce_conditions=False)
        == 1024
    )


def test_predict_kopt_raises_when_no_k_is_admissible():
    # L*gamma = 0.8: L^2 gamma^2 = 0.64 > 1 - 0.5, so (3.1) fails for every K.
    with pytest.raises(ValueError, match=r"\(3\.1\)"):
        theory.predict_kopt(1.0, 1.0, 1.0, 0.8, 4, 2, 1000, 0.5)
    # Budget below one round.
    with pytest.raises(ValueError, match="S"):
        theory.predict_kopt(1.0, 1.0, 1.0, 0.01, 4, 2, 0.5, 0.5)
    # Without enforcement the formula is still minimised.
    assert theory.predict_kopt(1.0, 1.0, 1.0, 0.8, 4, 2, 1000, 0.5, enforce_conditions=False) >= 1


def test_kopt_greater_than_one_hand_case():
    # alpha=4/5, beta=3/32, eta=1/128, delta=1/2: (3.47) reads 1/2*4/5 > 1/2*3/32 + 3/128,
    # i.e. 2/5 > 9/128. B(1) = 143/80 and B(2) = (4/5 + 3/16 + 3/128) * 2/(3/2) = 647/480.
    assert theory.kopt_greater_than_one(F_GAP, L, M, GAMMA, B, P, 100, DELTA) is True
    c = theory.bound_coefficients(F_GAP, L, M, GAMMA, B, P, 100, DELTA)
    assert close(theory.bound_curve(2, *c, DELTA), Fr(647, 480))
    assert theory.predict_kopt(F_GAP, L, M, GAMMA, B, P, 100, DELTA) > 1
    # A large gradient noise M reverses it: M=3000 -> beta=375/4, eta=125/16, 2/5 < 375/8 + 375/16.
    assert theory.kopt_greater_than_one(F_GAP, L, 3000, GAMMA, B, P, 100, DELTA) is False
    assert theory.predict_kopt(F_GAP, L, 3000, GAMMA, B, P, 100, DELTA) == 1
    # A budget below two rounds (S = 3/2 < 2) leaves only K = 1 admissible: not established,
    # although (3.47) itself holds (alpha = 160/3 is large).
    assert theory.kopt_greater_than_one(F_GAP, L, M, GAMMA, B, P, 1.5, DELTA) is False
    assert theory.kopt_greater_than_one(
        F_GAP, L, M, GAMMA, B, P, 1.5, DELTA, enforce_conditions=False
    )
    assert theory.predict_kopt(F_GAP, L, M, GAMMA, B, P, 1.5, DELTA) == 1


def test_kopt_condition_uses_347_not_the_misprinted_342():
    # delta = 1/3 kills the beta term ((3 delta - 1) = 0) and (1-delta)/(2 delta) = 1, so
    #   (3.47): alpha > 3 eta     while (3.42) as printed reduces to alpha > 2 eta.
    # L=1, gamma=1/2, M=6, B=1, P=1, S=64, F_gap=10: alpha = 20/32 = 5/8, eta = 1/4.
    F_gap, Lv, Mv, gamma, Bv, Pv, S, delta = 10, 1, 6, 0.5, 1, 1, 64, 1 / 3
    alpha, beta, eta = theory.bound_coefficients(F_gap, Lv, Mv, gamma, Bv, Pv, S, delta)
    assert close(alpha, Fr(5, 8)) and close(eta, Fr(1, 4)) and close(beta, 3)
    printed_342 = (1 - delta) * F_gap / (S * gamma * delta) > (3 * delta - 1) * Lv * gamma * Mv / (
        2 * delta * Pv * Bv
    ) + Lv**2 * gamma**2 * Mv / (3 * Bv)
    assert printed_342  # (3.42) as printed claims K_opt > 1 ...
    b1, b2 = theory.bound_curve([1, 2], alpha, beta, eta, delta)
    assert b2 > b1  # ... but B(2) > B(1) (87/8 vs 177/16)
    assert theory.kopt_greater_than_one(F_gap, Lv, Mv, gamma, Bv, Pv, S, delta) is False
    assert theory.predict_kopt(F_gap, Lv, Mv, gamma, Bv, Pv, S, delta) == 1


def test_kopt_greater_than_one_is_b2_less_than_b1_and_implies_kopt_above_one():
    rng = random.Random(99)
    outcomes = set()
    for _ in range(300):
        args = _random_args(rng)
        delta = args[-1]
        c = theory.bound_coefficients(*args)
        b1, b2 = theory.bound_curve([1, 2], *c, delta)
        if math.isclose(b1, b2, rel_tol=1e-9):
            continue
        raw = theory.kopt_greater_than_one(*args, enforce_conditions=False)
        assert raw is (b2 < b1)
        strict = theory.kopt_greater_than_one(*args)
        if strict:
            assert raw
            assert theory.predict_kopt(*args, k_max=64) > 1
        if raw and theory.stepsize_ok(args[1], args[3], 2, delta) and args[6] >= 2:
            assert strict
        outcomes.add((raw, strict))
    assert {(True, True), (False, False), (True, False)} <= outcomes
    # With (3.1) failing at K = 2 (L*gamma = 0.6 > 1/2) the condition cannot be established.
    assert theory.kopt_greater_than_one(1e6, 1.0, 1e-6, 0.6, 1, 1, 1e3, 0.5) is False
    assert theory.kopt_greater_than_one(
        1e6, 1.0, 1e-6, 0.6, 1, 1, 1e3, 0.5, enforce_conditions=False
    )


# --------------------------------------------------------------------------- bound_table


def test_bound_table_rows():
    rows = theory.bound_table(F_GAP, L, M, GAMMA, B, P, 100, DELTA, [1, 2, 3, 8])
    assert [r["K"] for r in rows] == [1, 2, 3, 8]
    assert close(rows[0]["bound"], Fr(143, 80))
    assert close(rows[1]["bound"], Fr(647, 480))
    assert close(rows[2]["bound"], Fr(24, 25) + Fr(69, 160))
    assert close(rows[3]["N"], Fr(100, 8))
    # L*gamma = 1/4: K=3 gives 1/16*4*1/2 + 3/4 = 7/8 <= 1; K=8 gives 1/16*9*6/2 + 2 > 1.
    assert [r["stepsize_ok"] for r in rows] == [True, True, True, False]


# --------------------------------------------------------------------------- validation

GOOD_BOUND = dict(F_gap=1.0, L=1.0, M=1.0, gamma=0.1, B=4, K=2, P=2, N=10, delta=0.5)
GOOD_COEF = dict(F_gap=1.0, L=1.0, M=1.0, gamma=0.1, B=4, P=2, S=100, delta=0.5)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("F_gap", -1.0),
        ("L", 0.0),
        ("L", -2.0),
        ("M", -0.5),
        ("gamma", 0.0),
        ("B", 0),
        ("K", 0),
        ("K", 2.5),
        ("K", True),
        ("P", -1),
        ("N", 0),
        ("delta", 0.0),
        ("delta", 1.0),
        ("delta", 1.5),
        ("L", float("nan")),
        ("N", float("inf")),
        ("gamma", "0.1"),
    ],
)
def test_kavg_bound_rejects_bad_input(name, bad):
    with pytest.raises(ValueError, match=name):
        theory.kavg_bound(**{**GOOD_BOUND, name: bad})


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("F_gap", -1.0),
        ("L", 0),
        ("M", -1),
        ("gamma", -0.1),
        ("B", 0),
        ("P", 0),
        ("S", 0),
        ("delta", 0),
        ("delta", 1),
    ],
)
def test_theorem_34_functions_reject_bad_input(name, bad):
    kwargs = {**GOOD_COEF, name: bad}
    for fn in (theory.bound_coefficients, theory.predict_kopt, theory.kopt_greater_than_one):
        with pytest.raises(ValueError, match=name):
            fn(**kwargs)
    with pytest.raises(ValueError, match=name):
        theory.bound_table(**kwargs, ks=[1, 2])


def test_other_functions_reject_bad_input():
    with pytest.raises(ValueError, match="k_max"):
        theory.predict_kopt(**GOOD_COEF, k_max=0)
    with pytest.raises(ValueError, match="ks"):
        theory.bound_table(**GOOD_COEF, ks=[1, 0])
    with pytest.raises(ValueError, match="gamma"):
        theory.stepsize_ok(1.0, 0.0, 2, 0.5)
    with pytest.raises(ValueError, match="K"):
        theory.stepsize_ok(1.0, 0.1, 0, 0.5)
    with pytest.raises(ValueError, match="delta"):
        theory.stepsize_ok(1.0, 0.1, 2, 1.0)
    with pytest.raises(ValueError, match="L"):
        theory.stepsize_ok(-1.0, 0.1, 2, 0.5)
    for name, bad in [("alpha", -1.0), ("beta", -1.0), ("eta", -1.0), ("delta", 0.0)]:
        args = {"alpha": 1.0, "beta": 1.0, "eta": 1.0, "delta": 0.5, name: bad}
        with pytest.raises(ValueError, match=name):
            theory.bound_curve(2, **args)
        with pytest.raises(ValueError, match=name):
            theory.bound_factors(2, **args)
    with pytest.raises(ValueError, match="K"):
        theory.bound_curve(0, 1.0, 1.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="K"):
        theory.bound_curve([1, -3], 1.0, 1.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="K"):
        theory.bound_curve("12", 1.0, 1.0, 1.0, 0.5)
    # Corollary 3.1 needs F_gap > 0 and M > 0 (a zero would give a zero or infinite step).
    with pytest.raises(ValueError, match="F_gap"):
        theory.corollary_stepsize(0, 1, 1, 4, 2, 2, 10)
    with pytest.raises(ValueError, match="M"):
        theory.corollary_stepsize(1, 1, 0, 4, 2, 2, 10)
    with pytest.raises(ValueError, match="N"):
        theory.corollary_stepsize(1, 1, 1, 4, 2, 2, 0)
    with pytest.raises(ValueError, match="total_samples"):
        theory.steps_from_samples(0, 4, 2)


def test_module_does_not_import_heavy_dependencies():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(theory))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"torch", "numpy", "ray", "pandas"}


# ------------------------------------------------------------------- kavg theory predict

PREDICT = ["theory", "predict", "--L", "1", "--M", "1", "--F-gap", "1", "--gamma", "0.1",
           "--B", "16", "--P", "2", "--k-max", "8", "--format", "csv"]  # fmt: skip


def _predict(*args: str):  # noqa: ANN202
    from click.testing import CliRunner

    from kavg_ray import cli

    return CliRunner().invoke(cli.main, [*PREDICT, *args])


def test_predict_takes_the_step_budget_as_estimate_names_it() -> None:
    """--step-budget (`kavg theory estimate`'s step_budget; S is Hier-AVG's group size)."""
    new = _predict("--step-budget", "100")
    assert new.exit_code == 0, new.output
    assert new.stdout.splitlines()[0] == "P,K,N,bound,stepsize_ok,K_opt"
    assert new.stdout.splitlines()[1].startswith("2,1,100.0,")
    assert "--step-budget" in _predict("--help").stdout


def test_predict_keeps_the_old_spelling_for_one_release_with_a_warning() -> None:
    new, old = _predict("--step-budget", "100"), _predict("--S", "100")
    assert old.exit_code == 0, old.output
    assert old.stdout == new.stdout and "warning" not in new.stderr
    assert old.stderr.splitlines()[0] == (
        "warning: --S is deprecated and will be removed in the next release: use "
        "--step-budget (S is Hier-AVG's group size elsewhere)"
    )
    assert "--S " not in _predict("--help").stdout  # not advertised


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "error: missing option --step-budget (local steps per learner, N*K)"),
        (("--S", "100", "--step-budget", "100"),
         "error: --S is the old spelling of --step-budget: give only --step-budget"),
        (("--step-budget", "0"), "error: --step-budget must be > 0, got 0"),
    ],
)  # fmt: skip
def test_predict_without_a_step_budget_is_bad_input(args: tuple, message: str) -> None:
    result = _predict(*args)
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1] == message
