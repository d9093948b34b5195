"""How a sweep's grid points become Tune trials (DESIGN.md section 11).

Three layouts, chosen by the spec's ``search:`` and ``pack:``:

- **grid** (default): one trial per grid point, a ``TorchTrainer`` with P workers.
- **refine**: :class:`~kavg_ray.launch.search.RefineSearcher` proposes the trials: the
  coarse K of each group (grid points equal but for K and seed), then K between the best
  and its neighbours until K_opt is bracketed. A refined K is the RunConfig of its group's
  grid point with that K, named as usual (``K23-P2-s0-sim``) and registered so that the
  results callback writes its row. On ``--resume`` the finished rows of the store are fed
  to the searcher first (:meth:`RefinePlan.feed`): they are not run again, and a search
  that has bracketed every K_opt starts nothing.
- **pack** (``pack: true``, simulated only): one trial per *pack*, the grid points that
  share workload and P (:func:`kavg_ray.train.packed.pack_key`), split when the pack's
  estimated memory exceeds what the device has. The trial runs the pack in its own process
  (no Ray Train worker group: the simulated backend needs one process) and reports each
  point's epochs with a ``point`` key; the callback writes a point's row as soon as its
  last epoch (or its divergence) arrives.

Early stopping (``search.early_stop``, grid or refine) goes through
:class:`~kavg_ray.launch.search.EarlyStopScheduler`. A trial is compared with the trials of
the same P *and seed* (and every other setting), that is with the other K of its seed, not
with every trial of its P: on a recorded 4-epoch grid (``benchmarks/early_stop.py``,
RESULTS.md) comparing across seeds stopped trials because of their seed, and changed K_opt
in 4 of 12 cases; comparing within a seed changed none. A stopped trial's row has status
``stopped`` and the reason in ``error``; it never counts as K_opt.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kavg_ray.analysis.results import FINISHED_STATUSES
from kavg_ray.config import RunConfig, SearchConfig
from kavg_ray.launch.progress import TrialTracker
from kavg_ray.metrics import is_finite_number

__all__ = [
    "Layout",
    "RefinePlan",
    "grid_layout",
    "make_callback",
    "pack_layout",
    "plan_packs",
    "refine_layout",
    "search_metric",
    "trial_entry",
    "trial_exception",
]


def search_metric(points: list[RunConfig]) -> tuple[str, str]:
    """What a search ranks K by: final test accuracy, or test loss for a regression task
    (``workload.task: regression``, or the synthetic least-squares task)."""
    for p in points:
        wl = p.workload
        synthetic_task = (wl.synthetic or {}).get("task") if wl.dataset == "synthetic" else None
        if wl.task == "regression" or synthetic_task == "least_squares":
            return "test_loss", "min"
    return "test_acc", "max"


# A K_schedule and its parameters: a schedule's points join the group of the fixed K.
_SCHEDULE_KEYS = {"K_schedule", "K_factor", "K_min", "K_max", "K_interval"}


def group_key(cfg: RunConfig) -> str:
    """A grid point's configuration but K, seed and K_schedule: its refinement group."""
    return cfg.model_dump_json(exclude={"K", "seed", *_SCHEDULE_KEYS})


def candidate_of(cfg: RunConfig) -> str | None:
    """A K_schedule point's label (``adacomm(K0=4)``), a candidate the refining search
    runs beside the fixed K and never refines; None for a fixed K."""
    from kavg_ray.analysis.schedules import candidate_label

    return candidate_label({"K": cfg.K, **{k: getattr(cfg, k) for k in _SCHEDULE_KEYS}})


def coords_of(cfg: RunConfig) -> dict[str, Any]:
    """The searcher's flat coordinates of a point (``config``: everything else; a
    schedule's point adds its ``candidate`` label)."""
    out = {"K": cfg.K, "seed": cfg.seed, "P": cfg.P, "config": group_key(cfg)}
    label = candidate_of(cfg)
    return out if label is None else {**out, "candidate": label}


def early_stop_group(cfg: RunConfig) -> str:
    """The early-stopping comparison group: the same P, seed and settings, any K."""
    return f"{group_key(cfg)}|seed={cfg.seed}"


def with_k(cfg: RunConfig, k: int) -> RunConfig:
    """``cfg`` with averaging period ``k`` (its trial name follows)."""
    return cfg.model_copy(update={"K": int(k)}, deep=True)


def trial_entry(cfg: RunConfig, sweep_root: Path) -> dict[str, Any]:
    """The Tune config (``trial`` key) of a one-point trial."""
    return {
        "trial_id": cfg.trial_name(), "run": cfg.model_dump(mode="json"),
        "train_storage": str(sweep_root / "ray" / "train"), "group": early_stop_group(cfg),
    }  # fmt: skip


def _scheduler(search: SearchConfig | None, points: list[RunConfig]) -> Any:
    if search is None or search.early_stop is None:
        return None
    from kavg_ray.launch.search import EarlyStopScheduler

    metric, mode = search_metric(points)
    return EarlyStopScheduler(
        search.early_stop.margin, metric=metric, mode=mode,
        min_epoch=search.early_stop.min_epoch, group_of=lambda c: c["trial"]["group"],
    )  # fmt: skip


@dataclass
class Layout:
    """What the Tuner gets: the trainable, its param space and TuneConfig arguments."""

    trainable: Any
    param_space: dict[str, Any]
    tune_kwargs: dict[str, Any] = field(default_factory=dict)
    stopped: Mapping[str, str] = field(default_factory=dict)  # Tune trial id -> reason


def grid_layout(
    todo: list[RunConfig], sweep_root: Path, trainable: Callable, search: SearchConfig | None
) -> Layout:
    """One trial per grid point (early stopping when the spec asks for it)."""
    from ray import tune

    scheduler = _scheduler(search, todo)
    space = {"trial": tune.grid_search([trial_entry(p, sweep_root) for p in todo])}
    kwargs = {"scheduler": scheduler} if scheduler is not None else {}
    stopped = scheduler.stopped if scheduler is not None else {}
    return Layout(tune.with_resources(trainable, {"CPU": 0, "memory": 2**20}), space, kwargs,
                  stopped)  # fmt: skip


class RefinePlan:
    """The refining search of one sweep: its searcher, scheduler and point registry."""

    def __init__(
        self, points: list[RunConfig], registry: dict[str, RunConfig], search: SearchConfig,
        sweep_root: Path,
    ) -> None:  # fmt: skip
        from kavg_ray.launch.search import RefineSearcher

        self.registry, self.sweep_root = registry, sweep_root
        self.bases = {(group_key(p), p.seed, candidate_of(p)): p for p in points}
        self.scheduler = _scheduler(search, points)
        metric, mode = search_metric(points)
        self.searcher = RefineSearcher(
            [coords_of(p) for p in points], self.to_config, metric=metric, mode=mode,
            pruned=self.scheduler.stopped if self.scheduler is not None else (),
        )  # fmt: skip

    def config_of(self, coords: Mapping[str, Any]) -> RunConfig:
        """The RunConfig of searcher coordinates (a grid point's, with the K asked for)."""
        base = self.bases[(coords["config"], coords["seed"], coords.get("candidate"))]
        return with_k(base, coords["K"])

    def to_config(self, coords: dict[str, Any]) -> dict[str, Any]:
        """The Tune config of a proposed point, registered under its trial name."""
        cfg = self.config_of(coords)
        self.registry[cfg.trial_name()] = cfg
        return {"trial": trial_entry(cfg, self.sweep_root)}

    def feed(self, trials: pd.DataFrame) -> int:
        """Hand the searcher the finished rows of a resumed sweep; returns how many."""
        metric = "final_test_loss" if self.searcher.metric == "test_loss" else "final_test_acc"
        ks = pd.to_numeric(trials.get("K", pd.Series(dtype=float)), errors="coerce").dropna()
        names = {}
        for key, base in self.bases.items():
            for k in [base.K] if key[2] else sorted({int(k) for k in ks if k >= 1}):
                cfg = with_k(base, k)
                names[cfg.trial_name()] = cfg
        n = 0
        for row in trials.to_dict("records"):
            cfg = names.get(str(row["trial_id"]))
            if cfg is None or row["status"] not in FINISHED_STATUSES:
                continue
            value = row.get(metric)
            usable = row["status"] == "completed" and is_finite_number(value)
            self.searcher.add_evaluated_point(
                coords_of(cfg), float(value) if usable else None,
                pruned=row["status"] == "stopped",
            )  # fmt: skip
            n += 1
        return n

    def has_work(self) -> bool:
        """Whether the search would start a trial now (probed, then put back as it was)."""
        saved = copy.deepcopy(self.searcher.get_state())
        to_config = self.searcher._to_config
        self.searcher._to_config = dict
        try:
            return isinstance(self.searcher.suggest("kavg-probe"), dict)
        finally:
            self.searcher._to_config = to_config
            self.searcher.set_state(saved)


def refine_layout(plan: RefinePlan, trainable: Callable) -> Layout:
    """Trials proposed by the refining searcher, as long as it has any."""
    from ray import tune

    kwargs: dict[str, Any] = {"search_alg": plan.searcher, "num_samples": -1}
    if plan.scheduler is not None:
        kwargs["scheduler"] = plan.scheduler
    stopped = plan.scheduler.stopped if plan.scheduler is not None else {}
    return Layout(tune.with_resources(trainable, {"CPU": 0, "memory": 2**20}), {}, kwargs,
                  stopped)  # fmt: skip


# --------------------------------------------------------------------------- packs


GIB = 2**30
#: GiB of the GPUs Ray names by accelerator type (ray.util.accelerators; the node label
#: ``ray.io/accelerator-type``, the resource ``accelerator_type:NAME``): the smallest
#: model that goes by each name (an "A100" may have 40 or 80).
GPU_MEMORY_GIB = {
    "K80": 12, "P4": 8, "P100": 12, "V100": 16, "T4": 16, "A10G": 24, "L4": 24, "L40S": 48,
    "A100": 40, "A100-40G": 40, "A100-80G": 80, "H100": 80, "H20": 96, "H200": 141,
    "B200": 180,
}  # fmt: skip
#: Of a GPU's memory, the share a trial is planned to use (CUDA's context, the allocator).
USABLE_FRACTION = 0.9
ACCELERATOR_LABEL = "ray.io/accelerator-type"
ACCELERATOR_RESOURCE = "accelerator_type:"


def gpu_node_types(nodes: list[dict[str, Any]]) -> list[str | None]:
    """The accelerator type of each alive node with GPUs (``ray.nodes()`` entries), None
    where Ray reports none."""
    types = []
    for n in nodes:
        res = n.get("Resources") or {}
        if not n.get("Alive", True) or res.get("GPU", 0) <= 0:
            continue
        kind = (n.get("Labels") or {}).get(ACCELERATOR_LABEL) or next(
            (k[len(ACCELERATOR_RESOURCE):] for k in res if k.startswith(ACCELERATOR_RESOURCE)),
            None,
        )  # fmt: skip
        types.append(kind)
    return types


def reported_gpu_budget(nodes: list[dict[str, Any]]) -> tuple[int | None, str]:
    """:data:`USABLE_FRACTION` of the smallest GPU among the cluster's GPU nodes, by the
    type Ray reports, and what that is; None when a type is missing or of unknown memory."""
    types = gpu_node_types(nodes)
    if not types:
        return None, "the cluster reports no GPU node"
    unknown = sorted({str(t) for t in types if t not in GPU_MEMORY_GIB})
    if unknown:
        return None, f"the cluster's GPU type {unknown[0]} has no known memory"
    smallest = min(types, key=lambda t: GPU_MEMORY_GIB[t])
    gib = GPU_MEMORY_GIB[smallest]
    return int(gib * USABLE_FRACTION * GIB), (
        f"{USABLE_FRACTION:.0%} of a {smallest} ({gib} GiB), the cluster's smallest GPU"
    )


def memory_budget(
    cfg: RunConfig, *, local: bool, nodes: list[dict[str, Any]] | None = None
) -> tuple[int | None, str]:
    """Bytes a simulated or packed trial of ``cfg`` may use on the device that will run it,
    and where the number comes from. On CPUs: this machine's available memory. On GPUs:
    ``resources.gpu_memory_gb``; else the local GPU's free memory (a local Ray); else, on
    a cluster, what Ray reports for its GPU nodes (``nodes``: ``ray.nodes()``, read when
    None). None: not known here; the worker checks before training."""
    import torch

    from kavg_ray.train.stacked import available_memory_bytes

    res = cfg.resources
    if not res.use_gpu:
        return available_memory_bytes(torch.device("cpu")), "available on this machine"
    if res.gpu_memory_gb is not None:
        return int(res.gpu_memory_gb * GIB), "resources.gpu_memory_gb"
    if local:
        if not torch.cuda.is_available():
            return None, "no local GPU"
        return available_memory_bytes(torch.device("cuda")), "free on the local GPU"
    if nodes is None:
        import ray

        nodes = ray.nodes()
    return reported_gpu_budget(nodes)


def plan_packs(
    todo: list[RunConfig], budget_bytes: int | None = None, *, local: bool = True,
    nodes: list[dict[str, Any]] | None = None,
) -> list[list[RunConfig]]:  # fmt: skip
    """The packs of ``todo``: points of one pack key, in grid order, split to fit memory
    (``budget_bytes``: default, :func:`memory_budget` of the device that will run them;
    when that is not known, packs are not split and the worker checks)."""
    from kavg_ray.train.packed import pack_key, split_packs

    if budget_bytes is None:
        budget_bytes = memory_budget(todo[0], local=local, nodes=nodes)[0] or 2**62
    by_key: dict[str, list[RunConfig]] = {}
    for p in todo:
        by_key.setdefault(pack_key(p), []).append(p)
    return [pack for group in by_key.values() for pack in split_packs(group, budget_bytes)]


def pack_entry(index: int, pack: list[RunConfig]) -> dict[str, Any]:
    """The Tune config (``trial`` key) of a pack trial."""
    return {
        "trial_id": f"pack{index}-P{pack[0].P}-{len(pack)}pts",
        "points": [c.trial_name() for c in pack],
        "runs": [c.model_dump(mode="json") for c in pack],
    }


def _pack_fn(config: dict) -> None:
    """One pack trial: the packed points in this process, each epoch reported per point."""
    import torch
    from ray import tune

    from kavg_ray.train.packed import run_pack

    trial = config["trial"]
    cfgs = [RunConfig.model_validate(r) for r in trial["runs"]]
    res = cfgs[0].resources
    torch.set_num_threads(max(1, int(res.cpus_per_worker)))
    device = torch.device("cuda" if res.use_gpu and torch.cuda.is_available() else "cpu")
    ids = trial["points"]

    def report(i: int, metrics: dict, done: bool) -> None:
        tune.report({**metrics, "point": ids[i], "point_done": done})

    run_pack(cfgs, report, device=device)


def pack_layout(packs: list[list[RunConfig]]) -> Layout:
    """One trial per pack, holding the CPUs (and GPU) of one simulated trial."""
    from ray import tune

    res = packs[0][0].resources
    need = {"CPU": res.cpus_per_worker, "memory": 2**20}
    if res.use_gpu:
        need["GPU"] = res.gpus_per_worker
    space = {"trial": tune.grid_search([pack_entry(i, p) for i, p in enumerate(packs)])}
    return Layout(tune.with_resources(_pack_fn, need), space)


# --------------------------------------------------------------------------- results


def trial_exception(trial: Any) -> BaseException | None:
    """The exception a failed Tune trial ended with, as Tune pickled it (a RayTaskError or
    RayActorError, with what it wraps); None when Tune pickled none or it cannot be read."""
    # The trial's local copy first: Tune writes it before calling back, and syncs the copy
    # in storage (what get_pickled_error reads) only later.
    path = getattr(trial, "pickled_error_file", None)
    stored = getattr(trial, "get_pickled_error", None)
    try:
        if path and Path(path).is_file():
            from ray import cloudpickle

            with open(path, "rb") as f:
                exc = cloudpickle.load(f)
        else:
            exc = stored() if stored is not None else None
    except Exception:  # a class this driver lacks, a truncated file: the trial's reason
        return None  # then comes from its error text
    return exc if isinstance(exc, BaseException) else None


def make_callback(
    tracker: TrialTracker,
    row_fn: Callable[..., dict],
    stopped: Mapping[str, str],
    error_text: Callable[[Any], str],
    error_exception: Callable[[Any], BaseException | None] = trial_exception,
) -> Any:  # a ray.tune.Callback
    """The Tune callback that hands trials (or the points of pack trials) to ``tracker``:
    a point's row is written at its last report, a trial's when it ends. A failed trial's
    ``error_text`` (Tune's error file) is saved, and its ``error_exception`` says why."""
    from ray.tune import Callback

    def points(trial: Any) -> list[str]:
        entry = trial.config["trial"]
        return list(entry.get("points") or [entry["trial_id"]])

    def still_open(trial: Any) -> list[str]:
        return [p for p in points(trial) if p not in tracker.statuses]

    class ResultsCallback(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):  # noqa: ANN001
            entry = trial.config["trial"]
            if entry.get("points"):  # a pack: its points, with one line for them all
                tracker.start_pack(entry["trial_id"], points(trial))
                return
            tracker.start(entry["trial_id"])

        def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
            point = result.get("point") or trial.config["trial"]["trial_id"]
            tracker.result(point, result)
            if result.get("point_done"):
                tracker.finish(point, None, row_fn)

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
            reason = stopped.get(trial.trial_id, "")
            fn = functools.partial(row_fn, stopped=reason) if reason else row_fn
            for p in still_open(trial):
                tracker.finish(p, None, fn)

        def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
            text, exc = error_text(trial) or "", error_exception(trial)
            for p in still_open(trial):
                tracker.finish(p, text, row_fn, exc)

    return ResultsCallback()
