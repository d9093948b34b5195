"""Workloads of one's own (docs/design.md section 8): factories named ``"module.path:function"``.

:func:`resolve` imports a factory, :func:`load_factory_data` calls a dataset factory and
checks what it returns, :func:`build_factory_model` calls a model factory (and
:func:`kavg_ray.train.workload.check_workload` tries a config's whole workload once on the
CPU, the data, one forward pass of the model on one sample, the loss, before anything is
launched). Every failure is a one-line :class:`~kavg_ray.errors.ConfigError` that names the factory.

Module paths are imported as ``python -m`` would: the current directory is on the path
(and PYTHONPATH). On a cluster the code must be importable on every node (from the image,
or shipped with ``kavg sweep submit --working-dir DIR``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset

from kavg_ray.config import RunConfig
from kavg_ray.errors import ConfigError

MAX_MESSAGE = 300  # characters of an exception's text shown in the one-line error


def describe(exc: BaseException) -> str:
    """An exception as one short line: ``Type: message``."""
    text = " ".join(str(exc).split())
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fail(key: str, spec: str, problem: str) -> ConfigError:
    return ConfigError(f"workload.{key} '{spec}': {problem}")


def resolve(spec: str, key: str) -> Callable[..., Any]:
    """The callable ``module.path:function`` names; ``key`` (dataset, model, loss) is
    the config key it came from, for the error message."""
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to see
        raise fail(key, spec, f"cannot import {module_name}: {describe(exc)}") from None
    if not hasattr(module, attr):
        raise fail(key, spec, f"{module_name} has no attribute '{attr}'")
    fn = getattr(module, attr)
    if not callable(fn):
        raise fail(key, spec, f"{module_name}.{attr} is not callable (a {type(fn).__name__})")
    return fn


def _call(key: str, spec: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    try:
        return fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the factory's own failure, shown in one line
        raise fail(key, spec, f"the factory raised {describe(exc)}") from None


def _takes_seed(fn: Callable[..., Any]) -> bool:
    try:
        return "seed" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def call_dataset_factory(cfg: RunConfig) -> tuple[TorchDataset, TorchDataset]:
    """``(train, test)`` from the config's dataset factory, checked: two non-empty
    map-style torch Datasets whose first items are ``(x, y)`` pairs."""
    wl = cfg.workload
    fn = resolve(wl.dataset, "dataset")
    kwargs = dict(wl.dataset_args)
    if _takes_seed(fn) and "seed" not in kwargs:
        kwargs["seed"] = cfg.seed
    out = _call("dataset", wl.dataset, fn, kwargs)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise fail(
            "dataset", wl.dataset,
            f"returned {kind_of(out)}, expected (train, test): two map-style torch Datasets",
        )  # fmt: skip
    for name, ds in zip(("train", "test"), out, strict=True):
        _check_map_style("dataset", wl.dataset, name, ds)
    return out[0], out[1]


def kind_of(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)}"
    return f"a {type(obj).__name__}"


def _check_map_style(key: str, spec: str, name: str, ds: Any) -> None:
    if isinstance(ds, IterableDataset) or not (
        hasattr(type(ds), "__getitem__") and hasattr(type(ds), "__len__")
    ):
        raise fail(key, spec, f"{name} is {kind_of(ds)}, not a map-style torch Dataset "
                    "(one with __getitem__ and __len__)")  # fmt: skip
    try:
        n = len(ds)
        item = ds[0] if n else None
    except Exception as exc:  # noqa: BLE001
        raise fail(key, spec, f"{name}[0] failed: {describe(exc)}") from None
    if n == 0:
        raise fail(key, spec, f"{name} is empty")
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise fail(key, spec, f"{name}[0] is {kind_of(item)}, expected an (x, y) pair")


def build_factory_optimizer(cfg: RunConfig, params: Iterable[Tensor]) -> torch.optim.Optimizer:
    """The inner optimizer of the config's optimizer factory, called as
    ``function(params=..., lr=lr.initial)`` (the loop then sets each step's lr in every
    ``param_groups`` entry): a ``torch.optim.Optimizer``, checked."""
    wl = cfg.workload
    fn = resolve(wl.optimizer, "optimizer")
    opt = _call("optimizer", wl.optimizer, fn, {"params": params, "lr": wl.lr.initial})
    if not isinstance(opt, torch.optim.Optimizer):
        raise fail(
            "optimizer", wl.optimizer, f"returned {kind_of(opt)}, expected a torch.optim.Optimizer"
        )
    if not opt.param_groups or any("lr" not in g for g in opt.param_groups):
        raise fail("optimizer", wl.optimizer, "its param_groups have no 'lr' to schedule")
    return opt


def build_factory_model(cfg: RunConfig) -> nn.Module:
    """The model of the config's model factory, called with ``model_args`` (on the CPU)."""
    wl = cfg.workload
    model = _call("model", wl.model, resolve(wl.model, "model"), dict(wl.model_args))
    if not isinstance(model, nn.Module):
        raise fail("model", wl.model, f"returned {kind_of(model)}, expected a torch.nn.Module")
    return model
