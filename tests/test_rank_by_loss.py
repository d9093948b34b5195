"""Tasks without accuracy: K_opt by final test loss, per swept factory argument; the CLI,
plots and report say what was ranked (docs/design.md section 8)."""

from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest

from kavg_ray.analysis import plots
from kavg_ray.analysis.report import write_report
from kavg_ray.analysis.results import ResultsStore, kopt_table, ranked_by

# (K, seed, final test loss) per width: at width 8 K=2 is best, at width 16 K=4.
LOSSES = {
    8: [(1, 0, 0.50), (1, 1, 0.52), (2, 0, 0.30), (2, 1, 0.32), (4, 0, 0.40), (4, 1, 0.41)],
    16: [(1, 0, 0.45), (1, 1, 0.47), (2, 0, 0.36), (2, 1, 0.34), (4, 0, 0.20), (4, 1, 0.22)],
}


def _trials() -> pd.DataFrame:
    rows = []
    for width, points in LOSSES.items():
        for K, seed, loss in points:
            rows.append({
                "sweep": "reg", "trial_id": f"K{K}-P2-s{seed}-model_args.width{width}",
                "algorithm": "kavg", "dataset": "mine:data", "model": "mine:net", "P": 2,
                "K": K, "seed": seed, "status": "completed", "final_test_acc": math.nan,
                "final_test_loss": loss, "model_args.width": width, "lr": 0.1,
            })  # fmt: skip
    return pd.DataFrame(rows)


def test_kopt_by_loss_is_the_lowest_mean_per_swept_argument() -> None:
    table = kopt_table(_trials(), by="loss")
    assert list(table["model_args.width"]) == [8, 16]
    assert list(table["K_opt"]) == [2, 4]
    assert table["mean"].tolist() == pytest.approx([0.31, 0.21])
    # Within one std of the best (0.31 + 0.0141): nothing else at width 8.
    assert list(table["k_within_1std"]) == ["2", "4"]
    # By accuracy nothing can win: no trial has one.
    assert kopt_table(_trials(), by="accuracy")["K_opt"].isna().all()


def test_ranked_by_is_loss_without_accuracy() -> None:
    trials = _trials()
    assert ranked_by(trials) == "loss"
    trials.loc[0, "final_test_acc"] = 0.9
    assert ranked_by(trials) == "accuracy"


def test_plots_and_report_name_the_loss(tmp_path) -> None:
    trials = _trials()
    fig = plots.kopt_vs_p(trials)
    assert "final test loss" in fig._suptitle.get_text()
    fig = plots.accuracy_vs_k(trials)
    assert fig.axes[0].get_ylabel() == "final test loss"
    store = ResultsStore(str(tmp_path))
    for row in trials.to_dict("records"):
        store.upsert_trial("reg", row, [])
    text = write_report("reg", str(tmp_path), str(tmp_path / "out")).read_text()
    assert "## K_opt by loss" in text and "lowest mean final test loss" in text


def test_cli_kopt_by_loss(tmp_path) -> None:
    store = ResultsStore(str(tmp_path))
    for row in _trials().to_dict("records"):
        store.upsert_trial("reg", row, [])
    cmd = [sys.executable, "-m", "kavg_ray.cli", "results", "kopt", "reg", "--storage",
           str(tmp_path), "--format", "csv"]  # fmt: skip
    for extra in ([], ["--by", "loss"]):  # loss is the default here: no accuracy
        out = subprocess.run(cmd + extra, capture_output=True, text=True, check=True).stdout
        table = pd.read_csv(pd.io.common.StringIO(out))
        assert list(table["K_opt"]) == [2, 4] and list(table["model_args.width"]) == [8, 16]
