"""Hier-AVG's node-aware groups: exact groups from (rank -> node) tables, the refusals
before launch and on the workers, real gloo averages over those groups, and the cost
model's link for groups that spanned nodes."""

from __future__ import annotations

import pytest
import torch

from kavg_ray.analysis.costmodel import Link, Network, allreduce_time, predict_trials
from kavg_ray.config import RunConfig
from kavg_ray.errors import SweepError
from kavg_ray.launch.placement import check_hier_groups, predicted_learners_per_node
from kavg_ray.train.averaging import HierAvgAverager
from kavg_ray.train.groups import (
    GroupPlacementError,
    gather_nodes,
    groups_on_node,
    hier_groups,
)
from tests.distributed import run_distributed


@pytest.mark.parametrize(
    ("nodes", "S", "groups"),
    [
        ([0, 0, 0, 0], 2, [[0, 1], [2, 3]]),  # one node: consecutive ranks, as before
        ([0, 0, 1, 1], 2, [[0, 1], [2, 3]]),
        ([0, 1, 0, 1], 2, [[0, 2], [1, 3]]),  # ranks interleaved over two nodes
        ([1, 1, 0, 0], 2, [[0, 1], [2, 3]]),
        ([0, 1, 2, 0, 1, 2], 2, [[0, 3], [1, 4], [2, 5]]),
        ([0, 0, 1, 1, 0, 0, 1, 1], 4, [[0, 1, 4, 5], [2, 3, 6, 7]]),
        ([0, 1, 0, 1], 1, [[0], [2], [1], [3]]),  # node by node
    ],
)
def test_groups_share_a_node(nodes: list[int], S: int, groups: list[list[int]]) -> None:
    assert hier_groups(nodes, S) == groups
    assert groups_on_node(groups, nodes)


def test_uneven_nodes_refused_unless_any() -> None:
    nodes = [0, 0, 0, 1]  # three learners on node 0, one on node 1
    refusal = r"S=2 .*\(node 0: 3, node 1: 1\).*hier_groups: any"
    with pytest.raises(GroupPlacementError, match=refusal):
        hier_groups(nodes, 2)
    groups = hier_groups(nodes, 2, across_nodes=True)
    assert groups == [[0, 1], [2, 3]]
    assert not groups_on_node(groups, nodes)
    # One learner per node (a GPU per node): every group of two spans two nodes.
    with pytest.raises(GroupPlacementError, match="node 0: 1, node 1: 1"):
        hier_groups([0, 1, 2, 3], 2)
    with pytest.raises(ValueError, match="S=3 must divide"):
        hier_groups([0, 0, 0, 0], 3)


def test_predicted_placement_packs_largest_nodes_first() -> None:
    gpu_nodes = [{"CPU": 8.0}] + [{"CPU": 8.0, "GPU": 1.0}] * 4  # a head without a GPU
    assert predicted_learners_per_node(4, {"CPU": 1, "GPU": 1}, gpu_nodes) == [1, 1, 1, 1]
    cpu_nodes = [{"CPU": 4.0}, {"CPU": 8.0}, {"CPU": 8.0}]
    assert predicted_learners_per_node(6, {"CPU": 2}, cpu_nodes) == [4, 2]
    assert predicted_learners_per_node(4, {"CPU": 2}, cpu_nodes) == [4]


def _hier(P: int, S: int, **extra: object) -> RunConfig:
    return RunConfig.model_validate(
        {"algorithm": "hier_avg", "P": P, "S": S, "K1": 2, "K2": 4, **extra}
    )


def test_hier_groups_checked_before_launch() -> None:
    one_gpu_each = [{"CPU": 8.0, "GPU": 1.0}] * 4
    gpu = {"resources": {"use_gpu": True}}
    refusal = r"S=2 does not divide .*\(1\+1\+1\+1 learners on 4 nodes\)"
    with pytest.raises(SweepError, match=refusal):
        check_hier_groups([_hier(4, 2, **gpu)], one_gpu_each)
    check_hier_groups([_hier(4, 2, hier_groups="any", **gpu)], one_gpu_each)
    check_hier_groups([_hier(4, 1, **gpu)], one_gpu_each)  # S = 1: no local average
    two_gpus_each = [{"CPU": 8.0, "GPU": 2.0}] * 2
    check_hier_groups([_hier(4, 2, **gpu)], two_gpus_each)
    with pytest.raises(SweepError, match="S=4"):
        check_hier_groups([_hier(4, 4, K1=2, **gpu)], two_gpus_each)


def test_hier_groups_key_validated() -> None:
    with pytest.raises(ValueError, match="hier_groups"):
        RunConfig.model_validate({"algorithm": "kavg", "K": 2, "hier_groups": "any"})
    with pytest.raises(ValueError, match="hier_groups"):
        _hier(4, 2, hier_groups="nodes")


def _local_average_over_placed_groups(rank: int, world: int) -> None:
    nodes = gather_nodes(rank % 2, world, torch.device("cpu"))  # ranks 0, 2 | 1, 3
    assert nodes == [0, 1, 0, 1]
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(rank))
    avg = HierAvgAverager(model, 1, 2, 2, node_of_rank=nodes)
    assert avg.groups == [[0, 2], [1, 3]] and avg.groups_on_node
    avg.average_local()
    expected = 1.0 if rank % 2 == 0 else 2.0  # (0 + 2) / 2 and (1 + 3) / 2
    for p in model.parameters():
        assert torch.equal(p.detach(), torch.full_like(p, expected))
    with pytest.raises(GroupPlacementError):
        HierAvgAverager(torch.nn.Linear(3, 1), 1, 2, 2, node_of_rank=[0, 0, 0, 1])


def test_local_average_over_placed_groups() -> None:
    run_distributed(_local_average_over_placed_groups, 4)


def test_costmodel_prices_spanning_groups_on_inter_link() -> None:
    inter, intra = Link(1e-3, 1e9), Link(1e-6, 1e11)
    net = Network("two-level", inter, intra)
    trial = {
        "sweep": "s", "trial_id": "t", "algorithm": "hier_avg", "model": "m", "dataset": "d",
        "backend": "ray", "P": 4, "S": 2, "batch_size": 8, "status": "completed",
        "local_on_node": 1.0,
    }  # fmt: skip
    hist = {
        "sweep": "s", "trial_id": "t", "epoch": 1, "samples": 320, "rounds": 3,
        "global_reductions": 3, "local_reductions": 7, "bytes_communicated": 1000,
        "compute_time_s": 1.0, "wall_time_s": 2.0, "test_acc": 0.5,
    }  # fmt: skip
    import pandas as pd

    nbytes = 100.0  # 1000 bytes over 10 reductions
    global_s = 3 * allreduce_time(4, nbytes, inter)
    for on_node, link in ((1.0, intra), (0.0, inter)):
        trials = pd.DataFrame([{**trial, "local_on_node": on_node}])
        out = predict_trials(trials, pd.DataFrame([hist]), net, step_time=0.0)
        want = global_s + 7 * allreduce_time(2, nbytes, link)
        assert out["predicted_comm_time_s"].iloc[0] == pytest.approx(want, rel=1e-12)


def _engine_groups_follow_nodes(rank: int, world: int, nodes: list[int], on_node: float) -> None:
    import torch.distributed as dist

    from kavg_ray.train.loop import run_epochs
    from kavg_ray.train.run import build_engine

    cfg = RunConfig.model_validate({
        "algorithm": "hier_avg", "P": world, "S": 2, "K1": 1, "K2": 10_000, "seed": 3,
        "hier_groups": "node" if on_node else "any",
        "workload": {"dataset": "digits", "model": "mlp", "epochs": 1, "batch_size": 64},
    })  # fmt: skip
    engine = build_engine(cfg, rank, world, torch.device("cpu"), node_rank=nodes[rank])
    last = run_epochs(cfg, engine, lambda metrics, state: None)
    assert last["local_on_node"] == on_node and last["local_reductions"] > 0
    # Every step ended with a local average and none with a global one: the learners of
    # a group hold the same model, the groups differ.
    flat = engine.averager.flat.buffer
    models = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(models, flat)
    for group in engine.averager.groups:
        assert all(torch.equal(models[group[0]], models[r]) for r in group)
    (a, *_), (b, *_) = engine.averager.groups[:2]
    assert not torch.equal(models[a], models[b])


@pytest.mark.parametrize(("nodes", "on_node"), [([0, 1, 0, 1], 1.0), ([0, 0, 0, 1], 0.0)])
def test_engine_groups_follow_nodes(nodes: list[int], on_node: float) -> None:
    run_distributed(_engine_groups_follow_nodes, 4, nodes, on_node)
