"""The GPU scripts run on a CPU with their smallest settings (--cpu-smoke): benchmarks/gpu.py
and benchmarks/gpu_emulation.py (issue #25's GPU check)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--cpu-smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "one-by-one/s" in run.stdout and "stk/ceil" in run.stdout
    (row,) = json.loads(out.read_text())
    assert (row["model"], row["P"], row["K"], row["batch"], row["steps"]) == (
        "cnn", 2, [1, 2], 2, 2
    )
    for key in ("one_by_one_samples_s", "packed_samples_s", "ceiling_samples_s",
                "packed_speedup", "stacked_over_ceiling"):  # fmt: skip
        assert math.isfinite(row[key]) and row[key] > 0, key
    # The ratios are those of the samples/s shown beside them.
    assert row["stacked_over_ceiling"] == (
        row["one_by_one_samples_s"] / row["ceiling_samples_s"]
    )
    assert row["peak_bytes"] is None and row["estimate_bytes"] > 0


def test_gpu_emulation_cpu_smoke(tmp_path: Path) -> None:
    """The device session's gpu_emulation step in smoke mode (SMOKE=1): P = 1 through
    kavg_ray.train for K-AVG, DiLoCo and the simulated backend; P = 2 and 4 ranks in a
    one-device group (cpu:gloo standing in for cuda:gloo) through the engine and loop; an
    average timed beside the host clocks."""
    env = {**os.environ, "SMOKE": "1", "ONLY": "gpu_emulation", "OUT": str(tmp_path),
           "PYTHON": sys.executable}  # fmt: skip
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_session.sh")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    log = run.stdout
    assert run.returncode == 0 and "=== gpu_emulation: rc=0" in log, log[-4000:]
    assert "all checks passed" in log and "event/synced" in log
    assert "calibrate" not in log  # ONLY: the one step
    rows = json.loads((tmp_path / "gpu_emulation.json").read_text())
    p1 = {r["run"]: r for r in rows if r["part"] == "p1"}
    assert set(p1) == {"kavg", "diloco", "simulated"}
    for r in p1.values():
        assert (r["rc"], r["epochs"], r["backend"]) == (0, 1, "gloo"), r
        assert r["last"].startswith("epoch 1/1  test_acc ")
    emulated = {(r["run"], r["P"]): r for r in rows if r["part"] == "emulate"}
    assert set(emulated) == {(run, P) for run in ("kavg", "diloco", "hier_avg") for P in (2, 4)}
    for (name, P), r in emulated.items():
        assert r["backend"] == "cpu:gloo" and r["epochs"] == 1 and not r["diverged"]
        # digits: 1437 training images, batch 16 per learner, an average every 2 steps.
        assert r["rounds"] == 1437 // (16 * P) // 2, r
        for key in ("comm_time_s", "compute_time_s", "test_acc"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert 0.0 <= r["wait_time_s"] <= r["comm_time_s"]
        assert len(r["comm_time_s_ranks"]) == P
        # Every rank holds the mean of the ranks' models: exactly for two (a + b, then / 2).
        assert r["global_members_equal"]
        err = r["global_mean_max_abs_err"]
        assert err == 0.0 if P == 2 else 0.0 <= err < 1e-6, err
        if name == "hier_avg":  # the local average: the mean of the rank's group of S = 2
            assert r["local_members_equal"] and r["local_mean_max_abs_err"] == 0.0
            assert r["group"] == [0, 1]
    timing = {r["P"]: r for r in rows if r["part"] == "timing"}
    assert set(timing) == {2, 4}
    for r in timing.values():
        assert r["timer"] == "host" and r["reps"] == 2 and r["nbytes"] > 0
        for key in ("event_ms", "event_ms_of_synced", "synced_ms", "unsynced_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
