"""The sweep specs under examples/ run: each is checked as the CLI checks it, then a tiny
version of two of its grid points trains on the simulated backend (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kavg_ray.config import parse_sweep, read_yaml
from kavg_ray.train import train
from kavg_ray.train.workload import check_workload

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Per spec: workload keys that make it tiny, and what one epoch must reach.
TINY = {
    "my_sweep.yaml": ({"epochs": 1}, lambda m: m["test_acc"] > 0.55),  # chance: 0.5
    "language_model.yaml": (
        {"steps": 30, "eval_every_steps": 10, "dataset_args": {"seq_len": 32, "chars": 12_000},
         "model_args": {"dim": 32, "layers": 1, "heads": 2}},
        lambda m: m["test_loss"] < 0.9 * math.log(m["vocab"]),
    ),  # fmt: skip
}


def test_every_example_spec_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs(name: str, monkeypatch) -> None:
    monkeypatch.chdir(EXAMPLES)  # the factories import from the spec's folder
    doc = read_yaml(name)
    points = parse_sweep(doc, name).points()
    assert all(p.backend == "simulated" for p in points)
    assert len(points) >= 8
    changes, good = TINY[name]
    doc["workload"] = {**doc["workload"], **changes}
    tiny = parse_sweep(doc, name).points()
    for point in (tiny[0], tiny[-1]):
        check_workload(point)
        reports: list[dict] = []
        train(point, lambda m, s, out=reports: out.append(m))
        last = reports[-1]
        if point.workload.dataset == "text":
            from kavg_ray.train.workload import load_data

            last["vocab"] = load_data(point).num_classes
        assert good(last), (point.trial_name(), last)
