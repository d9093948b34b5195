"""`kavg sweep run` with search: refine on a real Ray (one small simulated sweep, on the
pytest run's shared head: tests/ray_head.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kavg_ray.analysis.results import ResultsStore, kopt_table
from kavg_ray.launch.search import k_scores, refine_ks

from ..ray_head import RayHead

pytestmark = pytest.mark.ray


def test_refine_sweep_runs_coarse_then_refined_k(tmp_path: Path, ray_head: RayHead) -> None:
    spec = {
        "name": "refine",
        "workload": {"dataset": "digits", "model": "mlp", "epochs": 1, "batch_size": 16,
                     "lr": {"initial": 0.1}},
        "backend": "simulated",
        "search": {"strategy": "refine", "k_min": 1, "k_max": 8},
        "grid": {"P": [2]},
        "resources": {"cpus_per_worker": 0.5},
    }  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = ray_head.env
    out = subprocess.run(
        [sys.executable, "-m", "kavg_ray.cli", "sweep", "run", "spec.yaml", "--storage", "s",
         "--address", ray_head.address],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trials = ResultsStore(tmp_path / "s").read_trials("refine")
    assert set(trials["status"]) == {"completed"}
    ks = sorted(int(k) for k in trials["K"])
    assert {1, 2, 4, 8} <= set(ks) and len(ks) > 4  # the coarse grid, then refinement
    assert set(trials["trial_id"]) == {f"K{k}-P2-s0-sim" for k in ks}
    # What was run is what the rule asks for: nothing left to refine, K_opt bracketed.
    scores = k_scores({int(r.K): [r.final_test_acc] for r in trials.itertuples()})
    assert refine_ks(scores) == []
    best = max(scores, key=lambda k: (scores[k], -k))
    (row,) = kopt_table(trials).to_dict("records")
    assert row["K_opt"] == best
    i = ks.index(best)
    assert (i == 0 or ks[i] - ks[i - 1] == 1) and (i == len(ks) - 1 or ks[i + 1] - ks[i] == 1)
    assert f"K_opt by accuracy for sweep 'refine' ({len(ks)} trials)" in out.stdout
    # Resumed: the stored rows bracket K_opt already, so nothing runs (and Ray never starts).
    again = subprocess.run(
        [sys.executable, "-m", "kavg_ray.cli", "sweep", "run", "spec.yaml", "--storage", "s",
         "--resume"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[kavg] resume refine: 4 finished, 0 to run" in again.stdout
    assert len(ResultsStore(tmp_path / "s").read_trials("refine")) == len(ks)
