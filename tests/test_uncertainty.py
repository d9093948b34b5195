"""Tests for kavg_ray.analysis.uncertainty: bootstrap over seeds, the K_opt(P) power-law fit,
the CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kavg_ray import cli
from kavg_ray.analysis.results import ResultsStore
from kavg_ray.analysis.uncertainty import (
    bootstrap_kopt,
    fit_power_law,
    format_uncertainty,
    kopt_curve,
    uncertainty_report,
)
from kavg_ray.errors import BadInputError

# P=2: K=1 and K=2 can tie (mean 0.85); K=4 has one seed. P=4: K=1 and K=2 always tie.
TABLE = {
    2: {1: [0.80, 0.85, 0.90], 2: [0.85, 0.87], 4: [0.70]},
    4: {1: [0.5], 2: [0.5], 4: [0.4]},
}


def trial(P, K, seed, acc, status="completed", **extra):
    return {
        "trial_id": f"P{P}-K{K}-s{seed}", "algorithm": "kavg", "dataset": "digits",
        "model": "mlp", "P": P, "K": K, "seed": seed, "status": status,
        "final_test_acc": acc, "time_to_target_s": float("nan"), **extra,
    }  # fmt: skip


def table_frame(table=TABLE, extra_rows=()) -> pd.DataFrame:
    rows = [
        trial(P, K, s, acc)
        for P, per_k in table.items()
        for K, accs in per_k.items()
        for s, acc in enumerate(accs)
    ]
    return pd.DataFrame(rows + list(extra_rows))


def reference_freq(values_by_k: list[list[float]], n_boot: int, seed: int) -> list[float]:
    """A plain loop over resamples with the documented draws and tie rule."""
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(v), size=(n_boot, len(v))) for v in values_by_k]
    votes = [0.0] * len(values_by_k)
    for b in range(n_boot):
        means = [
            math.fsum(sorted(v[i] for i in d[b])) / len(v)
            for v, d in zip(values_by_k, draws, strict=True)
        ]
        best = max(means)
        winners = [
            j for j, m in enumerate(means) if abs(m - best) <= 1e-12 * max(1.0, abs(m), abs(best))
        ]
        for j in winners:
            votes[j] += 1.0 / len(winners)
    return [v / n_boot for v in votes]


def paired_reference_freq(values_by_k: list[list[float]], n_boot: int, seed: int) -> list[float]:
    """The paired bootstrap as a plain loop: value i of each K is seed i's (a K with fewer
    seeds lacks the last ones); each resample draws the seeds jointly, with the documented
    draw, and every K averages its values on the drawn seeds it has."""
    n = max(len(v) for v in values_by_k)
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    votes = [0.0] * len(values_by_k)
    for b in range(n_boot):
        means = []
        for v in values_by_k:
            got = sorted(v[i] for i in draws[b] if i < len(v))
            means.append(math.fsum(got) / len(got) if got else None)  # None: sits it out
        best = max(m for m in means if m is not None)
        winners = [j for j, m in enumerate(means)
                   if m is not None and abs(m - best) <= 1e-12 * max(1.0, abs(m))]
        for j in winners:
            votes[j] += 1.0 / len(winners)
    return [v / n_boot for v in votes]


def exact_paired_freq(values_by_k: list[list[float]]) -> list[float]:
    """The infinite paired bootstrap, by enumerating every joint resample of the seeds."""
    n = max(len(v) for v in values_by_k)
    votes, total = [0.0] * len(values_by_k), 0
    for combo in itertools.product(range(n), repeat=n):
        means = []
        for v in values_by_k:
            got = sorted(v[i] for i in combo if i < len(v))
            means.append(math.fsum(got) / len(got) if got else None)
        best = max(m for m in means if m is not None)
        winners = [j for j, m in enumerate(means) if m is not None and abs(m - best) <= 1e-12]
        for j in winners:
            votes[j] += 1.0 / len(winners)
        total += 1
    return [v / total for v in votes]


def exact_freq(values_by_k: list[list[float]]) -> list[float]:
    """The infinite-bootstrap frequencies, by enumerating every resample of every K."""
    per_k = [list(itertools.product(v, repeat=len(v))) for v in values_by_k]
    votes, total = [0.0] * len(values_by_k), 0
    for combo in itertools.product(*per_k):
        means = [math.fsum(sorted(c)) / len(c) for c in combo]
        best = max(means)
        winners = [j for j, m in enumerate(means) if abs(m - best) <= 1e-12]
        for j in winners:
            votes[j] += 1.0 / len(winners)
        total += 1
    return [v / total for v in votes]


def freqs(df: pd.DataFrame, P: int) -> list[float]:
    g = df[df["P"] == P].sort_values("K")
    return [float(f) for f in g["freq_best"]]


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_matches_reference_loop_exactly():
    out = bootstrap_kopt(table_frame(), n_boot=500, seed=7)
    assert list(out.columns) == [
        "algorithm", "dataset", "model", "P", "K", "n_seeds", "mean", "freq_best",
    ]  # fmt: skip
    want = paired_reference_freq([TABLE[2][k] for k in (1, 2, 4)], 500, 7)
    assert freqs(out, 2) == pytest.approx(want, abs=1e-12)
    assert sum(want) == pytest.approx(1.0)
    assert 0.0 < want[0] < 1.0 and 0.0 < want[1] < 1.0 and want[2] == 0.0
    unpaired = bootstrap_kopt(table_frame(), n_boot=500, seed=7, paired=False)
    want = reference_freq([TABLE[2][k] for k in (1, 2, 4)], 500, 7)
    assert freqs(unpaired, 2) == pytest.approx(want, abs=1e-12)
    assert freqs(unpaired, 4) == [0.5, 0.5, 0.0]
    # Ties are split equally: K=1 and K=2 both 0.5 at P=4, in every resample.
    assert freqs(out, 4) == [0.5, 0.5, 0.0]
    p2 = out[out["P"] == 2].sort_values("K")
    assert list(p2["n_seeds"]) == [3, 2, 1]
    assert list(p2["mean"]) == pytest.approx([0.85, 0.86, 0.70])


def test_bootstrap_is_deterministic_per_seed_and_varies_with_it():
    a = bootstrap_kopt(table_frame(), n_boot=300, seed=1)
    b = bootstrap_kopt(table_frame(), n_boot=300, seed=1)
    c = bootstrap_kopt(table_frame(), n_boot=300, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert freqs(a, 2) != freqs(c, 2)


def test_bootstrap_converges_to_enumerated_frequencies():
    values = [TABLE[2][k] for k in (1, 2, 4)]
    exact = exact_paired_freq(values)
    out = bootstrap_kopt(table_frame(), n_boot=40_000, seed=0)
    assert freqs(out, 2) == pytest.approx(exact, abs=0.01)
    assert exact[2] == 0.0 and exact[0] + exact[1] == pytest.approx(1.0)
    exact = exact_freq(values)
    out = bootstrap_kopt(table_frame(), n_boot=40_000, seed=0, paired=False)
    assert freqs(out, 2) == pytest.approx(exact, abs=0.01)


def test_bootstrap_skips_unusable_trials_and_minimises_time():
    extra = [
        trial(2, 4, 1, 0.99, status="diverged"),  # counted at chance accuracy, 0.1
        trial(2, 8, 0, float("nan")),  # completed without accuracy: unusable
        trial(2, 8, 1, 0.99, status="failed"),  # unusable
    ]
    out = bootstrap_kopt(table_frame(extra_rows=extra), n_boot=200, seed=7)
    p2 = out[out["P"] == 2].sort_values("K")
    assert list(p2["K"]) == [1, 2, 4] and list(p2["n_seeds"]) == [3, 2, 2]
    assert list(p2["mean"]) == pytest.approx([0.85, 0.86, 0.40])
    times = pd.DataFrame([
        {**trial(2, 1, 0, 0.9), "time_to_target_s": 10.0},
        {**trial(2, 2, 0, 0.9), "time_to_target_s": 5.0},
        {**trial(2, 4, 0, 0.9), "time_to_target_s": float("nan")},  # never reached
    ])  # fmt: skip
    by_time = bootstrap_kopt(times, by="time", n_boot=50, seed=0)
    assert list(by_time["K"]) == [1, 2] and freqs(by_time, 2) == [0.0, 1.0]


def test_bootstrap_rejects_bad_input():
    with pytest.raises(BadInputError, match="n_boot"):
        bootstrap_kopt(table_frame(), n_boot=0)
    with pytest.raises(BadInputError, match="by="):
        bootstrap_kopt(table_frame(), by="speed")


# --------------------------------------------------------------------------- fit


def test_fit_recovers_a_known_power_law():
    P = [2, 4, 8, 16, 32, 64]
    fit = fit_power_law(P, [3.0 * p**0.6 for p in P])
    assert fit.b == pytest.approx(0.6, abs=1e-12)
    assert fit.a == pytest.approx(3.0, rel=1e-12)
    assert fit.r2 == pytest.approx(1.0)
    assert np.abs(fit.residuals_log2()).max() < 1e-12
    assert float(fit.predict(128)) == pytest.approx(3.0 * 128**0.6)


def test_fit_recovers_exponent_from_noisy_integer_k():
    rng = np.random.default_rng(0)
    P = [2, 4, 8, 16, 32, 64, 128, 256]
    K = [max(1, round(2.0 * p**0.5 * math.exp(rng.normal(0, 0.05)))) for p in P]
    fit = fit_power_law(P, K)
    assert fit.b == pytest.approx(0.5, abs=0.05)
    assert 0.95 < fit.r2 < 1.0


def test_fit_rejects_degenerate_input():
    with pytest.raises(BadInputError, match="two or more distinct P"):
        fit_power_law([4, 4], [2, 8])
    with pytest.raises(BadInputError, match="positive"):
        fit_power_law([2, 4], [0, 8])
    flat = fit_power_law([2, 4, 8], [4, 4, 4])
    assert flat.b == 0.0 and flat.r2 == 1.0


def test_kopt_curve_fits_p_from_2_and_predicts_untried_powers_of_two():
    # K_opt = 1 at P=1 (not fitted), 2 at P=2, 4 at P=4, 8 at P=8: b = 1, a = 1.
    table = {1: {1: [0.9], 2: [0.8]}, 2: {1: [0.7], 2: [0.9], 4: [0.8]},
             4: {2: [0.7], 4: [0.9], 8: [0.8]}, 8: {4: [0.7], 8: [0.9], 16: [0.8]}}  # fmt: skip
    fits, curve = kopt_curve(table_frame(table))
    fit = fits.iloc[0]
    assert fit["a"] == pytest.approx(1.0) and fit["b"] == pytest.approx(1.0)
    assert fit["n_points"] == 3 and fit["P_fitted"] == "2,4,8"
    # One seed per point: fewer than two settled P, so every P is fitted, and flagged.
    assert fit["P_unsettled"] == "2,4,8" and fit["note"] == (
        "rests on unsettled K_opt: P=2 (single seed), P=4 (single seed), P=8 (single seed); "
        "a sketch, not a law"
    )
    assert list(curve["note"])[1:4] == ["flagged: single seed"] * 3
    assert list(curve["P"]) == [1, 2, 4, 8, 16, 32]
    assert list(curve["kind"]) == ["measured"] * 4 + ["predicted"] * 2
    assert list(curve["K_pred"]) == [1, 2, 4, 8, 16, 32]
    assert curve["note"].iloc[0] == "not fitted (P = 1)"
    _, custom = kopt_curve(table_frame(table), predict_p=[3, 8, 100])
    pred = custom[custom["kind"] == "predicted"]
    assert list(pred["P"]) == [3, 100] and list(pred["K_pred"]) == [3, 100]


def test_kopt_curve_with_two_p_says_the_fit_is_exact():
    table = {2: {1: [0.7], 2: [0.9]}, 4: {2: [0.7], 8: [0.9]}}
    fits, _ = kopt_curve(table_frame(table))
    assert fits.iloc[0]["b"] == pytest.approx(2.0) and fits.iloc[0]["r2"] == 1.0
    edge = "single seed; at the largest K tried: K_opt may be larger"
    assert fits.iloc[0]["note"] == (
        f"two P: the fit is exact, its R^2 says nothing; rests on unsettled K_opt: "
        f"P=2 ({edge}), P=4 ({edge}); a sketch, not a law"
    )


def test_kopt_curve_leaves_out_unsettled_p_when_two_settled_remain():
    """P=2 and P=4: K_opt best on every seed (clear). P=8: clear, but the largest K tried.
    P=16: K=4 and K=16 tie in the mean and split the bootstrap (inconclusive)."""
    table = {
        2: {1: [0.5, 0.6, 0.55], 2: [0.9, 0.8, 0.85], 4: [0.7, 0.7, 0.7]},
        4: {2: [0.5, 0.6, 0.55], 4: [0.9, 0.8, 0.85], 8: [0.7, 0.7, 0.7]},
        8: {4: [0.5, 0.6, 0.55], 8: [0.7, 0.7, 0.7], 16: [0.9, 0.8, 0.85]},
        16: {2: [0.5, 0.5], 4: [0.9, 0.8], 8: [0.5, 0.5], 16: [0.8, 0.9]},
    }
    fits, curve = kopt_curve(table_frame(table))
    fit = fits.iloc[0]
    assert fit["P_fitted"] == "2,4" and fit["n_points"] == 2 and fit["P_unsettled"] == "8,16"
    assert fit["a"] == pytest.approx(1.0) and fit["b"] == pytest.approx(1.0)
    assert fit["note"] == (
        "two P: the fit is exact, its R^2 says nothing; fitted on the settled P only; left "
        "out: P=8 (at the largest K tried: K_opt may be larger), P=16 (inconclusive)"
    )
    measured = curve[curve["kind"] == "measured"]
    assert list(measured["K_opt"]) == [2, 4, 16, 4]
    assert list(measured["verdict"]) == ["clear", "clear", "clear", "inconclusive"]
    assert list(measured["note"]) == [
        "", "", "not fitted: at the largest K tried: K_opt may be larger",
        "not fitted: inconclusive",
    ]  # fmt: skip
    assert list(measured["residual_log2"].isna()) == [False, False, True, True]
    # Had P=8 and P=16 been fitted, b would not be 1: K_opt 16 at P=8, 4 at P=16.
    assert list(measured["K_pred"]) == [2, 4, 8, 16]
    from kavg_ray.analysis import plots

    ax = next(a for a in plots.kopt_vs_p(table_frame(table)).axes if a.get_visible())
    line = next(ln for ln in ax.get_lines() if ln.get_label().startswith("fit K ="))
    assert line.get_label() == "fit K = 1·P^1 (R² = 1.000); P 8, 16 left out"
    assert line.get_xdata()[0] == pytest.approx(2.0) and line.get_xdata()[-1] == pytest.approx(4)


def test_kopt_curve_without_two_p_says_why():
    fits, curve = kopt_curve(table_frame({2: TABLE[2]}))
    assert fits.iloc[0]["note"] == "needs K_opt at two or more P >= 2"
    assert math.isnan(fits.iloc[0]["b"])
    assert list(curve["kind"]) == ["measured"]


# --------------------------------------------------------------------------- output, CLI


def test_format_json_holds_the_three_tables():
    frames = uncertainty_report(table_frame(), n_boot=100, seed=3)
    doc = json.loads(format_uncertainty(frames, "json", 100, 3))
    assert set(doc) == {"n_boot", "seed", "bootstrap", "fit", "curve"}
    text = format_uncertainty(frames, "csv", 100, 3)
    assert text.startswith("# bootstrap: how often each K is best over 100 resamples")


def make_store(tmp_path) -> str:
    store = ResultsStore(tmp_path / "store")
    for row in table_frame().to_dict("records"):
        store.upsert_trial("unc", row)
    return str(store.root)


def test_cli_uncertainty_prints_the_bootstrap_frequencies(tmp_path):
    storage = make_store(tmp_path)
    args = ["results", "kopt", "unc", "--storage", storage, "--uncertainty"]
    res = CliRunner().invoke(
        cli.main, [*args, "--n-boot", "400", "--seed", "5", "--format", "json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    got = {(r["P"], r["K"]): r["freq_best"] for r in doc["bootstrap"]}
    want = paired_reference_freq([TABLE[2][k] for k in (1, 2, 4)], 400, 5)
    assert [got[(2, k)] for k in (1, 2, 4)] == pytest.approx(want, abs=1e-12)
    assert [got[(4, k)] for k in (1, 2, 4)] == [0.5, 0.5, 0.0]
    assert doc["n_boot"] == 400 and doc["seed"] == 5
    table = CliRunner().invoke(cli.main, [*args, "--n-boot", "400", "--seed", "5"])
    assert table.exit_code == 0, table.output
    assert "ties split equally" in table.output and "K_opt(P) = a * P^b" in table.output
    line = next(ln for ln in table.output.splitlines() if ln.split()[3:5] == ["4", "1"])
    assert line.split()[-1] == "0.5"


def test_cli_uncertainty_bad_n_boot_exits_2(tmp_path):
    storage = make_store(tmp_path)
    res = CliRunner().invoke(
        cli.main, ["results", "kopt", "unc", "--storage", storage, "--uncertainty", "--n-boot", "0"]
    )
    assert res.exit_code == 2


# --------------------------------------------------------------------------- plots


def test_bootstrap_plot_bars_are_the_frequencies():
    from kavg_ray.analysis import plots

    fig = plots.kopt_bootstrap(table_frame(), n_boot=500, seed=7)
    ax = next(a for a in fig.axes if a.get_visible())
    want = bootstrap_kopt(table_frame(), n_boot=500, seed=7)
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == pytest.approx(freqs(want, 2) + freqs(want, 4), abs=1e-12)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4"]
    one_seed = table_frame({2: {1: [0.5], 2: [0.6]}})
    with pytest.raises(plots.PlotDataError, match="one seed per K"):
        plots.kopt_bootstrap(one_seed)


def test_kopt_vs_p_draws_the_fitted_curve():
    from kavg_ray.analysis import plots

    table = {2: {1: [0.7], 2: [0.9], 4: [0.8]}, 4: {2: [0.7], 4: [0.9], 8: [0.8]},
             8: {4: [0.7], 8: [0.9], 16: [0.8]}}  # fmt: skip
    ax = next(a for a in plots.kopt_vs_p(table_frame(table)).axes if a.get_visible())
    fit = next(ln for ln in ax.get_lines() if ln.get_label().startswith("fit K ="))
    x, y = fit.get_xdata(), fit.get_ydata()
    assert x[0] == pytest.approx(2.0) and x[-1] == pytest.approx(8.0)
    assert list(y) == pytest.approx(list(x))  # K_opt = P: a = 1, b = 1
    # One seed per P: no P is settled, so the fit uses them all and says so.
    assert fit.get_label() == "fit K = 1·P^1 (R² = 1.000); on unsettled K_opt at P 2, 4, 8"
