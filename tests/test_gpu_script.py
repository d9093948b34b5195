"""benchmarks/gpu.py runs on a CPU with its smallest settings (--cpu-smoke)."""

from __future__ import annotations

import json
import math
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
