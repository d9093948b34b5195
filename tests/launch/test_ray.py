"""Real Ray runs through the CLI: one `kavg train`, one 2 x 2 sweep and its resume.

They run on the pytest run's shared local Ray head (tests/ray_head.py: `--address`); a
kavg that starts its own local Ray is tested in test_loopback.py and test_reliability.py.
These are slow tests (tens of seconds each on 2 cores); the algorithms are tested without
Ray in test_averaging.py and tests/train/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kavg_ray.analysis.results import HISTORY_COLUMNS, TRIAL_COLUMNS, ResultsStore

from ..ray_head import RayHead

pytestmark = pytest.mark.ray

WORKLOAD = {
    "dataset": "digits",
    "model": "mlp",
    "epochs": 5,
    "batch_size": 16,
    "lr": {"initial": 0.1},
}


@pytest.fixture
def kavg(ray_head: RayHead):  # noqa: ANN201
    """Run `kavg ARGS` (on the shared head when ARGS start a run: ``train`` or ``sweep run``)."""

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        on_ray = args[0] == "train" or args[:2] == ("sweep", "run")
        address = ("--address", ray_head.address) if on_ray else ()
        return subprocess.run(
            [sys.executable, "-m", "kavg_ray.cli", *args, *address], cwd=cwd, env=ray_head.env,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    return run


def test_kavg_train_on_ray(tmp_path: Path, kavg) -> None:  # noqa: ANN001
    config = {
        "name": "digits-train",
        "workload": WORKLOAD,
        "K": 4,
        "P": 2,
        "resources": {"cpus_per_worker": 0.5},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    out = kavg("train", "run.yaml", "--storage", "store", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for epoch in range(1, 6):
        assert f"epoch {epoch}/5" in out.stdout
    assert "summary: kavg P=2 K=4 status completed" in out.stdout
    # Epoch lines, the summary and where the results are: nothing of Ray's, Tune's or the
    # workers' (those are in the run's log), and nothing on stderr.
    assert len(out.stdout.splitlines()) == 5 + 2, out.stdout
    assert out.stderr == "", out.stderr[-3000:]
    assert list((tmp_path / "store" / "digits-train" / "logs").glob("train-*.log"))

    trials = ResultsStore(tmp_path / "store").read_trials("digits-train")
    (row,) = trials.to_dict("records")
    assert row["status"] == "completed"
    assert row["final_test_acc"] >= 0.9
    # 1437 samples, 2 learners x 16: 44 steps per epoch, an average every 4 steps.
    assert row["samples"] == 5 * 44 * 32
    assert row["rounds"] == (5 * 44) // 4
    assert row["bytes_communicated"] == row["rounds"] * (64 * 128 + 128 + 128 * 10 + 10) * 4
    history = ResultsStore(tmp_path / "store").read_history("digits-train")
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5]


def test_step_budget_recipe_on_ray(tmp_path: Path, kavg) -> None:  # noqa: ANN001
    """The language-model recipe on P = 2 Ray Train learners: a step budget shorter than an
    epoch, evaluated and checkpointed every 4 steps, bf16, clipping, warm-up into cosine."""
    config = {
        "name": "lm-steps",
        "workload": {
            "dataset": "text", "dataset_args": {"seq_len": 16}, "model": "gpt",
            "model_args": {"dim": 16, "layers": 1, "heads": 2}, "batch_size": 8,
            "steps": 12, "eval_every_steps": 4, "precision": "bf16", "grad_clip": 1.0,
            "lr": {"initial": 0.05, "schedule": "cosine", "warmup_steps": 3},
        },
        "K": 2, "P": 2, "resources": {"cpus_per_worker": 0.5},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    out = kavg("train", "run.yaml", "--storage", "store", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    (row,) = ResultsStore(tmp_path / "store").read_trials("lm-steps").to_dict("records")
    assert row["status"] == "completed" and row["rounds"] == 12 // 2
    history = ResultsStore(tmp_path / "store").read_history("lm-steps")
    assert history["step"].tolist() == [4, 8, 12]
    assert all(0 < e < 1 for e in history["epoch"])  # shorter than one epoch
    assert sorted(p.name for p in (tmp_path / "store").rglob("step-0*")), "no step checkpoints"


def test_sweep_tables_kopt_and_resume(tmp_path: Path, kavg) -> None:  # noqa: ANN001
    spec = {
        "name": "grid2x2",
        "workload": {**WORKLOAD, "epochs": 3},
        "grid": {"K": [1, 4], "P": [1, 2], "seed": [0]},
        "resources": {"cpus_per_worker": 0.5},
        "theory": "estimate",
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = kavg("sweep", "run", "spec.yaml", "--storage", "store", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "K_opt by accuracy" in out.stdout
    # kavg's own lines only: where the logs are, a start, an end and a bar per trial,
    # the table and the commands that plot and report it (Tune's tables: in the log).
    lines = out.stdout.splitlines()
    assert lines[0].startswith("[kavg] sweep grid2x2: 4 trials, one per grid point; Ray, Tune "
                             "and worker logs: ")
    assert sum(ln.startswith("[kavg] start ") for ln in lines) == 4
    assert sum(ln.startswith("[kavg] end ") for ln in lines) == 4
    assert lines[-1].startswith("report:  kavg results report grid2x2") and len(lines) < 30
    assert "Trial status" not in out.stdout + out.stderr and out.stderr == ""

    store = ResultsStore(tmp_path / "store")
    trials = store.read_trials("grid2x2")
    assert sorted(trials["trial_id"]) == ["K1-P1-s0", "K1-P2-s0", "K4-P1-s0", "K4-P2-s0"]
    assert list(trials.columns[: len(TRIAL_COLUMNS)]) == TRIAL_COLUMNS
    assert set(trials["status"]) == {"completed"}
    history = store.read_history("grid2x2")
    assert list(history.columns[: len(HISTORY_COLUMNS)]) == HISTORY_COLUMNS
    assert sorted(zip(history["trial_id"], history["epoch"], strict=True)) == sorted(
        (t, e) for t in trials["trial_id"] for e in (1, 2, 3)
    )
    assert json.loads((tmp_path / "store" / "grid2x2" / "spec.json").read_text())["grid"]

    kopt = kavg(
        "results", "kopt", "grid2x2", "--storage", "store", "--format", "json", cwd=tmp_path
    )
    assert kopt.returncode == 0, kopt.stderr
    rows = {r["P"]: r for r in json.loads(kopt.stdout)}
    assert set(rows) == {1, 2}
    # The theory probe ran once for the workload and predicted a K_opt for each P.
    theory = store.read_theory("grid2x2")
    assert len(theory["estimates"]) == 1 and theory["estimates"][0]["L"] > 0
    predicted = {p["P"]: p["predicted_kopt"] for p in theory["predictions"]}
    assert {p: r["predicted_kopt"] for p, r in rows.items()} == predicted
    for p, r in rows.items():
        best = trials[trials["P"] == p].sort_values(
            ["final_test_acc", "K"], ascending=[False, True]
        )
        assert r["K_opt"] == best["K"].iloc[0]

    # Lose two trials' rows, as a sweep interrupted before they finished would have.
    kept = trials[trials["trial_id"].isin(["K1-P1-s0", "K4-P2-s0"])]
    kept.to_parquet(tmp_path / "store" / "grid2x2" / "trials.parquet")
    again = kavg("sweep", "run", "spec.yaml", "--storage", "store", cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = kavg("sweep", "run", "spec.yaml", "--storage", "store", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 finished, 2 to run" in resumed.stdout
    ran = sorted(
        line.split()[2] for line in resumed.stdout.splitlines() if line.startswith("[kavg] end ")
    )
    assert ran == ["K1-P2-s0", "K4-P1-s0"]
    final = store.read_trials("grid2x2")
    assert sorted(final["trial_id"]) == sorted(trials["trial_id"])
    # Same seeds, same data order: the rerun trials reproduce their first results.
    merged = pd.merge(final, trials, on="trial_id", suffixes=("", "_first"))
    assert (merged["final_test_acc"] == merged["final_test_acc_first"]).all()


def test_simulated_and_real_backends_in_one_sweep(tmp_path: Path, kavg) -> None:  # noqa: ANN001
    """One grid point on both backends: same schema, same numbers, K_opt per backend."""
    spec = {
        "name": "mixed",
        "workload": {**WORKLOAD, "epochs": 2},
        "variants": [{"backend": "simulated"}, {"backend": "ray"}],
        "grid": {"K": [4], "P": [2], "seed": [0]},
        "resources": {"cpus_per_worker": 0.5},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = kavg("sweep", "run", "spec.yaml", "--storage", "store", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    store = ResultsStore(tmp_path / "store")
    trials = store.read_trials("mixed").set_index("trial_id")
    assert sorted(trials.index) == ["K4-P2-s0", "K4-P2-s0-sim"]
    sim, real = trials.loc["K4-P2-s0-sim"], trials.loc["K4-P2-s0"]
    assert (sim["backend"], real["backend"]) == ("simulated", "ray")
    assert sim["status"] == real["status"] == "completed"
    # Same arithmetic: the stacked learners reproduce the real ones.
    assert sim["final_test_acc"] == real["final_test_acc"]
    assert abs(sim["final_test_loss"] - real["final_test_loss"]) < 1e-5
    assert (sim["rounds"], sim["samples"]) == (real["rounds"], real["samples"])
    assert sim["bytes_communicated"] == 0 and real["bytes_communicated"] > 0
    history = store.read_history("mixed")
    assert sorted(zip(history["trial_id"], history["epoch"], strict=True)) == [
        ("K4-P2-s0", 1), ("K4-P2-s0", 2), ("K4-P2-s0-sim", 1), ("K4-P2-s0-sim", 2),
    ]  # fmt: skip
    kopt = kavg("results", "kopt", "mixed", "--storage", "store", "--format", "json", cwd=tmp_path)
    rows = json.loads(kopt.stdout)
    assert sorted(r["backend"] for r in rows) == ["ray", "simulated"]


def test_a_simulated_sweep_packs_by_default_and_reports_each_epoch(
    tmp_path: Path, kavg  # noqa: ANN001
) -> None:
    """No `pack:` and every point simulated kavg: one pack trial, a line per evaluation
    its points have all reported, a bar over epochs; K_opt by time from the cost model."""
    spec = {
        "name": "packed",
        "workload": {**WORKLOAD, "epochs": 3},
        "backend": "simulated",
        "target_accuracy": 0.5,
        "grid": {"K": [1, 4], "P": [2], "seed": [0]},
        "resources": {"cpus_per_worker": 0.5},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = kavg("sweep", "run", "spec.yaml", "--storage", "store", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("[kavg] sweep packed: 2 grid points packed (stacked per "
                               "workload and P; pack: false opts out); Ray, Tune")  # fmt: skip
    assert "[kavg] start pack0-P2-2pts  (2 points: kavg P=2 K=1,4 seed=0, 3 epochs)" in lines
    evals = [ln for ln in lines if ln.startswith("[kavg] pack0-P2-2pts  epoch ")]
    assert [ln.split("  ")[1] for ln in evals] == ["epoch 1/3", "epoch 2/3"]
    assert all("  2 of 2 points training  test accuracy " in ln for ln in evals)
    bars = [ln for ln in lines if " trials " in ln and " elapsed " in ln]
    assert bars[-1].split(" ", 2)[2].startswith("2/2 trials 6/6 epochs elapsed ")
    assert bars[-1].endswith(" ETA 0:00:00")
    assert ("K_opt by time of simulated trials: kavg results kopt packed --by time --network "
            "NETWORK (the cost model)") in lines  # fmt: skip
    assert "K_opt by accuracy for sweep 'packed' (2 trials):" in lines
    store = ResultsStore(tmp_path / "store")
    assert store.read_progress("packed")["work"] == {"done": 6.0, "planned": 6.0,
                                                     "unit": "epochs"}  # fmt: skip
    assert list(store.read_trials("packed")["pack_points"]) == [2, 2]
    by_time = kavg("results", "kopt", "packed", "--storage", "store", "--by", "time",
                   cwd=tmp_path)  # fmt: skip
    assert by_time.returncode == 2 and "add --network" in by_time.stderr
    priced = kavg("results", "kopt", "packed", "--storage", "store", "--by", "time",
                  "--network", "eth10g", cwd=tmp_path)  # fmt: skip
    assert priced.returncode == 0, priced.stderr[-3000:]
    assert "verdict" in priced.stdout.splitlines()[1]
