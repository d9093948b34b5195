"""Finding K_opt with fewer trials: a refining K search and early stopping (docs/design.md s. 11).

Each part is pure, deterministic logic with a thin Tune wrapper around it.

**Refining search.** Per group of grid points that share a K_opt (same P and every other
setting; seeds are replicates), the coarse K grid runs first (the spec's K list; powers of
two by default, :func:`coarse_grid`). A K's score is the mean over its seeds of the metric
(diverged, failed or early-stopped seeds excluded, as in ``results.kopt_table``; a K with
no usable seed never wins). Then, round after round (:func:`refine_ks`): with best K b
(ties: the smallest K) and its nearest tried neighbours lo < b < hi, a K is added between
lo and b when ``b - lo > 1`` and between b and hi when ``hi - b > 1``, at the geometric
midpoint ``round(sqrt(lo * b))`` (kept strictly inside). The search of a group stops when
both neighbours are adjacent integers or b is the smallest or largest K tried (the grid's
edges: K never leaves the coarse grid's range). A round starts only when every trial of
the previous one finished, so the proposals depend only on the results, not on timing.
A point with a ``candidate`` coordinate (a K_schedule's label, ``adacomm(K0=4)``) joins the
group of the same point without it: it runs in the coarse round on every seed, as a
candidate beside the K, and never takes part in the refinement.

**Early stopping.** :class:`EarlyStopRule` stops a trial that diverged (a report with
``diverged`` true, or a non-finite metric or ``train_loss``), or whose metric at an epoch
trails the best value reported at that epoch by any trial of its group by more than
``margin`` (from epoch ``min_epoch`` on). "Best so far": a trial is compared with the
trials that reported that epoch before it. Grouping trials by P *and seed* (the other K
of the same seed) is safer than by P alone: ``benchmarks/early_stop.py`` (RESULTS.md)
shows the seeds of one P differing by more than its K do at early epochs.

**Wiring** (a sweep runner, in the Ray driver)::

    from ray import tune
    from kavg_ray.launch.search import EarlyStopScheduler, RefineSearcher, point_group

    coords = [{"K": p.K, "P": p.P, "seed": p.seed, "lr": p.workload.lr.initial}
              for p in points]                     # flat grid coordinates, one per point
    scheduler = EarlyStopScheduler(margin=0.05, group_of=lambda cfg: cfg["group"])
    searcher = RefineSearcher(
        coords,
        # compare a trial with the other K of its seed: seeds differ by more than K does
        to_config=lambda c: {"group": repr(point_group(c, ("K",))), "trial": make_trial(c)},
        metric="test_acc", mode="max", pruned=scheduler.stopped,
    )
    tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=-1,
                    max_concurrent_trials=n)     # param_space={}: the searcher gives configs

``to_config(coords)`` builds the Tune trial config of one point (it is called with K
values the grid did not list); ``searcher.trial_coords(trial_id)`` gives a trial's
coordinates back. On ``--resume``, feed the finished rows of the results store first
with ``searcher.add_evaluated_point(coords, value)`` (value None for a diverged or stopped
trial) so that they are not run again. Tune saves and restores both plug-ins with the
experiment (``save``/``restore``).
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Container, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from kavg_ray.analysis.results import _mean_std, _tied
from kavg_ray.errors import BadInputError

__all__ = [
    "EarlyStopRule",
    "EarlyStopScheduler",
    "RefineSearcher",
    "best_k",
    "coarse_grid",
    "geometric_midpoint",
    "k_scores",
    "point_group",
    "refine_ks",
]

Score = float | None


def _check_mode(mode: str) -> float:
    if mode not in ("max", "min"):
        raise BadInputError(f"mode must be 'max' or 'min', got {mode!r}")
    return 1.0 if mode == "max" else -1.0


def coarse_grid(k_min: int = 1, k_max: int = 256) -> list[int]:
    """The powers of two in [k_min, k_max], with k_min and k_max themselves."""
    if not (isinstance(k_min, int) and isinstance(k_max, int) and 1 <= k_min <= k_max):
        raise BadInputError(f"need integers 1 <= k_min <= k_max, got {k_min!r}, {k_max!r}")
    ks = {k_min, k_max}
    q = 1
    while q <= k_max:
        if q >= k_min:
            ks.add(q)
        q *= 2
    return sorted(ks)


def k_scores(values: Mapping[int, Iterable[Score]]) -> dict[int, Score]:
    """Mean of each K's usable values (None and non-finite excluded); None if it has none."""
    out: dict[int, Score] = {}
    for k, vals in values.items():
        usable = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
        out[k] = _mean_std(usable)[0] if usable else None
    return out


def best_k(scores: Mapping[int, Score], mode: str = "max") -> int | None:
    """The K with the best score (ties, as in ``kopt_table``: the smallest K); None if none."""
    sign = _check_mode(mode)
    best = None
    for k in sorted(scores):
        s = scores[k]
        if s is None:
            continue
        if best is None or (sign * s > sign * scores[best] and not _tied(s, scores[best])):
            best = k
    return best


def geometric_midpoint(lo: int, hi: int) -> int:
    """``round(sqrt(lo * hi))``, kept strictly between lo and hi (needs hi - lo >= 2)."""
    if hi - lo < 2:
        raise ValueError(f"no integer strictly between {lo} and {hi}")
    return min(max(round(math.sqrt(lo * hi)), lo + 1), hi - 1)


def refine_ks(scores: Mapping[int, Score], mode: str = "max") -> list[int]:
    """The K to try next (ascending, none already tried); [] when K_opt is bracketed.

    ``scores``: every K tried so far -> its score (None: no usable run).
    """
    b = best_k(scores, mode)
    if b is None:
        return []
    tried = sorted(scores)
    i = tried.index(b)
    out = []
    if i > 0 and b - tried[i - 1] > 1:
        out.append(geometric_midpoint(tried[i - 1], b))
    if i + 1 < len(tried) and tried[i + 1] - b > 1:
        out.append(geometric_midpoint(b, tried[i + 1]))
    return out


def point_group(coords: Mapping[str, Any], exclude: Iterable[str] = ("K", "seed")) -> tuple:
    """The refinement group of grid coordinates: every (key, value) but K and the seed."""
    skip = set(exclude)
    return tuple(sorted((k, v) for k, v in coords.items() if k not in skip))


# --------------------------------------------------------------------------- refining searcher


@dataclass
class _Group:
    """One refinement group's bookkeeping (plain data: pickled by save)."""

    base: dict[str, Any]
    seeds: list[Any]
    coarse: list[int]
    values: dict[int | str, dict[Any, Score]] = field(default_factory=dict)
    queue: list[tuple[int | str, Any]] = field(default_factory=list)
    running: set[tuple[int | str, Any]] = field(default_factory=set)
    done: bool = False
    proposed: list[int] = field(default_factory=list)
    # Candidates beside the K (a K_schedule's points, by label): run with the coarse round
    # on every seed, never refined; their coordinates (K0 included) by label.
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)

    def missing(self, ks: Iterable[int | str]) -> list[tuple[int | str, Any]]:
        return [(k, s) for k in ks for s in self.seeds if s not in self.values.get(k, {})]

    def plan(self, mode: str) -> None:
        """Queue the next round, or mark the group done (only when nothing is running)."""
        fixed = {k: v for k, v in self.values.items() if not isinstance(k, str)}
        todo = self.missing(sorted(set(self.coarse) | set(fixed))) + self.missing(self.extras)
        if not todo:
            scores = k_scores({k: v.values() for k, v in fixed.items()})
            new = refine_ks(scores, mode)
            todo = self.missing(new)
        self.queue = todo
        self.proposed += sorted({k for k, _ in todo
                                 if not isinstance(k, str) and k not in self.proposed})
        self.done = not todo


def _int_k(value: Any) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = 0
    if isinstance(value, bool) or k != value or k < 1:
        raise BadInputError(f"the refining search needs integer K >= 1, got {value!r}")
    return k


#: The coordinate that names a candidate beside the K (a K_schedule's label): such points
#: share the group of the fixed K and are run, not refined.
CANDIDATE_KEY = "candidate"


def _group_points(coords: Sequence[Mapping[str, Any]], k_key: str, seed_key: str) -> list[_Group]:
    groups: dict[tuple, _Group] = {}
    for c in coords:
        if k_key not in c:
            raise BadInputError(f"grid point {dict(c)!r} has no {k_key!r}")
        key = point_group(c, (k_key, seed_key, CANDIDATE_KEY))
        g = groups.setdefault(key, _Group(dict(key), [], []))
        k, seed = _int_k(c[k_key]), c.get(seed_key)
        if c.get(CANDIDATE_KEY) is not None:
            g.extras[str(c[CANDIDATE_KEY])] = {k_key: k, CANDIDATE_KEY: c[CANDIDATE_KEY]}
        elif k not in g.coarse:
            g.coarse.append(k)
        if seed not in g.seeds:
            g.seeds.append(seed)
    for g in groups.values():
        g.coarse.sort()
    return list(groups.values())


class RefineSearcher(Searcher):
    """Tune searcher: the coarse K grid per group, then :func:`refine_ks` rounds.

    ``coords``: the grid points as flat mappings holding ``k_key`` and ``seed_key`` (a
    missing seed is one seed, None). Points equal but for K and seed form a group; its
    coarse grid is their K values, its seeds their seeds (every K runs every seed).
    ``to_config(coords)`` turns a point into the Tune trial config (default: the coords).
    ``pruned``: trial ids whose result must not count (e.g. ``EarlyStopScheduler.stopped``).
    """

    def __init__(
        self,
        coords: Sequence[Mapping[str, Any]],
        to_config: Callable[[dict[str, Any]], dict[str, Any]] = dict,
        *,
        metric: str = "test_acc",
        mode: str = "max",
        k_key: str = "K",
        seed_key: str = "seed",
        pruned: Container[str] = (),
    ) -> None:
        _check_mode(mode)
        if not coords:
            raise BadInputError("the refining search needs at least one grid point")
        super().__init__(metric=metric, mode=mode)
        self._to_config = to_config
        self._k_key, self._seed_key = k_key, seed_key
        self._pruned = pruned
        self._groups = _group_points(coords, k_key, seed_key)
        self._trials: dict[str, tuple[int, int, Any]] = {}

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        """Accept Tune's metric and mode when they agree with the searcher's own."""
        return metric in (None, self._metric) and mode in (None, self._mode)

    def coords_of(self, group: int, k: int | str, seed: Any) -> dict[str, Any]:
        """The grid coordinates of one trial of group index ``group`` (``k``: a K, or a
        candidate's label)."""
        g = self._groups[group]
        out = {**g.base, **g.extras[k]} if isinstance(k, str) else {**g.base, self._k_key: k}
        if seed is not None or self._seed_key in self._groups[group].base:
            out[self._seed_key] = seed
        return out

    def trial_coords(self, trial_id: str) -> dict[str, Any] | None:
        """The coordinates suggested for ``trial_id`` while it runs (None once finished)."""
        if trial_id not in self._trials:
            return None
        return self.coords_of(*self._trials[trial_id])

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """The next point's config; None while a round waits for results; FINISHED."""
        for gi, g in enumerate(self._groups):
            if not g.queue and not g.running and not g.done:
                g.plan(self._mode)
            if g.queue:
                k, seed = g.queue.pop(0)
                g.running.add((k, seed))
                self._trials[trial_id] = (gi, k, seed)
                return self._to_config(self.coords_of(gi, k, seed))
        if all(g.done for g in self._groups):
            return Searcher.FINISHED
        return None

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """Record the trial's final metric (None when it errored, diverged or was stopped)."""
        entry = self._trials.pop(trial_id, None)
        if entry is None:
            return
        gi, k, seed = entry
        g = self._groups[gi]
        g.running.discard((k, seed))
        usable = not error and result is not None and trial_id not in self._pruned
        g.values.setdefault(k, {})[seed] = self._value(result) if usable else None

    def _value(self, result: Mapping[str, Any]) -> Score:
        v = result.get(self._metric)
        if result.get("diverged") or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        return float(v)

    def add_evaluated_point(
        self,
        parameters: Mapping[str, Any],
        value: float | None,
        error: bool = False,
        pruned: bool = False,
        intermediate_values: list[float] | None = None,
    ) -> None:
        """Record a finished point (e.g. a results-store row on resume): not run again."""
        key = point_group(parameters, (self._k_key, self._seed_key, CANDIDATE_KEY))
        for g in self._groups:
            if point_group(g.base, ()) == key:
                ok = not (error or pruned) and value is not None and math.isfinite(value)
                label = parameters.get(CANDIDATE_KEY)
                k = str(label) if label is not None else _int_k(parameters[self._k_key])
                g.values.setdefault(k, {})[parameters.get(self._seed_key)] = (
                    float(value) if ok else None
                )
                return
        raise BadInputError(f"point {dict(parameters)!r} is not in the searched grid")

    def proposed(self) -> list[list[int]]:
        """Per group (in grid order), the K in the order the search queued them."""
        return [list(g.proposed) for g in self._groups]

    def get_state(self) -> dict:
        return {"groups": self._groups, "trials": self._trials}

    def set_state(self, state: dict) -> None:
        self._groups, self._trials = state["groups"], state["trials"]

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.get_state(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.set_state(pickle.load(fh))


# --------------------------------------------------------------------------- early stopping


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


class EarlyStopRule:
    """Decides, report by report, which trials to stop (pure; state in plain dicts).

    ``margin``: how far (in the metric's units, e.g. 0.05 accuracy) a trial may trail the
    best value of its group at the same epoch. ``best`` maps (group, epoch) to (value,
    trial id); ``stopped`` maps a stopped trial id to the reason.
    """

    def __init__(
        self,
        margin: float,
        *,
        metric: str = "test_acc",
        mode: str = "max",
        min_epoch: int = 1,
        epoch_key: str = "epoch",
    ) -> None:
        if _number(margin) is None or not (0.0 <= margin < math.inf):
            raise BadInputError(f"early_stop margin must be a number >= 0, got {margin!r}")
        if not isinstance(min_epoch, int) or isinstance(min_epoch, bool) or min_epoch < 0:
            raise BadInputError(f"early_stop min_epoch must be an integer >= 0, got {min_epoch!r}")
        self.sign = _check_mode(mode)
        self.margin, self.metric, self.mode = float(margin), metric, mode
        self.min_epoch, self.epoch_key = min_epoch, epoch_key
        self.best: dict[tuple[Hashable, Any], tuple[float, str]] = {}
        self.stopped: dict[str, str] = {}

    def diverged(self, result: Mapping[str, Any]) -> str | None:
        """Why ``result`` shows a diverged run (a flag or a non-finite metric), else None."""
        epoch = result.get(self.epoch_key)
        if result.get("diverged"):
            return f"diverged at epoch {epoch}"
        for key in (self.metric, "train_loss"):
            v = _number(result.get(key))
            if v is not None and not math.isfinite(v):
                return f"{key} is {v} at epoch {epoch}: diverged"
        return None

    def trails(self, trial_id: str, group: Hashable, result: Mapping[str, Any]) -> str | None:
        """Record the report; why the trial trails its group's best by > margin, else None."""
        value, epoch = _number(result.get(self.metric)), result.get(self.epoch_key)
        if value is None or epoch is None:
            return None
        key = (group, epoch)
        best = self.best.get(key)
        if best is None or self.sign * value > self.sign * best[0]:
            self.best[key] = (value, trial_id)
            return None
        if _number(epoch) is None or epoch < self.min_epoch:
            return None
        if self.sign * (best[0] - value) > self.margin:
            return (
                f"{self.metric} {value:.4g} at epoch {epoch} trails the best of its group "
                f"({best[0]:.4g}, trial {best[1]}) by more than {self.margin:g}"
            )
        return None

    def decide(self, trial_id: str, group: Hashable, result: Mapping[str, Any]) -> str | None:
        """The reason to stop ``trial_id`` after this report, or None to let it go on."""
        if trial_id in self.stopped:
            return self.stopped[trial_id]
        reason = self.diverged(result) or self.trails(trial_id, group, result)
        if reason:
            self.stopped[trial_id] = reason
        return reason


def _config_p(config: Mapping[str, Any]) -> Hashable:
    return config.get("P")


class EarlyStopScheduler(FIFOScheduler):
    """Tune scheduler: runs trials in order (FIFO) and stops those :class:`EarlyStopRule`
    names. ``group_of(trial.config)`` gives a trial's group (default: its ``P`` key)."""

    def __init__(
        self,
        margin: float,
        *,
        metric: str = "test_acc",
        mode: str = "max",
        min_epoch: int = 1,
        epoch_key: str = "epoch",
        group_of: Callable[[Mapping[str, Any]], Hashable] = _config_p,
    ) -> None:
        super().__init__()
        self.rule = EarlyStopRule(
            margin, metric=metric, mode=mode, min_epoch=min_epoch, epoch_key=epoch_key
        )
        self._group_of = group_of

    @property
    def stopped(self) -> dict[str, str]:
        """trial id -> why it was stopped (the same dict for the scheduler's whole life)."""
        return self.rule.stopped

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        reason = self.rule.decide(trial.trial_id, self._group_of(trial.config), result)
        return TrialScheduler.STOP if reason else TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return (
            f"Early stopping: diverged, or {self.rule.metric} more than {self.rule.margin:g} "
            f"behind its group's best at an epoch ({len(self.stopped)} stopped)."
        )

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump({"best": self.rule.best, "stopped": self.rule.stopped}, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        self.rule.best = state["best"]
        self.rule.stopped.clear()  # in place: a searcher may hold this dict
        self.rule.stopped.update(state["stopped"])
