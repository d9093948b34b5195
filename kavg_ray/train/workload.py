"""The workload of a run, built once for every engine and for the theory probe.

:func:`build_workload` loads the data set, seeds torch with the run's seed and builds the
model, then moves model and data to the learner's device. Every learner of a run therefore
starts from one model. Loss and evaluation sums live here too, so the real, stacked and
parameter-server engines compute them the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kavg_ray.config import RunConfig
from kavg_ray.data import Dataset, load_dataset
from kavg_ray.models import build_model

EVAL_BATCH = 1024
# build(input_shape, num_classes) -> model: the default is kavg_ray.models.build_model.
ModelBuilder = Callable[[tuple[int, ...], int], nn.Module]
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Workload:
    """A run's data (on the device), its freshly seeded model and its loss."""

    data: Dataset
    model: nn.Module
    loss: LossFn
    device: torch.device


def load_data(cfg: RunConfig) -> Dataset:
    """The run's data set, on the CPU."""
    wl = cfg.workload
    return load_dataset(
        wl.dataset, data_dir=wl.data_dir, download=wl.download, seed=cfg.seed,
        synthetic=wl.synthetic,
    )  # fmt: skip


def build_workload(
    cfg: RunConfig, device: torch.device, *, build: ModelBuilder | None = None
) -> Workload:
    """Data, model seeded with ``cfg.seed`` and loss, with model and data on ``device``."""
    data = load_data(cfg)
    torch.manual_seed(cfg.seed)
    if build is None:
        model = build_model(cfg.workload.model, data.input_shape, data.num_classes)
    else:
        model = build(data.input_shape, data.num_classes)
    model = model.to(device)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        setattr(data, name, getattr(data, name).to(device))
    return Workload(data, model, loss_fn(data), device)


def seed_dropout(cfg: RunConfig, rank: int) -> None:
    """Seed torch for what a learner draws while training (dropout): one stream per rank."""
    torch.manual_seed(cfg.seed * 1_000_003 + rank)


def loss_fn(data: Dataset) -> LossFn:
    """Cross-entropy for classification, half the squared error for least squares."""
    if data.task == "regression":
        return lambda out, y: 0.5 * F.mse_loss(out, y)
    return F.cross_entropy


@dataclass
class EvalSums:
    """Test-set sums of one learner's slice: add them over learners, then divide."""

    loss_sum: float
    correct: float
    count: float
    has_accuracy: bool = True  # False for tasks without one (regression)
    finite: bool = True


def evaluate_sums(
    forward: Callable[[Tensor], Tensor], model: nn.Module, data: Dataset, idx: Tensor
) -> EvalSums:
    """Summed test loss, correct predictions and count of ``forward`` on test rows ``idx``."""
    criterion = loss_fn(data)
    loss_sum = correct = 0.0
    model.eval()
    try:
        with torch.no_grad():
            for chunk in idx.split(EVAL_BATCH):
                x, y = data.prepare(data.test_x[chunk]), data.test_y[chunk]
                out = forward(x)
                loss_sum += criterion(out, y).item() * len(chunk)
                if data.task == "classification":
                    correct += (out.argmax(1) == y).sum().item()
    finally:
        model.train()
    return EvalSums(loss_sum, correct, float(len(idx)), data.task == "classification")
