"""Joining a cluster (kavg_ray.launch.nodes): which user code is shipped to the other
nodes and how, and the refusal of a storage that some node cannot see. No Ray is started:
ray.init and the nodes' answers are stand-ins (the real runs: tests/launch/
test_working_dir.py and test_cluster.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kavg_ray.config import parse_run
from kavg_ray.errors import KavgError, SweepError
from kavg_ray.launch import nodes, sweep


def _point(dataset: str, model: str = "mlp", loss: str | None = None):  # noqa: ANN202
    wl = {"dataset": dataset, "model": model, **({"loss": loss} if loss else {})}
    return parse_run({"K": 1, "workload": wl})


def test_factories_outside_the_installed_packages_are_shipped(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_wl.py").write_text("def data(): pass\ndef net(): pass\n")
    (tmp_path / "mypkg" / "sub").mkdir(parents=True)
    for init in ("mypkg/__init__.py", "mypkg/sub/__init__.py"):
        (tmp_path / init).write_text("")
    (tmp_path / "mypkg" / "sub" / "losses.py").write_text("def l1(o, t): pass\n")
    points = [
        _point("my_wl:data", "my_wl:net", "mypkg.sub.losses:l1"),
        _point("digits", "mlp"),  # built-ins: nothing to ship
        _point("my_wl:data", "torch.nn:Linear"),  # installed: the nodes have it
        _point("kavg_ray.train.data:load_digits_like"),  # kavg itself: the nodes have it
    ]
    assert nodes.user_code(points) == [str(tmp_path / "my_wl.py"), str(tmp_path / "mypkg")]
    assert nodes.user_code([_point("no_such_module_here:data")]) == []


def _fake_ray(monkeypatch):  # noqa: ANN202
    import ray

    for key in ("RAY_TRAIN_V2_ENABLED", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        monkeypatch.setenv(key, os.environ.get(key, "1"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(sweep, "_loopback_bound", lambda address: False)
    seen = []
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: seen.append(kw["runtime_env"]))
    return seen


def test_connect_ships_the_user_code_as_py_modules(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    seen = _fake_ray(monkeypatch)
    code = [str(tmp_path / "my_wl.py")]
    sweep.connect("10.0.0.5:6379", None, code)
    sweep.connect("10.0.0.5:6379", None, [])
    assert seen[0]["py_modules"] == code and "py_modules" not in seen[1]
    # Inside a submitted job the job's runtime_env (--working-dir) reaches the workers;
    # adding py_modules could clash with the job's own (--ship-package).
    job = {"runtime_env": {"working_dir": str(tmp_path), "env_vars": {}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    sweep.connect("auto", None, code)
    assert "py_modules" not in seen[2]


def test_a_storage_some_node_cannot_see_is_refused(tmp_path) -> None:
    store = tmp_path / "store"
    asked = []

    def ask(path: str, token: str) -> dict[str, bool | None]:
        asked.append((path, Path(path).read_text() == token))
        return {"10.0.0.1 (aaaa)": True, "10.0.0.2 (bbbb)": False}

    with pytest.raises(SweepError) as err:
        nodes.check_shared_storage(str(store), nodes=lambda: 2, ask=ask)
    assert err.value.exit_code == 2
    assert str(err.value) == (
        f"--storage {store}: node 10.0.0.2 (bbbb) cannot see {store}: give a folder that "
        "every node mounts at that path (a shared file system) or an object-store URI "
        "(s3://BUCKET/PREFIX)"
    )
    ((path, had_token),) = asked
    assert had_token and Path(path).parent == store and not Path(path).exists()
    assert list(store.iterdir()) == []


def test_a_storage_every_node_sees_passes(tmp_path) -> None:
    def ask(path: str, token: str) -> dict[str, bool | None]:
        return {"a": True, "b": nodes._node_sees(path, token)}

    nodes.check_shared_storage(str(tmp_path / "store"), nodes=lambda: 3, ask=ask)
    assert list((tmp_path / "store").iterdir()) == []


def test_no_check_on_one_node_or_an_object_store(tmp_path) -> None:
    def ask(path: str, token: str) -> dict[str, bool | None]:
        raise AssertionError("no node should be asked")

    nodes.check_shared_storage(str(tmp_path / "store"), nodes=lambda: 1, ask=ask)
    nodes.check_shared_storage("s3://bucket/prefix", nodes=lambda: 4, ask=ask)
    assert not (tmp_path / "store").exists()


def test_a_node_that_does_not_answer_the_check_fails_the_run(tmp_path) -> None:
    with pytest.raises(KavgError) as err:
        nodes.check_shared_storage(
            str(tmp_path), nodes=lambda: 2, ask=lambda p, t: {"a": True, "b": None}
        )
    assert err.value.exit_code == 1 and "node b did not answer" in str(err.value)
    assert list(tmp_path.iterdir()) == []
