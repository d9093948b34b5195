"""Hier-AVG's groups of S learners, formed from where the learners run.

A local average is meant to stay on one node (the cost model prices it on the intra-node
link), so the learners of a group share a node: each node's ranks, in rank order, are cut
into groups of S. When S does not divide some node's learner count the run is refused,
unless the config says ``hier_groups: any``: then the ranks, node by node, are cut into
groups of S and some groups span two nodes (their averages cross the network, and the
cost model prices them on the inter-node link).

Torch only (the node of each rank comes from Ray Train's context or torchrun's
environment, see :func:`node_rank_from_env`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from kavg_ray.train import collectives


class GroupPlacementError(ValueError):
    """S does not divide the learners of some node, and groups may not span nodes."""


def hier_groups(
    node_of_rank: Sequence[int], group_size: int, across_nodes: bool = False
) -> list[list[int]]:
    """The groups of ``group_size`` ranks, given each rank's node (``node_of_rank[r]``).

    Nodes are taken in the order of their lowest rank; inside a node, ranks in order.
    With every learner on one node this is today's consecutive ranks 0..S-1, S..2S-1, ...
    """
    P, S = len(node_of_rank), group_size
    if S < 1 or P % S:
        raise ValueError(f"group_size S={S} must divide the number of learners P={P}")
    by_node: dict[int, list[int]] = {}
    for rank, node in enumerate(node_of_rank):
        by_node.setdefault(int(node), []).append(rank)
    uneven = {node: len(r) for node, r in by_node.items() if len(r) % S}
    if uneven and not across_nodes:
        counts = ", ".join(f"node {n}: {c}" for n, c in uneven.items())
        raise GroupPlacementError(
            f"Hier-AVG group size S={S} does not divide the learners per node ({counts}), "
            "so a local average would cross nodes: choose S dividing the learners per node, "
            "or set hier_groups: any to allow it"
        )
    order = [rank for ranks in by_node.values() for rank in ranks]
    return [order[i : i + S] for i in range(0, P, S)]


def groups_on_node(groups: Sequence[Sequence[int]], node_of_rank: Sequence[int]) -> bool:
    """Whether every group's learners share a node."""
    return all(len({node_of_rank[r] for r in g}) == 1 for g in groups)


def node_rank_from_env() -> int:
    """This process's node under torchrun (``GROUP_RANK``), else 0 (one node)."""
    return int(os.environ.get("GROUP_RANK", 0))


def gather_nodes(node_rank: int, world_size: int, device: torch.device) -> list[int]:
    """Every rank's node: one small all-reduce over the world, called by every rank."""
    if world_size == 1:
        return [node_rank]
    nodes = torch.zeros(world_size, dtype=torch.int64, device=device)
    nodes[dist.get_rank()] = node_rank
    collectives.all_reduce(nodes, device)
    return [int(n) for n in nodes.tolist()]
