"""The workload of a run, built once for every engine and for the theory probe.

:func:`build_workload` loads the data set, seeds torch with the run's seed and builds the
model, then moves model and data to the learner's device. Every learner of a run therefore
starts from one model. Loss and evaluation sums live here too, so the real, stacked and
parameter-server engines compute them the same way. :func:`check_workload` tries a
workload of one's own once on the CPU before anything is launched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kavg_ray.config import RunConfig, is_factory
from kavg_ray.errors import ConfigError
from kavg_ray.train import factories
from kavg_ray.train.data import Dataset, load_dataset
from kavg_ray.train.factories import describe, fail, kind_of
from kavg_ray.train.loader import LoaderData, factory_data
from kavg_ray.train.models import build_model

EVAL_BATCH = 1024
# build(input_shape, num_classes) -> model: the default is model_builder(cfg).
ModelBuilder = Callable[[tuple[int, ...], int], nn.Module]
LossFn = Callable[[Tensor, Tensor], Tensor]
# What the engines train on: tensors in memory, or a factory's data set read through
# DataLoaders; both yield the batches of epoch_indices (train_batches, test_batches).
Data = Dataset | LoaderData


@dataclass
class Workload:
    """A run's data (on the device), its freshly seeded model and its loss."""

    data: Data
    model: nn.Module
    loss: LossFn
    device: torch.device


def load_data(cfg: RunConfig) -> Data:
    """The run's data set, on the CPU (a large factory data set: read through DataLoaders)."""
    wl = cfg.workload
    if is_factory(wl.dataset):
        train, test = factories.call_dataset_factory(cfg)
        data = factory_data(
            wl.dataset, train, test, wl.task or "classification", wl.in_memory_mb,
            wl.num_workers,
        )  # fmt: skip
    else:
        data = load_dataset(
            wl.dataset, data_dir=wl.data_dir, download=wl.download, seed=cfg.seed,
            synthetic=wl.synthetic, options=wl.dataset_args,
        )  # fmt: skip
        data.task = wl.task or data.task
    data.loss_name = wl.loss  # every loss_fn(data) then computes the run's loss
    return data


def model_builder(cfg: RunConfig) -> ModelBuilder:
    """How the run builds its model from (input shape, outputs): the built-in model with
    ``model_args``, or the model factory (which takes only ``model_args``)."""
    wl = cfg.workload
    if is_factory(wl.model):
        return lambda _shape, _classes: factories.build_factory_model(cfg)
    if wl.model_args:  # the sizes of gpt, mlp1d or cnn1d
        return lambda shape, classes: build_model(wl.model, shape, classes, wl.model_args)
    return lambda shape, classes: build_model(wl.model, shape, classes)


def build_workload(
    cfg: RunConfig, device: torch.device, *, build: ModelBuilder | None = None
) -> Workload:
    """Data, model seeded with ``cfg.seed`` and loss, with model and data on ``device``."""
    data = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = (build or model_builder(cfg))(data.input_shape, data.num_classes)
    model = model.to(device)
    if isinstance(data, LoaderData):
        data.device = device
    else:
        for name in ("train_x", "train_y", "test_x", "test_y"):
            setattr(data, name, getattr(data, name).to(device))
    return Workload(data, model, loss_fn(data, cfg.workload.loss), device)


def build_optimizer(cfg: RunConfig, params: Iterable[Tensor]) -> torch.optim.Optimizer:
    """The inner optimizer of ``workload.optimizer``: SGD (momentum, weight decay), AdamW,
    or a factory's (:func:`kavg_ray.train.factories.build_factory_optimizer`)."""
    wl = cfg.workload
    if is_factory(wl.optimizer):
        return factories.build_factory_optimizer(cfg, params)
    if wl.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=wl.lr.initial, betas=tuple(wl.betas), eps=wl.eps,
            weight_decay=wl.weight_decay,
        )  # fmt: skip
    return torch.optim.SGD(
        params, lr=wl.lr.initial, momentum=wl.momentum, weight_decay=wl.weight_decay
    )


class Recipe:
    """How a learner takes one optimizer step (docs/design.md section 1, "Training recipe"):
    ``grad_accum`` micro-batches of ``batch_size`` (each micro-batch's loss divided by N, so
    the gradients are those of the mean loss over the N B samples), forward and loss under
    autocast at ``precision`` (fp16 with a gradient scaler), gradients clipped to the global
    norm ``grad_clip`` per learner. Parameters, optimizer state and averages stay fp32.
    ``workload.tf32`` sets torch's TF32 switches on a CUDA device."""

    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        wl = cfg.workload
        self.accum, self.clip, self.batch_size = wl.grad_accum, wl.grad_clip, wl.batch_size
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(wl.precision)
        self.device_type = device.type
        # The default recipe takes the plain step of the recorded trajectories, bit for bit.
        self.plain = self.accum == 1 and self.clip is None and self.dtype is None
        if device.type == "cuda" and wl.tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = wl.tf32
            torch.backends.cudnn.allow_tf32 = wl.tf32

    @property
    def step_batch(self) -> int:
        """Samples of one learner's optimizer step: the rows of an epoch_indices batch."""
        return self.batch_size * self.accum

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward and loss's autocast (nothing at fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """fp16's gradient scaler (None otherwise)."""
        if self.dtype != torch.float16:
            return None
        return torch.amp.GradScaler(self.device_type)

    def micro_batches(self, x: Tensor, y: Tensor, dim: int = 0) -> Iterable[tuple[Tensor, Tensor]]:
        """A step's batch cut into its ``grad_accum`` micro-batches along ``dim``."""
        if self.accum == 1:
            return ((x, y),)
        return zip(x.split(self.batch_size, dim), y.split(self.batch_size, dim), strict=True)

    def step(
        self, model: nn.Module, criterion: LossFn, opt: torch.optim.Optimizer, x: Tensor,
        y: Tensor, scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:  # fmt: skip
        """One optimizer step of ``model`` on a step's batch; returns its (mean) loss."""
        opt.zero_grad(set_to_none=True)
        loss = self.backward(model, criterion, x, y, scaler)
        if scaler is not None:
            scaler.unscale_(opt)
        self.clip_gradients(model.parameters())
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        return loss

    def backward(
        self, model: nn.Module, criterion: LossFn, x: Tensor, y: Tensor,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:  # fmt: skip
        """The gradients of a step's batch in the parameters' ``.grad`` (accumulated over
        the micro-batches, scaled for fp16); returns the step's (mean) loss, detached."""
        total = None
        for xm, ym in self.micro_batches(x, y):
            with self.autocast():
                loss = criterion(model(xm), ym)
            part = loss / self.accum if self.accum > 1 else loss
            (part if scaler is None else scaler.scale(part)).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total / self.accum if self.accum > 1 else total

    def clip_gradients(self, params: Iterable[Tensor]) -> None:
        """Clip to the global norm ``grad_clip`` (torch.nn.utils.clip_grad_norm_)."""
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.clip)


def clip_rows(grads: list[Tensor], max_norm: float) -> None:
    """Clip stacked learners' gradients (row r of each tensor is learner r's) to the global
    norm ``max_norm`` per learner, with the arithmetic of torch.nn.utils.clip_grad_norm_."""
    rows = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(rows, -1), dim=1) for g in grads])
    total = torch.linalg.vector_norm(norms, dim=0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(rows, *([1] * (g.dim() - 1))))


def tokens_per_sample(data: Data) -> int:
    """Target positions per training sample: a text sequence's length, else 1."""
    y = getattr(data, "train_y", None)
    return int(y[0].numel()) if isinstance(y, Tensor) and y.dim() > 1 else 1


def seed_dropout(cfg: RunConfig, rank: int) -> None:
    """Seed torch for what a learner draws while training (dropout): one stream per rank."""
    torch.manual_seed(cfg.seed * 1_000_003 + rank)


def loss_fn(data: Data, name: str | None = None) -> LossFn:
    """The loss ``name`` (cross_entropy, mse or a factory ``module:function``; default the
    data's ``loss_name``, the config's), else cross-entropy for classification and half
    the squared error for regression."""
    name = name or getattr(data, "loss_name", None)
    if name is None:
        name = "half_mse" if data.task == "regression" else "cross_entropy"
    if name == "half_mse":
        return lambda out, y: 0.5 * F.mse_loss(out, y)
    if name == "mse":
        return F.mse_loss
    if name == "cross_entropy":
        return cross_entropy
    return factories.resolve(name, "loss")


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of logits (B, C) with targets (B,), or of a sequence model's (B, T, C)
    with (B, T): the mean over every position."""
    if out.dim() == 3:
        return F.cross_entropy(out.flatten(0, 1), y.flatten())
    return F.cross_entropy(out, y)


@dataclass
class EvalSums:
    """Test-set sums of one learner's slice: add them over learners, then divide."""

    loss_sum: float
    correct: float
    count: float
    has_accuracy: bool = True  # False for tasks without one (regression)
    finite: bool = True


def evaluate_sums(
    forward: Callable[[Tensor], Tensor],
    model: nn.Module,
    data: Data,
    idx: Tensor,
    criterion: LossFn | None = None,
) -> EvalSums:
    """Summed test loss, correct predictions and count of ``forward`` on test rows ``idx``
    (``criterion``: the run's loss, default :func:`loss_fn`). For a sequence model a row's
    "correct" is its fraction of positions predicted right (token accuracy)."""
    criterion = criterion or loss_fn(data)
    loss_sum = correct = 0.0
    model.eval()
    try:
        with torch.no_grad():
            for x, y in data.test_batches(idx, EVAL_BATCH):
                out = forward(x)
                loss_sum += criterion(out, y).item() * len(y)
                if data.task == "classification" and out.dim() == 3:
                    correct += (out.argmax(-1) == y).double().mean(1).sum().item()
                elif data.task == "classification":
                    correct += (out.argmax(1) == y).sum().item()
    finally:
        model.train()
    return EvalSums(loss_sum, correct, float(len(idx)), data.task == "classification")


def check_workload(cfg: RunConfig) -> None:
    """Try the workload once before a launch: the data loads, the model builds and takes one
    training sample on the CPU, the loss gives a finite scalar. Nothing when the workload
    names no factory (built-in workloads are checked by the config itself)."""
    wl = cfg.workload
    if not any(is_factory(name or "") for name in (wl.dataset, wl.model, wl.loss, wl.optimizer)):
        return
    data = load_data(cfg)
    if cfg.backend == "simulated" and isinstance(data, LoaderData):
        raise fail(
            "dataset", wl.dataset,
            f"the simulated backend holds the data set in memory, and it is about "
            f"{data.nbytes / 2**20:.0f} MB, over workload.in_memory_mb ({wl.in_memory_mb:g}): "
            "raise in_memory_mb or use backend ray",
        )  # fmt: skip
    if not is_factory(wl.model) and data.num_classes < 1:
        raise fail(
            "model", wl.model,
            "cannot tell the number of classes of a data set read through a DataLoader: give "
            "its Datasets a 'targets' attribute, or use a model factory",
        )  # fmt: skip
    x, y = next(data.train_batches(torch.zeros((1, 1), dtype=torch.int64), torch.Generator()))
    builder = model_builder(cfg)
    try:
        model = builder(data.input_shape, data.num_classes)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a built-in model that cannot take this data
        raise fail("model", wl.model, f"cannot be built for this data: {describe(exc)}") from None
    try:
        out = model.train()(x)
    except Exception as exc:  # noqa: BLE001
        problem = f"forward pass on one sample failed: {describe(exc)}"
        raise fail("model", wl.model, problem) from None
    name = wl.loss or ("half_mse" if data.task == "regression" else "cross_entropy")
    _check_loss(name, loss_fn(data, name), out, y)
    if is_factory(wl.optimizer):
        build_optimizer(cfg, model.parameters())


def _check_loss(name: str, criterion: Callable[..., Any], out: Any, y: Any) -> None:
    try:
        loss = criterion(out, y)
    except Exception as exc:  # noqa: BLE001
        raise fail("loss", name, f"failed on the model's output: {describe(exc)}") from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise fail("loss", name, f"returned {kind_of(loss)}, expected a scalar float tensor")
    if not loss.requires_grad:
        raise fail("loss", name, "its result does not depend on the model (no gradient)")
