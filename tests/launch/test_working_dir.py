"""`kavg sweep submit --working-dir DIR`: the folder of the user's code travels with the job
as Ray's runtime_env working_dir. Unit-tested on the runtime_env that jobs.submit hands to
Ray and through the CLI up to the submission (a real Ray Job upload is left to a cluster:
starting a Ray head costs more than this check is worth on two cores). And `kavg sweep run
--address`, which ships the factories' modules as py_modules, on the shared Ray head."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kavg_ray.analysis.results import ResultsStore
from kavg_ray.errors import JobsError
from kavg_ray.launch.jobs import SPEC_ENV, check_working_dir, job_runtime_env

FACTORIES = """
import torch
from torch import nn
from torch.utils.data import TensorDataset


def data():
    return TensorDataset(torch.randn(32, 4), torch.randint(2, (32,))), \\
        TensorDataset(torch.randn(8, 4), torch.randint(2, (8,)))


def net():
    return nn.Linear(4, 2)
"""
SPEC = {
    "name": "wd", "workload": {"dataset": "shipped_wl:data", "model": "shipped_wl:net",
                               "epochs": 1, "batch_size": 4},
    "algorithm": "kavg", "grid": {"K": [1, 2], "P": [2]},
}  # fmt: skip


def test_runtime_env_ships_the_folder(tmp_path) -> None:
    env = job_runtime_env("name: x\n", {"A": "1"}, working_dir=str(tmp_path))
    assert env["working_dir"] == str(tmp_path) and os.path.isabs(env["working_dir"])
    assert env["env_vars"] == {"A": "1", SPEC_ENV: "name: x\n", "PYTHONUNBUFFERED": "1"}
    assert "py_modules" not in env
    relative = os.path.relpath(tmp_path)
    assert job_runtime_env("", working_dir=relative)["working_dir"] == str(tmp_path)
    assert "working_dir" not in job_runtime_env("")
    both = job_runtime_env("", ship_package=True, working_dir=str(tmp_path))
    assert both["py_modules"][0].endswith("kavg_ray") and both["working_dir"] == str(tmp_path)


@pytest.mark.parametrize(
    ("path", "message"),
    [("nosuch", "--working-dir nosuch: does not exist"), ("file.txt", "is not a folder"),
     (" ", "--working-dir is empty")],
)  # fmt: skip
def test_a_bad_working_dir_is_bad_input(tmp_path, monkeypatch, path, message) -> None:
    monkeypatch.chdir(tmp_path)
    Path("file.txt").write_text("x")
    with pytest.raises(JobsError, match=message) as info:
        check_working_dir(path)
    assert info.value.exit_code == 2


def _submit(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAVG_", "RAY_"))}
    return subprocess.run(
        [sys.executable, "-m", "kavg_ray.cli", "sweep", "submit", "spec.yaml",
         "--address", "http://127.0.0.1:9", "--storage", str(cwd / "store"), *extra],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_checks_the_factories_from_the_working_dir(tmp_path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "shipped_wl.py").write_text(FACTORIES)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    # Without the folder the factories do not import here: refused before any submission.
    refused = _submit(tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "error: workload.dataset 'shipped_wl:data': cannot import shipped_wl: "
        "ModuleNotFoundError: No module named 'shipped_wl'"
    ]
    # With it they import and pass; the run stops only at the cluster nobody answers.
    shipped = _submit(tmp_path, "--working-dir", "code")
    assert shipped.returncode == 1, shipped.stderr
    assert "cannot reach the Ray dashboard at http://127.0.0.1:9" in shipped.stderr
    missing = _submit(tmp_path, "--working-dir", "nosuch")
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == ["error: --working-dir nosuch: does not exist"]


def test_sweep_run_on_a_cluster_ships_the_factories(tmp_path, ray_head) -> None:  # noqa: ANN001
    """`kavg sweep run --address`: the factory module is importable on the driver only (a
    folder on its PYTHONPATH, which Ray does not pass on, as another machine would lack
    it); the trial's workers import the copy shipped as py_modules."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "shipped_wl.py").write_text(FACTORIES)
    (tmp_path / "run").mkdir()
    spec = {**SPEC, "name": "ship", "grid": {"K": [1], "P": [1]}}
    (tmp_path / "run" / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**ray_head.env, "KAVG_CONNECT_TIMEOUT_S": "30"}
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(tmp_path / "code")])
    out = subprocess.run(
        [sys.executable, "-m", "kavg_ray.cli", "sweep", "run", "spec.yaml", "--address",
         ray_head.address, "--storage", str(tmp_path / "store")],
        cwd=tmp_path / "run", env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = ResultsStore(tmp_path / "store").read_trials("ship").to_dict("records")
    assert [(r["trial_id"], r["status"]) for r in rows] == [("K1-P1-s0", "completed")]
