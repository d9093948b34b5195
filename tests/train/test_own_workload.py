"""A workload of one's own: this module defines its dataset and model factories and runs
them by import path, on real gloo learners and on the simulated backend, in memory and
through a DataLoader (docs/design.md section 8)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset as TorchDataset

from kavg_ray.config import RunConfig
from kavg_ray.errors import ConfigError
from kavg_ray.train import train
from kavg_ray.train.data import Dataset, epoch_indices
from kavg_ray.train.loader import LoaderData
from kavg_ray.train.workload import build_workload, check_workload, load_data

from ..distributed import run_distributed

HERE = "tests.train.test_own_workload"
CPU = torch.device("cpu")
ACCURACY = 0.9  # both backends reach it in 4 epochs


class Blobs(TorchDataset):
    """Four Gaussian blobs in 8 dimensions: items (x float32 (8,), label int)."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(1234)  # the same centers for train and test
        self.centers = torch.randn(4, 8, generator=gen) * 2
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(4, (n,), generator=gen)
        self.points = self.centers[self.labels] + torch.randn(n, 8, generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.points[i], int(self.labels[i])


def blobs(n_train: int = 512, n_test: int = 256) -> tuple[Blobs, Blobs]:
    """The dataset factory: (train, test)."""
    return Blobs(n_train, seed=1), Blobs(n_test, seed=2)


def two_layer(width: int = 16) -> nn.Module:
    """The model factory."""
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 4))


def _doc(**changes) -> dict:
    doc = {
        "name": "own",
        "workload": {
            "dataset": f"{HERE}:blobs", "model": f"{HERE}:two_layer",
            "model_args": {"width": 16}, "epochs": 4, "batch_size": 16,
            "lr": {"initial": 0.1},
        },
        "algorithm": "kavg", "K": 4, "P": 2, "seed": 3,
    }  # fmt: skip
    for key, value in changes.items():
        if key == "workload":
            doc["workload"] = {**doc["workload"], **value}
        else:
            doc[key] = value
    return doc


def _run(cfg: RunConfig, **kwargs) -> list[dict]:
    reports: list[dict] = []
    train(cfg, lambda m, s: reports.append(m), **kwargs)
    return reports


def _real(rank: int, world: int, out_dir: str, doc: dict) -> None:
    reports = _run(RunConfig.model_validate(doc), rank=rank, world_size=world)
    dist.barrier()
    torch.save(reports, os.path.join(out_dir, f"rank{rank}.pt"))


def test_real_and_simulated_learn_and_agree(tmp_path) -> None:
    doc = _doc()
    run_distributed(_real, 2, str(tmp_path), doc)
    real = torch.load(tmp_path / "rank0.pt", weights_only=False)
    sim = _run(RunConfig.model_validate(_doc(backend="simulated")))
    assert [m["epoch"] for m in real] == [1, 2, 3, 4]
    assert real[-1]["test_acc"] >= ACCURACY
    assert sim[-1]["test_acc"] >= ACCURACY
    assert real[0]["test_loss"] > real[-1]["test_loss"]
    for ours, theirs in zip(sim, real, strict=True):
        for key in ("epoch", "samples", "rounds"):
            assert ours[key] == theirs[key], key
        for key in ("train_loss", "test_loss", "test_acc"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key


def test_small_factory_data_is_held_in_memory_and_large_is_streamed() -> None:
    small = load_data(RunConfig.model_validate(_doc()))
    assert isinstance(small, Dataset)
    assert small.train_x.shape == (512, 8) and small.num_classes == 4
    # 768 items of 8 floats and one int64: 27 KiB, over a limit of 0.01 MB.
    big = load_data(RunConfig.model_validate(_doc(workload={"in_memory_mb": 0.01})))
    assert isinstance(big, LoaderData)
    assert big.nbytes == 768 * (8 * 4 + 8)
    assert (big.n_train, big.n_test, big.input_shape) == (512, 256, (8,))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_dataloader_and_in_memory_give_the_same_batches(num_workers: int) -> None:
    cfg = RunConfig.model_validate(_doc())
    memory = build_workload(cfg, CPU).data
    streamed_cfg = _doc(workload={"in_memory_mb": 0.0, "num_workers": num_workers})
    streamed = build_workload(RunConfig.model_validate(streamed_cfg), CPU).data
    assert isinstance(streamed, LoaderData)
    for epoch in (0, 1):
        idx = epoch_indices(512, 16, 1, 2, epoch, cfg.seed)
        pairs = zip(
            memory.train_batches(idx, torch.Generator()),
            streamed.train_batches(idx, torch.Generator()),
            strict=True,
        )
        for step, ((x1, y1), (x2, y2)) in enumerate(pairs):
            assert torch.equal(x1, x2) and torch.equal(y1, y2), (epoch, step)
            assert torch.equal(y1, memory.train_y[idx[step]])
        assert step == len(idx) - 1
    test_idx = torch.arange(1, 256, 2)
    for (x1, y1), (x2, y2) in zip(
        memory.test_batches(test_idx, 50), streamed.test_batches(test_idx, 50), strict=True
    ):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_dataloader_and_in_memory_give_the_same_trajectory() -> None:
    memory = _run(RunConfig.model_validate(_doc(P=1, workload={"epochs": 2})))
    streamed_doc = _doc(P=1, workload={"epochs": 2, "in_memory_mb": 0.0, "num_workers": 1})
    streamed = _run(RunConfig.model_validate(streamed_doc))
    for a, b in zip(memory, streamed, strict=True):
        for key in ("train_loss", "test_loss", "test_acc", "samples"):
            assert a[key] == b[key], key


def test_the_simulated_backend_refuses_a_streamed_data_set() -> None:
    cfg = RunConfig.model_validate(_doc(backend="simulated", workload={"in_memory_mb": 0.01}))
    with pytest.raises(ConfigError, match="the simulated backend holds the data set in memory"):
        check_workload(cfg)


def mean_abs(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A loss factory for a regression task."""
    return (out.squeeze(-1) - y).abs().mean()


class Line(TorchDataset):
    def __init__(self, n: int) -> None:
        self.x = torch.linspace(-1, 1, n).unsqueeze(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], 3 * self.x[i, 0] - 1


def line(n: int = 256) -> tuple[Line, Line]:
    return Line(n), Line(64)


def affine() -> nn.Module:
    return nn.Linear(1, 1)


def test_regression_with_a_loss_of_ones_own_reports_loss_only() -> None:
    doc = _doc(P=1, workload={
        "dataset": f"{HERE}:line", "model": f"{HERE}:affine", "model_args": {},
        "loss": f"{HERE}:mean_abs", "task": "regression", "epochs": 3,
    })  # fmt: skip
    reports = _run(RunConfig.model_validate(doc))
    assert all(m["test_acc"] != m["test_acc"] for m in reports)  # NaN: no accuracy
    assert reports[-1]["test_loss"] < 0.5 * reports[0]["test_loss"]
