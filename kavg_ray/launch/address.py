"""The `--address` and `--storage` options, checked before Ray is imported.

A cluster address is one of: ``HOST:PORT`` (a GCS, e.g. ``127.0.0.1:6379``),
``ray://HOST:PORT`` (Ray Client) or ``auto`` (``$RAY_ADDRESS``, else the cluster that
``ray start`` last started on this machine, as recorded in
``$RAY_TMPDIR/ray/ray_current_cluster``, ``$TMPDIR/ray/...`` or ``/tmp/ray/...``).
A malformed address, an ``auto`` that finds no cluster or a dashboard URL is bad input
(exit 2). A well-formed address is then dialled and greeted as gRPC (Ray's GCS and Ray
Client both speak it): the HTTP/2 connection preface goes out and the server's SETTINGS
frame must come back. Whatever the peer does instead (refuses, answers something else,
closes, or accepts and stays silent), within ``KAVG_CONNECT_TIMEOUT_S`` seconds (default
10) in all, is a failure at run time (exit 1), reported in one line that names the
address, instead of Ray's long wait and traceback. (With ``RAY_USE_TLS`` the greeting
would be TLS: only the TCP connection is checked then.)

This module imports no Ray (and no torch): the checks cost milliseconds.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

from kavg_ray.errors import BadInputError, KavgError

DEFAULT_CONNECT_TIMEOUT_S = 10.0
_HOST_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?)$")
FORMS = "HOST:PORT (e.g. 127.0.0.1:6379), ray://HOST:PORT or auto"


def connect_timeout_s() -> float:
    """Seconds to wait for a cluster to answer: $KAVG_CONNECT_TIMEOUT_S, default 10."""
    raw = os.environ.get("KAVG_CONNECT_TIMEOUT_S", "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_CONNECT_TIMEOUT_S
    except ValueError:
        raise BadInputError(f"KAVG_CONNECT_TIMEOUT_S={raw!r}: expected seconds") from None
    if not value > 0:
        raise BadInputError(f"KAVG_CONNECT_TIMEOUT_S={raw!r}: expected seconds above 0")
    return value


def ray_current_cluster_file() -> Path:
    """Where `ray start` records the address of the cluster it started (as Ray reads it)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base, "ray", "ray_current_cluster")


def split_host_port(address: str) -> tuple[str, int]:
    """(host, port) of ``HOST:PORT`` or ``ray://HOST:PORT``; BadInputError if malformed."""
    text = address.removeprefix("ray://")
    host, sep, port = text.rpartition(":")
    if not sep or not _HOST_RE.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInputError(f"--address {address!r}: expected {FORMS}")
    return host.strip("[]"), int(port)


def resolve_address(address: str) -> str:
    """The address to dial: ``auto`` resolved, the form checked (BadInputError if bad)."""
    address = address.strip()
    if not address:
        raise BadInputError(f"--address is empty: expected {FORMS}")
    if address.startswith(("http://", "https://")):
        raise BadInputError(
            f"--address {address}: that is a dashboard address, for 'kavg sweep submit'; "
            "give the cluster's GCS address HOST:PORT (port 6379 by default)"
        )
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS", "").strip()
        if env and env != "auto":
            return resolve_address(env)
        recorded = ray_current_cluster_file()
        try:
            found = recorded.read_text().strip()
        except OSError:
            found = ""
        if not found:
            raise BadInputError(
                "--address auto: no running Ray cluster found on this machine (no "
                f"$RAY_ADDRESS, no {recorded}); start one with 'ray start --head' or "
                "give HOST:PORT"
            )
        return resolve_address(found)
    split_host_port(address)
    return address


#: What an HTTP/2 client sends first (RFC 9113 3.4): the preface, then its SETTINGS frame.
GRPC_GREETING = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
SETTINGS_FRAME_TYPE = 4


class _NotRay(Exception):
    """The peer answered, closed or stayed silent instead of greeting as gRPC."""


def _uses_tls() -> bool:
    return os.environ.get("RAY_USE_TLS", "").strip().lower() in ("1", "true", "yes")


def _greet(sock: socket.socket, deadline: float) -> None:
    """Send the HTTP/2 greeting; the first frame back must be the server's SETTINGS."""
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    sock.sendall(GRPC_GREETING)
    header = b""
    while len(header) < 9:  # a frame header: length (3), type (1), flags (1), stream (4)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(9 - len(header))
        if not chunk:
            raise _NotRay("it closed the connection without answering")
        header += chunk
    if header[3] != SETTINGS_FRAME_TYPE or any(header[5:9]):
        raise _NotRay("it answered, but not as a Ray cluster (no gRPC)")


def probe(address: str, timeout_s: float | None = None) -> None:
    """Dial ``address`` and greet it as gRPC; KavgError (exit 1) naming it unless it
    answers as a gRPC server within ``timeout_s`` in all."""
    timeout_s = connect_timeout_s() if timeout_s is None else timeout_s
    host, port = split_host_port(address)
    start = time.monotonic()
    connected = False
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            connected = True
            if not _uses_tls():
                _greet(sock, start + timeout_s)
            return
    except socket.gaierror as exc:
        reason = f"cannot resolve {host}: {exc.strerror or exc}"
    except TimeoutError:
        accepted = "it accepted the connection but sent nothing back" if connected else ""
        reason = accepted or f"no answer within {timeout_s:g} s"
    except _NotRay as exc:
        reason = str(exc)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
    waited = time.monotonic() - start
    raise KavgError(
        f"no Ray cluster answers at {address} ({reason}; waited {waited:.1f} s of "
        f"{timeout_s:g} s, KAVG_CONNECT_TIMEOUT_S)"
    )


def check_address(address: str | None) -> str | None:
    """None (start a local Ray) or the resolved address of a cluster that answers."""
    if address is None:
        return None
    timeout_s = connect_timeout_s()
    resolved = resolve_address(address)
    probe(resolved, timeout_s)
    return resolved


def check_storage(storage: str, write: bool = False) -> str:
    """A results folder that is, or can be made, a directory (and, for ``write``, that this
    process may write); BadInputError otherwise."""
    if not storage.strip():
        raise BadInputError("--storage is empty: give a directory")
    if "://" in storage:
        return storage
    path = Path(storage).expanduser()
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                where = "" if part == path else f"{part} "
                raise BadInputError(f"--storage {storage}: {where}is a file, not a directory")
            if write and not os.access(part, os.W_OK | os.X_OK):
                raise BadInputError(f"--storage {storage}: {part} is not writable")
            break
    return storage
