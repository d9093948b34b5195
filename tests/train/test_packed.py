"""Packed simulated runs (kavg_ray.train.packed): each point's rows are those of the point
run alone, a diverging point loses none of the others, and packs split to fit memory."""

from __future__ import annotations

import math

import pytest

from kavg_ray.config import RunConfig
from kavg_ray.train import train
from kavg_ray.train.packed import pack_key, pack_memory_bytes, run_pack, split_packs

BASE = {
    "workload": {"dataset": "digits", "model": "mlp", "epochs": 2, "batch_size": 16,
                 "lr": {"initial": 0.1}},
    "backend": "simulated", "P": 4,
}  # fmt: skip


def cfg(**over) -> RunConfig:
    doc = {**BASE, **over}
    doc["workload"] = {**BASE["workload"], **over.get("workload", {})}
    return RunConfig.model_validate(doc)


POINTS = [
    cfg(K=2, seed=0),
    cfg(K=8, seed=1, workload={"lr": {"initial": 0.05}, "momentum": 0.9}),
    cfg(algorithm="hier_avg", S=2, K1=2, K2=6, seed=2),
    cfg(K=4, seed=3, outer={"lr": 0.7, "momentum": 0.9, "nesterov": True}, warmup_steps=3),
    cfg(K=3, seed=4, workload={"optimizer": "adamw", "lr": {"initial": 0.003},
                               "weight_decay": 0.01}),
]  # fmt: skip


def alone(c: RunConfig) -> list[dict]:
    out: list[dict] = []
    train(c, lambda m, _state: out.append(m))
    return out


def packed(cfgs: list[RunConfig]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {i: [] for i in range(len(cfgs))}
    done: dict[int, bool] = {}

    def report(i: int, m: dict, finished: bool) -> None:
        assert not done.get(i), "a point reported after its last row"
        out[i].append(m)
        done[i] = finished

    run_pack(cfgs, report)
    assert all(done.values())
    return out


def test_packed_points_equal_the_points_run_alone() -> None:
    assert len({pack_key(c) for c in POINTS}) == 1
    got = packed(POINTS)
    for i, c in enumerate(POINTS):
        ref = alone(c)
        assert [m["epoch"] for m in got[i]] == [1, 2]
        for a, b in zip(got[i], ref, strict=True):
            assert a["test_acc"] == b["test_acc"], (i, a["test_acc"], b["test_acc"])
            for key in ("test_loss", "train_loss"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), (i, key)
            for key in ("rounds", "samples", "global_reductions", "local_reductions", "lr"):
                assert a[key] == b[key], (i, key)
    # The points differ from one another: the pack did not run one point five times.
    assert len({round(got[i][-1]["train_loss"], 6) for i in got}) == len(POINTS)
    assert got[2][-1]["local_reductions"] > 0 and got[0][-1]["rounds"] == (2 * 22) // 2


def test_a_diverging_point_loses_none_of_the_others() -> None:
    bad = cfg(K=2, seed=5, workload={"lr": {"initial": 1e30}})
    got = packed([POINTS[0], bad, POINTS[3]])
    assert got[1][-1]["diverged"] is True and len(got[1]) == 1
    assert not math.isfinite(got[1][-1]["train_loss"])
    for i, c in ((0, POINTS[0]), (2, POINTS[3])):
        ref = alone(c)
        assert [m["test_acc"] for m in got[i]] == [m["test_acc"] for m in ref]
        assert got[i][-1]["diverged"] is False


def test_pack_keys_and_memory_split() -> None:
    assert pack_key(POINTS[0]) != pack_key(cfg(K=2, P=2))
    assert pack_key(POINTS[0]) != pack_key(cfg(K=2, workload={"batch_size": 32}))
    one = pack_memory_bytes([POINTS[0]])
    two = pack_memory_bytes(POINTS[:2])
    assert one < two < 2 * one  # the data set is held once
    cfgs = [cfg(K=k) for k in (1, 2, 4, 8, 16)]
    five = pack_memory_bytes(cfgs)
    assert [len(p) for p in split_packs(cfgs, five)] == [5]
    budget = pack_memory_bytes(cfgs[:2])
    assert [len(p) for p in split_packs(cfgs, budget)] == [2, 2, 1]
    assert [[c.K for c in p] for p in split_packs(cfgs, budget)] == [[1, 2], [4, 8], [16]]
    with pytest.raises(ValueError, match="needs ~"):
        split_packs(cfgs, one - 1)


@pytest.mark.parametrize("model", ["mlp1d", "cnn1d"])
def test_mnist1d_models_pack(model, tmp_path) -> None:
    """MNIST-1D's MLP and 1-D CNN stack in a pack: each point as it runs alone."""
    workload = {"dataset": "mnist1d", "model": model, "dataset_args": {"num_samples": 800},
                "data_dir": str(tmp_path), "lr": {"initial": 0.3}}  # fmt: skip
    points = [cfg(K=k, seed=s, workload=workload) for k, s in ((1, 0), (4, 1), (16, 0))]
    assert len({pack_key(c) for c in points}) == 1
    got = packed(points)
    for i, c in enumerate(points):
        for a, b in zip(got[i], alone(c), strict=True):
            assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1e-9), (i, model)
            for key in ("test_loss", "train_loss"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), (i, key)
            assert a["rounds"] == b["rounds"]
