import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kavg_ray.train.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASETS,
    augment_generator,
    epoch_indices,
    least_squares_constants,
    load_dataset,
    random_crop_flip,
    steps_per_epoch,
)
from kavg_ray.train.models import build_model

# ------------------------------------------------------------------------------------ digits


def test_digits_split_sizes_and_content():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert (ds.n_train, ds.n_test) == (1437, 360)
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert ds.task == "classification" and ds.augment is None

    raw = load_digits()
    perm = np.random.RandomState(0).permutation(1797)
    expect_x = torch.from_numpy(raw.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    expect_y = torch.from_numpy(raw.target.astype(np.int64))
    assert torch.equal(ds.test_x, expect_x[perm[:360]])
    assert torch.equal(ds.test_y, expect_y[perm[:360]])
    assert torch.equal(ds.train_x, expect_x[perm[360:]])
    assert torch.equal(ds.train_y, expect_y[perm[360:]])
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0
    # prepare() leaves float data alone.
    assert ds.prepare(ds.test_x) is ds.test_x


def test_digits_read_without_importing_sklearn():
    """Every learner loads the digits: the bundled file is read without sklearn's import."""
    code = (
        "import sys; from kavg_ray.train.data import load_dataset; ds = load_dataset('digits'); "
        "print(ds.n_train, int(ds.train_y.sum()), 'sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ds = load_dataset("digits")
    assert out.stdout.split() == ["1437", str(int(ds.train_y.sum())), "False"]


def test_digits_fallback_through_sklearn(monkeypatch):
    import kavg_ray.train.data as data

    expected = load_dataset("digits")
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    ds = load_dataset("digits")
    assert torch.equal(ds.train_x, expected.train_x) and torch.equal(ds.test_y, expected.test_y)


def test_digits_split_does_not_depend_on_seed():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=123)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)


# ---------------------------------------------------------------------------------- sampling


def test_steps_per_epoch():
    assert steps_per_epoch(1437, 16, 3) == 29
    assert steps_per_epoch(1437, 16, 1) == 89
    assert steps_per_epoch(32, 16, 2) == 1
    with pytest.raises(ValueError, match="exceeds the 31 training samples"):
        steps_per_epoch(31, 16, 2)
    with pytest.raises(ValueError):
        steps_per_epoch(100, 0, 2)


def test_shard_indices_disjoint_and_deterministic():
    n, b, p = 1437, 16, 3
    parts = [epoch_indices(n, b, r, p, epoch=2, seed=7, sampling="shard") for r in range(p)]
    for part in parts:
        assert part.shape == (29, 16) and part.dtype == torch.int64
        assert int(part.min()) >= 0 and int(part.max()) < n
    flat = torch.cat([part.flatten() for part in parts])
    assert flat.unique().numel() == 3 * 29 * 16  # disjoint across ranks, no repeats
    for r in range(p):
        assert torch.equal(parts[r], epoch_indices(n, b, r, p, 2, 7, "shard"))
    # The documented formula: one shared permutation, rank r takes the r-th block.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7 * 1_000_003 + 2))
    assert torch.equal(parts[1].flatten(), perm[29 * 16 : 2 * 29 * 16])
    # A new epoch or seed reshuffles.
    assert not torch.equal(parts[0], epoch_indices(n, b, 0, p, 3, 7, "shard"))
    assert not torch.equal(parts[0], epoch_indices(n, b, 0, p, 2, 8, "shard"))


def test_shard_is_the_default_sampling():
    assert torch.equal(
        epoch_indices(100, 8, 1, 2, 0, 0), epoch_indices(100, 8, 1, 2, 0, 0, "shard")
    )


def test_iid_indices():
    n, b, p = 200, 8, 4
    parts = [epoch_indices(n, b, r, p, epoch=1, seed=3, sampling="iid") for r in range(p)]
    for r, part in enumerate(parts):
        assert part.shape == (6, 8) and part.dtype == torch.int64
        assert torch.equal(part, epoch_indices(n, b, r, p, 1, 3, "iid"))
    assert not torch.equal(parts[0], parts[1])
    gen = torch.Generator().manual_seed((3 * 1_000_003 + 1) * 4099 + 2)
    assert torch.equal(parts[2], torch.randint(n, (6, 8), generator=gen))
    # With replacement: over many draws some index repeats within one learner's epoch.
    big = epoch_indices(50, 10, 0, 1, 0, 0, "iid")
    assert big.unique().numel() < big.numel()


def test_epoch_indices_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown sampling 'random'"):
        epoch_indices(100, 8, 0, 2, 0, 0, "random")
    with pytest.raises(ValueError, match="rank"):
        epoch_indices(100, 8, 2, 2, 0, 0, "shard")
    with pytest.raises(ValueError, match="exceeds"):
        epoch_indices(10, 8, 0, 2, 0, 0, "shard")


def test_augment_generator_is_deterministic_and_distinct():
    def draw(g: torch.Generator) -> torch.Tensor:
        return torch.randint(1 << 30, (4,), generator=g)

    assert torch.equal(draw(augment_generator(1, 2, 0)), draw(augment_generator(1, 2, 0)))
    assert not torch.equal(draw(augment_generator(1, 2, 0)), draw(augment_generator(1, 2, 1)))
    assert not torch.equal(draw(augment_generator(1, 2, 0)), draw(augment_generator(1, 3, 0)))


# --------------------------------------------------------------------------------- synthetic


def test_synthetic_classification_is_seeded_and_learnable():
    ds = load_dataset("synthetic")
    assert ds.train_x.shape == (2048, 20) and ds.test_x.shape == (512, 20)
    assert ds.train_y.dtype == torch.int64 and ds.num_classes == 4
    assert ds.input_shape == (20,) and ds.task == "classification"
    again = load_dataset("synthetic", seed=99)  # the trial seed does not change the data
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.test_y, again.test_y)
    other = load_dataset("synthetic", synthetic={"seed": 1})
    assert not torch.equal(ds.train_x, other.train_x)
    assert set(ds.train_y.tolist()) == {0, 1, 2, 3}
    # Nearest class center classifies the test set almost perfectly.
    centers = ds.extras["centers"]
    pred = torch.cdist(ds.test_x, centers).argmin(dim=1)
    assert (pred == ds.test_y).float().mean() > 0.97


def test_synthetic_options_validated():
    with pytest.raises(ValueError, match="unknown synthetic option"):
        load_dataset("synthetic", synthetic={"dims": 3})
    with pytest.raises(ValueError, match="unknown synthetic task"):
        load_dataset("synthetic", synthetic={"task": "ranking"})


def test_least_squares_constants_match_independent_computation():
    opts = {"task": "least_squares", "n_train": 512, "n_test": 64, "dim": 6, "noise": 0.1}
    ds = load_dataset("synthetic", synthetic=opts)
    assert ds.task == "regression" and ds.num_classes == 1
    assert ds.train_y.shape == (512, 1) and ds.train_y.dtype == torch.float32
    assert ds.extras["w_star"].shape == (6, 1)
    assert torch.equal(ds.extras["covariance"], torch.eye(6))

    c = least_squares_constants(ds)
    x = ds.train_x.double().numpy()
    y = ds.train_y.double().numpy()
    # L via the singular values of X: sigma_max(X)^2 / n = lambda_max(X^T X / n).
    sigma = np.linalg.svd(x, compute_uv=False)
    assert c["L"] == pytest.approx(sigma[0] ** 2 / 512, rel=1e-10)
    assert c["mu"] == pytest.approx(sigma[-1] ** 2 / 512, rel=1e-10)
    assert 0.5 < c["mu"] < c["L"] < 2.0  # x ~ N(0, I): eigenvalues near 1
    # Normal equations hold at w_opt, and w_opt is close to the generating w_star.
    w = c["w_opt"].numpy()
    assert np.allclose(x.T @ (x @ w - y), 0.0, atol=1e-8)
    assert np.allclose(w, ds.extras["w_star"].double().numpy(), atol=0.05)
    assert c["F_star"] == pytest.approx(0.5 * np.mean((x @ w - y) ** 2), rel=1e-12)
    assert c["F_star"] == pytest.approx(0.5 * 0.1**2, rel=0.3)  # half the noise variance
    resid = (x @ w - y)[:, 0]
    assert c["M_at_opt"] == pytest.approx(np.mean((x**2).sum(1) * resid**2), rel=1e-12)

    # The constants describe the `linear` model under the documented half-MSE loss:
    # its loss Hessian has top eigenvalue L, and its loss at w_opt is F_star.
    model = build_model("linear", (6,), 1).double()
    xt, yt = ds.train_x.double(), ds.train_y.double()

    def loss(weight: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((xt @ weight.T - yt) ** 2).mean()

    hess = torch.autograd.functional.hessian(loss, model[1].weight.detach()).reshape(6, 6)
    assert float(torch.linalg.eigvalsh(hess)[-1]) == pytest.approx(c["L"], rel=1e-10)
    with torch.no_grad():
        model[1].weight.copy_(c["w_opt"].T)
        assert float(0.5 * ((model(xt) - yt) ** 2).mean()) == pytest.approx(c["F_star"])

    # With an intercept the Hessian gains a constant feature.
    cb = least_squares_constants(ds, bias=True)
    xb = np.hstack([x, np.ones((512, 1))])
    assert cb["L"] == pytest.approx(np.linalg.svd(xb, compute_uv=False)[0] ** 2 / 512)
    assert cb["w_opt"].shape == (7, 1)


def test_least_squares_constants_rejects_classification():
    with pytest.raises(ValueError, match="regression"):
        least_squares_constants(load_dataset("synthetic"))


# ----------------------------------------------------------------------------------- cifar10


def _write_tiny_cifar10(root, per_batch=4, n_test=6):
    """A tiny set in CIFAR-10's own on-disk format (pickled dicts, bytes keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        data = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
        labels = rng.randint(0, 10, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
        written[name] = (data, labels)
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return folder, written


def test_cifar10_local_set_round_trips(tmp_path):
    folder, written = _write_tiny_cifar10(tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (20, 3, 32, 32)
    assert ds.test_x.shape == (6, 3, 32, 32) and ds.train_y.dtype == torch.int64
    train_data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert np.array_equal(ds.train_x.numpy().reshape(20, 3072), train_data)
    assert ds.train_y.tolist() == train_labels
    assert np.array_equal(ds.test_x.numpy().reshape(6, 3072), written["test_batch"][0])
    assert ds.test_y.tolist() == written["test_batch"][1]
    # Row layout: the first 1024 bytes are the red plane, row-major.
    assert int(ds.train_x[0, 0, 0, 1]) == int(train_data[0, 1])
    assert int(ds.train_x[0, 1, 0, 0]) == int(train_data[0, 1024])
    assert ds.extras["classes"] == [f"class{i}" for i in range(10)]
    assert (ds.num_classes, ds.input_shape) == (10, (3, 32, 32))

    # data_dir may also name the batches folder itself.
    direct = load_dataset("cifar10", data_dir=folder)
    assert torch.equal(direct.train_x, ds.train_x)


def test_cifar10_prepare_and_augment(tmp_path):
    _write_tiny_cifar10(tmp_path)
    ds = load_dataset("cifar10", data_dir=str(tmp_path))
    raw = ds.train_x[:8]
    x = ds.prepare(raw)
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32)
    for ch in range(3):
        expect = (raw[3, ch, 5, 7].item() / 255.0 - CIFAR10_MEAN[ch]) / CIFAR10_STD[ch]
        assert x[3, ch, 5, 7].item() == pytest.approx(expect, abs=1e-5)

    out = ds.augment(x, augment_generator(0, 0, 0))
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, ds.augment(x, augment_generator(0, 0, 0)))
    # Padding is black: augmenting prepared images equals preparing augmented raw images.
    raw_aug = random_crop_flip(raw, augment_generator(0, 0, 0), padding=4)
    assert raw_aug.dtype == torch.uint8
    assert torch.allclose(out, ds.prepare(raw_aug), atol=1e-5)


def test_random_crop_flip_is_a_crop_or_mirrored_crop():
    x = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(x, torch.Generator().manual_seed(5), padding=4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    found = set()
    for i in range(x.shape[0]):
        matches = [
            (oy, ox, flip)
            for oy in range(9)
            for ox in range(9)
            for flip in (False, True)
            if torch.equal(
                out[i],
                padded[i, :, oy : oy + 32, ox : ox + 32].flip(-1)
                if flip
                else padded[i, :, oy : oy + 32, ox : ox + 32],
            )
        ]
        assert matches, f"image {i} is not a crop of its padded input"
        found.add(matches[0])
    assert {f for _, _, f in found} == {False, True}
    assert len({(oy, ox) for oy, ox, _ in found}) > 5


def test_cifar10_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found under") as info:
        load_dataset("cifar10", data_dir=missing, download=False)
    assert str(missing) in str(info.value)
    assert "download: true" in str(info.value) and "cifar-10-batches-py" in str(info.value)


# ----------------------------------------------------------------------------------- mnist1d


@pytest.fixture(scope="module")
def mnist1d_dir(tmp_path_factory):
    """One cache folder for this module's MNIST-1D sets (each is made once)."""
    return tmp_path_factory.mktemp("mnist1d-cache")


def test_mnist1d_published_defaults_shapes_and_split(mnist1d_dir):
    ds = load_dataset("mnist1d", data_dir=mnist1d_dir)
    assert (ds.n_train, ds.n_test) == (4000, 1000)  # 5,000 samples, 80% for training
    assert ds.train_x.shape == (4000, 40) and ds.test_x.shape == (1000, 40)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.input_shape == (40,) and ds.num_classes == 10 and ds.task == "classification"
    labels = torch.cat([ds.train_y, ds.test_y])
    assert torch.bincount(labels).tolist() == [500] * 10  # num_samples // 10 per digit
    # The generator standardises the whole set (mean 0, std 1) before splitting it.
    x = torch.cat([ds.train_x, ds.test_x]).double()
    assert abs(x.mean().item()) < 1e-5 and x.std().item() == pytest.approx(1.0, abs=1e-3)
    small = load_dataset("mnist1d", data_dir=mnist1d_dir, options={"num_samples": 1003})
    assert (small.n_train, small.n_test) == (800, 200)  # 1003 // 10 = 100 per digit


def test_mnist1d_is_deterministic_per_seed_and_leaves_global_rngs_alone(tmp_path):
    import random

    np.random.seed(7)
    random.seed(7)
    before = np.random.get_state()[1].copy(), random.getstate()
    a = load_dataset("mnist1d", data_dir=tmp_path / "a", options={"num_samples": 300, "seed": 3})
    b = load_dataset("mnist1d", data_dir=tmp_path / "b", options={"num_samples": 300, "seed": 3})
    c = load_dataset("mnist1d", data_dir=tmp_path / "a", options={"num_samples": 300, "seed": 4})
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.train_x, c.train_x)
    # The run's seed is not the generator's: every trial sees one data set.
    d = load_dataset("mnist1d", data_dir=tmp_path / "a", seed=9, options={"num_samples": 300,
                                                                          "seed": 3})
    assert torch.equal(a.train_x, d.train_x)


def test_mnist1d_cache_is_reused_and_made_again_when_unreadable(tmp_path, monkeypatch):
    from kavg_ray.train import data

    calls = []
    real = data._generate_mnist1d

    def counting(num_samples, seed):
        calls.append((num_samples, seed))
        return real(num_samples, seed)

    monkeypatch.setattr(data, "_generate_mnist1d", counting)
    first = load_dataset("mnist1d", data_dir=tmp_path, options={"num_samples": 200, "seed": 1})
    second = load_dataset("mnist1d", data_dir=tmp_path, options={"num_samples": 200, "seed": 1})
    assert calls == [(200, 1)]  # the second load read the file
    assert torch.equal(first.train_x, second.train_x)
    path = tmp_path / "mnist1d" / Path(first.extras["source"]).name
    assert first.extras["source"] == str(path) and path.is_file()
    assert path.name.startswith("mnist1d-n200-seed1-v")
    assert [p.name for p in path.parent.iterdir() if p.suffix == ".tmp"] == []  # renamed
    # Another argument set is another file; $KAVG_DATA_DIR is the default root.
    monkeypatch.setenv("KAVG_DATA_DIR", str(tmp_path))
    load_dataset("mnist1d", options={"num_samples": 200, "seed": 2})
    assert calls == [(200, 1), (200, 2)]
    load_dataset("mnist1d", options={"num_samples": 200, "seed": 2})
    assert len(calls) == 2
    path.write_bytes(b"not a zip")  # a damaged file is made again, not trusted
    again = load_dataset("mnist1d", data_dir=tmp_path, options={"num_samples": 200, "seed": 1})
    assert len(calls) == 3 and torch.equal(again.train_x, first.train_x)


def test_mnist1d_generator_arguments_round_trip(tmp_path, monkeypatch):
    """The generator gets its published arguments but num_samples and seed, and the set
    carries them back (from the cached file)."""
    import mnist1d.data

    from kavg_ray.train import data

    seen = []
    real = mnist1d.data.make_dataset

    def spy(args=None, template=None):
        seen.append(dict(vars(args)))
        return real(args, template)

    monkeypatch.setattr(mnist1d.data, "make_dataset", spy)
    ds = load_dataset("mnist1d", data_dir=tmp_path, options={"num_samples": 250, "seed": 11})
    published = mnist1d.data.get_dataset_args(as_dict=True)
    assert seen == [{**published, "num_samples": 250, "seed": 11}]
    expected = {k: v for k, v in seen[0].items() if k != "url"}
    assert json.loads(json.dumps(ds.extras["generator_args"])) == json.loads(json.dumps(expected))
    reread = data.load_mnist1d(250, 11, data_dir=tmp_path)
    assert len(seen) == 1 and reread.extras["generator_args"] == ds.extras["generator_args"]
    with pytest.raises(ValueError, match="num_samples must be >= 10"):
        data.load_mnist1d(9, data_dir=tmp_path)


def test_mnist1d_config_checks():
    from kavg_ray.config import RunConfig

    ok = {"dataset": "mnist1d", "model": "cnn1d", "dataset_args": {"num_samples": 20_000,
          "seed": 0}, "model_args": {"channels": 8}}  # fmt: skip
    assert RunConfig.model_validate({"K": 1, "workload": ok}).workload.dataset == "mnist1d"
    bad = [
        ({**ok, "dataset_args": {"n": 5}}, "dataset_args.n"),
        ({**ok, "dataset_args": {"num_samples": 5}}, "num_samples"),
        ({**ok, "model_args": {"width": 5}}, "model_args.width"),
        ({**ok, "model": "cnn", "model_args": {}}, "model cnn needs images"),
        ({"dataset": "digits", "model": "cnn1d"}, "model cnn1d needs 1-D signals"),
    ]
    for workload, match in bad:
        with pytest.raises(ValueError, match=match):
            RunConfig.model_validate({"K": 1, "workload": workload})
