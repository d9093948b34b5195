import pytest
import torch
from torch import nn

from kavg_ray.train.models import MODELS, build_model

DIGITS_SHAPE = (1, 8, 8)
CIFAR_SHAPE = (3, 32, 32)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_models_tuple_lists_every_model():
    assert set(MODELS) == {
        "mlp", "cnn", "vgg16", "nin", "resnet18", "linear", "gpt", "mlp1d", "cnn1d",
    }  # fmt: skip


def test_config_accepts_exactly_the_built_models_and_datasets():
    """A name the config accepts must build or load, and every model that builds and every
    data set that loads must be nameable: the names are written once (kavg_ray.config) and
    the builders and loaders must not drift from them."""
    from kavg_ray.config import BUILTIN_DATASETS, BUILTIN_MODELS
    from kavg_ray.train import data, models

    assert MODELS is BUILTIN_MODELS and data.DATASETS is BUILTIN_DATASETS
    assert set(models._BUILDERS) == set(BUILTIN_MODELS)
    assert set(data._LOADERS) == set(BUILTIN_DATASETS)


@pytest.mark.parametrize(
    ("name", "shape", "num_classes"),
    [
        ("mlp", DIGITS_SHAPE, 10),
        ("cnn", DIGITS_SHAPE, 10),
        ("linear", DIGITS_SHAPE, 10),
        ("linear", (20,), 1),
        ("mlp", (20,), 4),
        ("cnn", CIFAR_SHAPE, 10),
        ("vgg16", CIFAR_SHAPE, 10),
        ("nin", CIFAR_SHAPE, 10),
        ("resnet18", CIFAR_SHAPE, 7),
        ("mlp1d", (40,), 10),
        ("cnn1d", (40,), 10),
        ("cnn1d", (2, 40), 10),
        ("mlp1d", DIGITS_SHAPE, 10),
    ],
)
def test_forward_shape(name, shape, num_classes):
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes)
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    # Gradients reach the first layer: the model is one connected graph.
    out.sum().backward()
    first = next(iter(model.parameters()))
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_mlp_structure():
    model = build_model("mlp", DIGITS_SHAPE, 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 128), (128, 10)]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_linear_is_one_bias_free_layer():
    model = build_model("linear", (20,), 1)
    params = list(model.parameters())
    assert len(params) == 1 and params[0].shape == (1, 20)
    x = torch.randn(5, 20)
    assert torch.allclose(model(x), x @ params[0].T)


def test_cnn_is_small_and_has_no_batchnorm():
    model = build_model("cnn", DIGITS_SHAPE, 10)
    assert _n_params(model) < 300_000
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_resnet18_parameter_count():
    model = build_model("resnet18", CIFAR_SHAPE, 10)
    n = _n_params(model)
    assert abs(n - 11_173_962) / 11_173_962 < 0.01, n
    # CIFAR stem: 3x3 stride-1 conv and no max pool.
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


def test_vgg16_has_batchnorm_buffers():
    model = build_model("vgg16", CIFAR_SHAPE, 10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 13  # one per conv layer of VGG-16
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128] + [256] * 3 + [512] * 6
    buffers = dict(model.named_buffers())
    assert any(k.endswith("running_mean") for k in buffers)
    assert all(
        b.running_mean is not None and b.running_mean.shape == (b.num_features,) for b in bns
    )
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in last] == [(512, 10)]


def test_nin_structure():
    model = build_model("nin", CIFAR_SHAPE, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [192, 160, 96, 192, 192, 192, 192, 192, 10]
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # global average pool
    assert any(isinstance(m, nn.Dropout) for m in model.modules())


def test_unknown_model_raises_with_valid_names():
    with pytest.raises(ValueError, match="unknown model 'alexnet'") as info:
        build_model("alexnet", CIFAR_SHAPE, 10)
    for name in MODELS:
        assert name in str(info.value)


def test_image_model_rejects_flat_input():
    with pytest.raises(ValueError, match="image input shape"):
        build_model("cnn", (20,), 4)
    with pytest.raises(ValueError, match="at least 32x32"):
        build_model("vgg16", DIGITS_SHAPE, 10)


def test_mnist1d_models_have_the_published_shapes():
    """Greydanus (2020)'s MLP 40-100-100-10 and ConvBase (25 channels, 125 features into the
    linear layer), parameter for parameter; both sized through their options."""
    mlp = build_model("mlp1d", (40,), 10)
    assert [(m.in_features, m.out_features) for m in mlp.modules() if isinstance(m, nn.Linear)] \
        == [(40, 100), (100, 100), (100, 10)]
    assert _n_params(mlp) == 15_210
    cnn = build_model("cnn1d", (40,), 10)
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.kernel_size[0], c.stride[0], c.padding[0], c.out_channels) for c in convs] == [
        (5, 2, 1, 25), (3, 2, 1, 25), (3, 2, 1, 25),
    ]  # fmt: skip
    assert [m.in_features for m in cnn.modules() if isinstance(m, nn.Linear)] == [125]
    assert _n_params(cnn) == 5_210
    wide = build_model("mlp1d", (40,), 10, {"hidden": 32, "layers": 3})
    assert _n_params(wide) == 40 * 32 + 32 + 2 * (32 * 32 + 32) + 32 * 10 + 10
    assert _n_params(build_model("cnn1d", (40,), 10, {"channels": 8})) == (
        8 * 5 + 8 + 2 * (8 * 8 * 3 + 8) + 8 * 5 * 10 + 10
    )
    with pytest.raises(ValueError, match="takes no options"):
        build_model("mlp", (40,), 10, {"hidden": 3})
    with pytest.raises(ValueError, match="signals"):
        build_model("cnn1d", DIGITS_SHAPE, 10)


def test_mnist1d_models_stack_under_vmap():
    """The simulated engine runs P learners as vmap(grad(functional_call)): the 1-D models
    must batch there, learner by learner equal to the model run alone."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    for name in ("mlp1d", "cnn1d"):
        models = []
        for seed in range(3):
            torch.manual_seed(seed)
            models.append(build_model(name, (40,), 10))
        params, buffers = stack_module_state(models)
        x, y = torch.randn(3, 8, 40), torch.randint(0, 10, (3, 8))

        def loss(p, b, xb, yb, base=models[0]):
            out = functional_call(base, (p, b), (xb,))
            return torch.nn.functional.cross_entropy(out, yb)

        grads = vmap(grad(loss))(params, buffers, x, y)
        for r, model in enumerate(models):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x[r]), y[r]).backward()
            for pname, p in model.named_parameters():
                assert torch.allclose(grads[pname][r], p.grad, atol=1e-6), (name, pname)
