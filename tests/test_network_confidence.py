"""`kavg results kopt --by time --network`: the K_opt table by predicted time carries the
same confidence columns as the measured one (verdict, freq_best, credible_set, freq_k1,
diff_vs_k1 and its interval, note), from the same paired bootstrap over seeds, on the
predicted times; and `--by time` without `--network` on simulated trials is refused."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kavg_ray.analysis.costmodel import kopt_by_predicted_time
from kavg_ray.analysis.results import ResultsStore
from kavg_ray.cli import main
from tests.test_costmodel import _store_hand_sweep


def _row(P: int, K: int, seed: int, predicted: float) -> dict:
    return {"trial_id": f"K{K}-P{P}-s{seed}", "algorithm": "kavg", "dataset": "digits",
            "model": "mlp", "backend": "ray", "P": P, "K": K, "seed": seed,
            "status": "completed", "predicted_time_to_target_s": predicted,
            "measured_time_to_target_s": 100.0 + K, "network": "eth10g"}  # fmt: skip


def _predicted() -> pd.DataFrame:
    """P=4: K=4 is 4 s faster than K=1 on every seed. P=8: K=1 and K=16 trade places
    between the two seeds (equal means); K=4 is slow."""
    rows = [_row(4, k, s, base + s) for s in range(3) for k, base in ((1, 10.0), (4, 6.0),
                                                                      (16, 8.0))]  # fmt: skip
    per_seed = {1: (5.0, 9.0), 4: (20.0, 20.0), 16: (9.0, 5.0)}
    rows += [_row(8, k, s, per_seed[k][s]) for s in range(2) for k in (1, 4, 16)]
    return pd.DataFrame(rows)


def test_the_network_table_has_the_confidence_columns_exactly() -> None:
    out = kopt_by_predicted_time(_predicted()).set_index("P")
    p4 = out.loc[4]
    assert p4["K_opt"] == 4 and p4["verdict"] == "clear" and p4["freq_best"] == 1.0
    assert p4["credible_set"] == "4 (1.00)" and p4["freq_k1"] == 0.0
    # Paired: every seed is 4 s faster with K=4, so the interval is the point.
    assert (p4["diff_vs_k1"], p4["diff_vs_k1_lo"], p4["diff_vs_k1_hi"]) == (-4.0, -4.0, -4.0)
    assert p4["mean"] == 7.0 and p4["std"] == 1.0 and p4["n_seeds"] == 3 and p4["note"] == ""
    assert p4["predicted_time_s"] == 7.0 and p4["measured_time_s"] == 104.0
    p8 = out.loc[8]
    # The documented draw of the paired bootstrap (seed 0, 1000 resamples of 2 seeds):
    # K=1 wins a resample of seed 0 twice, K=16 one of seed 1 twice, mixed ones tie.
    idx = np.random.default_rng(0).integers(0, 2, size=(1000, 2))
    both0, both1 = (idx.sum(axis=1) == 0).sum(), (idx.sum(axis=1) == 2).sum()
    mixed = 1000 - both0 - both1
    freq1, freq16 = (both0 + mixed / 2) / 1000, (both1 + mixed / 2) / 1000
    assert p8["K_opt"] == 1 and p8["freq_best"] == pytest.approx(freq1, abs=1e-12)
    assert p8["freq_k1"] == p8["freq_best"]
    first, second = sorted([(freq1, 1), (freq16, 16)], key=lambda t: (-t[0], t[1]))
    assert p8["credible_set"] == f"1, 16 ({first[0] + second[0]:.2f})"
    assert p8["verdict"] == "inconclusive"
    assert (p8["diff_vs_k1"], p8["diff_vs_k1_lo"], p8["diff_vs_k1_hi"]) == (0.0, 0.0, 0.0)
    assert p8["note"] == "to settle: more seeds (2 now)"


def test_the_cli_network_table_prints_the_columns_and_the_legend(tmp_path: Path) -> None:
    _store_hand_sweep(tmp_path)
    args = ["results", "kopt", "hand", "--storage", str(tmp_path), "--by", "time",
            "--network", "eth10g"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    header = lines[1].split()
    for col in ("verdict", "freq_best", "credible_set", "freq_k1", "diff_vs_k1",
                "diff_vs_k1_lo", "diff_vs_k1_hi", "note", "predicted_time_s"):  # fmt: skip
        assert col in header
    assert lines[3].startswith("K_opt by predicted time on eth10g: mean time to the target. ")
    assert lines[-1].startswith("diff_vs_k1: K_opt minus K = 1 on the same seeds")


def test_kopt_by_time_of_simulated_trials_needs_a_network(tmp_path: Path) -> None:
    _store_hand_sweep(tmp_path)
    store = ResultsStore(tmp_path)
    trials = store.read_trials("hand")
    row = {**trials.iloc[0].to_dict(), "trial_id": "K1-P4-s0-sim", "backend": "simulated"}
    store.upsert_trial("hand", {k: v for k, v in row.items() if not _missing(v)}, [])
    args = ["results", "kopt", "hand", "--storage", str(tmp_path), "--by", "time"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        "error: 1 simulated trial(s): their learners share one process and communicate "
        "nothing, so K_opt by time comes from the cost model: add --network (e.g. "
        "--network eth10g)"
    ]
    assert res.stdout == ""
    ok = CliRunner().invoke(main, [*args, "--network", "eth10g"])
    assert ok.exit_code == 0, ok.output


def _missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def test_a_packed_points_step_time_is_its_share_of_the_pack() -> None:
    """A packed point's compute time is its pack's: the step time divides it by P and by
    the points of the pack (a row without pack_points: one point)."""
    from kavg_ray.analysis import costmodel as cm
    from tests.test_costmodel import _hand_sweep

    trials, hist = _hand_sweep()
    trials["backend"] = "simulated"
    trials["pack_points"] = [3, 3, float("nan")]
    pred = cm.predict_trials(trials, hist, cm.PRESETS["nvlink"], target=0.9)
    assert list(pred["step_time_s"]) == pytest.approx([0.02 / 12, 0.02 / 12, 0.02 / 4])
    assert list(pred["step_time_source"]) == ["measured/(P x 3 packed points)"] * 2 + [
        "measured/P (simulated)"
    ]


def test_simulated_trials_get_no_measured_time_columns() -> None:
    """Stacked learners communicate nothing and share their pack's clock: the table by
    predicted time leaves out the measured columns when every trial is simulated, and
    keeps them when one is not."""
    simulated = _predicted().assign(backend="simulated")
    out = kopt_by_predicted_time(simulated)
    assert "measured_time_s" not in out.columns and "measured_K_opt" not in out.columns
    assert list(out["K_opt"]) == list(kopt_by_predicted_time(_predicted())["K_opt"])
    mixed = simulated.copy()
    mixed.loc[0, "backend"] = "ray"
    assert {"measured_time_s", "measured_K_opt"} <= set(kopt_by_predicted_time(mixed).columns)


def test_the_cli_sizes_a_model_as_the_run_built_it() -> None:
    """Simulated trials move no bytes, so `--network` sizes their model: the text data set
    and `model_args` (a gpt of the spec's width) are sized as the run builds them, not
    refused and not at the default width."""
    import torch

    from kavg_ray.cli import _model_bytes
    from kavg_ray.config import RunConfig
    from kavg_ray.train.workload import build_workload

    workload = {"dataset": "text", "dataset_args": {"chars": 20000, "seq_len": 16},
                "model": "gpt", "model_args": {"dim": 16, "heads": 2, "layers": 1}}  # fmt: skip
    cfg = RunConfig.model_validate({"workload": workload, "backend": "simulated", "K": 1})
    model = build_workload(cfg, torch.device("cpu")).model
    built = sum(p.numel() * p.element_size() for p in model.parameters())
    size = _model_bytes()
    assert size("gpt", "text", workload) == built
    wider = {**workload, "model_args": {"dim": 32, "heads": 2, "layers": 1}}
    assert size("gpt", "text", wider) > built
    assert size("mlp1d", "mnist1d", {}) == 15_210 * 4  # the published 40-100-100-10 MLP
