"""The simulated backend (all P learners stacked in one process) against the real loop.

Float32 MLP runs match the sequential reference and the real gloo loop to rounding. The
CNN and BatchNorm runs are compared in float64: in float32 the batched kernels (grouped
convolutions, batched matmuls) round differently from the per-learner kernels, and after a
few dozen steps one such ulp can flip a ReLU or max-pool decision, after which the
trajectories drift apart by ~1e-3 although the algorithm is the same. In float64 that
does not happen within the test's steps, so any difference would be a semantic one.
"""

from __future__ import annotations

import functools
import math
import os
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from torch import nn

import kavg_ray.train.stacked as stacked
import kavg_ray.train.workload as wl_module
from kavg_ray.config import RunConfig
from kavg_ray.metrics import METRIC_KEYS
from kavg_ray.train import train
from kavg_ray.train.data import CIFAR10_MEAN, CIFAR10_STD, Dataset, load_dataset, random_crop_flip
from kavg_ray.train.loop import run_epochs
from kavg_ray.train.stacked import StackedEngine, estimate_memory_bytes, input_spec

from ..distributed import run_distributed
from ..workloads import diverging_least_squares
from . import test_process_group
from .test_process_group import _config, sequential_reference

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def _digits64(*args, **kwargs):
    """Digits in float64, cut to 448 training and 120 test images (batched float64
    convolutions are slow on CPU): P = 4, B = 16 still takes 7 steps per epoch."""
    data = load_dataset("digits")
    data.train_x, data.train_y = data.train_x[:448].double(), data.train_y[:448]
    data.test_x, data.test_y = data.test_x[:120].double(), data.test_y[:120]
    return data


def _bn_model(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 4, kernel_size=3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(4 * h * w, num_classes),
    )


@contextmanager
def _float64(monkeypatch: pytest.MonkeyPatch):
    """Models built in float64 and digits served in float64, for both loops."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    monkeypatch.setattr(wl_module, "load_dataset", _digits64)
    monkeypatch.setattr(test_process_group, "load_dataset", _digits64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _simulate(cfg: RunConfig, build=None, resume=None) -> tuple[list, list]:
    metrics, states = [], []

    def report(m: dict, s: dict | None) -> None:
        metrics.append(m)
        states.append(s)

    run_epochs(cfg, StackedEngine(cfg, CPU, build=build), report, resume)
    return metrics, states


def _max_diff(state: dict, references: list[dict]) -> float:
    tensors = {**state["engine"]["params"], **state["engine"]["buffers"]}
    worst = 0.0
    for rank, reference in enumerate(references):
        assert set(reference) == set(tensors)
        for name, value in reference.items():
            worst = max(worst, (tensors[name][rank].double() - value.double()).abs().max().item())
    return worst


CASES = {
    "kavg-P2": {"P": 2, "K": 3},
    "kavg-P4": {"P": 4, "K": 3},
    "hier-P4-S2": {"P": 4, "K": None, "algorithm": "hier_avg", "S": 2, "K1": 2, "K2": 6},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_equals_sequential_reference(case: str, model: str, monkeypatch) -> None:
    workload = {**_config().workload.model_dump(), "model": model}
    cfg = _config(**CASES[case], workload=workload)
    if model == "cnn":
        with _float64(monkeypatch):
            metrics, states = _simulate(cfg)
            reference = sequential_reference(cfg)
    else:
        metrics, states = _simulate(cfg)
        reference = sequential_reference(cfg)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert _max_diff(states[-1], reference) <= 1e-5
    # The learners were left as they are (not averaged) by the evaluation.
    w = states[-1]["engine"]["params"]["1.weight" if model == "mlp" else "0.weight"]
    assert not torch.equal(w[0], w[-1])
    steps = metrics[-1]["samples"] // (workload["batch_size"] * cfg.P)
    assert steps >= 12
    assert metrics[-1]["rounds"] == steps // cfg.period
    assert tuple(metrics[-1]) == METRIC_KEYS or set(metrics[-1]) == set(METRIC_KEYS)
    if cfg.algorithm == "hier_avg":
        assert metrics[-1]["local_reductions"] == steps // cfg.K1 - steps // cfg.K2


# ------------------------------------------------------------- against real gloo processes


def _real_runs(rank: int, world: int, out_dir: str, docs: dict) -> None:
    """Run each config with the real loop; save this rank's reports."""
    results = {}
    for key, (doc, float64, bn) in docs.items():
        cfg = RunConfig.model_validate(doc)
        before = torch.get_default_dtype(), wl_module.load_dataset, wl_module.build_model
        if float64:
            torch.set_default_dtype(torch.float64)
            wl_module.load_dataset = _digits64
        if bn:
            wl_module.build_model = lambda name, shape, classes: _bn_model(shape, classes)
        reports: list = []
        try:
            train(cfg, lambda m, s, out=reports: out.append((m, s)), rank=rank, world_size=world)
        finally:
            torch.set_default_dtype(before[0])
            wl_module.load_dataset, wl_module.build_model = before[1], before[2]
        metrics, state = reports[-1]
        results[key] = {"metrics": [m for m, _ in reports], "model": state["engine"]["model"]}
        dist.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_equals_real_gloo_loop(tmp_path, monkeypatch) -> None:
    """P = 2 real processes: an MLP (float32, metrics too), a BatchNorm model (float64,
    momentum and weight decay), and MNIST-1D's MLP and 1-D CNN (float32) trained by
    run_training equal the simulated learners."""
    mlp = _config(P=2, K=3)
    bn_workload = {
        **_config().workload.model_dump(),
        "momentum": 0.9,
        "weight_decay": 1e-3,
    }
    bn = _config(P=2, K=3, workload=bn_workload)
    # MNIST-1D with its two models (float32), made once here into the learners' cache.
    mnist1d = {
        model: _config(P=2, K=3, workload={
            **_config().workload.model_dump(), "dataset": "mnist1d", "model": model,
            "dataset_args": {"num_samples": 1000}, "data_dir": str(tmp_path / "data"),
        })  # fmt: skip
        for model in ("mlp1d", "cnn1d")
    }
    load_dataset("mnist1d", data_dir=tmp_path / "data", options={"num_samples": 1000})
    docs = {
        "mlp": (mlp.model_dump(mode="json"), False, False),
        "bn": (bn.model_dump(mode="json"), True, True),
        **{m: (cfg.model_dump(mode="json"), False, False) for m, cfg in mnist1d.items()},
    }
    run_distributed(_real_runs, 2, str(tmp_path), docs)
    real = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    sim_metrics, sim_states = _simulate(mlp)
    assert _max_diff(sim_states[-1], [r["mlp"]["model"] for r in real]) <= 1e-5
    for ours, theirs in zip(sim_metrics, real[0]["mlp"]["metrics"], strict=True):
        assert set(ours) == set(theirs)
        for key in ("epoch", "samples", "rounds", "lr", "diverged"):
            assert ours[key] == theirs[key], key
        for key in ("train_loss", "test_loss", "test_acc"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key
        assert ours["comm_time_s"] == 0 and ours["bytes_communicated"] == 0

    for model, cfg in mnist1d.items():
        ours_m, ours_s = _simulate(cfg)
        assert _max_diff(ours_s[-1], [r[model]["model"] for r in real]) <= 1e-5, model
        for ours, theirs in zip(ours_m, real[0][model]["metrics"], strict=True):
            assert ours["samples"] == theirs["samples"] == ours["epoch"] * 800  # 25 steps of 2x16
            for key in ("train_loss", "test_loss", "test_acc"):
                assert ours[key] == pytest.approx(theirs[key], abs=1e-5), (model, key)

    with _float64(monkeypatch):
        bn_metrics, bn_states = _simulate(bn, build=_bn_model)
    references = [r["bn"]["model"] for r in real]
    assert "1.running_var" in references[0] and "1.num_batches_tracked" in references[0]
    assert _max_diff(bn_states[-1], references) <= 1e-5
    # The running statistics moved, and differ between the learners (not in sync now).
    var = bn_states[-1]["engine"]["buffers"]["1.running_var"]
    assert not torch.equal(var[0], torch.ones_like(var[0]))
    assert not torch.equal(var[0], var[1])
    for ours, theirs in zip(bn_metrics, real[0]["bn"]["metrics"], strict=True):
        for key in ("train_loss", "test_loss", "test_acc"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key


# -------------------------------------------------------------------------- memory check


def test_memory_check_refuses_before_allocating(monkeypatch) -> None:
    cfg = RunConfig.model_validate(
        {"workload": {"dataset": "digits", "model": "resnet18"}, "K": 1, "P": 4096}
    )

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded the data set before checking memory")

    monkeypatch.setattr(wl_module, "load_dataset", no_loading)
    with pytest.raises(ValueError, match=r"simulated P=4096 resnet18 needs ~[\d.]+ GiB; the dev"):
        StackedEngine(cfg, CPU)
    # The estimate counts at least parameters, gradients and the stacked activations.
    shape, classes, _ = input_spec(cfg)
    n_params = 11_173_962  # resnet18 with 10 classes
    assert estimate_memory_bytes(cfg, shape, classes) > 4096 * 2 * n_params * 4
    small = _config(P=2, K=1)
    est = estimate_memory_bytes(small, (1, 8, 8), 10)
    mlp_params = 64 * 128 + 128 + 128 * 10 + 10
    assert 2 * 2 * mlp_params * 4 < est < 100 * 2**20


# --------------------------------------------------------------- resume and divergence


def test_resume_equals_uninterrupted_run() -> None:
    workload = {**_config().workload.model_dump(), "momentum": 0.9}
    cfg = _config(P=2, K=4, workload=workload)
    full_m, full_s = _simulate(cfg)
    one_epoch = cfg.model_copy(update={"workload": cfg.workload.model_copy(update={"epochs": 1})})
    _, part_s = _simulate(one_epoch)
    res_m, res_s = _simulate(cfg, resume=part_s[-1])
    assert [m["epoch"] for m in res_m] == [2]
    full = full_s[-1]["engine"]
    assert _max_diff(res_s[-1], [{**full["params"], **full["buffers"]}]) == 0
    for name, buf in full_s[-1]["engine"]["momentum"].items():
        assert torch.equal(res_s[-1]["engine"]["momentum"][name], buf), name
    for key in ("rounds", "samples", "train_loss", "test_loss", "test_acc"):
        assert res_m[-1][key] == full_m[-1][key], key
    assert [m["epoch"] for m in res_m[0]["history_before"]] == [1]
    assert res_m[0]["history_before"][0]["test_loss"] == full_m[0]["test_loss"]
    assert [m["epoch"] for m in res_s[-1]["history"]] == [1, 2]

    # A finished run resumed trains nothing and reports its end once.
    again_m, again_s = _simulate(cfg, resume=full_s[-1])
    assert again_s == [None] and again_m[0]["epoch"] == 2
    assert [m["epoch"] for m in again_m[0]["history_before"]] == [1]

    with pytest.raises(ValueError, match="not a simulated-backend checkpoint"):
        _simulate(cfg, resume={"model": {}})


def test_divergence_is_reported_and_stops() -> None:
    workload = diverging_least_squares(epochs=4)
    cfg = RunConfig.model_validate({"workload": workload, "K": 2, "P": 2})
    metrics, _ = _simulate(cfg)
    assert len(metrics) == 1 and metrics[0]["diverged"] is True
    assert math.isnan(metrics[0]["test_acc"])
    workload["lr"] = {"initial": 0.05}
    metrics, _ = _simulate(RunConfig.model_validate({"workload": workload, "K": 2, "P": 2}))
    assert len(metrics) == 4 and not any(m["diverged"] for m in metrics)


def _fake_cifar(*args, **kwargs):
    """160 + 40 random uint8 3x32x32 images served like CIFAR-10 (normalize, crop + flip)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (200,), generator=gen)
    return Dataset(
        name="fake",
        train_x=x[:160],
        train_y=y[:160],
        test_x=x[160:],
        test_y=y[160:],
        num_classes=10,
        input_shape=(3, 32, 32),
        task="classification",
        augment=functools.partial(random_crop_flip, padding=4, fill=0.0),
        norm_mean=CIFAR10_MEAN,
        norm_std=CIFAR10_STD,
    )


def test_augmented_images_follow_the_worker_loop(monkeypatch) -> None:
    """uint8 images through prepare + the per-learner augmentation generator (P = 1)."""
    monkeypatch.setattr(wl_module, "load_dataset", _fake_cifar)
    workload = {"dataset": "cifar10", "download": True, "model": "mlp", "epochs": 2,
                "batch_size": 16, "lr": {"initial": 0.05}}  # fmt: skip
    cfg = RunConfig.model_validate({"workload": workload, "K": 3, "P": 1, "seed": 5})
    real = []
    train(cfg, lambda m, s: real.append((m, s)))
    metrics, states = _simulate(cfg)
    assert _max_diff(states[-1], [real[-1][1]["engine"]["model"]]) <= 1e-5
    assert metrics[-1]["train_loss"] == pytest.approx(real[-1][0]["train_loss"], abs=1e-5)
    # Without the augmentation the trajectory is a different one.
    monkeypatch.setattr(stacked, "augment_generator", lambda s, e, r: torch.Generator())
    _, other = _simulate(cfg)
    assert _max_diff(other[-1], [real[-1][1]["engine"]["model"]]) > 1e-3
