"""The installed Ray still has what kavg_ray/launch/ray_private.py relies on (no Ray
started): a Ray release that drops one fails here, with the reason, not in a user's sweep."""

from __future__ import annotations

import os
from importlib.metadata import requires

import ray
from packaging.requirements import Requirement

from kavg_ray.launch import ray_private


def test_installed_ray_has_everything_kavg_relies_on() -> None:
    problems = ray_private.missing()
    assert problems == [], "Ray changed under kavg:\n" + "\n".join(problems)


def test_installed_ray_is_in_the_pinned_range() -> None:
    # The installed kavg-ray's own requirement (pyproject.toml, as pip installed it).
    (req,) = [r for r in map(Requirement, requires("kavg-ray")) if r.name == "ray"]
    assert ray.__version__ in req.specifier, f"Ray {ray.__version__} is outside {req}"
    assert ray_private.CHECKED_ON in req.specifier


def test_a_missing_reliance_is_reported_with_its_reason(monkeypatch) -> None:  # noqa: ANN001
    gone = (
        ray_private.Reliance("ray._private.services:no_such_function", "reason one"),
        ray_private.Reliance("ray._private.ray_constants:ENABLE_RAY_CLUSTERS_ENV_VAR",
                             "reason two", value="SOMETHING_ELSE"),
        ray_private.Reliance("ray._private.node", "reason three", in_source="no such phrase"),
        ray_private.Reliance("ray._no_such_module", "reason four"),
    )  # fmt: skip
    monkeypatch.setattr(ray_private, "RELIANCES", gone)
    problems = ray_private.missing()
    assert [p.split(":")[0] for p in problems] == [
        "ray._private.services", "ray._private.ray_constants", "ray._private.node",
        "ray._no_such_module",
    ]  # fmt: skip
    assert [p.endswith(f"(needed because reason {n})") for p, n in
            zip(problems, ("one", "two", "three", "four"), strict=True)] == [True] * 4
    assert "is 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', not 'SOMETHING_ELSE'" in problems[1]


def test_startup_timeout_is_told_from_other_failures() -> None:
    assert ray_private.is_startup_timeout(Exception("The current node timed out during startup."))
    assert not ray_private.is_startup_timeout(ConnectionError("connection refused"))


def test_a_worker_is_pointed_at_its_own_cluster(monkeypatch) -> None:  # noqa: ANN001
    """The setup hook (run in each Ray worker of kavg's job) sets $RAY_ADDRESS to the
    worker's own GCS and drops $RAY_API_SERVER_ADDRESS, which would win over it."""
    import types

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # another cluster's
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:2")
    context = types.SimpleNamespace(gcs_address="127.0.0.1:40001")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    ray_private.address_own_cluster()
    assert os.environ["RAY_ADDRESS"] == "127.0.0.1:40001"
    assert "RAY_API_SERVER_ADDRESS" not in os.environ

    def broken():  # noqa: ANN202
        raise RuntimeError("not connected")

    monkeypatch.setattr(ray, "get_runtime_context", broken)
    ray_private.address_own_cluster()  # a failing hook would end the worker: it never raises
    assert os.environ["RAY_ADDRESS"] == "127.0.0.1:40001"
