import pytest
import torch
from torch import nn

from kavg_ray.train.models import MODELS, build_model

DIGITS_SHAPE = (1, 8, 8)
CIFAR_SHAPE = (3, 32, 32)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_models_tuple_lists_every_model():
    assert set(MODELS) == {"mlp", "cnn", "vgg16", "nin", "resnet18", "linear", "gpt"}


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
