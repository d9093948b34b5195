"""Data sets and the per-learner mini-batch schedule.

Data sets are held whole in memory as tensors (the largest, CIFAR-10, is 150 MB as uint8), so a
learner draws a mini-batch by indexing: ``ds.prepare(ds.train_x[idx])``, then
``ds.augment(x, generator)`` for training batches when ``ds.augment`` is set.

The batch schedule (:func:`epoch_indices`) and the augmentation generators
(:func:`augment_generator`) are pure functions of ``(seed, epoch, rank)``: a distributed run
and the single-process simulator that stacks all P learners draw exactly the same batches.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kavg_ray.config import BUILTIN_DATASETS

#: The built-in data sets, by the names the config accepts (one list: kavg_ray.config).
DATASETS = BUILTIN_DATASETS
SAMPLINGS = ("shard", "iid")

# Per-channel statistics of the CIFAR-10 training set (pixel values scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST_FILE = "test_batch"

_SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "task": "classification",  # classification | least_squares
    "n_train": 2048,
    "n_test": 512,
    "dim": 20,
    "num_classes": 4,  # classification only
    "noise": 0.1,  # least squares: std of the label noise
    "cluster_std": 1.0,  # classification: std of each Gaussian cluster
    "seed": 0,
}

_SEED_MOD = 2**64  # torch.Generator.manual_seed accepts [0, 2**64)
# Salt that separates the augmentation streams from the iid-sampling streams.
_AUGMENT_SALT = 0x9E3779B97F4A7C15


@dataclass
class Dataset:
    """An in-memory data set.

    ``train_x``/``test_x`` are stored compactly (uint8 images for CIFAR-10, float32 otherwise);
    call :meth:`prepare` on every batch (train and test) before the model sees it.
    ``augment(x, generator)`` is a batch-level training augmentation applied to a prepared
    float batch; ``None`` when the data set has none. ``extras`` holds data-set specific facts,
    e.g. ``w_star`` for the synthetic least-squares task.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int  # 1 for regression
    input_shape: tuple[int, ...]
    task: str  # "classification" | "regression"
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    # Normalization applied by prepare() to uint8 images after scaling them to [0, 1].
    norm_mean: tuple[float, ...] | None = None
    norm_std: tuple[float, ...] | None = None
    # The run's loss when its config names one (workload.loss); None: the task's default.
    loss_name: str | None = None

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_x.shape[0])

    def prepare(self, x: Tensor) -> Tensor:
        """uint8 images -> normalized float32 (on ``x``'s device); other data unchanged
        (float features, int64 tokens)."""
        if x.dtype != torch.uint8:
            return x
        out = x.to(torch.float32).div_(255.0)
        if self.norm_mean is not None and self.norm_std is not None:
            out = _normalize(out, self.norm_mean, self.norm_std)
        return out


    def train_batches(
        self, indices: Tensor, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One learner's training batches of an epoch: row ``i`` of ``indices`` (steps, B)
        gives step i's prepared (and augmented, drawing on ``generator``) inputs and targets."""
        for idx in indices:
            x = self.prepare(self.train_x[idx])
            if self.augment is not None:
                x = self.augment(x, generator)
            yield x, self.train_y[idx]

    def test_batches(self, idx: Tensor, chunk: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Prepared test inputs and targets of rows ``idx``, ``chunk`` rows at a time."""
        for part in idx.split(chunk):
            yield self.prepare(self.test_x[part]), self.test_y[part]


def _normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - m) / s


# --------------------------------------------------------------------------------------------
# Loading


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    synthetic: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> Dataset:
    """Load data set ``name`` (one of :data:`DATASETS`).

    ``seed`` is the trial's seed. The built-in data sets deliberately ignore it: the digits
    split and the synthetic data are fixed by their own seeds so that every trial of a sweep
    (all K, P and seeds) sees the same data. ``synthetic`` holds the options of the synthetic
    data set (see :func:`make_synthetic`), ``options`` those of ``text`` (see
    :func:`load_text`) or ``mnist1d`` (see :func:`load_mnist1d`); ``data_dir``/``download``
    apply to the torchvision data sets, ``data_dir`` also to where mnist1d is cached.
    """
    del seed  # accepted for a uniform call signature; see the docstring
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return _LOADERS[name](name, data_dir, download, synthetic or {}, options or {})


# name, data_dir, download, synthetic options, text options -> the data set.
_LOADERS: dict[str, Callable[[str, Any, bool, dict, dict], Dataset]] = {
    "digits": lambda name, d, dl, syn, opt: load_digits(),
    "synthetic": lambda name, d, dl, syn, opt: make_synthetic(**syn),
    "cifar10": lambda name, d, dl, syn, opt: load_cifar10(d, download=dl),
    "cifar100": lambda name, d, dl, syn, opt: load_cifar100(d, download=dl),
    "mnist": lambda name, d, dl, syn, opt: load_mnist(name, d, download=dl),
    "fashion_mnist": lambda name, d, dl, syn, opt: load_mnist(name, d, download=dl),
    "text": lambda name, d, dl, syn, opt: load_text(**opt),
    "mnist1d": lambda name, d, dl, syn, opt: load_mnist1d(**opt, data_dir=d),
}


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits (1797 images), pixels scaled to [0, 1], shaped (N, 1, 8, 8).

    The test set is a fixed 20% (360 images, rounded up as in ``train_test_split``), chosen
    with ``numpy.random.RandomState(0)`` so the split never depends on a trial's seed.
    """
    pixels, target = _digits_arrays()
    x = torch.from_numpy((pixels / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(target.astype(np.int64))
    n = x.shape[0]
    perm = torch.from_numpy(np.random.RandomState(0).permutation(n))
    n_test = math.ceil(0.2 * n)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    return Dataset(
        name="digits",
        train_x=x[train_idx].contiguous(),
        train_y=y[train_idx].contiguous(),
        test_x=x[test_idx].contiguous(),
        test_y=y[test_idx].contiguous(),
        num_classes=10,
        input_shape=(1, 8, 8),
        task="classification",
    )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as scikit-learn ships them (``data``, ``target``), read from its file.

    Reading the bundled CSV skips importing scikit-learn, about a second of every
    learner's start-up; ``sklearn.datasets.load_digits`` is the fallback should the file
    ever move.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    return bunch.data, bunch.target


def make_synthetic(**options: Any) -> Dataset:
    """Seeded synthetic data. Options (defaults in brackets):

    - ``task`` [classification]: ``classification`` or ``least_squares``.
    - ``n_train`` [2048], ``n_test`` [512], ``dim`` [20], ``seed`` [0].
    - classification: ``num_classes`` [4] Gaussian clusters with centers drawn from N(0, I_dim)
      and spread ``cluster_std`` [1.0]; well separated for the default ``dim``.
    - least_squares: x ~ N(0, I_dim), y = x @ w_star + ``noise`` [0.1] * N(0, 1), y shaped
      (n, 1). The intended loss is ``mean over the batch of 0.5 * (x . w - y)^2`` (note the
      0.5: ``torch.nn.functional.mse_loss`` is twice that), whose Hessian is E[x x^T]; see
      :func:`least_squares_constants`. ``extras`` holds ``w_star`` (dim, 1) and the population
      ``covariance`` of x (the identity).

    The training set does not depend on ``n_test`` (it is drawn first).
    """
    opts = _synthetic_options(options)
    task = opts["task"]
    n_train, n_test, dim = int(opts["n_train"]), int(opts["n_test"]), int(opts["dim"])
    rng = np.random.RandomState(int(opts["seed"]))
    if task == "classification":
        return _synthetic_classification(opts, rng, n_train, n_test, dim)
    if task == "least_squares":
        return _synthetic_least_squares(opts, rng, n_train, n_test, dim)
    raise ValueError(f"unknown synthetic task {task!r}; valid tasks: classification, least_squares")


def _synthetic_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` over the defaults, after rejecting unknown keys and empty sizes."""
    unknown = sorted(set(options) - set(_SYNTHETIC_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown synthetic option(s) {unknown}; valid options: {sorted(_SYNTHETIC_DEFAULTS)}"
        )
    opts = {**_SYNTHETIC_DEFAULTS, **options}
    n_train, n_test, dim = int(opts["n_train"]), int(opts["n_test"]), int(opts["dim"])
    if n_train < 1 or n_test < 1 or dim < 1:
        raise ValueError(f"synthetic n_train, n_test and dim must be >= 1, got {opts}")
    return opts


def _synthetic_classification(
    opts: dict[str, Any], rng: np.random.RandomState, n_train: int, n_test: int, dim: int
) -> Dataset:
    """The ``classification`` task: Gaussian clusters around centers drawn from N(0, I_dim)."""
    num_classes = int(opts["num_classes"])
    if num_classes < 2:
        raise ValueError(f"synthetic num_classes must be >= 2, got {num_classes}")
    centers = rng.randn(num_classes, dim)
    std = float(opts["cluster_std"])

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = rng.randint(num_classes, size=n)
        x = centers[y] + std * rng.randn(n, dim)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))

    extras = {"centers": torch.from_numpy(centers.astype(np.float32))}
    return _drawn_synthetic(draw, n_train, n_test, dim, num_classes, "classification", extras)


def _synthetic_least_squares(
    opts: dict[str, Any], rng: np.random.RandomState, n_train: int, n_test: int, dim: int
) -> Dataset:
    """The ``least_squares`` task: y = x @ w_star + noise * N(0, 1) with x ~ N(0, I_dim)."""
    w_star = rng.randn(dim, 1)
    noise = float(opts["noise"])

    def draw(n: int) -> tuple[Tensor, Tensor]:
        x = rng.randn(n, dim)
        y = x @ w_star + noise * rng.randn(n, 1)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))

    extras = {
        "w_star": torch.from_numpy(w_star.astype(np.float32)),
        "covariance": torch.eye(dim),
        "noise": noise,
        "loss": "mean of 0.5 * (x . w - y)^2",
    }
    return _drawn_synthetic(draw, n_train, n_test, dim, 1, "regression", extras)


def _drawn_synthetic(
    draw: Callable[[int], tuple[Tensor, Tensor]],
    n_train: int,
    n_test: int,
    dim: int,
    num_classes: int,
    task: str,
    extras: dict[str, Any],
) -> Dataset:
    """The synthetic :class:`Dataset` with splits ``draw(n_train)`` and ``draw(n_test)``."""
    # Training set first, so that it does not depend on n_test (make_synthetic's promise).
    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return Dataset(
        name="synthetic",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=num_classes,
        input_shape=(dim,),
        task=task,
        extras=extras,
    )


def least_squares_constants(ds: Dataset, *, bias: bool = False) -> dict[str, Any]:
    """Closed-form constants of the empirical least-squares problem on ``ds``'s training set.

    Loss: F(w) = mean_i 0.5 * (x_i . w - y_i)^2, so the Hessian is H = X^T X / n everywhere.
    Returns ``L`` (largest eigenvalue of H: the gradient's Lipschitz constant), ``mu`` (the
    smallest), ``w_opt`` (the least-squares solution, float64 tensor (d, 1)), ``F_star``
    (F at ``w_opt``) and ``M_at_opt`` (the variance of one sample's gradient at ``w_opt``,
    mean_i ||x_i r_i||^2 with residual r_i, since the full gradient vanishes there).
    ``bias=True`` appends a constant feature, for a model with an intercept (the ``linear``
    model has none).
    """
    if ds.task != "regression":
        raise ValueError(f"least_squares_constants needs a regression data set, got {ds.task!r}")
    x = ds.train_x.detach().cpu().double().reshape(ds.n_train, -1).numpy()
    y = ds.train_y.detach().cpu().double().reshape(ds.n_train, -1).numpy()
    if bias:
        x = np.hstack([x, np.ones((x.shape[0], 1))])
    n = x.shape[0]
    eig = np.linalg.eigvalsh(x.T @ x / n)
    w_opt, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = x @ w_opt - y
    f_star = 0.5 * float(np.mean(np.sum(resid**2, axis=1)))
    per_sample_grad_sq = np.sum(x**2, axis=1) * np.sum(resid**2, axis=1)
    return {
        "L": float(eig[-1]),
        "mu": float(eig[0]),
        "w_opt": torch.from_numpy(w_opt),
        "F_star": f_star,
        "M_at_opt": float(np.mean(per_sample_grad_sq)),
    }


def load_cifar10(
    data_dir: str | os.PathLike[str] | None = None, *, download: bool = False
) -> Dataset:
    """CIFAR-10 as uint8 tensors (N, 3, 32, 32); batches go through ``Dataset.prepare``.

    ``data_dir`` is either the directory that contains ``cifar-10-batches-py`` or that folder
    itself; default ``$KAVG_DATA_DIR`` or ``~/.cache/kavg_ray``. ``download=True`` fetches and
    md5-checks the archive with torchvision. The pickled batches are then read here rather than
    through ``torchvision.datasets.CIFAR10``, which insists on the md5 sums of the original
    files and so refuses any locally written set in the same format (a subset, a test fixture).
    """
    root = _cifar10_root(data_dir)
    folder = root / CIFAR10_FOLDER
    if download and not _cifar10_complete(folder):
        from torchvision.datasets import CIFAR10

        CIFAR10(root=str(root), train=True, download=True)
    if not _cifar10_complete(folder):
        raise FileNotFoundError(
            f"CIFAR-10 not found under {folder}; set download: true or point data_dir at the "
            f"extracted {CIFAR10_FOLDER}"
        )
    train_x, train_y = _read_cifar10_batches(folder, _CIFAR10_TRAIN_FILES)
    test_x, test_y = _read_cifar10_batches(folder, (_CIFAR10_TEST_FILE,))
    return Dataset(
        name="cifar10",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=10,
        input_shape=(3, 32, 32),
        task="classification",
        augment=functools.partial(
            random_crop_flip,
            padding=4,
            # RandomCrop pads the raw image with black; after normalization black is -mean/std.
            fill=tuple(-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD, strict=True)),
        ),
        extras={"classes": _read_cifar10_classes(folder)},
        norm_mean=CIFAR10_MEAN,
        norm_std=CIFAR10_STD,
    )


def _cifar10_root(data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is None:
        data_dir = os.environ.get("KAVG_DATA_DIR") or "~/.cache/kavg_ray"
    path = Path(data_dir).expanduser()
    return path.parent if path.name == CIFAR10_FOLDER else path


def _cifar10_complete(folder: Path) -> bool:
    names = (*_CIFAR10_TRAIN_FILES, _CIFAR10_TEST_FILE)
    return all((folder / name).is_file() for name in names)


def _unpickle(path: Path) -> dict[Any, Any]:
    # latin1 (as torchvision does) decodes the Python 2 pickles of the official archive;
    # files written by Python 3 may have bytes keys, which _get() accepts too.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # trusted: local data set files


def _get(entry: dict[Any, Any], key: str) -> Any:
    if key in entry:
        return entry[key]
    if key.encode() in entry:
        return entry[key.encode()]
    raise KeyError(key)


def _read_cifar10_batches(folder: Path, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for name in names:
        entry = _unpickle(folder / name)
        try:
            data = np.asarray(_get(entry, "data"), dtype=np.uint8)
            labels = np.asarray(_get(entry, "labels"), dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"{folder / name} is not a CIFAR-10 batch (no {exc} entry)") from exc
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{folder / name}: expected data (N, 3072) and N labels, got data "
                f"{data.shape} and {labels.shape[0]} labels"
            )
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _read_cifar10_classes(folder: Path) -> list[str]:
    meta = folder / "batches.meta"
    if not meta.is_file():
        return []
    names = _get(_unpickle(meta), "label_names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR100_FOLDER = "cifar-100-python"
# Per data set: the torchvision class that downloads it, its folder under the root, the
# pixel mean and std of its training set.
_MNIST_SETS = {
    "mnist": ("MNIST", "MNIST", 0.1307, 0.3081),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST", 0.2860, 0.3530),
}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _data_root(data_dir: str | os.PathLike[str] | None, folder: str) -> Path:
    """The root above ``folder`` (``data_dir`` may name the root or the folder itself);
    default ``$KAVG_DATA_DIR`` or ``~/.cache/kavg_ray``."""
    if data_dir is None:
        data_dir = os.environ.get("KAVG_DATA_DIR") or "~/.cache/kavg_ray"
    path = Path(data_dir).expanduser()
    parts = Path(folder).parts
    if path.parts[-len(parts) :] == parts:
        return Path(*path.parts[: -len(parts)]) if len(path.parts) > len(parts) else Path(".")
    return path


def load_cifar100(
    data_dir: str | os.PathLike[str] | None = None, *, download: bool = False
) -> Dataset:
    """CIFAR-100 (fine labels, 100 classes) as uint8 (N, 3, 32, 32), from the pickled
    ``train`` and ``test`` files under ``cifar-100-python``; augmented as CIFAR-10."""
    root = _data_root(data_dir, CIFAR100_FOLDER)
    folder = root / CIFAR100_FOLDER
    if download and not all((folder / n).is_file() for n in ("train", "test")):
        from torchvision.datasets import CIFAR100

        CIFAR100(root=str(root), train=True, download=True)
    parts = []
    for split in ("train", "test"):
        if not (folder / split).is_file():
            raise FileNotFoundError(
                f"CIFAR-100 not found: no {folder / split}; set download: true or point "
                f"data_dir at the extracted {CIFAR100_FOLDER}"
            )
        entry = _unpickle(folder / split)
        data = np.asarray(_get(entry, "data"), dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(_get(entry, "fine_labels"), dtype=np.int64)
        parts += [torch.from_numpy(data), torch.from_numpy(labels)]
    meta = folder / "meta"
    names = _get(_unpickle(meta), "fine_label_names") if meta.is_file() else []
    fill = tuple(-m / s for m, s in zip(CIFAR100_MEAN, CIFAR100_STD, strict=True))
    return Dataset(
        "cifar100", *parts, num_classes=100, input_shape=(3, 32, 32), task="classification",
        augment=functools.partial(random_crop_flip, padding=4, fill=fill),
        extras={"classes": [n.decode() if isinstance(n, bytes) else str(n) for n in names]},
        norm_mean=CIFAR100_MEAN, norm_std=CIFAR100_STD,
    )  # fmt: skip


def load_mnist(
    name: str = "mnist", data_dir: str | os.PathLike[str] | None = None, *, download: bool = False
) -> Dataset:
    """MNIST or Fashion-MNIST as uint8 (N, 1, 28, 28), from the idx-ubyte files (optionally
    gzipped) under ``MNIST/raw`` or ``FashionMNIST/raw``, as torchvision keeps them."""
    cls_name, sub, mean, std = _MNIST_SETS[name]
    root = _data_root(data_dir, f"{sub}/raw")
    folder = root / sub / "raw"
    if download and _idx_path(folder, _IDX_FILES["test"][1]) is None:
        import torchvision.datasets

        getattr(torchvision.datasets, cls_name)(root=str(root), train=True, download=True)
    tensors = []
    for split in ("train", "test"):
        for fname, ndim in zip(_IDX_FILES[split], (3, 1), strict=True):
            path = _idx_path(folder, fname)
            if path is None:
                raise FileNotFoundError(
                    f"{cls_name} not found: no {folder / fname}; set download: true or point "
                    f"data_dir at the folder holding {sub}/raw"
                )
            tensors.append(read_idx(path, ndim))
    train_x, train_y, test_x, test_y = tensors
    return Dataset(
        name, train_x.unsqueeze(1), train_y.long(), test_x.unsqueeze(1), test_y.long(),
        num_classes=10, input_shape=(1, 28, 28), task="classification",
        norm_mean=(mean,), norm_std=(std,),
    )  # fmt: skip


def _idx_path(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path, ndim: int) -> Tensor:
    """An idx-ubyte file (magic 0x0000080N: unsigned bytes, N dimensions) as a uint8 tensor."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise ValueError(f"{path}: not an idx-ubyte file of {ndim} dimensions (magic {magic:#x})")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise ValueError(f"{path}: {body.size} bytes of data for shape {shape}")
    return torch.from_numpy(body.reshape(shape).copy())


# --------------------------------------------------------------------------------------------
# MNIST-1D

#: The folder under the data root where generated MNIST-1D sets are cached.
MNIST1D_FOLDER = "mnist1d"


def load_mnist1d(
    num_samples: int = 5000,
    seed: int = 42,
    data_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """MNIST-1D (Greydanus 2020): 10 classes of 1-D signals of length 40, float32 (N, 40).

    Made by the ``mnist1d`` package's own generator (``mnist1d.data.make_dataset``) with its
    published arguments (``get_dataset_args()``) but ``num_samples`` and ``seed``, whose
    defaults are the published ones: 5,000 samples (``num_samples // 10`` per digit), the
    first 80% for training (4,000) and the rest for testing, seed 42. The run's seed is not
    used: every trial of a sweep sees one data set.

    The set is made once per (num_samples, seed, package version) and cached as
    ``<root>/mnist1d/mnist1d-n{num_samples}-seed{seed}-v{version}.npz`` (root: ``data_dir``,
    else ``$KAVG_DATA_DIR``, else ``~/.cache/kavg_ray``), written atomically under a lock,
    so the learners of a node and later trials read it instead of making it again.
    ``extras["generator_args"]`` holds the generator's arguments as used (read back from
    the file), ``extras["source"]`` the file.
    """
    if not 10 <= int(num_samples):
        raise ValueError(f"mnist1d num_samples must be >= 10 (one per digit), got {num_samples}")
    folder = _data_root(data_dir, MNIST1D_FOLDER) / MNIST1D_FOLDER
    path = folder / f"mnist1d-n{int(num_samples)}-seed{int(seed)}-v{_mnist1d_version()}.npz"
    arrays = _read_mnist1d(path)
    if arrays is None:
        folder.mkdir(parents=True, exist_ok=True)
        with _file_lock(folder / f".{path.name}.lock"):
            arrays = _read_mnist1d(path)  # another learner may have made it meanwhile
            if arrays is None:
                arrays = _generate_mnist1d(int(num_samples), int(seed))
                _write_npz_atomically(path, arrays)
                arrays = _read_mnist1d(path) or arrays
    args = json.loads(str(arrays["args"]))
    return Dataset(
        "mnist1d",
        torch.from_numpy(np.ascontiguousarray(arrays["x"], dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(arrays["y"], dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(arrays["x_test"], dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(arrays["y_test"], dtype=np.int64)),
        num_classes=10, input_shape=(int(arrays["x"].shape[1]),), task="classification",
        extras={"generator_args": args, "source": str(path)},
    )  # fmt: skip


def _mnist1d_version() -> str:
    """The installed mnist1d's version (read without importing the package: that imports
    matplotlib and scipy); a missing package is named with the fix."""
    from importlib import metadata

    try:
        return metadata.version("mnist1d")
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            "dataset mnist1d needs the package mnist1d: pip install mnist1d"
        ) from None


def _generate_mnist1d(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """The package's generator with its published arguments but these two. It seeds
    numpy's and Python's global generators; their states are restored after."""
    import random

    from mnist1d.data import get_dataset_args, make_dataset
    from mnist1d.utils import ObjectView

    args = get_dataset_args(as_dict=True)
    args.update(num_samples=num_samples, seed=seed)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        made = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    args.pop("url", None)  # where the published pickle lives: not an argument of the data
    return {
        "x": np.asarray(made["x"], dtype=np.float32),
        "y": np.asarray(made["y"], dtype=np.int64),
        "x_test": np.asarray(made["x_test"], dtype=np.float32),
        "y_test": np.asarray(made["y_test"], dtype=np.int64),
        "args": np.array(json.dumps(args, sort_keys=True)),
    }


def _read_mnist1d(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing or unreadable (made again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("x", "y", "x_test", "y_test", "args")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return arrays


def _write_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to a temporary file in ``path``'s folder, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the set from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself, durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (where there is one), so that one process makes a
    cached set while the others wait for it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: every process may make it; the rename stays atomic
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Text


def generate_corpus(chars: int = 120_000, seed: int = 0) -> str:
    """A seeded, structured English-like corpus of ``chars`` characters, made offline.

    A vocabulary of 48 made-up words (2 to 7 letters) and a first-order chain over them:
    each word is followed by one of its three successors with probabilities 0.6, 0.3 and
    0.1. Sentences of 4 to 11 words start with a capital and end with ". ". A character
    model learns the spelling of the words first, then which word follows which.
    """
    rng = np.random.RandomState(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.randint(2, 8))) for _ in range(48)]
    successors = rng.randint(len(words), size=(len(words), 3))
    n_words = chars // 3 + 16  # words are at least 3 characters with their space
    picks = rng.choice(3, size=n_words, p=[0.6, 0.3, 0.1])
    lengths = rng.randint(4, 12, size=n_words // 4 + 1)
    starts = rng.randint(len(words), size=lengths.size)
    out: list[str] = []
    total, used = 0, 0
    for length, w in zip(lengths, starts, strict=True):
        sentence = []
        for _ in range(length):
            sentence.append(words[w])
            w = successors[w, picks[used % n_words]]
            used += 1
        text = " ".join(sentence).capitalize() + ". "
        out.append(text)
        total += len(text)
        if total >= chars:
            break
    return "".join(out)[:chars]


def load_text(
    path: str | None = None,
    seq_len: int = 64,
    chars: int = 120_000,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """A character-level language-modelling set: int64 token sequences (N, seq_len).

    The corpus is the UTF-8 file ``path``, or :func:`generate_corpus` (``chars``, ``seed``).
    Tokens are the corpus's distinct characters in sorted order (``extras["vocab"]``); the
    last ``test_fraction`` of it is the test text. Each text is cut into non-overlapping
    windows: the input is ``seq_len`` tokens, the target the same window shifted by one.
    """
    if path is not None:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    else:
        text = generate_corpus(chars, seed)
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    n_test = int(len(ids) * test_fraction)
    train_x, train_y = _windows(ids[: len(ids) - n_test], seq_len)
    test_x, test_y = _windows(ids[len(ids) - n_test :], seq_len)
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError(
            f"text of {len(ids)} characters is too short for sequences of {seq_len} with "
            f"test_fraction {test_fraction}"
        )
    return Dataset(
        "text", train_x, train_y, test_x, test_y, num_classes=len(vocab),
        input_shape=(seq_len,), task="classification",
        extras={"vocab": "".join(vocab), "source": path or f"generated(seed={seed})"},
    )  # fmt: skip


def _windows(ids: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].reshape(n, seq_len).clone()
    y = ids[1 : n * seq_len + 1].reshape(n, seq_len).clone()
    return x, y


# --------------------------------------------------------------------------------------------
# Augmentation


def random_crop_flip(
    x: Tensor,
    generator: torch.Generator,
    *,
    padding: int = 4,
    fill: float | tuple[float, ...] = 0.0,
) -> Tensor:
    """Batched random crop (same size, zero-``fill`` padding) plus random horizontal flip.

    Per image this equals torchvision's ``RandomCrop(H, padding)`` then
    ``RandomHorizontalFlip()``, but all draws come from ``generator`` (a CPU generator) so
    the result is reproducible. ``fill`` (scalar or per channel) is used for floating-point
    input; integer input is padded with 0.
    """
    n, c, h, w = x.shape
    padded = x.new_zeros((n, c, h + 2 * padding, w + 2 * padding))
    if x.is_floating_point():
        fills = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1)
        padded += fills.view(1, -1, 1, 1) if fills.numel() > 1 else fills
    padded[:, :, padding : padding + h, padding : padding + w] = x
    off_y = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    off_x = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.arange(w)
    rows = off_y[:, None] + torch.arange(h)  # (n, h)
    # A flipped crop reads its columns right to left.
    cols = off_x[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)  # (n, w)
    batch = torch.arange(n)[:, None, None]
    dev = x.device
    # Advanced indices on dims 0, 2, 3 around a slice put the index dims first: (n, h, w, c).
    out = padded[batch.to(dev), :, rows[:, :, None].to(dev), cols[:, None, :].to(dev)]
    return out.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Sampling


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def steps_per_epoch(n_train: int, batch_size: int, world_size: int) -> int:
    """Local steps per learner per epoch: one epoch is n_train samples over all learners."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(
            f"batch_size and world_size must be >= 1, got batch_size={batch_size}, "
            f"world_size={world_size}"
        )
    if batch_size * world_size > n_train:
        raise ValueError(
            f"batch_size * world_size = {batch_size} * {world_size} = {batch_size * world_size} "
            f"exceeds the {n_train} training samples: one step of all learners needs more than "
            f"one epoch"
        )
    return n_train // (batch_size * world_size)


def epoch_indices(
    n_train: int,
    batch_size: int,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int,
    sampling: str = "shard",
) -> Tensor:
    """Training-set indices of learner ``rank`` for ``epoch``: int64 (steps, batch_size).

    ``shard``: one permutation per epoch, the same on every rank; rank r takes the r-th
    contiguous block of steps * batch_size indices, so ranks are disjoint (the last
    n_train mod (batch_size * world_size) samples of the permutation are skipped this epoch).
    ``iid``: uniform with replacement, an independent stream per (seed, epoch, rank).
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; valid samplings: {', '.join(SAMPLINGS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    steps = steps_per_epoch(n_train, batch_size, world_size)
    base = _epoch_seed(seed, epoch)
    if sampling == "shard":
        gen = torch.Generator().manual_seed(base % _SEED_MOD)
        perm = torch.randperm(n_train, generator=gen)
        block = steps * batch_size
        return perm[rank * block : (rank + 1) * block].reshape(steps, batch_size).clone()
    gen = torch.Generator().manual_seed((base * 4099 + rank) % _SEED_MOD)
    return torch.randint(n_train, (steps, batch_size), generator=gen, dtype=torch.int64)


def augment_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The CPU generator for learner ``rank``'s training augmentation in ``epoch``."""
    return torch.Generator().manual_seed(
        ((_epoch_seed(seed, epoch) * 4099 + rank) + _AUGMENT_SALT) % _SEED_MOD
    )


class LearnerEpochs:
    """One learner's plan of an epoch: its batches (``epoch_indices``, ``(steps,
    step_batch)`` on ``device``) and its augmentation stream, which consecutive calls for
    the same epoch continue; starting inside an epoch not begun here (a resume, a step
    budget's evaluation), the earlier steps' augmentation is drawn first."""

    def __init__(
        self, data: Any, step_batch: int, rank: int, world_size: int, seed: int,
        sampling: str, device: torch.device,
    ) -> None:  # fmt: skip
        self.data, self.step_batch, self.rank, self.world_size = data, step_batch, rank, world_size
        self.seed, self.sampling, self.device = seed, sampling, device
        self._plan: tuple[int, Tensor, torch.Generator] | None = None

    def at(self, epoch: int, first: int) -> tuple[Tensor, torch.Generator]:
        """Epoch ``epoch``'s batches and stream, positioned for step ``first``."""
        if self._plan is None or self._plan[0] != epoch or first == 0:
            data = self.data
            batches = epoch_indices(
                data.n_train, self.step_batch, self.rank, self.world_size, epoch, self.seed,
                self.sampling,
            ).to(self.device)  # fmt: skip
            gen = augment_generator(self.seed, epoch, self.rank)
            if first and data.augment is not None:
                for _ in data.train_batches(batches[:first], gen):
                    pass
            self._plan = (epoch, batches, gen)
        return self._plan[1], self._plan[2]
