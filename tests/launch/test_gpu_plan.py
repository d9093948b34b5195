"""Simulated and packed GPU trials are planned for the GPU that will run them, not for the
driver's memory (docs/design.md section 11), and checked again on the worker. On CPU: the
cluster's report is a stand-in for ``ray.nodes()``, and the worker's device-memory
queries are replaced."""

from __future__ import annotations

import pytest
import torch

from kavg_ray.config import parse_run, parse_sweep
from kavg_ray.errors import SweepError
from kavg_ray.launch import plans, sweep
from kavg_ray.train import stacked
from kavg_ray.train.packed import PackedEngine, pack_memory_bytes

GIB = 2**30
SPEC = {
    "name": "g", "backend": "simulated", "pack": True,
    "workload": {"dataset": "digits", "model": "mlp", "epochs": 1},
    "resources": {"use_gpu": True}, "grid": {"K": [1, 2, 4, 8], "P": [4]},
}  # fmt: skip


def _node(gpus: int, kind: str | None, alive: bool = True, label: bool = True) -> dict:
    res = {"CPU": 8.0, "GPU": float(gpus)} if gpus else {"CPU": 8.0}
    labels = {}
    if kind and label:
        labels["ray.io/accelerator-type"] = kind
    elif kind:
        res[f"accelerator_type:{kind}"] = 1.0
    return {"Alive": alive, "Resources": res, "Labels": labels}


CLUSTER = [_node(8, "H100"), _node(1, "L4", label=False), _node(0, None),
           _node(1, "T4", alive=False)]  # fmt: skip


def test_the_budget_is_the_clusters_smallest_gpu() -> None:
    assert plans.gpu_node_types(CLUSTER) == ["H100", "L4"]
    budget, source = plans.reported_gpu_budget(CLUSTER)
    assert budget == int(0.9 * 24 * GIB)
    assert source == "90% of a L4 (24 GiB), the cluster's smallest GPU"
    assert plans.reported_gpu_budget([_node(8, "H100")])[0] == int(0.9 * 80 * GIB)
    assert plans.reported_gpu_budget([_node(0, None)]) == (None, "the cluster reports no GPU node")
    unknown = plans.reported_gpu_budget([_node(8, "H100"), _node(2, "Quantum-9000")])
    assert unknown == (None, "the cluster's GPU type Quantum-9000 has no known memory")
    assert plans.reported_gpu_budget([_node(1, None)])[0] is None


def test_a_declared_gpu_memory_wins() -> None:
    spec = {**SPEC, "resources": {"use_gpu": True, "gpu_memory_gb": 12}}
    cfg = parse_sweep(spec).points()[0]
    assert plans.memory_budget(cfg, local=False, nodes=CLUSTER) == (
        12 * GIB, "resources.gpu_memory_gb"
    )
    assert plans.memory_budget(cfg, local=True)[0] == 12 * GIB


def test_packs_are_planned_for_the_clusters_gpu_not_the_drivers_memory(monkeypatch) -> None:  # noqa: ANN001
    points = parse_sweep(SPEC).points()
    one, two = pack_memory_bytes(points[:1]), pack_memory_bytes(points[:2])
    # The driver has almost no memory (and no GPU): planning from it would refuse.
    monkeypatch.setattr(stacked, "available_memory_bytes", lambda device: one // 2)
    (whole,) = plans.plan_packs(points, local=False, nodes=CLUSTER)
    assert len(whole) == 4
    # A GPU declared just big enough for two points at a time: packs of two.
    small = parse_sweep({**SPEC, "resources": {"use_gpu": True,
                                               "gpu_memory_gb": two / GIB}}).points()  # fmt: skip
    assert [len(p) for p in plans.plan_packs(small, local=False, nodes=CLUSTER)] == [2, 2]
    # A GPU type of unknown memory: not split here; the worker checks.
    (unsplit,) = plans.plan_packs(points, local=False, nodes=[_node(1, "Quantum-9000")])
    assert len(unsplit) == 4


def test_a_simulated_trial_too_big_for_the_clusters_gpu_is_refused() -> None:
    spec = {**SPEC, "pack": False, "workload": {"dataset": "digits", "model": "mlp",
            "epochs": 1, "batch_size": 4096}, "grid": {"K": [1], "P": [4096]}}  # fmt: skip
    points = parse_sweep(spec).points()
    need = pack_memory_bytes(points)
    assert 0.9 * 8 * GIB < need < 0.9 * 80 * GIB  # fits an H100, not a P4
    # On a cluster the GPU check waits for Ray's report (after joining) ...
    sweep.check_simulated_memory(points, local=False)
    sweep.check_simulated_memory(points, local=False, joined=True,
                                 cluster_nodes=[_node(8, "H100")])  # fmt: skip
    with pytest.raises(SweepError) as err:
        sweep.check_simulated_memory(points, local=False, joined=True,
                                     cluster_nodes=[_node(8, "H100"), _node(1, "P4")])  # fmt: skip
    assert err.value.exit_code == 2
    assert str(err.value).startswith(
        f"trial {points[0].trial_name()}: simulated P=4096 mlp needs ~"
    )
    assert "GiB (90% of a P4 (8 GiB), the cluster's smallest GPU). Lower P or batch_size, " \
        "set resources.gpu_memory_gb, or run with backend: ray" in str(err.value)
    # ... unless the spec says how big the GPU is: then before anything starts.
    declared = parse_sweep({**spec, "resources": {"use_gpu": True, "gpu_memory_gb": 4}})
    with pytest.raises(SweepError, match=r"GiB \(resources.gpu_memory_gb\)"):
        sweep.check_simulated_memory(declared.points(), local=False)


def test_the_worker_refuses_a_gpu_smaller_than_planned(monkeypatch) -> None:  # noqa: ANN001
    cfg = parse_run({"K": 1, "P": 2, "backend": "simulated",
                     "resources": {"use_gpu": True, "gpu_memory_gb": 40}})  # fmt: skip
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(stacked, "device_total_bytes", lambda device: int(22.5 * GIB))
    monkeypatch.setattr(stacked, "available_memory_bytes", lambda device: 20 * GIB)
    with pytest.raises(ValueError) as err:
        stacked.check_memory(cfg, gpu)
    assert str(err.value) == (
        "resources.gpu_memory_gb is 40 but this trial's GPU (cuda:0) has 22.5 GiB: the sweep "
        "was planned for a larger GPU; set resources.gpu_memory_gb to at most 22.5"
    )
    with pytest.raises(ValueError, match="resources.gpu_memory_gb is 40 but"):
        PackedEngine([cfg], gpu)
    fits = cfg.model_copy(update={"resources": cfg.resources.model_copy(
        update={"gpu_memory_gb": 16.0})})  # fmt: skip
    assert stacked.check_memory(fits, gpu) > 0  # planned for 16 GiB: a 22.5 GiB GPU will do
    stacked.check_planned_gpu(cfg, torch.device("cpu"))  # nothing to check on a CPU
