"""Two `kavg sweep run`s at once on one machine, each starting its own local Ray (real Ray).

Running two sweeps in two terminals is ordinary use (issue #29). Each driver starts a local
Ray of its own, as users do: no ``--address``, no shared head. Both Rays share one
RAY_TMPDIR, as two users' sweeps share /tmp/ray (a short one of this test's own, so that
every process of both is found by that path and ended, and nothing else is touched).

Ray Train's PlacementGroupCleaner and its state actor ask Ray's state API about their
controller without an address: Ray then looks for "the" cluster on the machine, and with
two up it failed ("ConnectionError: Found multiple active Ray instances") or, worse, could
read another cluster and take a live trial's controller for dead. kavg pins each worker to
its own cluster (docs/design.md section 6). Checked: both sweeps finish every row, and
neither their output, their logs, nor their Rays' worker logs hold a Ray error.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kavg_ray.analysis.results import ResultsStore
from tests.ray_head import pids_under

from .listening import command

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]

SPEC = """
name: {name}
workload: {{dataset: digits, model: mlp, epochs: 2, batch_size: 16, lr: {{initial: 0.1}}}}
grid: {{K: [1, 4], P: [2]}}
resources: {{cpus_per_worker: 0.5}}
"""
# What Ray says when it cannot tell which cluster to use, and other signs of a Ray failure.
RAY_ERRORS = (
    "multiple active Ray instances", "Could not find any running Ray instance",
    "Traceback (most recent call last)", "RayActorError", "ActorDiedError:",
    "RayTaskError", "ConnectionError", "Failed to query Ray Train Controller",
    "Detected that the Ray Train controller actor",
)  # fmt: skip


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# Ray's own warning, "safe to ignore" when the CPU is overloaded (two Rays on 2 cores): a
# 5 s wait on Train's autoscaling coordinator ran out. Its traceback ends at the timeout.
TRANSIENT = ("Failed to send resource request", "GetTimeoutError")


def _ray_errors(text: str) -> list[str]:
    errors, transient = [], None  # transient: the prefix of a process's tolerated traceback
    for line in text.splitlines():
        if transient is not None and line.startswith(transient):
            transient = None if TRANSIENT[1] in line else transient
        elif TRANSIENT[0] in line:
            transient = line[: line.index(TRANSIENT[0])]
        elif any(e in line for e in RAY_ERRORS):
            errors.append(line[:300])
    return errors


def test_two_local_sweeps_at_once_both_finish(tmp_path: Path) -> None:
    ray_tmp = Path(tempfile.mkdtemp(prefix="k2", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(ROOT),
           "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    drivers: dict[str, subprocess.Popen] = {}
    start = time.monotonic()
    try:
        for name in ("twin-a", "twin-b"):
            (tmp_path / f"{name}.yaml").write_text(SPEC.format(name=name))
            with open(tmp_path / f"{name}.out", "w") as out:
                drivers[name] = subprocess.Popen(
                    [sys.executable, "-m", "kavg_ray.cli", "sweep", "run", f"{name}.yaml",
                     "--storage", f"store-{name}"],
                    cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                )  # fmt: skip
        # That the two Rays were up at once while a run's cleaner polled (the moment the
        # cleaner met two clusters), seen from the processes' command lines.
        overlap, deadline = False, time.monotonic() + 540
        while any(d.poll() is None for d in drivers.values()) and time.monotonic() < deadline:
            if not overlap:
                commands = [command(pid) for pid in pids_under(ray_tmp)]
                overlap = sum("gcs_server" in c for c in commands) >= 2 and any(
                    "PlacementGroupCleaner" in c for c in commands
                )
            time.sleep(1)
        codes = {name: d.wait(timeout=max(1.0, deadline - time.monotonic()))
                 for name, d in drivers.items()}  # fmt: skip
        took = time.monotonic() - start
        # Each driver takes the Ray it started down with it; give it a moment to wind down.
        deadline = time.monotonic() + 120
        while pids_under(ray_tmp) and time.monotonic() < deadline:
            time.sleep(1)
        leftovers = pids_under(ray_tmp)
        worker_logs = "".join(
            p.read_text(errors="replace")
            # The workers' own stdout and stderr (the cleaner's thread prints there).
            for p in sorted(ray_tmp.glob("ray/session_*/logs/worker-*"))
            if p.suffix in (".out", ".err")
        )
    finally:
        for d in drivers.values():
            if d.poll() is None:
                d.kill()
        for pid in pids_under(ray_tmp):  # only processes of this test's two Rays
            _kill(pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    print(f"two sweeps at once: {took:.0f} s")
    for name, code in codes.items():
        out = (tmp_path / f"{name}.out").read_text()
        assert code == 0, f"{name} exited {code}:\n{out[-3000:]}"
        logs = "".join(
            p.read_text(errors="replace")
            for p in sorted((tmp_path / f"store-{name}" / name / "logs").glob("*"))
        )
        assert logs, f"{name} left no logs"
        errors = _ray_errors(out + logs)
        assert not errors, f"{name}: Ray errors in its output or logs:\n" + "\n".join(errors)
        trials = ResultsStore(tmp_path / f"store-{name}").read_trials(name)
        assert sorted(trials["trial_id"]) == ["K1-P2-s0", "K4-P2-s0"], trials
        assert set(trials["status"]) == {"completed"}, trials[["trial_id", "status", "error"]]
        history = ResultsStore(tmp_path / f"store-{name}").read_history(name)
        assert sorted(zip(history["trial_id"], history["epoch"], strict=True)) == [
            ("K1-P2-s0", 1), ("K1-P2-s0", 2), ("K4-P2-s0", 1), ("K4-P2-s0", 2),
        ]  # fmt: skip
    errors = _ray_errors(worker_logs)
    assert not errors, "Ray errors in the workers' logs:\n" + "\n".join(errors)
    assert leftovers == [], f"processes of this test's Rays outlived it: {leftovers}"
    assert overlap, "the two sweeps' Rays were never up at once while a run was on"
