"""Collectives on the run's device (kavg_ray.train.collectives): the NCCL path is pinned on
CPU. A group that kavg creates on GPUs is NCCL for CUDA tensors only, and a host tensor
handed to it ended every P >= 2 GPU run after its first epoch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from kavg_ray.train import collectives
from kavg_ray.train.loop import EngineBase

TRAIN = Path(__file__).resolve().parents[2] / "kavg_ray" / "train"
CUDA0 = torch.device("cuda", 0)


def test_a_host_tensor_is_refused_when_the_run_is_on_a_gpu() -> None:
    with pytest.raises(collectives.CollectiveDeviceError, match="tensor on cpu; .* on cuda:0"):
        collectives.all_reduce(torch.zeros(3), CUDA0)
    with pytest.raises(collectives.CollectiveDeviceError):
        collectives.broadcast(torch.zeros(3), torch.device("cuda"), src=0)
    collectives.check_device(torch.zeros(3), torch.device("cpu"))  # the CPU run's own
    with pytest.raises(collectives.CollectiveDeviceError, match="tensor on cpu"):
        byte = torch.zeros(2, dtype=torch.uint8)
        collectives.all_to_all_single(byte, byte.clone(), [1, 1], [1, 1], CUDA0)


def test_the_epoch_sums_travel_on_the_engines_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # The loop's per-epoch sums (Recorder.epoch_metrics, the parameter server's counters)
    # are built on the host and must reach the collective on the engine's device. "meta"
    # stands in for a GPU: a device other than the host's.
    seen: list[torch.device] = []
    monkeypatch.setattr(collectives.dist, "all_reduce",
                        lambda t, **kw: seen.append(t.device))  # fmt: skip
    engine = EngineBase()
    engine.world_size, engine.device = 2, torch.device("meta")
    out = engine.all_reduce(torch.zeros(6, dtype=torch.float64))
    assert seen == [torch.device("meta")] and out.device == torch.device("meta")
    engine.world_size = 1  # one process: nothing travels
    assert engine.all_reduce(torch.ones(2)).device == torch.device("cpu") and len(seen) == 1


@pytest.mark.parametrize(
    ("backend", "device", "expected"),
    [
        ("nccl", "cuda", True), ("gloo", "cpu", False), ("gloo", "cuda", False),
        ("cpu:gloo,cuda:nccl", "cuda", True), ("cpu:gloo,cuda:nccl", "cpu", False),
        ("cpu:gloo, cuda:nccl", "cuda", True),
    ],
)  # fmt: skip
def test_which_backend_averages_natively(backend: str, device: str, expected: bool) -> None:
    assert collectives.backend_has_average(backend, torch.device(device)) is expected


def test_groups_on_gpus_also_take_host_tensors() -> None:
    assert collectives.backend(True) == "cpu:gloo,cuda:nccl"
    assert collectives.backend(False) == "gloo"


def test_every_collective_of_training_goes_through_one_place() -> None:
    calls = []
    for path in sorted(TRAIN.glob("*.py")):
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "dist" and node.attr in (
                    "all_reduce", "broadcast", "all_gather", "reduce_scatter", "reduce",
                    "all_to_all", "all_reduce_coalesced", "scatter", "gather",
                    "all_to_all_single",
                ):  # fmt: skip
                    calls.append(f"{path.name}:{node.lineno} dist.{node.attr}")
    assert calls == []


def test_fractional_gpus_are_refused_where_ranks_would_share_one() -> None:
    from kavg_ray.config import ConfigError, parse_run

    half = {"use_gpu": True, "gpus_per_worker": 0.5}
    with pytest.raises(ConfigError, match="gpus_per_worker 0.5 would put two of the 2"):
        parse_run({"K": 4, "P": 2, "resources": half})
    with pytest.raises(ConfigError, match="NCCL refuses"):
        parse_run({"algorithm": "downpour", "P": 4, "resources": half})
    # One rank per trial: nothing to share a GPU with.
    parse_run({"K": 4, "P": 1, "resources": half})
    parse_run({"K": 4, "P": 8, "backend": "simulated", "resources": half})
    parse_run({"K": 4, "P": 2, "resources": {"gpus_per_worker": 0.5}})  # CPU run

