"""Workloads shared by several test modules."""

from __future__ import annotations


def diverging_least_squares(epochs: int) -> dict:
    """Least squares with a step (50) far beyond 2/L: every algorithm blows up in epoch 1."""
    return {
        "dataset": "synthetic",
        "synthetic": {"task": "least_squares"},
        "model": "linear",
        "epochs": epochs,
        "batch_size": 16,
        "lr": {"initial": 50.0},
    }
