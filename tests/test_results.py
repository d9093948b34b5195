"""Tests for kavg_ray.analysis.results: K_opt selection, the Parquet store and output formats."""

from __future__ import annotations

import io
import json
import math
import os
import threading

import numpy as np
import pandas as pd
import pytest

from kavg_ray.analysis import results
from kavg_ray.analysis.results import (
    HISTORY_COLUMNS,
    TRIAL_COLUMNS,
    ResultsError,
    ResultsStore,
    attach_predictions,
    format_frame,
    kopt_table,
    validate_name,
)

NAN = float("nan")


def trial(K, acc=NAN, *, P=2, seed=0, status="completed", ttt=NAN, **extra):
    """One hand-built trials row (digits/mlp/kavg unless overridden)."""
    row = {
        "algorithm": "kavg",
        "dataset": "digits",
        "model": "mlp",
        "P": P,
        "K": K,
        "seed": seed,
        "status": status,
        "final_test_acc": acc,
        "time_to_target_s": ttt,
    }
    row.update(extra)
    return row


def frame(*rows):
    return pd.DataFrame(list(rows))


def only_row(df: pd.DataFrame) -> pd.Series:
    assert len(df) == 1, df
    return df.iloc[0]


# --------------------------------------------------------------------------- kopt: accuracy


def test_kopt_columns_exact():
    out = kopt_table(frame(trial(1, 0.9), trial(2, 0.8)))
    assert list(out.columns) == [
        "algorithm", "dataset", "model", "P",
        "K_opt", "verdict", "freq_best", "credible_set", "freq_k1", "diff_vs_k1",
        "diff_vs_k1_lo", "diff_vs_k1_hi",
        "mean", "std", "n_seeds", "k_within_1std", "n_excluded", "K_values_tried", "note",
    ]


def test_kopt_accuracy_picks_max_mean():
    row = only_row(kopt_table(frame(trial(1, 0.80), trial(2, 0.95), trial(4, 0.90))))
    assert row["K_opt"] == 2
    assert row["mean"] == pytest.approx(0.95)
    assert row["std"] == 0.0  # one seed: std reported as 0
    assert row["n_seeds"] == 1
    assert row["k_within_1std"] == "2"
    assert row["K_values_tried"] == "1,2,4"
    assert row["n_excluded"] == 0
    assert row["verdict"] == "single seed"
    assert row["note"] == "to settle: more seeds (1 now)"


def test_kopt_tie_smallest_k_wins():
    # Rows deliberately out of K order: the tie must go to K=2, not to the first row.
    df = frame(trial(8, 0.9), trial(2, 0.9), trial(4, 0.9), trial(1, 0.5))
    row = only_row(kopt_table(df))
    assert row["K_opt"] == 2
    assert row["k_within_1std"] == "2,4,8"


def test_kopt_tie_up_to_rounding_goes_to_smallest_k():
    # Both means are 0.15 in decimal, but in floats (0.3 + 0.0) / 2 < (0.1 + 0.2) / 2:
    # the last-bit difference must not hand the win to the larger K.
    df = frame(
        trial(2, 0.3, seed=0), trial(2, 0.0, seed=1),
        trial(4, 0.1, seed=0), trial(4, 0.2, seed=1),
    )
    assert (0.3 + 0.0) / 2 < (0.1 + 0.2) / 2  # the premise of this test
    assert only_row(kopt_table(df))["K_opt"] == 2


def test_kopt_completed_without_accuracy_is_excluded():
    df = frame(trial(1, 0.7), trial(2, NAN), trial(4, 0.6))
    row = only_row(kopt_table(df))
    assert row["K_opt"] == 1
    assert row["n_excluded"] == 1
    assert row["k_within_1std"] == "1"


def test_kopt_several_seeds_exact_mean_std():
    df = frame(
        trial(1, 0.80, seed=0), trial(1, 0.90, seed=1),
        trial(4, 0.86, seed=0), trial(4, 0.88, seed=1), trial(4, 0.90, seed=2),
        trial(16, 0.70, seed=0), trial(16, 0.72, seed=1),
    )
    row = only_row(kopt_table(df))
    assert row["K_opt"] == 4
    assert row["mean"] == pytest.approx(0.88)
    assert row["std"] == pytest.approx(0.02)  # sample std (ddof=1) of .86,.88,.90
    assert row["n_seeds"] == 3
    # K=1 mean 0.85 >= 0.88 - 0.02 = 0.86? no. So only K=4.
    assert row["k_within_1std"] == "4"


def test_kopt_within_one_std_exact_set():
    df = frame(
        trial(1, 0.84, seed=0), trial(1, 0.86, seed=1),  # mean .85 -> inside
        trial(2, 0.80, seed=0), trial(2, 1.00, seed=1),  # mean .90, std .1414 -> best
        trial(4, 0.76, seed=0), trial(4, 0.76, seed=1),  # mean .76 -> just inside
        trial(8, 0.70, seed=0), trial(8, 0.78, seed=1),  # mean .74 -> outside
    )
    row = only_row(kopt_table(df))
    assert row["K_opt"] == 2
    assert row["std"] == pytest.approx(math.sqrt(0.02))
    # bound = 0.9 - 0.141421 = 0.758579: K=1 (.85), K=2 and K=4 (.76) inside; K=8 not.
    assert row["k_within_1std"] == "1,2,4"

    df2 = frame(
        trial(1, 0.84, seed=0), trial(1, 0.86, seed=1),
        trial(2, 0.88, seed=0), trial(2, 0.92, seed=1),  # mean .90, std .028284
        trial(4, 0.87, seed=0), trial(4, 0.88, seed=1),  # mean .875 >= .871716 -> inside
    )
    assert only_row(kopt_table(df2))["k_within_1std"] == "2,4"


def test_kopt_diverged_with_best_raw_accuracy_does_not_win():
    df = frame(
        trial(1, 0.80, seed=0), trial(1, 0.82, seed=1),
        trial(8, 0.99, seed=0, status="diverged"), trial(8, 0.70, seed=1),
    )
    row = only_row(kopt_table(df))
    assert row["K_opt"] == 1
    assert row["mean"] == pytest.approx(0.81)
    assert row["n_excluded"] == 0  # the diverged seed counts, at chance accuracy
    assert row["K_values_tried"] == "1,8"
    assert row["note"].startswith("diverged (K=8 1 of 2), counted at chance accuracy 0.1")


def test_kopt_diverged_counts_against_its_k():
    """Averaging only the survivors, K=2 (0.90 on its one surviving seed) would win; the
    diverged seed counts at chance (0.1 on digits): K=2's mean is 0.5 and K_opt moves to 1."""
    df = frame(
        trial(1, 0.85, seed=0), trial(1, 0.84, seed=1),
        trial(2, 0.90, seed=0), trial(2, NAN, seed=1, status="diverged"),
    )
    row = only_row(kopt_table(df))
    assert row["K_opt"] == 1
    assert row["mean"] == pytest.approx(0.845)
    survivors = only_row(kopt_table(df[df["status"] == "completed"]))
    assert survivors["K_opt"] == 2  # what dropping the diverged seed would have said
    # By loss it counts at the group's worst loss (here K=1 seed 1's 0.9).
    loss = df.assign(final_test_loss=[0.5, 0.9, 0.6, NAN])
    by_loss = only_row(kopt_table(loss, by="loss"))
    assert by_loss["K_opt"] == 1 and by_loss["mean"] == pytest.approx(0.7)
    assert "counted at the worst loss 0.9" in by_loss["note"]
    # A data set whose chance is unknown: the diverged seed scores 0.
    other = only_row(kopt_table(df.assign(dataset="mywl:load")))
    assert other["K_opt"] == 1 and "counted at 0" in other["note"]


def test_kopt_failed_trial_does_not_win():
    df = frame(trial(2, 0.5), trial(4, 0.97, status="failed"), trial(8, 0.6))
    row = only_row(kopt_table(df))
    assert row["K_opt"] == 8
    assert row["n_excluded"] == 1


def test_kopt_multiple_p_groups():
    df = frame(
        trial(1, 0.9, P=1), trial(4, 0.8, P=1),
        trial(1, 0.7, P=4), trial(4, 0.85, P=4),
        trial(1, 0.6, P=2), trial(2, 0.65, P=2), trial(4, 0.64, P=2),
    )
    out = kopt_table(df)
    assert list(out["P"]) == [1, 2, 4]
    assert list(out["K_opt"]) == [1, 2, 4]
    assert list(out["mean"]) == pytest.approx([0.9, 0.65, 0.85])


def test_kopt_groups_by_algorithm_and_dataset():
    df = frame(
        trial(1, 0.9), trial(4, 0.8),
        trial(1, 0.5, dataset="cifar10"), trial(4, 0.6, dataset="cifar10"),
    )
    out = kopt_table(df)
    got = dict(zip(out["dataset"], out["K_opt"], strict=True))
    assert got == {"cifar10": 4, "digits": 1}


def test_kopt_group_by_override_and_missing_column():
    df = frame(trial(1, 0.9, P=1), trial(4, 0.95, P=2))
    out = kopt_table(df, group_by=["algorithm"])
    assert list(out.columns[:2]) == ["algorithm", "K_opt"]
    assert only_row(out)["K_opt"] == 4
    with pytest.raises(ValueError, match="nope"):
        kopt_table(df, group_by=["nope"])


def test_kopt_no_completed_trial_in_group():
    df = frame(trial(1, 0.9, status="failed"), trial(2, 0.9, status="diverged"))
    row = only_row(kopt_table(df))
    assert pd.isna(row["K_opt"])
    assert row["note"] == "no completed trial"
    assert row["n_excluded"] == 2


def test_kopt_unknown_by():
    with pytest.raises(ValueError, match="by="):
        kopt_table(frame(trial(1, 0.9)), by="speed")


def test_predictions_attach_per_lr_and_p_to_kavg_rows_only():
    trials = frame(
        trial(1, 0.90, P=2, lr=0.1, batch_size=16),
        trial(4, 0.95, P=2, lr=0.1, batch_size=16),
        trial(1, 0.80, P=2, lr=0.5, batch_size=16),
        trial(4, 0.70, P=2, lr=0.5, batch_size=16),
        trial(8, 0.60, P=4, lr=0.5, batch_size=16),
        trial(8, 0.99, P=2, lr=0.1, batch_size=16, algorithm="downpour"),
    )
    theory = {"predictions": [  # JSON numbers: P and batch size as ints, lr as float
        {"dataset": "digits", "model": "mlp", "lr": 0.1, "batch_size": 16, "P": 2,
         "predicted_kopt": 3},
        {"dataset": "digits", "model": "mlp", "lr": 0.5, "batch_size": 16, "P": 2,
         "predicted_kopt": 1},
        {"dataset": "digits", "model": "cnn", "lr": 0.5, "batch_size": 16, "P": 2,
         "predicted_kopt": 64},
    ]}  # fmt: skip
    out = attach_predictions(trials, theory)
    assert out["predicted_kopt"].tolist() == [3, 3, 1, 1, pd.NA, pd.NA]
    assert str(out["predicted_kopt"].dtype) == "Int64"
    assert out.drop(columns="predicted_kopt").equals(trials)  # nothing else changes
    table = kopt_table(out)
    table = table[table["algorithm"] == "kavg"].set_index(["lr", "P"])
    assert table.loc[(0.1, 2), "K_opt"] == 4 and table.loc[(0.1, 2), "predicted_kopt"] == 3
    assert table.loc[(0.5, 2), "K_opt"] == 1 and table.loc[(0.5, 2), "predicted_kopt"] == 1
    assert pd.isna(table.loc[(0.5, 4), "predicted_kopt"])
    # Older theory.json (no dataset/model keys) still matches on lr, batch size and P.
    old = {"predictions": [{k: v for k, v in theory["predictions"][0].items()
                            if k not in ("dataset", "model")}]}  # fmt: skip
    assert attach_predictions(trials, old)["predicted_kopt"].tolist()[:3] == [3, 3, pd.NA]
    assert attach_predictions(trials, None) is trials


def test_kopt_predicted_passthrough():
    df = frame(trial(1, 0.9, predicted_kopt=None), trial(4, 0.8, predicted_kopt=16))
    row = only_row(kopt_table(df))
    assert row["predicted_kopt"] == 16
    assert "predicted_kopt" not in kopt_table(frame(trial(1, 0.9))).columns


def test_kopt_hier_avg_uses_k_column():
    df = frame(
        trial(2, 0.7, algorithm="hier_avg", S=2, K1=1, K2=2),
        trial(8, 0.9, algorithm="hier_avg", S=2, K1=1, K2=8),
    )
    row = only_row(kopt_table(df))
    assert row["algorithm"] == "hier_avg"
    assert row["K_opt"] == 8
    # K_opt is the best global period K2 for each local period K1 swept.
    df = frame(
        trial(2, 0.7, algorithm="hier_avg", S=2, K1=1, K2=2),
        trial(8, 0.9, algorithm="hier_avg", S=2, K1=2, K2=8),
        trial(4, 0.95, algorithm="hier_avg", S=2, K1=2, K2=4),
    )
    table = kopt_table(df)
    assert table[["K1", "K_opt"]].values.tolist() == [[1, 2], [2, 4]]


def test_kopt_float_k_reported_as_int():
    # K comes back as float from Parquet when some rows lack it.
    df = frame(trial(1.0, 0.5), trial(4.0, 0.9), trial(NAN, 0.99))
    row = only_row(kopt_table(df))
    assert str(row["K_opt"]) == "4"
    assert row["K_values_tried"] == "1,4"
    assert row["n_excluded"] == 1  # the row without K


# --------------------------------------------------------------------------- kopt: time


def test_kopt_time_never_reached_k_is_not_candidate():
    df = frame(
        trial(1, 0.9, seed=0, ttt=30.0), trial(1, 0.9, seed=1, ttt=34.0),
        trial(4, 0.9, seed=0, ttt=NAN), trial(4, 0.9, seed=1, ttt=NAN),  # never reached
        trial(8, 0.9, seed=0, ttt=20.0), trial(8, 0.9, seed=1, ttt=NAN),  # one seed reached
        trial(16, 0.9, seed=0, ttt=5.0, status="diverged"),  # fast but diverged
    )
    row = only_row(kopt_table(df, by="time"))
    assert row["K_opt"] == 8
    assert row["mean"] == pytest.approx(20.0)
    assert row["std"] == 0.0
    assert row["n_seeds"] == 1
    assert row["k_within_1std"] == "8"
    assert row["n_excluded"] == 1
    assert row["K_values_tried"] == "1,4,8,16"


def test_kopt_time_mean_std_and_within_set():
    df = frame(
        trial(1, ttt=10.0, seed=0), trial(1, ttt=14.0, seed=1),  # mean 12, std 2.828
        trial(2, ttt=14.0, seed=0), trial(2, ttt=14.0, seed=1),  # 14 <= 14.83 -> inside
        trial(4, ttt=16.0, seed=0), trial(4, ttt=16.0, seed=1),  # outside
        trial(8, ttt=12.0, seed=0),  # tie with K=1 on mean but larger K
    )
    row = only_row(kopt_table(df, by="time"))
    assert row["K_opt"] == 1
    assert row["mean"] == pytest.approx(12.0)
    assert row["std"] == pytest.approx(math.sqrt(8.0))
    assert row["n_seeds"] == 2
    assert row["k_within_1std"] == "1,2,8"


def test_kopt_time_nothing_reached_target():
    df = frame(
        trial(1, 0.9, P=1, ttt=NAN), trial(2, 0.9, P=1, ttt=NAN),
        trial(1, 0.9, P=2, ttt=40.0), trial(2, 0.9, P=2, ttt=30.0),
    )
    out = kopt_table(df, by="time").set_index("P")
    assert pd.isna(out.loc[1, "K_opt"])
    assert out.loc[1, "note"] == "no trial reached the target"
    assert math.isnan(out.loc[1, "mean"])
    assert out.loc[1, "k_within_1std"] == ""
    assert out.loc[2, "K_opt"] == 2
    assert out.loc[2, "verdict"] == "single seed"
    assert out.loc[2, "note"] == (
        "K_opt is the largest K tried: the best K may be larger; to settle: more seeds "
        "(1 now); or a K range that brackets the best (K beyond the largest K tried)"
    )


def test_kopt_empty_frame():
    out = kopt_table(pd.DataFrame(columns=TRIAL_COLUMNS))
    assert len(out) == 0
    assert "K_opt" in out.columns


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("bad", ["../x", "", "a/b", ".", "..", "a b", "x" * 129, "a\\b"])
def test_validate_name_rejects(bad):
    with pytest.raises(ValueError):
        validate_name(bad)


@pytest.mark.parametrize("good", ["K4-P8-s0", "sweep_1.v2", "x" * 128, "..a"])
def test_validate_name_accepts(good):
    assert validate_name(good) == good


def test_store_rejects_bad_sweep_name(tmp_path):
    with pytest.raises(ValueError):
        ResultsStore(str(tmp_path)).upsert_trial("../escape", {"trial_id": "t"}, [])
    assert not (tmp_path.parent / "escape").exists()


def test_default_storage(monkeypatch):
    monkeypatch.delenv("KAVG_STORAGE", raising=False)
    assert results.default_storage() == "./kavg_results"
    monkeypatch.setenv("KAVG_STORAGE", "/tmp/elsewhere")
    assert results.default_storage() == "/tmp/elsewhere"
    assert ResultsStore().storage == "/tmp/elsewhere"


# --------------------------------------------------------------------------- store


def row(trial_id, status="completed", acc=0.9, **extra):
    r = {"trial_id": trial_id, "algorithm": "kavg", "P": 2, "K": 4, "seed": 0,
         "status": status, "final_test_acc": acc}
    r.update(extra)
    return r


def hist(n, acc=0.5):
    return [{"epoch": e, "test_acc": acc, "train_loss": 1.0 / (e + 1)} for e in range(n)]


def test_upsert_insert_and_replace(tmp_path):
    store = ResultsStore(str(tmp_path))
    store.upsert_trial("s", row("a", acc=0.5), hist(3, acc=0.1))
    store.upsert_trial("s", row("b", acc=0.6), hist(2, acc=0.2))
    store.upsert_trial("s", row("a", acc=0.95), hist(1, acc=0.3))

    t = store.read_trials("s")
    assert len(t) == 2
    assert list(t.columns[: len(TRIAL_COLUMNS)]) == TRIAL_COLUMNS
    assert set(t["sweep"]) == {"s"}
    by_id = t.set_index("trial_id")["final_test_acc"]
    assert by_id["a"] == pytest.approx(0.95)
    assert by_id["b"] == pytest.approx(0.6)

    h = store.read_history("s")
    assert list(h.columns[: len(HISTORY_COLUMNS)]) == HISTORY_COLUMNS
    counts = h.groupby("trial_id").size().to_dict()
    assert counts == {"a": 1, "b": 2}
    assert h.loc[h["trial_id"] == "a", "test_acc"].tolist() == [pytest.approx(0.3)]
    assert set(h["sweep"]) == {"s"}


def test_upsert_keeps_extra_columns(tmp_path):
    store = ResultsStore(str(tmp_path))
    store.upsert_trial("s", row("a", staleness_mean=1.5), [])
    t = store.read_trials("s")
    assert t.loc[0, "staleness_mean"] == 1.5
    assert list(t.columns) == TRIAL_COLUMNS + ["staleness_mean"]


def test_upsert_requires_trial_id(tmp_path):
    with pytest.raises(ValueError, match="trial_id"):
        ResultsStore(str(tmp_path)).upsert_trial("s", {"status": "completed"}, [])


def test_upsert_survives_mixed_type_column(tmp_path):
    store = ResultsStore(str(tmp_path))
    store.upsert_trial("s", row("a", note_x=3), [])
    store.upsert_trial("s", row("b", note_x="three"), [])
    t = store.read_trials("s").set_index("trial_id")
    assert t.loc["b", "note_x"] == "three"
    assert str(t.loc["a", "note_x"]) == "3"


def test_atomic_write_leaves_no_temp_files(tmp_path):
    store = ResultsStore(str(tmp_path))
    for i in range(3):
        store.upsert_trial("s", row(f"t{i}"), hist(2))
    store.write_spec("s", {"name": "s"})
    names = sorted(os.listdir(tmp_path / "s"))
    assert names == [".lock", "history.parquet", "spec.json", "trials.parquet"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    store = ResultsStore(str(tmp_path))
    store.upsert_trial("s", row("a"), [])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("kavg_ray.analysis.results.pq.write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        store.upsert_trial("s", row("b"), [])
    monkeypatch.undo()
    assert list(store.read_trials("s")["trial_id"]) == ["a"]
    assert not [n for n in os.listdir(tmp_path / "s") if n.endswith(".tmp")]


def test_concurrent_upserts_lose_nothing(tmp_path):
    store = ResultsStore(str(tmp_path))
    errors: list[BaseException] = []

    def work(i):
        try:
            ResultsStore(str(tmp_path)).upsert_trial("s", row(f"t{i}"), hist(2))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert sorted(store.read_trials("s")["trial_id"]) == sorted(f"t{i}" for i in range(12))
    assert len(store.read_history("s")) == 24


def test_spec_roundtrip(tmp_path):
    store = ResultsStore(str(tmp_path))
    spec = {"name": "s", "grid": {"K": [1, 2, 4], "P": [2]}, "target_accuracy": 0.9}
    store.write_spec("s", spec)
    assert store.read_spec("s") == spec
    assert store.sweep_dir("s") == tmp_path / "s"


def test_spec_only_sweep_reads_empty(tmp_path):
    store = ResultsStore(str(tmp_path))
    store.write_spec("s", {"name": "s"})
    t = store.read_trials("s")
    assert len(t) == 0 and list(t.columns) == TRIAL_COLUMNS
    h = store.read_history("s")
    assert len(h) == 0 and list(h.columns) == HISTORY_COLUMNS
    assert store.finished_trial_ids("s") == set()


def test_unknown_sweep(tmp_path):
    store = ResultsStore(str(tmp_path))
    for fn in (store.read_trials, store.read_history, store.read_spec):
        with pytest.raises(ResultsError) as ei:
            fn("nosuch")
        assert str(ei.value) == f"unknown sweep 'nosuch' under {tmp_path}"
    with pytest.raises(ResultsError, match="nosuch"):
        results.load_trials("nosuch", storage=str(tmp_path))


def test_corrupt_trials_file(tmp_path):
    store = ResultsStore(str(tmp_path))
    store.upsert_trial("bad", row("a"), hist(1))
    store.upsert_trial("good", row("x", status="completed"), [])
    store.upsert_trial("good", row("y", status="diverged"), [])
    store.upsert_trial("good", row("z", status="failed"), [])
    path = tmp_path / "bad" / "trials.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all")

    with pytest.raises(ResultsError) as ei:
        store.read_trials("bad")
    msg = str(ei.value)
    assert msg.startswith(f"cannot read {path}: ")
    assert "\n" not in msg

    # A corrupt file must not be silently replaced by an upsert (other rows would be lost).
    with pytest.raises(ResultsError):
        store.upsert_trial("bad", row("b"), [])

    listing = store.list_sweeps()
    assert list(listing.columns) == [
        "sweep", "trials", "completed", "diverged", "failed", "updated", "error",
    ]
    lst = listing.set_index("sweep")
    assert list(lst.index) == ["bad", "good"]
    assert str(path) in lst.loc["bad", "error"]
    assert pd.isna(lst.loc["bad", "trials"])
    assert lst.loc["good", "error"] == ""
    assert (lst.loc["good", "trials"], lst.loc["good", "completed"]) == (3, 1)
    assert (lst.loc["good", "diverged"], lst.loc["good", "failed"]) == (1, 1)
    pd.Timestamp(lst.loc["good", "updated"])  # parses as an ISO time


def test_truncated_history_file(tmp_path):
    store = ResultsStore(str(tmp_path))
    store.upsert_trial("s", row("a"), hist(5))
    path = tmp_path / "s" / "history.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ResultsError, match=str(path).replace("\\", "\\\\")):
        results.load_history("s", storage=str(tmp_path))


def test_corrupt_spec(tmp_path):
    store = ResultsStore(str(tmp_path))
    store.write_spec("s", {"a": 1})
    (tmp_path / "s" / "spec.json").write_text("{not json")
    with pytest.raises(ResultsError, match="spec.json"):
        store.read_spec("s")


def test_list_sweeps_empty_and_ignores_non_sweeps(tmp_path):
    store = ResultsStore(str(tmp_path / "missing"))
    assert len(store.list_sweeps()) == 0
    (tmp_path / "not_a_sweep").mkdir()
    store = ResultsStore(str(tmp_path))
    store.write_spec("only_spec", {})
    lst = store.list_sweeps()
    assert list(lst["sweep"]) == ["only_spec"]
    assert lst.loc[0, "trials"] == 0


def test_finished_trial_ids(tmp_path):
    store = ResultsStore(str(tmp_path))
    store.upsert_trial("s", row("c", status="completed"), [])
    store.upsert_trial("s", row("d", status="diverged"), [])
    store.upsert_trial("s", row("f", status="failed"), [])
    assert store.finished_trial_ids("s") == {"c", "d"}
    store.upsert_trial("s", row("f", status="completed"), [])  # rerun of the failed one
    assert store.finished_trial_ids("s") == {"c", "d", "f"}


def test_store_to_kopt_roundtrip(tmp_path):
    store = ResultsStore(str(tmp_path))
    for k, acc in [(1, 0.8), (2, 0.9), (4, 0.85)]:
        store.upsert_trial(
            "s", {**row(f"k{k}", acc=acc), "K": k, "dataset": "digits", "model": "mlp"}, []
        )
    out = kopt_table(results.load_trials("s", storage=str(tmp_path)))
    assert only_row(out)["K_opt"] == 2


# --------------------------------------------------------------------------- format


@pytest.fixture
def kopt_out():
    df = frame(
        trial(1, 0.81234567, P=1, ttt=NAN), trial(2, 0.9, P=1),
        trial(1, 0.5, P=2), trial(2, 0.5, P=2, status="failed"),
    )
    return kopt_table(df)


def test_format_csv_roundtrip(kopt_out):
    back = pd.read_csv(io.StringIO(format_frame(kopt_out, "csv")), keep_default_na=False)
    assert list(back.columns) == list(kopt_out.columns)
    assert list(back["K_opt"]) == [2, 1]
    assert list(back["mean"]) == pytest.approx([0.9, 0.5])
    assert list(back["n_excluded"]) == [0, 1]
    assert list(back["K_values_tried"].astype(str)) == ["1,2", "1,2"]


def test_format_json_roundtrip_with_nulls():
    df = frame(trial(1, 0.9, P=1, ttt=NAN), trial(1, 0.9, P=2, ttt=12.5))
    out = kopt_table(df, by="time")
    recs = json.loads(format_frame(out, "json"))
    assert isinstance(recs, list) and len(recs) == 2
    assert recs[0]["P"] == 1 and recs[0]["K_opt"] is None and recs[0]["mean"] is None
    assert recs[0]["note"] == "no trial reached the target"
    assert recs[1]["K_opt"] == 1 and recs[1]["mean"] == 12.5
    assert set(recs[0]) == set(out.columns)


def test_format_table(kopt_out):
    text = format_frame(kopt_out, "table")
    lines = text.rstrip("\n").splitlines()
    assert lines[0].split()[:5] == ["algorithm", "dataset", "model", "P", "K_opt"]
    assert len(lines) == 3
    table = format_frame(kopt_table(frame(trial(1, 0.81234567))), "table")
    assert " 0.8123 " in table.splitlines()[1]  # 4 significant digits
    assert "0.81234" not in table


def test_format_unknown():
    with pytest.raises(ValueError, match="xml"):
        format_frame(pd.DataFrame({"a": [1]}), "xml")


def test_format_json_plain_frame_nan():
    df = pd.DataFrame({"a": [1.5, np.nan], "b": ["x", None]})
    assert json.loads(format_frame(df, "json")) == [
        {"a": 1.5, "b": "x"}, {"a": None, "b": None},
    ]


def test_kopt_table_groups_by_a_swept_learning_rate() -> None:
    """Two learning rates in one sweep: one K_opt per (P, lr), never pooled as seeds."""
    rows = [
        {"algorithm": "kavg", "dataset": "digits", "model": "mlp", "P": 2, "K": k, "lr": lr,
         "seed": 0, "status": "completed", "final_test_acc": acc}
        for k, lr, acc in [(1, 0.1, 0.90), (4, 0.1, 0.80), (1, 0.5, 0.70), (4, 0.5, 0.95)]
    ]  # fmt: skip
    table = kopt_table(pd.DataFrame(rows))
    assert table[["lr", "K_opt"]].values.tolist() == [[0.1, 1], [0.5, 4]]
    assert table["n_seeds"].tolist() == [1, 1]


def test_reader_during_writes_never_sees_a_partial_file(tmp_path) -> None:
    """A reader polling while another process rewrites the tables sees whole tables only."""
    import multiprocessing as mp

    store = ResultsStore(tmp_path)
    store.write_spec("live", {"grid": {}})
    ctx = mp.get_context("spawn")
    writer = ctx.Process(target=_write_many, args=(str(tmp_path), 60))
    writer.start()
    seen = set()
    try:
        while writer.is_alive() or not seen:
            df = store.read_trials("live")  # raises ResultsError on a torn file
            hist = store.read_history("live")
            assert df["trial_id"].is_unique
            seen.add(len(df))
            # History is written before trials: every listed trial has its rows.
            assert set(df["trial_id"]) <= set(hist["trial_id"])
    finally:
        writer.join(60)
    assert writer.exitcode == 0
    assert len(store.read_trials("live")) == 60
    assert len(seen) > 1  # the reader really overlapped the writes


def _write_many(storage: str, n: int) -> None:
    store = ResultsStore(storage)
    for i in range(n):
        row = {"trial_id": f"t{i}", "K": 1, "P": 1, "status": "completed", "final_test_acc": 0.5}
        store.upsert_trial("live", row, [{"epoch": 1, "test_acc": 0.5}])
