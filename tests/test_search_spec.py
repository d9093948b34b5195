"""`search:` and `pack:` in a sweep spec: parsing, defaults and one-line refusals."""

from __future__ import annotations

import pytest

from kavg_ray.analysis.results import FINISHED_STATUSES, kopt_table
from kavg_ray.config import ConfigError, coarse_k_grid, parse_sweep

BASE = {
    "name": "s",
    "workload": {"dataset": "digits", "model": "mlp", "epochs": 1},
    "backend": "simulated",
}


def names(spec) -> list[str]:
    return [p.trial_name() for p in spec.points()]


def test_default_is_grid_packed_when_every_point_can_be() -> None:
    spec = parse_sweep({**BASE, "grid": {"K": [1, 4], "P": [2]}})
    assert spec.search.strategy == "grid" and spec.search.early_stop is None
    assert spec.pack is True  # simulated kavg on a grid: packed by default
    assert names(spec) == ["K1-P2-s0-sim", "K4-P2-s0-sim"]
    assert parse_sweep({**BASE, "pack": False, "grid": {"K": [1, 4], "P": [2]}}).pack is False


@pytest.mark.parametrize(
    ("extra", "grid"),
    [
        ({"backend": "ray"}, {"K": [1, 4], "P": [2]}),  # one real point is enough
        ({"variants": [{}, {"backend": "ray"}]}, {"K": [1], "P": [2]}),
        ({"algorithm": "downpour", "backend": "ray", "fetch_period": 1, "push_period": 1},
         {"P": [2, 4]}),
        ({"search": "refine"}, {"P": [2]}),
        ({"search": {"early_stop": {}}}, {"K": [1, 4], "P": [2]}),
    ],
)
def test_what_cannot_be_packed_runs_one_trial_per_point_silently(extra: dict, grid: dict) -> None:
    assert parse_sweep({**BASE, **extra, "grid": grid}).pack is False


def test_refine_without_k_list_uses_powers_of_two_in_range() -> None:
    spec = parse_sweep(
        {**BASE, "search": {"strategy": "refine", "k_min": 3, "k_max": 20}, "grid": {"P": [2]}}
    )
    assert [p.K for p in spec.points()] == [3, 4, 8, 16, 20]
    spec = parse_sweep({**BASE, "search": "refine", "grid": {"P": [2], "seed": [0, 1]}})
    assert sorted({p.K for p in spec.points()}) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert len(spec.points()) == 18


def test_refine_with_k_list_keeps_it_and_early_stop_parses() -> None:
    spec = parse_sweep(
        {**BASE, "search": {"strategy": "refine", "early_stop": {"margin": 0.1}},
         "grid": {"K": [2, 16], "P": [2]}}
    )  # fmt: skip
    assert [p.K for p in spec.points()] == [2, 16]
    assert spec.search.early_stop.margin == 0.1 and spec.search.early_stop.min_epoch == 1


def test_early_stop_with_grid_and_pack_with_grid() -> None:
    spec = parse_sweep(
        {**BASE, "search": {"early_stop": {"margin": 0.02, "min_epoch": 2}},
         "grid": {"K": [1, 2], "P": [2]}}
    )  # fmt: skip
    assert spec.search.strategy == "grid" and spec.search.early_stop.min_epoch == 2
    assert parse_sweep({**BASE, "pack": True, "grid": {"K": [1, 2], "P": [2]}}).pack is True


def test_coarse_grid_matches_the_searchers() -> None:
    from kavg_ray.launch.search import coarse_grid

    for lo, hi in [(1, 256), (3, 100), (5, 5), (1, 1), (6, 7)]:
        assert coarse_k_grid(lo, hi) == coarse_grid(lo, hi)


HIER = {"algorithm": "hier_avg", "S": 1, "K1": 1}


@pytest.mark.parametrize(
    ("extra", "grid", "message"),
    [
        ({"search": "best"}, {"K": [1]},
         "spec: search.strategy: Input should be 'grid' or 'refine'"),
        ({"search": 3}, {"K": [1]}, "spec: search: must be grid, refine or a mapping, got 3"),
        ({"search": {"strategy": "refine", "k_min": 9, "k_max": 8}}, {"P": [2]},
         "spec: search.k_min (9) is larger than k_max (8)"),
        ({"search": {"k_min": 0}}, {"K": [1]},
         "spec: search.k_min: Input should be greater than or equal to 1"),
        ({"search": {"early_stop": {"margin": -1}}}, {"K": [1]},
         "spec: search.early_stop.margin: Input should be greater than or equal to 0"),
        ({"search": {"early_stop": {"patience": 2}}}, {"K": [1]},
         "spec: search.early_stop.patience: unknown key"),
        ({"search": {"stategy": "refine"}}, {"K": [1]}, "spec: search.stategy: unknown key"),
        ({"search": "refine", "K": 4}, {"P": [2]},
         "spec: search: refine chooses K: list the coarse K in grid.K, or leave K out "
         "(powers of two in [k_min, k_max] = [1, 256])"),
        ({"search": "refine", **HIER, "K2": 2}, {"P": [2]},
         "spec: search: refine searches K of algorithm kavg, not hier_avg"),
        ({"search": "refine", "target_accuracy": 0.9}, {"P": [2]},
         "spec: search: refine ranks K by final test accuracy (or loss); target_accuracy "
         "(K_opt by time) needs search: grid"),
        ({"pack": "yes"}, {"K": [1]}, "spec: pack: must be true or false, got 'yes'"),
        ({"pack": True, "search": "refine"}, {"P": [2]},
         "spec: pack: true runs the whole grid stacked; search: refine chooses K round by "
         "round: use one of them"),
        ({"pack": True, "search": {"early_stop": {}}}, {"K": [1]},
         "spec: search.early_stop stops trials one by one: it needs pack: false"),
        ({"pack": True, "backend": "ray"}, {"K": [1], "P": [2]},
         "spec: pack: true stacks simulated kavg and hier_avg trials; grid point K1-P2-s0 is "
         "kavg on backend ray"),
    ],
)  # fmt: skip
def test_refused_in_one_line(extra: dict, grid: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_sweep({**BASE, **extra, "grid": grid})
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_stopped_is_finished_but_never_k_opt() -> None:
    import pandas as pd

    assert "stopped" in FINISHED_STATUSES and "failed" not in FINISHED_STATUSES
    trials = pd.DataFrame(
        {"algorithm": "kavg", "dataset": "digits", "model": "mlp", "P": 2,
         "K": [1, 2, 4], "status": ["completed", "stopped", "completed"],
         "final_test_acc": [0.80, 0.99, 0.85], "seed": 0}
    )  # fmt: skip
    (row,) = kopt_table(trials).to_dict("records")
    assert row["K_opt"] == 4 and row["n_excluded"] == 1
