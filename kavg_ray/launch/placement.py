"""Before launch: will Hier-AVG's groups of S learners each share a node?

Ray Train places a trial's workers with its default PACK strategy: as few nodes as
possible. From the cluster's nodes, :func:`check_hier_groups` predicts how many learners
each node gets and refuses a Hier-AVG point whose S does not divide them, unless the point
says ``hier_groups: any``. The workers check again from where they actually run
(kavg_ray.train.groups), so a placement that differs from the prediction still cannot
average across nodes unnoticed.
"""

from __future__ import annotations

from collections.abc import Sequence

from kavg_ray.config import RunConfig
from kavg_ray.errors import SweepError


def predicted_learners_per_node(
    workers: int, per_worker: dict[str, float], nodes: Sequence[dict[str, float]]
) -> list[int]:
    """How Ray Train's default PACK placement spreads ``workers`` over ``nodes``
    (each node's total resources): the nodes that hold the most workers first."""
    capacity = []
    for node in nodes:
        fits = [int(node.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items() if v > 0]
        capacity.append(min(fits) if fits else workers)
    counts, left = [], workers
    for cap in sorted(capacity, reverse=True):
        if left <= 0 or cap <= 0:
            break
        counts.append(min(cap, left))
        left -= counts[-1]
    return counts


def alive_node_resources() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected Ray cluster."""
    from kavg_ray.launch.nodes import alive_nodes

    return [dict(n["Resources"]) for n in alive_nodes()]


def check_hier_groups(
    points: Sequence[RunConfig], nodes: Sequence[dict[str, float]] | None = None
) -> None:
    """Refuse a Hier-AVG point on Ray Train whose groups would span nodes."""
    hier = [p for p in points if p.algorithm == "hier_avg" and p.backend == "ray"]
    hier = [p for p in hier if p.hier_groups == "node" and p.S > 1]
    if not hier:
        return
    nodes = alive_node_resources() if nodes is None else nodes
    for cfg in hier:
        res = cfg.resources
        per_worker = {"CPU": res.cpus_per_worker}
        if res.use_gpu:
            per_worker["GPU"] = res.gpus_per_worker
        counts = predicted_learners_per_node(cfg.workers, per_worker, nodes)
        if any(c % cfg.S for c in counts):
            raise SweepError(
                f"trial {cfg.trial_name()}: Hier-AVG group size S={cfg.S} does not divide "
                f"the learners per node on this cluster ({'+'.join(map(str, counts))} "
                f"learners on {len(counts)} nodes), so local averages would cross nodes: "
                "choose S dividing them, or set hier_groups: any"
            )
