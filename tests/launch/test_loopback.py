"""A local Ray that kavg starts listens on the loopback only (real Ray, one start).

``kavg sweep run`` without ``--address`` starts its own Ray and trains a P = 2 trial.
While it runs, every listening TCP socket of the driver and of every process whose
command line or environment names this test's RAY_TMPDIR (GCS, raylet, dashboard and its
agents, metrics exporters, workers, and the trial's two Ray Train workers with their
process group: the rendezvous store and gloo) is read from /proc/net/tcp{,6}
(tests/launch/listening.py) every 0.2 s. Any address outside the loopback fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.ray_head import pids_under

from .listening import command, listening, loopback

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]

SPEC = """
name: lo
workload: {dataset: digits, model: mlp, epochs: 12, batch_size: 16}
grid: {K: [2], P: [2]}
"""


def test_loopback_classification() -> None:
    hosts = ("127.0.0.1", "::1", "::ffff:7f00:1", "0.0.0.0", "::", "192.0.2.2", "::ffff:c000:202")
    assert [loopback(h) for h in hosts] == [True, True, True, False, False, False, False]


def test_local_ray_and_its_trainers_listen_on_loopback_only(tmp_path: Path) -> None:
    ray_tmp = Path(tempfile.mkdtemp(prefix="kl", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "spec.yaml").write_text(SPEC)
    seen: dict[tuple[str, int], int] = {}  # (host, port) -> pid
    trainers: set[int] = set()  # Ray Train workers (a process's title changes per task)
    try:
        driver = subprocess.Popen(
            [sys.executable, "-m", "kavg_ray.cli", "sweep", "run", "spec.yaml", "--storage",
             "store"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while driver.poll() is None and time.monotonic() < deadline:
            for host, port, pid in listening(set(pids_under(ray_tmp)) | {driver.pid}):
                seen[(host, port)] = pid
                if "RayTrainWorker" in command(pid):
                    trainers.add(pid)
            time.sleep(0.2)
        out, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert driver.returncode == 0, err[-3000:]
    assert "K2-P2-s0  completed" in out, out
    # GCS, raylet, object manager, agents, exporters, workers: a dozen or more listeners.
    assert len(seen) >= 5, seen
    # The trial's process group: rank 0's store and each rank's gloo listener, on 127.0.0.1
    # (Ray's own servers in the same processes are on ::ffff:127.0.0.1).
    group = [(h, p) for (h, p), pid in seen.items() if pid in trainers and h == "127.0.0.1"]
    assert len(trainers) >= 2 and len(group) >= 3, (trainers, seen)
    outside = [(h, p, command(pid)) for (h, p), pid in seen.items() if not loopback(h)]
    assert outside == [], f"listening beyond the loopback: {outside}"
