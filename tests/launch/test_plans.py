"""The sweep-side glue of search and packs (kavg_ray.launch.plans), without a Ray cluster:
the refining plan's configs and names, resume from stored rows, the results callback for
pack and early-stopped trials, and the pack layout."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
from ray.tune.search import Searcher

from kavg_ray.analysis.results import ResultsStore
from kavg_ray.config import RunConfig, parse_sweep
from kavg_ray.launch import plans
from kavg_ray.launch.progress import TrialTracker
from kavg_ray.launch.sweep import _row, trial_row

SPEC = {
    "name": "r",
    "workload": {"dataset": "digits", "model": "mlp", "epochs": 2},
    "backend": "simulated",
    "search": {"strategy": "refine", "k_min": 1, "k_max": 16},
    "grid": {"P": [2], "seed": [0, 1]},
}
# Accuracy peaking at K = 6: coarse best 8, refined 6 and 11, then 5 and 7 around 6.
ACC = {k: 0.9 - 0.01 * abs(math.log2(k / 6)) for k in range(1, 17)}


def refine_plan(tmp_path: Path, registry: dict | None = None):
    spec = parse_sweep(SPEC)
    points = spec.points()
    registry = {p.trial_name(): p for p in points} if registry is None else registry
    return plans.RefinePlan(points, registry, spec.search, tmp_path), registry, points


def run_search(plan) -> list[str]:
    """A fake Tune loop, one trial at a time: the trial names in the order proposed."""
    names, n = [], 0
    while True:
        cfg = plan.searcher.suggest(f"t{n}")
        if cfg == Searcher.FINISHED or cfg is None:
            return names
        entry = cfg["trial"]
        names.append(entry["trial_id"])
        K = RunConfig.model_validate(entry["run"]).K
        plan.searcher.on_trial_complete(f"t{n}", {"test_acc": ACC[K], "epoch": 2})
        n += 1


def test_refined_points_are_registered_runs_with_the_usual_names(tmp_path: Path) -> None:
    plan, registry, points = refine_plan(tmp_path)
    assert [p.K for p in points[::2]] == [1, 2, 4, 8, 16]
    names = run_search(plan)
    coarse = [f"K{k}-P2-s{s}-sim" for k in (1, 2, 4, 8, 16) for s in (0, 1)]
    assert names[:10] == coarse
    refined = names[10:]
    assert [n.split("-")[0] for n in refined[::2]] == ["K6", "K11", "K5", "K7"]
    assert all(n in registry and registry[n].trial_name() == n for n in refined)
    k6 = registry["K6-P2-s1-sim"]
    assert (k6.K, k6.seed, k6.P, k6.backend, k6.workload.epochs) == (6, 1, 2, "simulated", 2)
    # A trial's early-stopping group: its P and seed, any K.
    e0, e1 = (plans.trial_entry(registry[f"K{k}-P2-s0-sim"], tmp_path) for k in (5, 6))
    assert e0["group"] == e1["group"]
    assert e0["group"] != plans.trial_entry(registry["K5-P2-s1-sim"], tmp_path)["group"]


def rows_for(names: list[str], registry: dict, status=lambda n: "completed") -> pd.DataFrame:
    rows = []
    for n in names:
        cfg = registry[n]
        hist = [{"epoch": 2, "test_acc": ACC[cfg.K], "test_loss": 0.1, "train_loss": 0.1}]
        rows.append(trial_row("r", n, cfg, hist, status(n)))
    return pd.DataFrame(rows)


def test_resume_feeds_stored_rows_and_a_bracketed_search_starts_nothing(tmp_path: Path) -> None:
    plan, registry, _ = refine_plan(tmp_path)
    names = run_search(plan)
    stored = rows_for(names, registry)
    again, _, _ = refine_plan(tmp_path, dict(registry))
    assert again.has_work()
    assert again.feed(stored) == len(names)
    assert not again.has_work()
    # Half the coarse grid stored: the rest is proposed, nothing stored is run again.
    half, reg, _ = refine_plan(tmp_path)
    half.feed(rows_for(names[:4], registry))
    assert half.has_work()  # probing leaves the searcher as it was
    assert run_search(half)[:6] == names[4:10]


def test_a_stopped_row_counts_for_nothing(tmp_path: Path) -> None:
    plan, registry, _ = refine_plan(tmp_path)
    names = run_search(plan)
    # K6 stopped on both seeds: the search has not bracketed K_opt without it.
    stored = rows_for(names, registry, lambda n: "stopped" if n.startswith("K6-") else "completed")
    again, _, _ = refine_plan(tmp_path, dict(registry))
    again.feed(stored)
    scores = again.searcher._groups[0].values[6]
    assert scores == {0: None, 1: None}


def test_row_status_stopped_unless_diverged(tmp_path: Path) -> None:
    cfg = parse_sweep(SPEC).points()[0]
    hist = [{"epoch": 1, "test_acc": 0.5, "test_loss": 1.0, "train_loss": 1.0}]
    row = _row("r", "x", cfg, hist, error="", failed=False, stopped="trails its group")
    assert (row["status"], row["error"]) == ("stopped", "trails its group")
    hist[-1]["diverged"] = True
    assert _row("r", "x", cfg, hist, error="", failed=False, stopped="d")["status"] == "diverged"
    assert _row("r", "x", cfg, hist[:0], error="boom", failed=True, stopped="d")["status"] == (
        "failed"
    )


def fake_trial(tid: str, entry: dict) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, config={"trial": entry}, error_file=None,
                           get_error=lambda: "RuntimeError: pack died")  # fmt: skip


def test_callback_writes_each_packed_point_as_soon_as_it_ends(tmp_path: Path) -> None:
    spec = parse_sweep({**SPEC, "search": "grid", "pack": True, "grid": {"K": [1, 2, 4], "P": [2]}})
    points = spec.points()
    store = ResultsStore(tmp_path)
    by_id = {p.trial_name(): p for p in points}
    tracker = TrialTracker(store, "r", by_id, list(by_id), echo=lambda _: None)
    (pack,) = plans.plan_packs(points)
    entry = plans.pack_entry(0, pack)
    assert entry["trial_id"] == "pack0-P2-3pts" and entry["points"] == list(by_id)
    cb = plans.make_callback(tracker, _row, {}, lambda t: t.get_error())
    trial = fake_trial("t0", entry)
    cb.on_trial_start(0, [], trial)
    epoch = {"test_acc": 0.8, "test_loss": 0.5, "train_loss": 0.4, "wall_time_s": 1.0}
    cb.on_trial_result(0, [], trial, {**epoch, "epoch": 1, "point": "K2-P2-s0-sim",
                                      "diverged": True, "point_done": True})  # fmt: skip
    cb.on_trial_result(0, [], trial, {**epoch, "epoch": 1, "point": "K1-P2-s0-sim",
                                      "point_done": False})  # fmt: skip
    rows = store.read_trials("r").set_index("trial_id")
    assert list(rows.index) == ["K2-P2-s0-sim"] and rows.loc["K2-P2-s0-sim", "status"] == (
        "diverged"
    )
    cb.on_trial_result(0, [], trial, {**epoch, "epoch": 2, "point": "K1-P2-s0-sim",
                                      "point_done": True})  # fmt: skip
    assert store.read_trials("r").set_index("trial_id").loc["K1-P2-s0-sim", "status"] == (
        "completed"
    )
    cb.on_trial_error(0, [], trial)  # K4 never reported: failed, with the pack's error
    rows = store.read_trials("r").set_index("trial_id")
    assert rows.loc["K4-P2-s0-sim", "status"] == "failed"
    assert rows.loc["K4-P2-s0-sim", "error"] == "RuntimeError: pack died"
    assert rows.loc["K1-P2-s0-sim", "status"] == "completed"  # not rewritten
    assert len(store.read_history("r")) == 3


def test_callback_marks_early_stopped_trials(tmp_path: Path) -> None:
    cfg = parse_sweep({**SPEC, "search": "grid", "grid": {"K": [4]}}).points()[0]
    store = ResultsStore(tmp_path)
    tracker = TrialTracker(store, "r", {cfg.trial_name(): cfg}, [cfg.trial_name()],
                           echo=lambda _: None)  # fmt: skip
    reason = "test_acc 0.5 at epoch 1 trails the best of its group (0.9, trial t1) by more"
    cb = plans.make_callback(tracker, _row, {"t7": reason}, lambda t: "")
    trial = fake_trial("t7", plans.trial_entry(cfg, tmp_path))
    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, {"epoch": 1, "test_acc": 0.5, "train_loss": 1.0,
                                      "test_loss": 1.0})  # fmt: skip
    cb.on_trial_complete(0, [], trial)
    (row,) = store.read_trials("r").to_dict("records")
    assert (row["status"], row["error"]) == ("stopped", reason)


def test_packs_group_by_workload_and_p_and_split_to_fit() -> None:
    spec = parse_sweep({**SPEC, "search": "grid", "pack": True,
                        "grid": {"K": [1, 2, 4], "P": [1, 2], "lr": [0.1, 0.05]}})  # fmt: skip
    points = spec.points()
    packs = plans.plan_packs(points)
    assert [len(p) for p in packs] == [6, 6]
    assert [{c.P for c in p} for p in packs] == [{1}, {2}]
    from kavg_ray.train.packed import pack_memory_bytes

    budget = pack_memory_bytes(packs[1][:4])
    small = plans.plan_packs(points, budget)
    assert sorted(len(p) for p in small if p[0].P == 2) == [2, 4]


def test_a_regression_workload_is_searched_by_test_loss() -> None:
    def metric(workload: dict) -> tuple[str, str]:
        spec = {**SPEC, "workload": {"model": "linear", "epochs": 1, **workload}}
        return plans.search_metric(parse_sweep(spec).points())

    assert metric({"dataset": "digits"}) == ("test_acc", "max")
    assert metric({"dataset": "synthetic"}) == ("test_acc", "max")
    least_squares = {"dataset": "synthetic", "synthetic": {"task": "least_squares"}}
    assert metric(least_squares) == ("test_loss", "min")
