"""An S3-compatible server on 127.0.0.1 for tests: moto's server mode (``moto[server]``,
the ``test`` extra), started on a free port and stopped by the test that started it.

The endpoint travels in the storage URI (pyarrow's ``endpoint_override`` and ``scheme``
query options), so every process that is handed the URI (the driver, Tune, Ray Train's
workers) talks to this server. Credentials come from the environment (:data:`CREDENTIALS`):
moto accepts any, and setting them keeps the AWS SDK from looking further (instance
metadata, profiles).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    """A running moto server: ``uri(bucket, prefix)`` names storage on it."""

    proc: subprocess.Popen
    port: int

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, bucket: str, prefix: str = "") -> str:
        path = f"{bucket}/{prefix}".rstrip("/")
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http"

    def filesystem(self):  # noqa: ANN201 - a pyarrow S3FileSystem
        from pyarrow.fs import S3FileSystem

        return S3FileSystem(
            access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=self.endpoint, scheme="http", region="us-east-1",
            allow_bucket_creation=True,
        )  # fmt: skip

    def create_bucket(self, bucket: str) -> None:
        self.filesystem().create_dir(bucket)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object under ``bucket/prefix``, as keys relative to it (sorted)."""
        from pyarrow.fs import FileSelector, FileType

        base = f"{bucket}/{prefix}".rstrip("/")
        infos = self.filesystem().get_file_info(
            FileSelector(base, recursive=True, allow_not_found=True)
        )
        return sorted(i.path[len(base) + 1 :] for i in infos if i.type == FileType.File)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def start_s3_server(timeout: float = 60) -> S3Server:
    """Start moto's server on 127.0.0.1 and wait until it answers; skips the test when
    moto is not installed (``pip install -e '.[test]'``)."""
    pytest.importorskip("moto.server", reason="moto[server] (the test extra) is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, **CREDENTIALS},
    )  # fmt: skip
    server = S3Server(proc, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto's server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"moto's server did not answer on 127.0.0.1:{port} in {timeout:g} s")


def serving_bucket(bucket: str) -> Iterator[S3Server]:
    """A fixture body: a started server holding ``bucket``, stopped afterwards."""
    server = start_s3_server()
    try:
        server.create_bucket(bucket)
        yield server
    finally:
        server.stop()
