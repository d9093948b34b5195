"""A K_schedule in the K_opt table: a candidate of its own beside the fixed K, and the line
that says whether the best schedule beats the best fixed K, by how much, with what verdict
(kavg_ray/analysis/schedules.py), on hand-made results tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kavg_ray.analysis import confidence
from kavg_ray.analysis.results import kopt_table
from kavg_ray.analysis.schedules import candidate_label
from kavg_ray.config import parse_run
from kavg_ray.launch.sweep import trial_row

SEEDS = range(5)
FIXED = {1: [0.80, 0.81, 0.82, 0.83, 0.84], 4: [0.90, 0.91, 0.92, 0.93, 0.94],
         16: [0.85, 0.86, 0.87, 0.88, 0.89]}  # fmt: skip


def _rows(schedules: list[tuple]) -> pd.DataFrame:
    """Fixed K trials (FIXED) and one row per seed of each schedule (kind, K0, params)."""
    base = {"algorithm": "kavg", "dataset": "digits", "model": "mlp", "P": 4,
            "status": "completed"}  # fmt: skip
    rows = [{**base, "K": k, "seed": s, "K_schedule": "constant", "final_test_acc": v}
            for k, vals in FIXED.items() for s, v in zip(SEEDS, vals, strict=True)]  # fmt: skip
    for kind, k0, params, vals in schedules:
        rows += [{**base, "K": k0, "seed": s, "K_schedule": kind, **params, "final_test_acc": v}
                 for s, v in zip(SEEDS, vals, strict=True)]  # fmt: skip
    return pd.DataFrame(rows)


def _reference(sched: list[float], fixed: list[float], n_boot: int = 1000, seed: int = 0):
    """The paired bootstrap written out: the same draws, schedule minus fixed."""
    idx = np.random.default_rng(seed).integers(0, 5, size=(n_boot, 5))
    s, f = np.asarray(sched)[idx].mean(axis=1), np.asarray(fixed)[idx].mean(axis=1)
    d = np.asarray(sched) - np.asarray(fixed)
    wins = np.where(np.abs(s - f) <= 1e-12, 0.5, (s > f).astype(float)).mean()
    lo, hi = np.quantile(d[idx].mean(axis=1), confidence.INTERVAL)
    return float(d.mean()), float(lo), float(hi), float(wins)


def test_a_better_schedule_beats_the_best_fixed_K_clearly() -> None:
    ada = [0.93, 0.94, 0.95, 0.96, 0.97]
    trials = _rows([("adacomm", 4, {}, ada), ("stagewise", 2, {"K_factor": 3}, [0.5] * 5)])
    row = kopt_table(trials).iloc[0]
    # K_opt ranks the fixed K only: adacomm's K0 = 4 rows are not K = 4's.
    assert row["K_opt"] == 4 and row["n_seeds"] == 5
    assert row["mean"] == pytest.approx(0.92, abs=1e-12)
    assert row["K_values_tried"] == "1,4,16"
    assert row["best_schedule"] == "adacomm(K0=4)" and row["best_fixed_K"] == 4
    d, lo, hi, wins = _reference(ada, FIXED[4])
    assert row["schedule_vs_fixed"] == pytest.approx(0.03, abs=1e-12) == d
    assert (row["schedule_vs_fixed_lo"], row["schedule_vs_fixed_hi"]) == pytest.approx((lo, hi))
    assert row["freq_schedule_wins"] == wins == 1.0
    assert row["schedule_verdict"] == "clear"
    assert row["schedule_line"] == (
        "adacomm(K0=4) beats K=4 by 0.03 (difference +0.03, 90%: +0.03 to +0.03; clear)"
    )


def test_a_mixed_schedule_is_inconclusive_and_matches_the_written_out_bootstrap() -> None:
    sched = [0.93, 0.90, 0.94, 0.91, 0.95]  # +0.03, -0.01, +0.02, -0.02, +0.01 against K = 4
    row = kopt_table(_rows([("stagewise", 4, {"K_factor": 2, "K_max": 64}, sched)])).iloc[0]
    d, lo, hi, wins = _reference(sched, FIXED[4])
    assert row["best_schedule"] == "stagewise(K0=4,K_factor=2,K_max=64)"
    assert row["schedule_vs_fixed"] == pytest.approx(d) and d == pytest.approx(0.006)
    assert (row["schedule_vs_fixed_lo"], row["schedule_vs_fixed_hi"]) == pytest.approx((lo, hi))
    assert lo < 0 < hi
    assert row["freq_schedule_wins"] == pytest.approx(wins) and 0.2 < wins < 0.8
    assert row["schedule_verdict"] == "inconclusive"
    assert row["schedule_line"].startswith("stagewise(K0=4,K_factor=2,K_max=64) beats K=4 by 0.006")


def test_a_worse_schedule_trails_by_loss_and_one_seed_is_single_seed() -> None:
    trials = _rows([("adacomm", 4, {"K_interval": 50}, [0.5] * 5)])
    trials["final_test_loss"] = 1.0 - trials["final_test_acc"]
    row = kopt_table(trials, by="loss").iloc[0]
    assert row["K_opt"] == 4 and row["best_schedule"] == "adacomm(K0=4,K_interval=50)"
    assert row["schedule_vs_fixed"] == pytest.approx(0.42, abs=1e-12)  # 0.5 - 0.08 of loss
    assert row["freq_schedule_wins"] == 0.0 and row["schedule_verdict"] == "clear"
    assert row["schedule_line"].startswith("adacomm(K0=4,K_interval=50) trails K=4 by 0.42")
    one = trials[(trials["K_schedule"] == "constant") | (trials["seed"] == 0)]
    assert kopt_table(one, by="loss").iloc[0]["schedule_verdict"] == "single seed"


def test_tables_without_a_schedule_keep_their_columns() -> None:
    table = kopt_table(_rows([]))
    assert "best_schedule" not in table.columns and table.iloc[0]["K_opt"] == 4


def test_trial_rows_carry_the_schedule_and_label_it() -> None:
    cfg = parse_run({"workload": {"dataset": "digits", "model": "mlp", "lr": {"initial": 0.1}},
                     "K": 4, "P": 2, "K_schedule": "adacomm", "K_interval": 50})  # fmt: skip
    row = trial_row("s", "t", cfg, [], "completed")
    assert row["K_schedule"] == "adacomm" and row["K_interval"] == 50 and row["K"] == 4
    assert row["K_factor"] is None and candidate_label(row) == "adacomm(K0=4,K_interval=50)"
    fixed = trial_row("s", "t", parse_run({**cfg.model_dump(mode="json"),
                                           "K_schedule": "constant", "K_interval": None}),
                      [], "completed")  # fmt: skip
    assert candidate_label(fixed) is None
    assert candidate_label({"K": 2.0, "K_schedule": "stagewise", "K_factor": 3.0,
                            "K_max": math.nan}) == "stagewise(K0=2,K_factor=3)"  # fmt: skip


def test_plots_leave_a_schedule_out_of_its_K0s_mean() -> None:
    from kavg_ray.analysis import plots

    trials = _rows([("adacomm", 4, {}, [0.1] * 5)])
    ok = plots._completed(trials, "final_test_acc")
    assert int(ok.sum()) == 15 and not ok[trials["K_schedule"] == "adacomm"].any()


def test_the_report_gives_the_schedule_line_beside_the_verdict() -> None:
    """`kavg results report`'s verdict bullets say where (P) without the schedule columns,
    and end with the schedule line; a table without schedules has no such sentence."""
    from kavg_ray.analysis.report import verdict_lines

    ada = [0.93, 0.94, 0.95, 0.96, 0.97]
    table = kopt_table(_rows([("adacomm", 4, {}, ada)]))
    text = verdict_lines(table)
    assert text.startswith("- P=4: K_opt = 4, **clear**")
    assert "best_schedule" not in text and "schedule_vs_fixed" not in text
    assert text.rstrip().endswith(
        "Schedules: adacomm(K0=4) beats K=4 by 0.03 (difference +0.03, 90%: +0.03 to +0.03; "
        "clear)"
    )
    assert "Schedules:" not in verdict_lines(kopt_table(_rows([])))
