"""How sure K_opt is (kavg_ray.analysis.confidence, results.kopt_table's new columns and
`kavg results kopt`): verdicts on hand-made tables, the paired bootstrap against the
unpaired one, scores from the history, and the wait for the last learner."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kavg_ray import cli
from kavg_ray.analysis import confidence
from kavg_ray.analysis.results import ResultsStore, kopt_table
from kavg_ray.analysis.uncertainty import bootstrap_kopt

NAN = float("nan")


def trials(table: dict, P: int = 4, **extra) -> pd.DataFrame:
    """{K: [score of seed 0, seed 1, ...]} as completed digits trials (accuracy)."""
    return pd.DataFrame([
        {"trial_id": f"K{k}-P{P}-s{s}", "algorithm": "kavg", "dataset": "digits",
         "model": "mlp", "P": P, "K": k, "seed": s, "status": "completed",
         "final_test_acc": acc, "time_to_target_s": NAN, **extra}
        for k, accs in table.items() for s, acc in enumerate(accs)
    ])  # fmt: skip


def row_of(df: pd.DataFrame, **kw) -> pd.Series:
    out = kopt_table(df, **kw)
    assert len(out) == 1, out
    return out.iloc[0]


def share_of_draws(n_rows: int, n_boot: int, seed: int, pred) -> float:  # noqa: ANN001
    """The share of the documented joint draws (one rng per group) for which pred holds."""
    idx = np.random.default_rng(seed).integers(0, n_rows, size=(n_boot, n_rows))
    return float(np.mean([pred(tuple(r)) for r in idx]))


# --------------------------------------------------------------------------- verdicts


def test_clear_when_one_k_wins_on_every_seed() -> None:
    row = row_of(trials({1: [0.80, 0.82, 0.84], 4: [0.85, 0.87, 0.89], 16: [0.70, 0.72, 0.74]}))
    assert row["K_opt"] == 4 and row["verdict"] == "clear"
    assert row["freq_best"] == 1.0 and row["credible_set"] == "4 (1.00)"
    assert row["freq_k1"] == 0.0
    # Paired: K=4 beats K=1 by 0.05 on every seed, so every resample says 0.05.
    assert row["diff_vs_k1"] == pytest.approx(0.05, abs=1e-12)
    assert (row["diff_vs_k1_lo"], row["diff_vs_k1_hi"]) == pytest.approx((0.05, 0.05), abs=1e-12)
    assert row["note"] == ""


def test_exact_frequencies_credible_set_and_narrow() -> None:
    """Two seeds, K=1 (0.80, 0.90) and K=2 (0.85, 0.86): K=2 wins a resample unless it
    drew seed 1 twice (then K=1: 0.90 against 0.86)."""
    row = row_of(trials({1: [0.80, 0.90], 2: [0.85, 0.86]}), n_boot=1000, seed=3)
    k1_wins = share_of_draws(2, 1000, 3, lambda r: r == (1, 1))
    assert 0.2 < k1_wins < 0.3
    assert row["K_opt"] == 2 and row["mean"] == pytest.approx(0.855)
    assert row["freq_best"] == pytest.approx(1 - k1_wins, abs=1e-12)
    assert row["freq_k1"] == pytest.approx(k1_wins, abs=1e-12)
    assert row["credible_set"] == "1, 2 (1.00)"  # 1 - k1_wins < 0.8: both K needed
    assert row["verdict"] == "narrow"  # two neighbouring K
    # K=2 - K=1 per seed: +0.05, -0.04; resamples give -0.04, +0.005 or +0.05.
    assert row["diff_vs_k1"] == pytest.approx(0.005, abs=1e-12)
    assert row["diff_vs_k1_lo"] == pytest.approx(-0.04, abs=1e-12)
    assert row["diff_vs_k1_hi"] == pytest.approx(0.05, abs=1e-12)


def test_ties_split_the_vote_and_go_to_the_smallest_k() -> None:
    two = row_of(trials({1: [0.7, 0.7], 2: [0.9, 0.8], 4: [0.9, 0.8], 8: [0.6, 0.5]}))
    assert two["K_opt"] == 2 and two["freq_best"] == 0.5
    assert two["credible_set"] == "2, 4 (1.00)" and two["verdict"] == "narrow"
    three = row_of(trials({1: [0.7, 0.7], 2: [0.9, 0.8], 4: [0.9, 0.8], 8: [0.9, 0.8],
                           16: [0.6, 0.6]}))  # fmt: skip
    assert three["K_opt"] == 2 and three["freq_best"] == pytest.approx(1 / 3)
    assert three["credible_set"] == "2, 4, 8 (1.00)"  # two thirds is not 0.8
    assert three["verdict"] == "narrow" and three["note"] == ""
    # Tied K that are not neighbours: inconclusive, and what would settle it.
    apart = row_of(trials({1: [0.9, 0.8, 0.7], 4: [0.5, 0.5, 0.5], 16: [0.9, 0.8, 0.7]}))
    assert apart["K_opt"] == 1 and apart["freq_best"] == 0.5 and apart["freq_k1"] == 0.5
    assert apart["credible_set"] == "1, 16 (1.00)" and apart["verdict"] == "inconclusive"
    assert apart["note"] == "to settle: more seeds (3 now)"
    assert apart["diff_vs_k1"] == 0.0


def test_single_seed() -> None:
    row = row_of(trials({1: [0.80], 2: [0.85], 4: [0.83]}))
    assert row["K_opt"] == 2 and row["verdict"] == "single seed"
    assert row["freq_best"] == 1.0 and row["credible_set"] == "2 (1.00)"
    assert row["note"] == "to settle: more seeds (1 now)"


def test_k_opt_at_the_edge_says_so_and_what_would_settle_it() -> None:
    clear = row_of(trials({1: [0.7, 0.8], 2: [0.75, 0.85], 4: [0.8, 0.9]}))
    assert clear["verdict"] == "clear"
    assert clear["note"] == "K_opt is the largest K tried: the best K may be larger"
    # K=8 and K=1 trade places from seed to seed; K=8 is ahead on the mean.
    row = row_of(trials({1: [0.9, 0.7, 0.8], 2: [0.5] * 3, 4: [0.5] * 3, 8: [0.7, 0.9, 0.81]}))
    assert row["K_opt"] == 8 and row["verdict"] == "inconclusive"
    assert row["note"] == (
        "K_opt is the largest K tried: the best K may be larger; to settle: a K range that "
        "brackets the best (K beyond the largest K tried); or more seeds (3 now)"
    )


def test_a_longer_budget_when_the_leading_k_still_improve() -> None:
    df = trials({1: [0.9, 0.7, 0.8], 2: [0.5] * 3, 4: [0.5] * 3, 8: [0.7, 0.9, 0.8]})
    epochs = 10

    def curve(final: float, rising: bool) -> list[float]:
        return [final - (0.05 * (epochs - e) if rising else 0.0) for e in range(1, epochs + 1)]

    hist = pd.DataFrame([
        {"trial_id": t, "epoch": e + 1, "test_acc": acc}
        for t, final, k in zip(df["trial_id"], df["final_test_acc"], df["K"], strict=True)
        for e, acc in enumerate(curve(final, rising=k in (1, 8)))
    ])  # fmt: skip
    row = row_of(df, history=hist)
    assert row["K_opt"] == 1 and row["verdict"] == "inconclusive"
    assert row["note"] == (
        "to settle: a longer budget (the leading K still improved over the last epochs); "
        "or more seeds (3 now)"
    )
    flat = hist.assign(test_acc=[df.set_index("trial_id").loc[t, "final_test_acc"]
                                 for t in hist["trial_id"]])  # fmt: skip
    assert row_of(df, history=flat)["note"] == "to settle: more seeds (3 now)"


def test_a_time_ranking_within_the_wait_says_so() -> None:
    base = trials({1: [NAN] * 3, 4: [NAN] * 3, 16: [NAN] * 3})
    base["time_to_target_s"] = [10.0, 10.4, 10.2, 9.9, 10.3, 10.1, 12.0, 12.4, 12.2]
    quiet = row_of(base.assign(wait_time_s=0.01), by="time")
    assert quiet["K_opt"] == 4 and quiet["verdict"] == "clear" and quiet["note"] == ""
    assert quiet["diff_vs_k1"] == pytest.approx(-0.1, abs=1e-9)
    busy = row_of(base.assign(wait_time_s=0.5), by="time")
    assert busy["K_opt"] == 4 and busy["freq_best"] == 1.0
    assert busy["verdict"] == "inconclusive"
    assert busy["note"] == (
        "within the wait: the wait for the last learner (mean 0.5 s) is as large as the gap "
        "between K=4 and K=1 (0.1 s); to settle: times without the wait (--network, or an "
        "idle machine); or more seeds (3 now)"
    )
    # With the history, the wait counted is the one up to the target epoch.
    hist = pd.DataFrame([
        {"trial_id": t, "epoch": e, "wall_time_s": ttt * e / 2, "wait_time_s": w * e}
        for t, ttt in zip(base["trial_id"], base["time_to_target_s"], strict=True)
        for e, w in ((1, 0.01), (2, 0.01), (3, 0.01))
    ])  # fmt: skip
    at_target = row_of(base.assign(wait_time_s=0.5), by="time", history=hist)
    assert at_target["verdict"] == "clear"  # 0.02 s of wait to the target, not 0.5
    with pytest.raises(ValueError, match="by time it is 'last'"):
        kopt_table(base, by="time", score="last:3")


# --------------------------------------------------------------------------- statistics


def test_paired_bootstrap_differs_from_unpaired() -> None:
    """Seeds differ much more than K: K=2 is 0.01 ahead of K=1 on every seed. Paired,
    K=2 wins every resample; drawn apart, the seed-to-seed spread hides it."""
    df = trials({1: [0.50, 0.70, 0.90], 2: [0.51, 0.71, 0.91]})
    row = row_of(df)
    assert row["K_opt"] == 2 and row["freq_best"] == 1.0 and row["verdict"] == "clear"
    paired = bootstrap_kopt(df, n_boot=1000, seed=0)
    unpaired = bootstrap_kopt(df, n_boot=1000, seed=0, paired=False)
    assert list(paired["freq_best"]) == [0.0, 1.0]
    assert 0.4 < unpaired["freq_best"].iloc[1] < 0.7
    values = [[0.50, 0.70, 0.90], [0.51, 0.71, 0.91]]
    assert confidence.unpaired_bootstrap(values, 1000, np.random.default_rng(0))[1] == (
        unpaired["freq_best"].iloc[1]
    )


def test_a_diverged_seed_moves_k_opt_away_from_its_k() -> None:
    df = trials({1: [0.80, 0.81, 0.82], 8: [0.90, 0.91, NAN]})
    df.loc[df.index[-1], "status"] = "diverged"
    survivors = row_of(df[df["status"] == "completed"])
    assert survivors["K_opt"] == 8  # 0.905 on the two survivors
    row = row_of(df)
    assert row["K_opt"] == 1  # K=8: (0.90 + 0.91 + 0.1) / 3 = 0.637
    assert row["n_excluded"] == 0 and row["note"].startswith(
        "diverged (K=8 1 of 3), counted at chance accuracy 0.1"
    )
    boot = bootstrap_kopt(df, n_boot=500)
    assert list(boot["n_seeds"]) == [3, 3]
    assert boot["mean"].iloc[1] == pytest.approx((0.90 + 0.91 + 0.1) / 3)


def test_the_same_table_on_every_run_and_another_with_another_seed() -> None:
    df = trials({1: [0.8, 0.9, 0.85, 0.7], 2: [0.85, 0.86, 0.8, 0.75], 4: [0.9, 0.7, 0.8, 0.8]})
    a, b = kopt_table(df), kopt_table(df)
    pd.testing.assert_frame_equal(a, b)
    c = kopt_table(df, seed=1)
    assert not a["freq_best"].equals(c["freq_best"])


def test_credible_set_and_verdict_functions() -> None:
    assert confidence.credible_set([1, 2, 4], [0.1, 0.45, 0.45]) == ([2, 4], 0.9)
    assert confidence.credible_set([1, 2, 4], [0.8, 0.1, 0.1]) == ([1], 0.8)
    assert confidence.format_credible([64, 128], 0.86) == "64, 128 (0.86)"
    tried = [1, 2, 4, 8, 16]
    assert confidence.verdict([4], tried, 5) == "clear"
    assert confidence.verdict([2, 4, 8], tried, 5) == "narrow"
    assert confidence.verdict([2, 4, 8, 16], tried, 5) == "inconclusive"
    assert confidence.verdict([2, 8], tried, 5) == "inconclusive"
    assert confidence.verdict([4], tried, 1) == "single seed"


# --------------------------------------------------------------------------- scores


def _history_store(tmp_path) -> tuple[str, pd.DataFrame, pd.DataFrame]:  # noqa: ANN001
    """K=1 and K=2, two seeds, five epochs each; the final epoch favours K=2, the last
    three favour K=1."""
    curves = {
        (1, 0): [0.50, 0.60, 0.70, 0.80, 0.75], (1, 1): [0.50, 0.60, 0.70, 0.80, 0.77],
        (2, 0): [0.50, 0.60, 0.72, 0.72, 0.78], (2, 1): [0.50, 0.60, 0.72, 0.72, 0.78],
    }  # fmt: skip
    store = ResultsStore(tmp_path / "store")
    rows, hist = [], []
    for (k, s), accs in curves.items():
        row = trials({k: [NAN] * (s + 1)}).iloc[s].to_dict()
        row.update(final_test_acc=accs[-1], best_test_acc=max(accs), epochs=5)
        h = [{"trial_id": row["trial_id"], "epoch": e + 1, "test_acc": a}
             for e, a in enumerate(accs)]  # fmt: skip
        store.upsert_trial("hist", row, h)
        rows.append(row)
        hist += h
    return str(store.root), pd.DataFrame(rows), pd.DataFrame(hist)


def test_score_last_3_is_the_mean_of_the_last_three_evaluations(tmp_path) -> None:
    storage, df, hist = _history_store(tmp_path)
    last = row_of(df)
    assert last["K_opt"] == 2 and last["mean"] == 0.78
    row = row_of(df, score="last:3", history=hist)
    k1 = [math.fsum(sorted([0.70, 0.80, 0.75])) / 3, math.fsum(sorted([0.70, 0.80, 0.77])) / 3]
    assert row["K_opt"] == 1
    assert row["mean"] == math.fsum(sorted(k1)) / 2
    assert row["std"] == pytest.approx(float(np.std(k1, ddof=1)), abs=1e-15)
    best = row_of(df, score="best", history=hist)
    assert best["K_opt"] == 1 and best["mean"] == 0.80
    with pytest.raises(ValueError, match="needs the sweep's history"):
        kopt_table(df, score="last:3")
    with pytest.raises(ValueError, match="unknown score"):
        kopt_table(df, score="last:0", history=hist)
    # The CLI: --score last:3 reads the stored history; the same numbers.
    res = CliRunner().invoke(cli.main, ["results", "kopt", "hist", "--storage", storage,
                                        "--score", "last:3", "--format", "json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    (doc,) = json.loads(res.output)
    assert doc["K_opt"] == 1 and doc["mean"] == pytest.approx(row["mean"], abs=1e-15)
    table = CliRunner().invoke(cli.main, ["results", "kopt", "hist", "--storage", storage])
    assert table.exit_code == 0 and table.output.startswith("algorithm"), table.output
    assert "K_opt by accuracy: final accuracy." in table.output
    assert "verdict" in table.output.splitlines()[0]
    for bad in (["--score", "first"], ["--score", "last:2", "--by", "time"]):
        res = CliRunner().invoke(cli.main, ["results", "kopt", "hist", "--storage", storage,
                                            *bad])  # fmt: skip
        assert res.exit_code == 2 and "--score" in res.output, res.output
