"""One local Ray head for a whole pytest run, shared by the tests that only need *a* Ray.

Starting a local Ray costs 7 to 8 s on 2 cores, and most Ray tests only need somewhere
to run trials: they pass ``--address`` (:attr:`RayHead.address`) to ``kavg`` and leave the
cluster as they found it. The head listens on 127.0.0.1 only (Ray's single-machine mode,
as kavg's own local Ray), lives under a temp dir of its own (so its processes are found
and ended by that path, and ``ray stop`` is never needed), and exports its metrics every
2 s so that a Prometheus pointed at its service-discovery file sees a short sweep.

Tests that must start, lose or kill a cluster themselves (the driver's own local Ray,
fault injection, the loopback check, the multi-node cluster) keep doing so and say why.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.s3_server import CREDENTIALS as S3_CREDENTIALS

RAY = Path(sys.executable).parent / "ray"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_under(path: Path) -> list[int]:
    """Live processes whose command line or environment names ``path``."""
    mark, pids = str(path).encode(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if (d / "stat").read_text().split(") ")[-1].startswith("Z"):
                continue
            if mark in (d / "cmdline").read_bytes() or mark in (d / "environ").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


@dataclass
class RayHead:
    """A running head: ``address`` for ``--address``, ``env`` for the processes that use it."""

    temp_dir: Path
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        env = {
            **os.environ, "RAY_TMPDIR": str(self.temp_dir), "RAY_DEDUP_LOGS": "0",
            "PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # `ray start --head` turns token authentication on: clients need its token.
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            # The test S3 server's credentials (tests/s3_server.py), on every node as a real
            # cluster's nodes hold their own: kavg copies none to the workers.
            **S3_CREDENTIALS,
        }  # fmt: skip
        env.pop("RAY_ADDRESS", None)
        return env

    @property
    def service_discovery_file(self) -> Path:
        """Prometheus's file_sd list of this cluster's metrics endpoints (Ray writes it)."""
        return self.temp_dir / "ray" / "prom_metrics_service_discovery.json"

    def start(self, num_cpus: int = 2, timeout: float = 180) -> None:
        ports = {
            "--port": self.port, "--dashboard-port": self.dashboard_port,
            "--metrics-export-port": self.metrics_port,
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }  # fmt: skip
        log = self.temp_dir / "head.txt"
        env = {**self.env, "RAY_metrics_report_interval_ms": "2000"}
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                 "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}",
                 f"--temp-dir={self.temp_dir / 'ray'}",
                 *(f"{k}={v}" for k, v in ports.items())],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in log.read_text():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        text = log.read_text()[-3000:]
        self.stop()
        raise RuntimeError(f"the shared Ray head did not start:\n{text}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while (left := pids_under(self.temp_dir)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head() -> RayHead:
    # Short: Ray's unix socket paths live under the temp dir.
    head = RayHead(Path(tempfile.mkdtemp(prefix="krs", dir="/tmp")))
    head.start()
    return head
