"""A workload of one's own, in one file: a data set factory and a model factory.

kavg imports them by path (``my_workload:spirals``, ``my_workload:mlp``) from the folder
you run it in; see my_sweep.yaml. Any map-style torch Dataset of ``(x, y)`` items works.
"""

import math

import torch
from torch import nn
from torch.utils.data import TensorDataset


def spirals(n_train: int = 2048, n_test: int = 512, noise: float = 0.2, seed: int = 0):
    """Two interleaved spirals in the plane, label 0 or 1: (train, test).

    kavg passes the run's ``seed`` because this factory has a ``seed`` parameter; give
    ``dataset_args: {seed: 0}`` instead to fix the data across a sweep's seeds.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> TensorDataset:
        label = torch.randint(2, (n,), generator=gen)
        t = torch.rand(n, generator=gen) * 3 * math.pi + 0.5
        sign = 1 - 2 * label.float()
        x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1) / 5
        return TensorDataset(x + noise * torch.randn(n, 2, generator=gen) / 5, label)

    return draw(n_train), draw(n_test)


def mlp(width: int = 64, depth: int = 2) -> nn.Module:
    """A ReLU network from the plane to two classes."""
    layers, size = [], 2
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.ReLU()]
        size = width
    return nn.Sequential(*layers, nn.Linear(size, 2))
