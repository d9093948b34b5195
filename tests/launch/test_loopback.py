"""A local Ray that kavg starts listens on the loopback only (real Ray, one start).

The driver (``connect(None)``, as ``kavg sweep run`` without ``--address``) runs a task
so that a worker exists; then every listening TCP socket of its Ray's processes (the
driver and every process whose command line names this test's RAY_TMPDIR: GCS, raylet,
dashboard and its agents, metrics exporters, workers) is read from /proc/net/tcp{,6}
(tests/launch/listening.py). Any address outside the loopback fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .listening import loopback

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]

DRIVER = r"""
import json, os, sys, time
import ray
from kavg_ray.launch.sweep import connect
from tests.launch.listening import command, listening, pids_naming

connect(None)
ray.get(ray.remote(lambda: 1).remote())
seen, stable_since = [], time.monotonic()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:  # agents and exporters come up after ray.init returns
    now = listening(pids_naming(sys.argv[1]) | {os.getpid()})
    if now != seen:
        seen, stable_since = now, time.monotonic()
    elif time.monotonic() - stable_since > 5:
        break
    time.sleep(0.5)
print(json.dumps([[h, p, command(pid)] for h, p, pid in seen]))
ray.shutdown()
"""


def test_loopback_classification() -> None:
    hosts = ("127.0.0.1", "::1", "::ffff:7f00:1", "0.0.0.0", "::", "192.0.2.2", "::ffff:c000:202")
    assert [loopback(h) for h in hosts] == [True, True, True, False, False, False, False]


def test_local_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    ray_tmp = Path(tempfile.mkdtemp(prefix="kl", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    try:
        out = subprocess.run(
            [sys.executable, "-c", DRIVER, str(ray_tmp)], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    sockets = json.loads(out.stdout.strip().splitlines()[-1])
    # GCS, raylet, object manager, agents, exporters, workers: a dozen or more listeners.
    assert len(sockets) >= 5, sockets
    outside = [s for s in sockets if not loopback(s[0])]
    assert outside == [], f"listening beyond the loopback: {outside}"
