"""A K_schedule in the refining search: its points join the group of the fixed K, run with
the coarse round on every seed, and are never refined (kavg_ray/launch/search.py), without
Ray."""

from __future__ import annotations

from pathlib import Path

from ray.tune.search import Searcher

from kavg_ray.config import SearchConfig, parse_run
from kavg_ray.launch.plans import RefinePlan, coords_of
from kavg_ray.launch.search import RefineSearcher

from .test_search import POW2, REFINED_23, drive, grid, peak_at

ADA = "adacomm(K0=4)"


def _objective(c: dict) -> float:
    return 100.0 if c.get("candidate") else peak_at(23)(c["K"])  # the schedule wins


def test_a_schedule_runs_beside_the_K_and_is_not_refined() -> None:
    points = grid(ps=(2,), seeds=(0, 1)) + [
        {"P": 2, "K": 4, "seed": s, "candidate": ADA} for s in (0, 1)
    ]
    searcher = RefineSearcher(points)
    order, cfgs = [], []

    def objective(c: dict) -> float:
        cfgs.append(c)
        order.append(c.get("candidate") or c["K"])
        return _objective(c)

    drive(searcher, objective=objective)
    # The same refinement as without the schedule, although the schedule scored best.
    assert searcher.proposed() == [POW2 + REFINED_23]
    # The schedule ran in the first round, on both seeds, once each, at its own K0.
    first_round = order[: 2 * (len(POW2) + 1)]
    assert first_round.count(ADA) == 2 and order.count(ADA) == 2
    assert [c["K"] for c in cfgs if c.get("candidate")] == [4, 4]
    assert sorted(c["seed"] for c in cfgs if c.get("candidate")) == [0, 1]


def test_a_finished_schedule_is_not_run_again_on_resume() -> None:
    searcher = RefineSearcher(grid(ps=(2,), ks=[16, 32, 64]) + [
        {"P": 2, "K": 4, "seed": 0, "candidate": ADA}])  # fmt: skip
    searcher.add_evaluated_point({"P": 2, "K": 4, "seed": 0, "candidate": ADA}, 0.5)
    cfgs = [searcher.suggest(f"t{i}") for i in range(4)]
    assert [c["K"] for c in cfgs[:3]] == [16, 32, 64] and cfgs[3] is None
    for i, c in enumerate(cfgs[:3]):
        searcher.on_trial_complete(f"t{i}", {"test_acc": peak_at(23)(c["K"])})
    assert searcher.suggest("t4")["K"] == 23
    searcher.on_trial_complete("t4", {"test_acc": 0.0})
    while (c := searcher.suggest("tx")) not in (None, Searcher.FINISHED):
        searcher.on_trial_complete("tx", {"test_acc": peak_at(23)(c["K"])})
    assert all(not k == ADA for k in searcher.proposed()[0])


def test_a_sweeps_schedule_points_share_the_group_and_come_back_as_themselves() -> None:
    doc = {"workload": {"dataset": "digits", "model": "mlp",
                        "lr": {"initial": 0.1, "halve_every_epochs": 1}},
           "K": 4, "P": 2, "backend": "simulated"}  # fmt: skip
    fixed = parse_run(doc)
    ada = parse_run({**doc, "K_schedule": "adacomm", "K_interval": 20})
    stage = parse_run({**doc, "K": 2, "K_schedule": "stagewise"})
    c_fixed, c_ada, c_stage = coords_of(fixed), coords_of(ada), coords_of(stage)
    assert c_fixed["config"] == c_ada["config"] == c_stage["config"]
    assert "candidate" not in c_fixed
    assert c_ada["candidate"] == "adacomm(K0=4,K_interval=20)"
    assert c_stage["candidate"] == "stagewise(K0=2)"
    plan = RefinePlan([fixed, ada, stage], {}, SearchConfig(strategy="refine"), Path("/tmp/x"))
    assert plan.config_of(c_ada) == ada and plan.config_of(c_stage) == stage
    assert plan.config_of({**c_fixed, "K": 8}).K == 8
    assert plan.config_of({**c_fixed, "K": 8}).K_schedule == "constant"
