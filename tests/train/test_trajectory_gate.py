"""The trajectory gate: the training code reproduces the trajectories recorded before the
refactor into kavg_ray.train (per-epoch train loss, test loss, test accuracy).

The cases, how they were recorded and the tolerance of the two parameter-server cases with
two learners (whose update order depends on message arrival) are in
benchmarks/trajectory_check.py; every other case must match bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GATE = json.loads((ROOT / "tests" / "train" / "trajectories.json").read_text())


# Imported by name from benchmarks/: the spawned gloo ranks import it again (they receive
# this process's sys.path).
sys.path.insert(0, str(ROOT / "benchmarks"))
CHECK = importlib.import_module("trajectory_check")


@pytest.fixture(autouse=True)
def _one_thread():
    """The gate was recorded with one intra-op thread; other counts round differently."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(GATE["cases"]))
def test_trajectory_matches_the_recording(name: str) -> None:
    recorded = GATE["cases"][name]
    passed, line = CHECK.check_case(name, recorded)
    assert passed, line
    if recorded["exact"]:
        assert "bit for bit" in line


def test_the_gate_covers_every_engine_and_resume() -> None:
    cases = GATE["cases"].values()
    kinds = {(c["runner"], c["config"].get("algorithm", "kavg")) for c in cases}
    assert kinds >= {("real", "kavg"), ("real", "hier_avg"), ("simulated", "kavg"),
                     ("simulated", "hier_avg"), ("downpour", "downpour"),
                     ("eamsgd", "eamsgd")}  # fmt: skip
    resumed = {c["runner"] for c in cases if c["resume_after_epoch"]}
    assert resumed >= {"real", "simulated", "downpour"}
