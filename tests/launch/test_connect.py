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
