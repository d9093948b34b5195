"""Factory data sets: held in memory as tensors when small, read through a DataLoader
when large. Both give every learner exactly the batches of its ``epoch_indices``.

A data set whose estimated size (the first item's bytes times the number of items) is at
most ``workload.in_memory_mb`` is collated once into a :class:`kavg_ray.train.data.Dataset`:
tensors on the learner's device, a batch is an index (the fast path of the built-in data
sets). A larger one becomes a :class:`LoaderData`: a ``torch.utils.data.DataLoader`` whose
batch sampler yields the rows of the learner's ``epoch_indices`` in order
(``workload.num_workers`` worker processes, kept across epochs; pinned memory on a GPU).
Both collate items with ``default_collate``, so a batch holds the same values either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, default_collate
from torch.utils.data import Dataset as TorchDataset

from kavg_ray.train.data import Dataset

MB = 2**20


class _Rows:
    """A batch sampler over rows of indices, swapped before each pass (workers persist)."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class LoaderData:
    """A data set read through DataLoaders; the engines' view of it matches
    :class:`kavg_ray.train.data.Dataset`'s (``n_train``, ``train_batches``,
    ``test_batches`` ...)."""

    name: str
    train: TorchDataset
    test: TorchDataset
    num_classes: int  # 0: not known (a model factory decides its outputs)
    input_shape: tuple[int, ...]
    task: str
    num_workers: int = 0
    nbytes: int = 0  # the estimated size of train and test together
    device: torch.device = torch.device("cpu")
    augment: Any = None  # factory data sets augment in their own __getitem__, if at all
    loss_name: str | None = None  # as kavg_ray.train.data.Dataset.loss_name
    extras: dict[str, Any] = field(default_factory=dict)
    _loaders: dict[str, tuple[_Rows, DataLoader]] = field(default_factory=dict, repr=False)

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_test(self) -> int:
        return len(self.test)

    def prepare(self, x: Tensor) -> Tensor:
        """Batches come as the factory's items make them."""
        return x

    def _loader(self, split: str) -> tuple[_Rows, DataLoader]:
        if split not in self._loaders:
            rows = _Rows()
            loader = DataLoader(
                self.train if split == "train" else self.test,
                batch_sampler=rows,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.num_workers > 0,
            )
            self._loaders[split] = (rows, loader)
        return self._loaders[split]

    def _batches(self, split: str, rows: list[list[int]]) -> Iterator[tuple[Tensor, Tensor]]:
        sampler, loader = self._loader(split)
        sampler.rows = rows
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_batches(
        self, indices: Tensor, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Step i's batch is the items of row i of ``indices`` (steps, B), in order."""
        del generator  # no batch-level augmentation: see ``augment``
        return self._batches("train", indices.cpu().tolist())

    def test_batches(self, idx: Tensor, chunk: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Test items ``idx``, ``chunk`` at a time."""
        return self._batches("test", [part.tolist() for part in idx.cpu().split(chunk)])


def estimated_bytes(ds: TorchDataset) -> int:
    """The size of ``ds`` if every item were as large as the first."""
    x, y = ds[0]
    return len(ds) * (_nbytes(x) + _nbytes(y))


def _nbytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.element_size() * obj.numel()
    nbytes = getattr(obj, "nbytes", None)  # numpy arrays
    return int(nbytes) if nbytes is not None else 8


def _declared_classes(*sets: TorchDataset) -> int:
    """The classes of data sets that list their labels as ``targets`` or ``labels`` (the
    torchvision convention), without reading an item; 0 when they do not."""
    top = -1
    for ds in sets:
        labels = getattr(ds, "targets", getattr(ds, "labels", None))
        if labels is None:
            return 0
        top = max(top, int(torch.as_tensor(labels).max().item()))
    return top + 1


def collate_all(ds: TorchDataset) -> tuple[Tensor, Tensor]:
    """Every item of ``ds`` collated at once: ``(X, Y)`` with one row per item."""
    return default_collate([ds[i] for i in range(len(ds))])


def factory_data(
    name: str, train: TorchDataset, test: TorchDataset, task: str, in_memory_mb: float,
    num_workers: int,
) -> Dataset | LoaderData:  # fmt: skip
    """The learners' view of a factory's ``(train, test)``: in memory when at most
    ``in_memory_mb``, else through DataLoaders."""
    nbytes = estimated_bytes(train) + estimated_bytes(test)
    x0, _ = default_collate([train[0]])
    input_shape = tuple(x0.shape[1:])
    if nbytes > in_memory_mb * MB:
        classes = _declared_classes(train, test) if task == "classification" else 1
        return LoaderData(
            name, train, test, num_classes=classes, input_shape=input_shape, task=task,
            num_workers=num_workers, nbytes=nbytes,
        )  # fmt: skip
    train_x, train_y = collate_all(train)
    test_x, test_y = collate_all(test)
    classes = 1
    if task == "classification" and not train_y.is_floating_point():
        classes = int(max(train_y.max().item(), test_y.max().item())) + 1
    return Dataset(
        name, train_x, train_y, test_x, test_y, num_classes=classes, input_shape=input_shape,
        task=task,
    )  # fmt: skip
