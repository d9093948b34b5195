"""connect() failures are one line (no Ray is started: ray.init is replaced)."""

from __future__ import annotations

import os

import pytest

from kavg_ray.errors import KavgError
from kavg_ray.launch import sweep


class AuthenticationError(Exception):
    """Stands for ray.exceptions.AuthenticationError (matched by name, as connect does)."""


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch):
    import ray

    for key in ("RAY_TRAIN_V2_ENABLED", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        monkeypatch.setenv(key, os.environ.get(key, "1"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(sweep, "_loopback_bound", lambda address: False)
    return monkeypatch, ray


def test_a_token_cluster_joined_without_the_token_says_what_to_set(no_ray, tmp_path) -> None:
    monkeypatch, ray = no_ray

    def init(**kw):
        raise AuthenticationError(
            "Authentication failed: the request has no token.\nTraceback (most recent...)\n..."
        )

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(KavgError) as err:
        sweep.connect("10.0.0.5:6379", tmp_path / "x.log")
    assert err.value.exit_code == 2
    assert str(err.value) == (
        "the Ray cluster at 10.0.0.5:6379 asks for token authentication: set "
        "RAY_AUTH_MODE=token and give its token in RAY_AUTH_TOKEN or ~/.ray/auth_token "
        f"(ray get-auth-token on the head) (Ray's log: {tmp_path / 'x.log'})"
    )


def test_other_failures_are_one_line_naming_the_log(no_ray, tmp_path) -> None:
    monkeypatch, ray = no_ray

    def init(**kw):
        raise RuntimeError("Failed to connect to GCS at 10.0.0.5:6379\nmore\nlines")

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(KavgError) as err:
        sweep.connect("10.0.0.5:6379", tmp_path / "x.log")
    assert err.value.exit_code == 1
    assert str(err.value) == (
        "cannot join the Ray cluster at 10.0.0.5:6379: Failed to connect to GCS at "
        f"10.0.0.5:6379 (Ray's log: {tmp_path / 'x.log'})"
    )


# --- Dialling: whatever the peer does, one line within KAVG_CONNECT_TIMEOUT_S ----------


@pytest.fixture
def peer():
    """A listener on 127.0.0.1 that answers each connection with ``reply`` (None: reads and
    sends nothing, never even accepts); yields a function making one."""
    import socket
    import threading

    made = []

    def make(reply: bytes | None) -> str:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        made.append(srv)
        if reply is not None:

            def serve() -> None:
                while True:
                    try:
                        conn, _ = srv.accept()
                    except OSError:
                        return
                    conn.recv(64)
                    conn.sendall(reply)
                    made.append(conn)
                    if not reply:
                        conn.close()

            threading.Thread(target=serve, daemon=True).start()
        return f"127.0.0.1:{srv.getsockname()[1]}"

    yield make
    for s in made:
        s.close()


SETTINGS = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # an empty SETTINGS frame: what gRPC sends first


@pytest.mark.parametrize(
    ("reply", "reason"),
    [(None, "it accepted the connection but sent nothing back"),
     (b"HTTP/1.1 400 Bad Request\r\n\r\n", "it answered, but not as a Ray cluster (no gRPC)"),
     (b"", "it closed the connection without answering")],
)  # fmt: skip
def test_a_peer_that_is_not_a_ray_cluster_is_refused_in_time(peer, reply, reason) -> None:
    import time

    from kavg_ray.launch.address import probe

    address = peer(None if reply is None else reply)
    t0 = time.monotonic()
    with pytest.raises(KavgError) as err:
        probe(address, 1.5)
    assert time.monotonic() - t0 < 3
    assert err.value.exit_code == 1
    assert str(err.value).startswith(f"no Ray cluster answers at {address} ({reason}; waited")


def test_a_grpc_server_passes(peer) -> None:
    from kavg_ray.launch.address import probe

    probe(peer(SETTINGS), 2)


def test_a_silent_listener_as_address_is_one_line_in_time_and_writes_nothing(peer, tmp_path):
    """`kavg sweep run --address` a listener that accepts and stays silent: exit 1 with one
    line within the connect timeout (plus start-up), and no storage written."""
    import subprocess
    import sys
    import time

    address = peer(None)
    (tmp_path / "spec.yaml").write_text(
        "name: silent\nworkload: {dataset: digits, model: mlp, epochs: 1}\ngrid: {K: [1]}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAVG_", "RAY_"))}
    env["KAVG_CONNECT_TIMEOUT_S"] = "3"
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "kavg_ray.cli", "sweep", "run", "spec.yaml", "--address",
         address, "--storage", str(tmp_path / "store")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stderr
    assert out.stderr.splitlines() == [
        f"error: no Ray cluster answers at {address} (it accepted the connection but sent "
        "nothing back; waited 3.0 s of 3 s, KAVG_CONNECT_TIMEOUT_S)"
    ]
    assert took < 3 + 8, took  # the timeout, plus Python and the CLI's imports
    assert not (tmp_path / "store").exists()
    assert out.stdout == ""


def test_joining_output_is_staged_outside_the_storage_until_joined(tmp_path) -> None:
    """Ray's output while connecting goes to a temporary file; settle() moves it into the
    sweep's logs/ (created only then), and what follows is appended there."""
    from kavg_ray.launch import console

    path = tmp_path / "store" / "s" / "logs" / "sweep.log"
    with console.quiet(path, staged=True) as say:
        os.write(1, b"connecting\n")
        staged = say.log
        assert staged != path and not staged.is_relative_to(tmp_path)
        assert not (tmp_path / "store").exists()
        say.settle()
        os.write(2, b"joined\n")
        assert say.log == path
    assert path.read_text() == "connecting\njoined\n"
    assert not os.path.exists(staged)


def test_every_run_tells_its_workers_their_own_cluster(no_ray) -> None:
    """Two local Rays on one machine (issue #29): each job's runtime_env carries the setup
    hook that gives every worker $RAY_ADDRESS of its own cluster; not through Ray Client,
    nor inside a submitted job (whose runtime_env is the job's)."""
    from kavg_ray.launch import ray_private

    monkeypatch, ray = no_ray
    monkeypatch.setattr(ray_private, "single_machine_mode", lambda: None)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    seen: list[dict] = []
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw["runtime_env"]))
    for address in (None, "10.0.0.5:6379", "auto", "ray://10.0.0.5:10001"):
        sweep.connect(address)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')
    sweep.connect("auto")
    hooks = [env.get("worker_process_setup_hook") for env in seen]
    own = ray_private.OWN_CLUSTER_HOOK
    assert hooks == [own, own, own, None, None]
    module, _, name = own.rpartition(".")
    assert getattr(__import__(module, fromlist=[name]), name) is ray_private.address_own_cluster
    assert all("RAY_TRAIN_V2_ENABLED" in env["env_vars"] for env in seen)
