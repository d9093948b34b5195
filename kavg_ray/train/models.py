"""Model zoo for the K-AVG experiments.

Every model maps a batch shaped ``(N, *input_shape)`` to ``(N, num_classes)``; ``gpt``
maps token sequences ``(N, T)`` to next-token logits ``(N, T, vocab)``. The CIFAR
models (``vgg16``, ``nin``, ``resnet18``) are the 32x32 variants used in the K-AVG paper's
experiments; ``mlp``, ``cnn`` and ``linear`` are small enough to train on two CPU cores, and so
are ``mlp1d`` and ``cnn1d``, the MNIST-1D paper's MLP and 1-D CNN (signals ``(L,)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kavg_ray.config import BUILTIN_MODELS
from kavg_ray.errors import BadInputError

#: The built-in models, by the names the config accepts (one list: kavg_ray.config).
MODELS = BUILTIN_MODELS

# CIFAR VGG-16: numbers are conv widths, "M" is a 2x2 max pool (five pools: 32 -> 1).
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip


def _flat_features(input_shape: tuple[int, ...]) -> int:
    return int(math.prod(input_shape))


def _image_shape(
    name: str, input_shape: tuple[int, ...], min_side: int = 1
) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"model {name!r} needs an image input shape (C, H, W), got {tuple(input_shape)}"
        )
    c, h, w = (int(s) for s in input_shape)
    if h < min_side or w < min_side:
        raise ValueError(
            f"model {name!r} needs images of at least {min_side}x{min_side}, got {h}x{w}"
        )
    return c, h, w


def _linear(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    # No bias: the synthetic least-squares target has no intercept, so without a bias the
    # loss Hessian is exactly the data second-moment matrix X^T X / n and the closed-form
    # constants of data.least_squares_constants() describe this model exactly.
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_flat_features(input_shape), num_classes, bias=False),
    )


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_flat_features(input_shape), 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )


def _cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, _, _ = _image_shape("cnn", input_shape, min_side=2)
    # The adaptive pool makes the head independent of the input size: on 8x8 digits it is a
    # no-op (4x4 after the max pool), on 32x32 CIFAR it averages 16x16 down to 4x4.
    return nn.Sequential(
        nn.Conv2d(c, 32, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )


def _mlp1d(
    input_shape: tuple[int, ...], num_classes: int, hidden: int = 100, layers: int = 2
) -> nn.Module:
    """The MNIST-1D paper's MLP: ``layers`` hidden layers of ``hidden`` units with ReLU
    (40-100-100-10 on MNIST-1D, 15,210 parameters)."""
    widths = [_flat_features(input_shape)] + [int(hidden)] * int(layers)
    body: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        body += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*body, nn.Linear(widths[-1], num_classes))


def _conv1d_length(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


def _cnn1d(input_shape: tuple[int, ...], num_classes: int, channels: int = 25) -> nn.Module:
    """The MNIST-1D paper's 1-D CNN (``ConvBase``): convolutions of kernel 5, 3, 3, stride 2,
    padding 1, ``channels`` wide, each with ReLU, then one linear layer (5,210 parameters
    on MNIST-1D). Takes signals (L,) (one channel) or (C, L)."""
    if len(input_shape) not in (1, 2):
        raise ValueError(f"model 'cnn1d' needs signals (L,) or (C, L), got {tuple(input_shape)}")
    c, length = (1, int(input_shape[0])) if len(input_shape) == 1 else map(int, input_shape)
    n = int(channels)
    out = length
    for kernel in (5, 3, 3):
        out = _conv1d_length(out, kernel, 2, 1)
    if out < 1:
        raise ValueError(f"model 'cnn1d' needs signals of length 3 or more, got {length}")
    head: list[nn.Module] = [nn.Unflatten(1, (1, length))] if len(input_shape) == 1 else []
    return nn.Sequential(
        *head,
        nn.Conv1d(c, n, kernel_size=5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(n, n, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(n, n, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(n * out, num_classes),
    )


def _vgg16(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, _, _ = _image_shape("vgg16", input_shape, min_side=32)
    layers: list[nn.Module] = []
    in_ch = c
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out_ch = int(item)
            layers += [
                nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
    return nn.Sequential(
        *layers,
        # 1x1 already for 32x32 inputs; keeps larger inputs working with the same classifier.
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    )


def _nin(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, _, _ = _image_shape("nin", input_shape, min_side=4)

    def mlpconv(in_ch: int, widths: tuple[int, int, int], kernel: int) -> list[nn.Module]:
        a, b, d = widths
        return [
            nn.Conv2d(in_ch, a, kernel_size=kernel, padding=kernel // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(a, b, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(b, d, kernel_size=1),
        ]

    return nn.Sequential(
        *mlpconv(c, (192, 160, 96), kernel=5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        nn.Dropout(0.5),
        *mlpconv(96, (192, 192, 192), kernel=5),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=3, stride=2, padding=1),
        nn.Dropout(0.5),
        # The last 1x1 conv emits one map per class; no ReLU after it (unlike the Caffe
        # model) because non-negative logits slow down training from scratch.
        *mlpconv(192, (192, 192, num_classes), kernel=3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def _resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, _, _ = _image_shape("resnet18", input_shape, min_side=8)
    from torchvision.models import resnet18  # lazy: torchvision is only needed here

    model = resnet18(weights=None, num_classes=num_classes)
    # CIFAR stem: a 7x7/2 conv plus max pool would shrink 32x32 to 8x8 before the first block.
    model.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions 0..t only.

    Written out (scores, a causal mask made in the forward pass, softmax) rather than
    with ``F.scaled_dot_product_attention``, whose CPU kernel has no ``vmap`` batching
    rule: the simulated backend runs all learners' attention in one batched call. No mask
    buffer, nothing updated in place.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.heads))
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(-1)
        weights = F.dropout(weights, self.dropout, self.training)
        return self.proj((weights @ v).transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """A pre-norm transformer block: attention, then a GELU MLP, each added to the input."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """A small causal transformer: tokens (B, T) int64 -> next-token logits (B, T, vocab)."""

    def __init__(
        self, vocab: int, seq_len: int, dim: int = 64, layers: int = 2, heads: int = 4,
        mlp_ratio: int = 4, dropout: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.zeros(seq_len, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, dropout) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        # GPT-2's scale (std 0.02) from a uniform draw: normal_ is slow on the meta device,
        # where the simulated backend sizes a model before building it.
        bound = 0.02 * math.sqrt(3.0)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.uniform_(module.weight, -bound, bound)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.uniform_(self.positions, -bound, bound)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tokens(idx) + self.positions[: idx.shape[-1]]
        return self.head(self.norm(self.blocks(x)))


def _gpt(input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    if len(input_shape) != 1:
        raise ValueError(f"model 'gpt' needs token sequences (T,), got {tuple(input_shape)}")
    return GPT(num_classes, int(input_shape[0]), **options)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "vgg16": _vgg16,
    "nin": _nin,
    "resnet18": _resnet18,
    "linear": _linear,
    "gpt": _gpt,
    "mlp1d": _mlp1d,
    "cnn1d": _cnn1d,
}
# The models that take model_args (the names of kavg_ray.config's options classes).
_WITH_OPTIONS = ("gpt", "mlp1d", "cnn1d")


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    options: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """Build model ``name`` for inputs shaped ``input_shape`` (without the batch dimension).

    ``num_classes`` is the output width: the number of classes (the vocabulary for
    ``gpt``), or 1 for the synthetic least-squares task (use ``linear`` there).
    ``options`` are ``gpt``'s sizes (dim, layers, heads, mlp_ratio, dropout), ``mlp1d``'s
    (hidden, layers) or ``cnn1d``'s (channels); the other models take none.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if options and name not in _WITH_OPTIONS:
        raise ValueError(f"model {name!r} takes no options, got {sorted(options)}")
    shape = tuple(int(s) for s in input_shape)
    return _BUILDERS[name](shape, int(num_classes), **dict(options or {}))


# --------------------------------------------------------------------------- model size
# What the cost model prices for a trial that moved no bytes (the analysis layer imports
# no torch, so the CLI hands it this function).

_INPUT = {
    "digits": ((1, 8, 8), 10), "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100),
    "mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10), "mnist1d": ((40,), 10),
}  # fmt: skip


@lru_cache(maxsize=64)
def _model_bytes_cached(model: str, input_shape: tuple[int, ...], outputs: int) -> int:
    with torch.device("meta"):
        m = build_model(model, input_shape, outputs)
    tensors = list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


def model_bytes(model: str, dataset: str, synthetic: Mapping[str, Any] | None = None) -> int:
    """Bytes one average moves for ``model`` on ``dataset``: its parameters and floating
    buffers (float32), from the model built on torch's meta device (nothing allocated)."""
    if dataset in _INPUT:
        shape, outputs = _INPUT[dataset]
    elif dataset == "synthetic":
        opts = {"task": "classification", "dim": 20, "num_classes": 4, **(synthetic or {})}
        shape = (int(opts["dim"]),)
        outputs = int(opts["num_classes"]) if opts["task"] == "classification" else 1
    else:
        raise BadInputError(f"cannot size model {model!r}: unknown dataset {dataset!r}")
    try:
        return _model_bytes_cached(str(model), shape, outputs)
    except ValueError as exc:
        raise BadInputError(f"cannot size model {model!r} on {dataset}: {exc}") from None
