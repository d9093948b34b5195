"""MNIST, Fashion-MNIST and CIFAR-100 from a local folder, read from small files this test
writes in each set's own on-disk format (idx-ubyte, gzipped or not; CIFAR-100's pickles)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kavg_ray.config import parse_run
from kavg_ray.errors import ConfigError
from kavg_ray.train import train
from kavg_ray.train.data import load_dataset, read_idx


def _idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = (0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def write_mnist(root: Path, folder: str, n_train: int, n_test: int, compress: bool) -> dict:
    """Images whose pixels encode their label (so a model can learn them), in idx files."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.RandomState(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.randint(10, size=n).astype(np.uint8)
        images = rng.randint(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label : 2 * label + 3, :] = 250
        _idx(raw / f"{split}-images-idx3-ubyte", images, compress)
        _idx(raw / f"{split}-labels-idx1-ubyte", labels, compress)
        arrays[split] = (images, labels)
    return arrays


def write_cifar100(root: Path, n_train: int, n_test: int) -> dict:
    """CIFAR-100's layout: pickled dicts with bytes keys, as the official archive loads."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(1)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.randint(0, 256, size=(n, 3 * 32 * 32)).astype(np.uint8)
        fine = rng.randint(100, size=n).tolist()
        entry = {b"data": data, b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]}
        (folder / split).write_bytes(pickle.dumps(entry))
        arrays[split] = (data, fine)
    names = [f"class{i}".encode() for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}))
    return arrays


@pytest.mark.parametrize(("name", "folder", "compress", "mean"),
                         [("mnist", "MNIST", True, 0.1307),
                          ("fashion_mnist", "FashionMNIST", False, 0.2860)])  # fmt: skip
def test_mnist_sets_from_idx_files(tmp_path, name, folder, compress, mean) -> None:
    arrays = write_mnist(tmp_path, folder, 40, 12, compress)
    ds = load_dataset(name, data_dir=tmp_path)
    assert ds.train_x.shape == (40, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrays["train"][0])
    assert ds.train_y.tolist() == arrays["train"][1].tolist()
    assert ds.test_y.tolist() == arrays["t10k"][1].tolist()
    assert (ds.num_classes, ds.input_shape, ds.name) == (10, (1, 28, 28), name)
    x = ds.prepare(ds.train_x[:1])
    assert x.dtype == torch.float32
    assert x[0, 0, 0, 0].item() == pytest.approx((arrays["train"][0][0, 0, 0] / 255 - mean)
                                                  / ds.norm_std[0])  # fmt: skip
    # data_dir may also name the folder of the files itself.
    again = load_dataset(name, data_dir=tmp_path / folder / "raw")
    assert torch.equal(again.test_x, ds.test_x)
    assert parse_run({"K": 1, "workload": {"dataset": name, "data_dir": str(tmp_path)}})
    assert parse_run({"K": 1, "workload": {"dataset": name,
                                           "data_dir": str(tmp_path / folder / "raw")}})


def test_cifar100_from_its_pickles(tmp_path) -> None:
    arrays = write_cifar100(tmp_path, 30, 10)
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert ds.train_x.shape == (30, 3, 32, 32) and ds.num_classes == 100
    assert np.array_equal(ds.train_x.reshape(30, -1).numpy(), arrays["train"][0])
    assert ds.train_y.tolist() == arrays["train"][1]
    assert ds.test_y.tolist() == arrays["test"][1]
    assert ds.extras["classes"][:2] == ["class0", "class1"]
    assert ds.augment is not None  # random crop and flip, as CIFAR-10
    out = ds.augment(ds.prepare(ds.train_x[:4]), torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 32, 32)


def test_missing_files_are_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="MNIST not found: no .*train-images-idx3-ubyte"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="CIFAR-100 not found"):
        load_dataset("cifar100", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="Fashion-MNIST not found: no FashionMNIST/raw"):
        parse_run({"K": 1, "workload": {"dataset": "fashion_mnist", "data_dir": str(tmp_path)}})


def test_a_file_of_another_kind_is_refused(tmp_path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    _idx(path, np.zeros((2, 3), dtype=np.uint8), compress=False)  # 2 dimensions, not 3
    with pytest.raises(ValueError, match="not an idx-ubyte file of 3 dimensions"):
        read_idx(path, 3)


def test_mnist_trains(tmp_path) -> None:
    write_mnist(tmp_path, "MNIST", 256, 64, compress=True)
    doc = {"K": 2, "P": 2, "backend": "simulated", "workload": {
        "dataset": "mnist", "data_dir": str(tmp_path), "model": "mlp", "epochs": 3,
        "batch_size": 16, "lr": {"initial": 0.05}}}  # fmt: skip
    reports: list[dict] = []
    train(parse_run(doc), lambda m, s: reports.append(m))
    assert reports[-1]["test_acc"] >= 0.9  # the stripes give the label away
