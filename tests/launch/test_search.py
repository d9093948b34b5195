"""Tests for kavg_ray.launch.search: the refining K search and early stopping, without Ray.

Tune's Searcher and Scheduler classes are driven directly with fake trial ids, results and
trials (no Ray cluster is started).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from kavg_ray.errors import BadInputError
from kavg_ray.launch.search import (
    EarlyStopRule,
    EarlyStopScheduler,
    RefineSearcher,
    best_k,
    coarse_grid,
    refine_ks,
)

POW2 = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# Optimum 23 (acc = -(log2 K - log2 23)^2): coarse best 32, then 23 wins and is bracketed.
REFINED_23 = [23, 45, 19, 27, 21, 25, 22, 24]
# Accuracy growing with K: K_opt is the grid's upper edge; refined only from below.
REFINED_EDGE = [181, 215, 235, 245, 250, 253, 254, 255]


def peak_at(opt: float):
    return lambda k: -((math.log2(k) - math.log2(opt)) ** 2)


OBJECTIVES = {2: peak_at(23), 4: lambda k: float(k), 8: lambda k: -float(k)}


def drive(searcher, objective=lambda c: OBJECTIVES[c["P"]](c["K"]), concurrency=1, lifo=False):
    """A fake Tune loop: keep up to ``concurrency`` trials running; complete in FIFO or LIFO."""
    running, order, n = [], [], 0
    while True:
        while len(running) < concurrency:
            tid = f"t{n}"
            cfg = searcher.suggest(tid)
            if cfg is None or cfg == Searcher.FINISHED:
                break
            n += 1
            running.append((tid, cfg))
            order.append((cfg["P"], cfg["K"], cfg.get("seed")))
        if not running:
            assert searcher.suggest(f"t{n}") == Searcher.FINISHED
            return order
        tid, cfg = running.pop() if lifo else running.pop(0)
        searcher.on_trial_complete(tid, {"test_acc": objective(cfg)})


def grid(ps=(2, 4, 8), seeds=(0,), ks=POW2):
    return [{"P": p, "K": k, "seed": s} for p in ps for k in ks for s in seeds]


# --------------------------------------------------------------------------- pure logic


def test_coarse_grid_and_bad_bounds():
    assert coarse_grid() == POW2
    assert coarse_grid(3, 100) == [3, 4, 8, 16, 32, 64, 100]
    with pytest.raises(BadInputError):
        coarse_grid(0, 8)


def test_refine_ks_rules():
    assert refine_ks({k: peak_at(23)(k) for k in POW2}) == [23, 45]
    assert refine_ks({16: 0.5, 32: 0.9, 33: 0.8, 31: 0.7}) == []  # neighbours adjacent
    assert refine_ks({1: 0.9, 2: 0.5, 4: 0.1}) == []  # best at the lower edge, 2 adjacent
    assert refine_ks({1: 0.1, 4: 0.9}) == [2]  # upper edge: only the left gap
    assert refine_ks({1: None, 8: None}) == []  # nothing usable: nothing to refine
    assert refine_ks({1: 0.5, 4: 0.5, 16: 0.1}) == [2]  # tie: smallest K is best
    assert refine_ks({4: 10.0, 8: 1.0, 16: 5.0}, mode="min") == [6, 11]
    assert best_k({2: None, 4: 0.3}) == 4


# --------------------------------------------------------------------------- searcher


def test_refine_search_proposes_the_exact_sequence():
    searcher = RefineSearcher(grid())
    order = drive(searcher)
    assert searcher.proposed() == [POW2 + REFINED_23, POW2 + REFINED_EDGE, POW2]
    assert [k for p, k, _ in order if p == 2] == POW2 + REFINED_23
    assert len(order) == 3 * 9 + len(REFINED_23) + len(REFINED_EDGE)


def test_refine_search_same_proposals_under_concurrency_and_seeds():
    searcher = RefineSearcher(grid(seeds=(0, 1)))
    order = drive(searcher, concurrency=5, lifo=True)
    assert searcher.proposed() == [POW2 + REFINED_23, POW2 + REFINED_EDGE, POW2]
    assert sorted(order) == sorted(
        (p, k, s) for p, ks in zip((2, 4, 8), searcher.proposed(), strict=True)
        for k in ks for s in (0, 1)
    )  # fmt: skip


def test_refine_search_waits_for_a_round_then_finishes():
    searcher = RefineSearcher(grid(ps=(2,), ks=[16, 32, 64]))
    cfgs = [searcher.suggest(f"t{i}") for i in range(3)]
    assert [c["K"] for c in cfgs] == [16, 32, 64]
    assert searcher.suggest("t3") is None  # the round is not finished yet
    for i, c in enumerate(cfgs):
        searcher.on_trial_complete(f"t{i}", {"test_acc": peak_at(23)(c["K"])})
    assert searcher.suggest("t4")["K"] == 23


def test_refine_search_save_restore_resumes_the_same_search(tmp_path):
    first = RefineSearcher(grid())
    for i in range(12):  # part of the coarse round, two trials left running
        cfg = first.suggest(f"t{i}")
        if i < 10:
            first.on_trial_complete(f"t{i}", {"test_acc": OBJECTIVES[cfg["P"]](cfg["K"])})
    path = tmp_path / "searcher.pkl"
    first.save(str(path))
    second = RefineSearcher(grid())
    second.restore(str(path))
    assert second.trial_coords("t10") == {"P": 2, "K": 45, "seed": 0}  # still running
    assert second.trial_coords("t9") is None  # finished before the save
    for i in (10, 11):
        c = second.trial_coords(f"t{i}")
        second.on_trial_complete(f"t{i}", {"test_acc": OBJECTIVES[c["P"]](c["K"])})
    drive(second)
    assert second.proposed() == [POW2 + REFINED_23, POW2 + REFINED_EDGE, POW2]


def test_refine_search_resumes_from_evaluated_points():
    searcher = RefineSearcher(grid(ps=(2,)), to_config=lambda c: {"point": c})
    for k in POW2:
        searcher.add_evaluated_point({"P": 2, "K": k, "seed": 0}, peak_at(23)(k))
    assert searcher.suggest("t0") == {"point": {"P": 2, "K": 23, "seed": 0}}
    with pytest.raises(BadInputError, match="not in the searched grid"):
        searcher.add_evaluated_point({"P": 3, "K": 4, "seed": 0}, 0.5)


def test_pruned_diverged_and_failed_trials_never_win():
    stopped = {"t1": "early stop"}
    searcher = RefineSearcher(grid(ps=(2,), ks=[1, 4, 16, 64]), pruned=stopped)
    cfgs = [searcher.suggest(f"t{i}") for i in range(4)]
    searcher.on_trial_complete("t0", {"test_acc": 0.5})  # K=1
    searcher.on_trial_complete("t1", {"test_acc": 0.99})  # K=4, pruned
    searcher.on_trial_complete("t2", {"test_acc": 0.98, "diverged": True})  # K=16
    searcher.on_trial_complete("t3", None, error=True)  # K=64
    assert [c["K"] for c in cfgs] == [1, 4, 16, 64]
    assert searcher.suggest("t4")["K"] == 2  # best is K=1: refine towards K=4 only


def test_refine_search_rejects_bad_grids():
    with pytest.raises(BadInputError, match="integer K"):
        RefineSearcher([{"P": 2, "K": 2.5, "seed": 0}])
    with pytest.raises(BadInputError, match="mode"):
        RefineSearcher(grid(), mode="best")
    with pytest.raises(BadInputError, match="at least one"):
        RefineSearcher([])


def test_refine_search_works_behind_tunes_concurrency_limiter():
    searcher = RefineSearcher(grid(ps=(2,)))
    limited = ConcurrencyLimiter(searcher, max_concurrent=3)
    order = drive(limited, concurrency=10)
    assert [k for _, k, _ in order] == POW2 + REFINED_23
    assert searcher.set_search_properties("test_acc", "max", {}) is True
    assert searcher.set_search_properties("loss", "min", {}) is False


# --------------------------------------------------------------------------- early stopping

# (trial, P, report) in arrival order; margin 0.125, from epoch 1. Dyadic values: exact.
HISTORY = [
    ("a", 2, {"epoch": 1, "test_acc": 0.5}),
    ("b", 2, {"epoch": 1, "test_acc": 0.25}),  # 0.25 behind a: stop
    ("c", 2, {"epoch": 1, "test_acc": 0.375}),  # exactly the margin behind: go on
    ("d", 4, {"epoch": 1, "test_acc": 0.125}),  # its own P: best of P=4
    ("a", 2, {"epoch": 2, "test_acc": 0.625}),
    ("c", 2, {"epoch": 2, "test_acc": 0.5}),  # exactly the margin behind: go on
    ("e", 2, {"epoch": 2, "test_acc": 0.625, "train_loss": float("nan")}),  # diverged
    ("f", 2, {"epoch": 1, "test_acc": 0.5, "diverged": True}),  # diverged
    ("h", 2, {"epoch": 0, "test_acc": 0.5}),
    ("g", 2, {"epoch": 0, "test_acc": 0.0}),  # before min_epoch: go on
    ("c", 2, {"epoch": 3, "test_acc": 0.875}),
    ("a", 2, {"epoch": 3, "test_acc": 0.625}),  # the early leader now trails: stop
    ("d", 4, {"epoch": 2, "test_acc": 0.75}),
]
STOPPED = {"b", "e", "f", "a"}


def test_early_stop_rule_stops_exactly_the_expected_trials():
    rule = EarlyStopRule(0.125)
    decisions = [rule.decide(t, p, r) for t, p, r in HISTORY]
    assert {t for (t, _, _), d in zip(HISTORY, decisions, strict=True) if d} == STOPPED
    assert [bool(d) for d in decisions] == [
        False, True, False, False, False, False, True, True, False, False, False, True, False,
    ]  # fmt: skip
    assert set(rule.stopped) == STOPPED
    assert rule.stopped["b"] == (
        "test_acc 0.25 at epoch 1 trails the best of its group (0.5, trial a) by more than 0.125"
    )
    assert rule.stopped["f"] == "diverged at epoch 1"
    assert rule.stopped["e"] == "train_loss is nan at epoch 2: diverged"


def test_early_stop_scheduler_returns_stop_for_those_trials(tmp_path):
    sched = EarlyStopScheduler(0.125, group_of=lambda cfg: cfg["trial"]["P"])
    trials = {t: SimpleNamespace(trial_id=t, config={"trial": {"P": p}}) for t, p, _ in HISTORY}
    out = [sched.on_trial_result(None, trials[t], r) for t, _, r in HISTORY]
    stops = {t for (t, _, _), d in zip(HISTORY, out, strict=True) if d == TrialScheduler.STOP}
    assert stops == STOPPED
    assert set(out) == {TrialScheduler.STOP, TrialScheduler.CONTINUE}
    held = sched.stopped
    path = tmp_path / "sched.pkl"
    sched.save(str(path))
    fresh = EarlyStopScheduler(0.125, group_of=lambda cfg: cfg["trial"]["P"])
    fresh.restore(str(path))
    assert set(fresh.stopped) == STOPPED and held is sched.stopped
    # The restored best values still apply: 0.5 at epoch 3 trails c's 0.875.
    late = SimpleNamespace(trial_id="z", config={"trial": {"P": 2}})
    assert fresh.on_trial_result(None, late, {"epoch": 3, "test_acc": 0.5}) == "STOP"


def test_early_stop_minimises_losses_and_rejects_bad_options():
    rule = EarlyStopRule(1.0, metric="test_loss", mode="min")
    assert rule.decide("a", 1, {"epoch": 1, "test_loss": 2.0}) is None
    assert rule.decide("b", 1, {"epoch": 1, "test_loss": 3.0}) is None  # exactly 1.0 worse
    assert rule.decide("c", 1, {"epoch": 1, "test_loss": 3.5}) is not None
    with pytest.raises(BadInputError, match="margin"):
        EarlyStopRule(-0.1)
    with pytest.raises(BadInputError, match="min_epoch"):
        EarlyStopRule(0.1, min_epoch=-1)
