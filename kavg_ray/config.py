"""Run configs and sweep specs: parsing and validation.

Everything here imports only pydantic and yaml, so a bad file is refused in well
under a second, before torch or Ray are loaded.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from kavg_ray.errors import ConfigError


@dataclass(frozen=True)
class Algorithm:
    """One row of the algorithm table: what a name means to validation, engines and rows."""

    name: str
    keys: tuple[str, ...]  # its own config keys, all required
    period_key: str  # the key reported as K in trial rows (the steps between updates)
    trial_head: str  # trial-name head, formatted with the config's keys and P
    needs_server: bool  # runs against a parameter server (kavg_ray.train.parameter_server)
    backends: tuple[str, ...]  # the backends it runs on
    # Values of its keys when a config leaves them out (a key without one is required).
    defaults: Mapping[str, Any] = field(default_factory=dict)


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("kavg", ("K",), "K", "K{K}-P{P}", False, ("ray", "simulated")),
        Algorithm(
            "hier_avg", ("S", "K1", "K2"), "K2", "S{S}-K1_{K1}-K2_{K2}-P{P}", False,
            ("ray", "simulated"),
        ),  # fmt: skip
        # Downpour (Dean et al., 2012): fetch and push every step unless set.
        Algorithm(
            "downpour", ("fetch_period", "push_period"), "push_period",
            "downpour-f{fetch_period}-p{push_period}-P{P}", True, ("ray",),
            defaults={"fetch_period": 1, "push_period": 1},
        ),  # fmt: skip
        # EAMSGD (Zhang, Choromanska, LeCun, 2015): beta = 0.9 (alpha = beta / P), their
        # setting in every experiment, and tau = 10, their ImageNet period (CIFAR: 1 to 64).
        # The K-AVG paper does not state the values it ran EAMSGD with.
        Algorithm(
            "eamsgd", ("tau", "beta"), "tau", "eamsgd-t{tau}-b{beta}-P{P}", True, ("ray",),
            defaults={"tau": 10, "beta": 0.9},
        ),  # fmt: skip
    )
}
ALGORITHM_KEYS = tuple(dict.fromkeys(k for a in ALGORITHMS.values() for k in a.keys))
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# Keys a sweep's grid may vary, and where each lives in a run config.
GRID_KEYS = {
    "K": ("K",),
    "P": ("P",),
    "seed": ("seed",),
    "S": ("S",),
    "K1": ("K1",),
    "K2": ("K2",),
    "fetch_period": ("fetch_period",),
    "push_period": ("push_period",),
    "tau": ("tau",),
    "beta": ("beta",),
    "lr": ("workload", "lr", "initial"),
    "batch_size": ("workload", "batch_size"),
    "epochs": ("workload", "epochs"),
    "momentum": ("workload", "momentum"),
    "optimizer": ("workload", "optimizer"),
    "outer_lr": ("outer", "lr"),
    "outer_momentum": ("outer", "momentum"),
    "warmup_steps": ("warmup_steps",),
    "outer_nesterov": ("outer", "nesterov"),
    "lr_schedule": ("workload", "lr", "schedule"),
    "lr_warmup_steps": ("workload", "lr", "warmup_steps"),
    "min_lr": ("workload", "lr", "min_lr"),
    "grad_clip": ("workload", "grad_clip"),
    "grad_accum": ("workload", "grad_accum"),
    "precision": ("workload", "precision"),
    "tf32": ("workload", "tf32"),
    "steps": ("workload", "steps"),
    "fragments": ("fragments",),
    "fragment_delay": ("fragment_delay",),
    "fragment_alpha": ("fragment_alpha",),
    "K_schedule": ("K_schedule",),
    "K_factor": ("K_factor",),
    "K_min": ("K_min",),
    "K_max": ("K_max",),
    "K_interval": ("K_interval",),
    "payload": ("payload",),
    "payload_error_feedback": ("payload_error_feedback",),
}
# Swept keys that the trial name ``K4-P2-s0`` does not already show; a grid over them
# appends ``-lr0.05``, ``-batch_size32`` ... so that every grid point has its own name.
CORE_KEYS = ("P", "seed", *ALGORITHM_KEYS)
MAX_GRID_POINTS = 10_000
MAX_FILE_BYTES = 1_000_000
# The side of the images of each data set (None: flat vectors), and the smallest image
# side each convolutional model accepts (see kavg_ray.train.models); checked here so that a
# mismatch is refused before Ray starts rather than inside a worker.
_IMAGE_SIDE = {
    "digits": 8, "cifar10": 32, "synthetic": None, "mnist": 28, "fashion_mnist": 28,
    "cifar100": 32, "mnist1d": None,
}  # fmt: skip
_MIN_IMAGE_SIDE = {"cnn": 2, "vgg16": 32, "nin": 4, "resnet18": 8}
# Models of 1-D signals (flat vectors: mnist1d, synthetic), refused on images.
_SIGNAL_MODELS = ("cnn1d",)
# Built-in data sets, models and losses; anything else is a factory "module.path:function"
# (docs/design.md section 8), imported and tried by kavg_ray.train.factories before a launch.
BUILTIN_DATASETS = (
    "digits", "synthetic", "cifar10", "mnist", "fashion_mnist", "cifar100", "text", "mnist1d",
)  # fmt: skip
BUILTIN_MODELS = ("linear", "mlp", "cnn", "vgg16", "nin", "resnet18", "gpt", "mlp1d", "cnn1d")
BUILTIN_LOSSES = ("cross_entropy", "mse")
BUILTIN_OPTIMIZERS = ("sgd", "adamw")  # what the simulated engine implements
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
FACTORY_RE = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}$")
# The torchvision data sets read from workload.data_dir: the folder each keeps its files in.
TORCHVISION_FOLDERS = {
    "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "mnist": "MNIST/raw",
    "fashion_mnist": "FashionMNIST/raw",
}  # fmt: skip
_DISPLAY_NAMES = {
    "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
}  # fmt: skip
# A grid key `model_args.NAME` or `dataset_args.NAME` sweeps one factory argument.
ARGS_KEY_RE = re.compile(r"^(model_args|dataset_args)\.([A-Za-z_][A-Za-z0-9_]*)$")


def is_factory(name: str) -> bool:
    """Whether a workload's dataset, model or loss names a factory ``module.path:function``."""
    return ":" in name


def _builtin_or_factory(value: str, builtins: tuple[str, ...]) -> str:
    if value in builtins or FACTORY_RE.match(value):
        return value
    names = ", ".join(f"'{b}'" for b in builtins[:-1]) + f" or '{builtins[-1]}'"
    raise ValueError(f"Input should be {names}, or a factory 'module.path:function'")


def grid_path(key: str) -> tuple[str, ...] | None:
    """Where a grid key lives in a run config (see GRID_KEYS and ARGS_KEY_RE); None: not
    sweepable."""
    if key in GRID_KEYS:
        return GRID_KEYS[key]
    m = ARGS_KEY_RE.match(key)
    return ("workload", m.group(1), m.group(2)) if m else None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _not_bool(value: Any) -> Any:
    # YAML reads yes/no/true/false as booleans; a number field must not take them as 1/0.
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


# Integers: only YAML integers (no booleans, strings or floats). Floats: any real number,
# and also a string such as "1e-3" (PyYAML reads 1e-3 without a dot as a string), but no
# boolean, infinity or NaN.
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]


class SyntheticOptions(_Strict):
    """The options of the synthetic data set (kavg_ray.train.data.make_synthetic)."""

    task: Literal["classification", "least_squares"] = "classification"
    n_train: Int = Field(default=2048, ge=1, le=10_000_000)
    n_test: Int = Field(default=512, ge=1, le=10_000_000)
    dim: Int = Field(default=20, ge=1, le=1_000_000)
    num_classes: Int = Field(default=4, ge=2, le=100_000)
    noise: Float = Field(default=0.1, ge=0)
    cluster_std: Float = Field(default=1.0, ge=0)
    seed: Int = Field(default=0, ge=0, le=2**32 - 1)


class TextOptions(_Strict):
    """``dataset: text``'s ``dataset_args`` (kavg_ray.train.data.load_text)."""

    path: str | None = Field(
        default=None, description="a UTF-8 text file; none: a seeded corpus generated offline"
    )
    seq_len: Int = Field(default=64, ge=2, le=65_536, description="characters per sequence")
    chars: Int = Field(
        default=120_000, ge=1_000, le=100_000_000,
        description="length of the generated corpus in characters (no path)",
    )  # fmt: skip
    test_fraction: Float = Field(
        default=0.1, gt=0, lt=1, description="the corpus's last fraction, held out for testing"
    )
    seed: Int = Field(
        default=0, ge=0, le=2**32 - 1,
        description="the generated corpus's seed (not the run's: every trial sees one corpus)",
    )  # fmt: skip


class MNIST1DOptions(_Strict):
    """``dataset: mnist1d``'s ``dataset_args`` (kavg_ray.train.data.load_mnist1d): the
    ``mnist1d`` package's generator with its published defaults, but for these two."""

    num_samples: Int = Field(
        default=5000, ge=10, le=1_000_000,
        description="samples made (the published 5,000): num_samples // 10 per digit, 80% "
        "for training",
    )  # fmt: skip
    seed: Int = Field(
        default=42, ge=0, le=2**32 - 1,
        description="the generator's seed (the published 42; not the run's: every trial sees "
        "one data set)",
    )  # fmt: skip


class MLP1DOptions(_Strict):
    """``model: mlp1d``'s ``model_args`` (the MNIST-1D paper's MLP, 40-100-100-10)."""

    hidden: Int = Field(default=100, ge=1, le=1_000_000, description="width of a hidden layer")
    layers: Int = Field(default=2, ge=1, le=100, description="hidden layers")


class CNN1DOptions(_Strict):
    """``model: cnn1d``'s ``model_args`` (the MNIST-1D paper's 1-D CNN: three convolutions,
    then one linear layer)."""

    channels: Int = Field(default=25, ge=1, le=65_536, description="channels of each convolution")


class GPTOptions(_Strict):
    """``model: gpt``'s ``model_args`` (kavg_ray.train.models.GPT, a small causal transformer)."""

    dim: Int = Field(default=64, ge=1, le=65_536, description="embedding width")
    layers: Int = Field(default=2, ge=1, le=1_000, description="transformer blocks")
    heads: Int = Field(default=4, ge=1, le=1_024, description="attention heads; divide dim")
    mlp_ratio: Int = Field(default=4, ge=1, le=64, description="MLP width / dim")
    dropout: Float = Field(default=0.0, ge=0, lt=1, description="dropout after attention and MLP")

    @model_validator(mode="after")
    def _check_heads(self) -> GPTOptions:
        if self.dim % self.heads:
            raise ValueError(f"heads={self.heads} does not divide dim={self.dim}")
        return self


SCHEDULES = ("constant", "step", "cosine", "linear")


class LRConfig(_Strict):
    """The inner learning rate per optimizer step (docs/design.md section 1, "Learning
    rate"): the paper's gamma0 halved every N epochs, or a cosine or linear decay to
    ``min_lr``, each after an optional linear warm-up."""

    initial: Float = Field(gt=0, description="initial (peak) learning rate gamma0")
    halve_every_epochs: Int | None = Field(
        default=None, ge=1, description="schedule step: halve the rate every this many epochs"
    )
    schedule: Literal[SCHEDULES] | None = Field(  # type: ignore[valid-type]
        default=None,
        description="constant | step | cosine | linear; none: step with halve_every_epochs, "
        "else constant",
    )
    warmup_steps: Int = Field(
        default=0, ge=0, le=100_000_000,
        description="linear warm-up: optimizer step s < W takes the rate times (s + 1) / W",
    )  # fmt: skip
    min_lr: Float = Field(
        default=0.0, ge=0, description="cosine and linear: the rate they decay to at the end"
    )

    @model_validator(mode="after")
    def _check_schedule(self) -> LRConfig:
        kind = self.kind
        if kind == "step" and self.halve_every_epochs is None:
            raise ValueError("schedule step needs halve_every_epochs")
        if kind != "step" and self.halve_every_epochs is not None:
            raise ValueError(f"halve_every_epochs belongs to schedule step, not {kind}")
        if kind not in ("cosine", "linear") and self.min_lr != 0:
            raise ValueError(f"min_lr belongs to schedules cosine and linear, not {kind}")
        if self.min_lr > self.initial:
            raise ValueError(f"min_lr {self.min_lr:g} is above initial {self.initial:g}")
        return self

    @property
    def kind(self) -> str:
        """The schedule: as given, else step with halve_every_epochs, else constant."""
        if self.schedule is not None:
            return self.schedule
        return "step" if self.halve_every_epochs is not None else "constant"

    def at_epoch(self, epoch: int) -> float:
        """Learning rate of schedule step (or constant) for a 0-based epoch, no warm-up."""
        if self.halve_every_epochs is None:
            return self.initial
        return self.initial * 0.5 ** (epoch // self.halve_every_epochs)

    def at_step(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """Learning rate of 0-based optimizer step ``step`` of a learner (counted over the
        whole run) of a run of ``total_steps`` steps, ``steps_per_epoch`` a epoch: a pure
        function of the three, so every engine, and a resumed run, set the same rates.

        constant: ``initial``; step: ``at_epoch(step // steps_per_epoch)``; cosine and
        linear: with progress ``p = (step - W) / (total_steps - W)`` clipped to [0, 1],
        ``min_lr + (initial - min_lr) (1 + cos(pi p)) / 2`` and ``initial + (min_lr -
        initial) p``. During the warm-up (step < W) the rate is multiplied by (step + 1) / W.
        """
        kind, W = self.kind, self.warmup_steps
        if kind == "constant":
            lr = self.initial
        elif kind == "step":
            lr = self.at_epoch(step // steps_per_epoch)
        else:
            p = min(1.0, max(0.0, (step - W) / max(1, total_steps - W)))
            span = self.initial - self.min_lr
            if kind == "cosine":
                lr = self.min_lr + span * 0.5 * (1.0 + math.cos(math.pi * p))
            else:
                lr = self.initial - span * p
        if step < W:
            lr = lr * (step + 1) / W
        return lr


class WorkloadConfig(_Strict):
    """What is trained: data set, model, budget and optimizer."""

    dataset: str = Field(
        default="digits", description="a built-in data set or a factory 'module.path:function'"
    )
    dataset_args: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the dataset factory (or text's)"
    )
    model: str = Field(
        default="mlp", description="a built-in model or a factory 'module.path:function'"
    )
    model_args: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the model factory (or gpt's)"
    )
    loss: str | None = Field(
        default=None,
        description="cross_entropy | mse | a factory 'module.path:function'; none: "
        "cross_entropy, or half the squared error for the synthetic least-squares task",
    )
    task: Literal["classification", "regression"] | None = Field(
        default=None,
        description="classification reports accuracy, regression only the loss; none: the "
        "data set's own (classification for a factory)",
    )
    in_memory_mb: Float = Field(
        default=512.0, ge=0,
        description="a factory data set up to this size is held as device tensors; a larger "
        "one is read through a DataLoader",
    )  # fmt: skip
    num_workers: Int = Field(
        default=1, ge=0, le=256, description="DataLoader worker processes (a data set read "
        "through a DataLoader)",
    )  # fmt: skip
    epochs: Int = Field(default=10, ge=1, le=100_000)
    batch_size: Int = Field(default=16, ge=1, le=1_000_000)
    lr: LRConfig = LRConfig(initial=0.1)
    momentum: Float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: Float = Field(default=0.0, ge=0.0)
    optimizer: str = Field(
        default="sgd",
        description="the inner optimizer: sgd (with momentum), adamw, or a factory "
        "'module.path:function' called as function(params=..., lr=initial) (process group)",
    )
    betas: tuple[Float, Float] = Field(
        default=(0.9, 0.999), description="adamw: the moment decay rates, each in [0, 1)"
    )
    eps: Float = Field(default=1e-8, gt=0, description="adamw: added to the denominator")
    grad_clip: Float | None = Field(
        default=None, gt=0, description="clip each learner's gradients to this global norm"
    )
    grad_accum: Int = Field(
        default=1, ge=1, le=65_536,
        description="micro-batches of batch_size per optimizer step (K counts optimizer steps)",
    )  # fmt: skip
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="autocast of forward and loss (fp16 with a gradient scaler); parameters, "
        "optimizer state and averages stay fp32",
    )
    tf32: Bool | None = Field(
        default=None, description="CUDA: TF32 matmuls and convolutions on/off (none: torch's)"
    )
    steps: Int | None = Field(
        default=None, ge=1, le=10_000_000_000,
        description="a budget of optimizer steps per learner instead of epochs",
    )  # fmt: skip
    eval_every_steps: Int | None = Field(
        default=None, ge=1, le=10_000_000_000,
        description="with steps: evaluate (and checkpoint) every this many optimizer steps "
        "and at the end; none: at the end only",
    )  # fmt: skip
    sampling: Literal["shard", "iid"] = "shard"
    data_dir: str | None = None
    download: Bool = False
    synthetic: dict[str, Any] | None = None

    @field_validator("synthetic")
    @classmethod
    def _check_synthetic(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # Validated here (unknown keys, types, ranges); kept as the plain dict it was.
        if value is not None:
            SyntheticOptions.model_validate(value)
        return value

    def __hash__(self) -> int:
        # dataset_args and model_args are dicts: hash the validated document instead.
        return hash(self.model_dump_json())

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, value: str) -> str:
        return _builtin_or_factory(value, BUILTIN_DATASETS)

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        return _builtin_or_factory(value, BUILTIN_MODELS)

    @field_validator("optimizer")
    @classmethod
    def _check_optimizer(cls, value: str) -> str:
        return _builtin_or_factory(value, BUILTIN_OPTIMIZERS)

    @field_validator("loss")
    @classmethod
    def _check_loss(cls, value: str | None) -> str | None:
        return value if value is None else _builtin_or_factory(value, BUILTIN_LOSSES)

    @model_validator(mode="after")
    def _check_data(self) -> WorkloadConfig:
        if not is_factory(self.dataset) and not is_factory(self.model):
            self._check_builtin_pair()
        self._check_args()
        folder = TORCHVISION_FOLDERS.get(self.dataset)
        if folder is not None and not self.download:
            root = Path(self.data_dir or "./data")
            named = root.parts[-len(Path(folder).parts) :] == Path(folder).parts
            if not (root / folder).is_dir() and not (named and root.is_dir()):
                raise ValueError(
                    f"{_DISPLAY_NAMES[self.dataset]} not found: no {folder} under '{root}' "
                    "(set workload.data_dir, or download: true where there is internet)"
                )
        if self.synthetic is not None and self.dataset != "synthetic":
            raise ValueError("'synthetic' options given but dataset is not 'synthetic'")
        self._check_budget()
        return self

    def _check_budget(self) -> None:
        """steps is an alternative to epochs; eval_every_steps belongs to steps."""
        if self.steps is not None and "epochs" in self.model_fields_set:
            raise ValueError("give epochs or steps, not both")
        if self.eval_every_steps is not None and self.steps is None:
            raise ValueError(
                "eval_every_steps needs a step budget (workload.steps); an epoch budget "
                "evaluates every epoch"
            )

    @model_serializer(mode="wrap")
    def _dump_one_budget(self, handler: Any) -> dict:
        # A step budget's dump leaves out the unused epochs default, so that the dump
        # validates again (the trials get their configs as dumps).
        doc = handler(self)
        if self.steps is not None and "epochs" not in self.model_fields_set:
            doc.pop("epochs", None)
        return doc

    @property
    def step_budget(self) -> bool:
        """Whether the run counts optimizer steps (workload.steps) rather than epochs."""
        return self.steps is not None

    def _check_builtin_pair(self) -> None:
        """A built-in model on a built-in data set: the inputs it takes."""
        if (self.model == "gpt") != (self.dataset == "text"):
            raise ValueError(
                f"model {self.model} does not take dataset {self.dataset}: the text data set "
                "is for gpt (or a model factory), gpt for text (or a dataset factory)"
            )
        side = _IMAGE_SIDE.get(self.dataset)
        need = _MIN_IMAGE_SIDE.get(self.model)
        if need is not None and side is None:
            raise ValueError(f"model {self.model} needs images; dataset {self.dataset} has none")
        if self.model in _SIGNAL_MODELS and side is not None:
            raise ValueError(
                f"model {self.model} needs 1-D signals (mnist1d, synthetic); dataset "
                f"{self.dataset} has {side}x{side} images"
            )
        if need is not None and side < need:
            raise ValueError(
                f"model {self.model} needs images of at least {need}x{need}; "
                f"dataset {self.dataset} has {side}x{side}"
            )

    def _check_args(self) -> None:
        """dataset_args and model_args: for factories, or text's and gpt's own options."""
        for key, name, options in (
            ("dataset_args", self.dataset, {"text": TextOptions, "mnist1d": MNIST1DOptions}),
            ("model_args", self.model,
             {"gpt": GPTOptions, "mlp1d": MLP1DOptions, "cnn1d": CNN1DOptions}),
        ):
            args = getattr(self, key)
            if is_factory(name):
                continue
            if name in options:
                try:
                    options[name].model_validate(args)
                except ValidationError as exc:
                    msg = _first_error(exc)
                    sep = "." if exc.errors()[0]["loc"] else ": "
                    raise ValueError(f"{key}{sep}{msg}") from None
            elif args:
                raise ValueError(f"{key} given, but {name} takes none (a factory or "
                                 f"{' / '.join(options)} does)")  # fmt: skip


class OuterConfig(_Strict):
    """The outer optimizer at global averages (docs/design.md section 9); defaults: plain K-AVG."""

    lr: Float = Field(default=1.0, gt=0, description="outer learning rate (DiLoCo: 0.7)")
    momentum: Float = Field(default=0.0, ge=0.0, lt=1.0, description="outer momentum (0.9)")
    nesterov: Bool = Field(default=False, description="Nesterov outer momentum")

    @model_validator(mode="after")
    def _check(self) -> OuterConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("outer.nesterov needs outer.momentum > 0")
        return self

    @property
    def plain(self) -> bool:
        """True for plain averaging (no anchor kept)."""
        return self.lr == 1.0 and self.momentum == 0.0


class ResourcesConfig(_Strict):
    """What each learner asks Ray for."""

    use_gpu: Bool = False
    cpus_per_worker: Float = Field(default=1.0, gt=0, le=1024)
    gpus_per_worker: Float = Field(default=1.0, ge=0, le=64)
    max_concurrent_trials: Int | None = Field(default=None, ge=1)
    nccl_timeout_s: Float = Field(
        default=1800.0, gt=0, le=86400,
        description="seconds a collective may wait before the process group gives up",
    )  # fmt: skip
    gpu_memory_gb: Float | None = Field(
        default=None, gt=0, le=4096,
        description="GiB of GPU memory a simulated or packed trial may use (default: from "
        "the GPU type Ray reports for the cluster's nodes, or the local GPU's free memory)",
    )  # fmt: skip


class FaultInjection(_Strict):
    """A test fault: kill learner ``rank`` once, at the end of epoch ``epoch``."""

    rank: Int = Field(ge=0, description="the learner (world rank) to kill; below P")
    epoch: Int = Field(ge=1, description="the 1-based epoch it dies in; at most workload.epochs")


class FailureConfig(_Strict):
    """Fault tolerance of one run.

    ``inject: {rank: R, epoch: E}`` is for testing recovery: learner R kills its own
    process (SIGKILL) after it has trained epoch E, before it reports that epoch, once per
    trial (a marker file in the trial's Ray Train storage stops the restarted worker group
    from dying again). With ``max_failures >= 1`` the run resumes from the epoch E - 1
    checkpoint and must end as if nothing had happened; with 0 the trial fails.
    """

    max_failures: Int = Field(default=0, ge=-1, description="worker-group restarts; -1: forever")
    checkpoint_every_epochs: Int = Field(
        default=1,
        ge=0,
        description="checkpoint every N epochs and after the last; 0: never (a restart "
        "begins again from epoch 1)",
    )
    inject: FaultInjection | None = Field(
        default=None, description="test only: kill one learner once, e.g. {rank: 1, epoch: 2}"
    )


class RunConfig(_Strict):
    """One training run: `kavg train CONFIG.yaml`, or one point of a sweep."""

    name: str = "run"
    workload: WorkloadConfig = WorkloadConfig()
    algorithm: Literal[tuple(ALGORITHMS)] = "kavg"  # type: ignore[valid-type]
    backend: Literal["ray", "simulated"] = Field(
        default="ray",
        description="ray: P Ray Train workers; simulated: all P learners stacked in one process",
    )
    K: Int | None = Field(default=None, ge=1, le=1_000_000)
    P: Int = Field(default=1, ge=1, le=4096)
    # The workers seed torch with seed * 1_000_003 + rank: keep that within 64 bits.
    seed: Int = Field(default=0, ge=0, le=2**32 - 1)
    S: Int | None = Field(default=None, ge=1, le=4096, description="Hier-AVG group size")
    K1: Int | None = Field(default=None, ge=1, le=1_000_000, description="Hier-AVG local period")
    K2: Int | None = Field(default=None, ge=1, le=1_000_000, description="Hier-AVG global period")
    hier_groups: Literal["node", "any"] = Field(
        default="node",
        description="Hier-AVG: groups share a node (node), or may span nodes (any)",
    )
    # Downpour and EAMSGD (kavg_ray.asgd); alpha = beta / P is EAMSGD's moving rate.
    fetch_period: Int | None = Field(
        default=None, ge=1, le=1_000_000, description="Downpour: pull the center every N steps"
    )
    push_period: Int | None = Field(
        default=None, ge=1, le=1_000_000, description="Downpour: push the update every N steps"
    )
    tau: Int | None = Field(
        default=None, ge=1, le=1_000_000, description="EAMSGD: exchange every tau steps"
    )
    beta: Float | None = Field(default=None, gt=0, description="EAMSGD: alpha = beta / P")
    resources: ResourcesConfig = ResourcesConfig()
    failure: FailureConfig = FailureConfig()
    target_accuracy: Float | None = Field(default=None, gt=0, le=1)
    outer: OuterConfig = Field(
        default=OuterConfig(), description="outer optimizer at global averages (DiLoCo, SlowMo)"
    )
    warmup_steps: Int = Field(
        default=0, ge=0, le=100_000_000,
        description="post-local SGD: average after every one of the first W steps",
    )  # fmt: skip
    theory: Literal["estimate"] | None = Field(
        default=None, description="'estimate': probe L, M, F gap and predict K_opt per P"
    )
    # Streaming fragments (docs/design.md section 9): kavg only.
    fragments: Int = Field(
        default=1, ge=1, le=1_000_000,
        description="kavg: average the model in F fragments of consecutive layers, in "
        "rotation, one every K/F steps (F divides K)",
    )  # fmt: skip
    fragment_delay: Int = Field(
        default=0, ge=0, le=1_000_000,
        description="kavg: apply a fragment's average tau steps after it is launched (tau < K/F)",
    )  # fmt: skip
    fragment_alpha: Float = Field(
        default=0.0, ge=0, le=1,
        description="kavg: the share of its own fragment a learner keeps when the average "
        "arrives (torchft's fragment_update_alpha; 0 takes the average)",
    )  # fmt: skip
    # A K that changes during training (docs/design.md section 9, "Adaptive periods"): kavg.
    K_schedule: Literal["constant", "stagewise", "adacomm"] = Field(
        default="constant",
        description="kavg: constant K, stagewise (K times K_factor when the lr drops) or adacomm "
        "(K from the loss and lr every K_interval steps); K is the first period",
    )
    K_factor: Int | None = Field(
        default=None, ge=2, le=1024, description="stagewise: K's multiplier at each lr drop (2)"
    )
    K_min: Int | None = Field(
        default=None, ge=1, le=1_000_000, description="adacomm: the smallest K (1)"
    )
    K_max: Int | None = Field(
        default=None, ge=1, le=1_000_000, description="stagewise, adacomm: the largest K (none)"
    )
    K_interval: Int | None = Field(
        default=None, ge=1, le=100_000_000,
        description="adacomm: recompute K every this many steps (one epoch's steps)",
    )  # fmt: skip
    # Compressed averages (docs/design.md section 9, "Compressed averages"): kavg only.
    payload: Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4"] = Field(
        default="fp32",
        description="kavg: what a global average sends: fp32 (the all-reduce), or each "
        "learner's change since the last average as bf16, fp16, or fp8/int8/int4 with one "
        "float32 scale per 256 elements",
    )
    payload_error_feedback: Bool = Field(
        default=False,
        description="kavg, payload other than fp32: add what quantizing dropped to the next "
        "payload",
    )
    # The swept keys outside CORE_KEYS, set by SweepSpec.points() for the trial name.
    _name_extra: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="before")
    @classmethod
    def _algorithm_defaults(cls, data: Any) -> Any:
        # An algorithm's keys left out (or null) take the table's defaults, so a config
        # and its trial name are the same whether a default is written out or not.
        if not isinstance(data, dict):
            return data
        name = data.get("algorithm", "kavg")
        algo = ALGORITHMS.get(name) if isinstance(name, str) else None
        if algo is None or not algo.defaults:
            return data
        return {**data, **{k: v for k, v in algo.defaults.items() if data.get(k) is None}}

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if not NAME_RE.match(self.name) or self.name in (".", ".."):
            raise ValueError(f"name '{self.name}' may only hold letters, digits, '.', '_' and '-'")
        inject = self.failure.inject
        if inject is not None and (inject.rank >= self.P or inject.epoch > self.workload.epochs):
            raise ValueError(
                f"failure.inject: rank {inject.rank} must be below P={self.P} and epoch "
                f"{inject.epoch} at most workload.epochs={self.workload.epochs}"
            )
        if inject is not None and self.backend != "ray":
            raise ValueError("failure.inject kills a Ray Train worker: it needs backend ray")
        res = self.resources
        if res.gpu_memory_gb is not None and not res.use_gpu:
            raise ValueError("resources.gpu_memory_gb is for GPU trials: it needs use_gpu: true")
        if res.use_gpu and self.workers > 1 and res.gpus_per_worker < 1:
            raise ValueError(
                f"resources.gpus_per_worker {res.gpus_per_worker:g} would put two of the "
                f"{self.workers} learners' ranks on one GPU, which NCCL refuses: give each "
                "learner a whole GPU, or use backend simulated"
            )
        self._check_outer()
        self._check_recipe()
        self._check_algorithm_keys()
        self._check_fragments()
        self._check_K_schedule()
        self._check_payload()
        return self

    def _check_payload(self) -> None:
        """payload and payload_error_feedback: K-AVG's (the Hier-AVG and parameter-server
        averages are not built compressed); error feedback needs a compressed payload."""
        if self.payload_error_feedback and self.payload == "fp32":
            raise ValueError(
                "payload_error_feedback needs a compressed payload (bf16, fp16, fp8, int8 "
                "or int4), not fp32"
            )
        if self.payload != "fp32" and self.algorithm != "kavg":
            raise ValueError(
                f"payload {self.payload} is built for kavg only; {self.algorithm} averages "
                "send fp32"
            )

    def _check_recipe(self) -> None:
        """The training recipe's keys (docs/design.md section 1) that an engine cannot honour."""
        wl = self.workload
        if is_factory(wl.optimizer) and self.backend == "simulated":
            raise ValueError(
                f"workload.optimizer '{wl.optimizer}': the simulated (and packed) engine "
                "implements sgd and adamw only: use backend ray for an optimizer factory"
            )
        if wl.tf32 is not None and not self.resources.use_gpu:
            raise ValueError("workload.tf32 is for CUDA: it needs resources.use_gpu: true")
        if wl.precision == "fp16" and (
            self.backend == "simulated" or ALGORITHMS[self.algorithm].needs_server
        ):
            raise ValueError(
                "workload.precision fp16 needs a gradient scaler, which only the process-group "
                f"engine (kavg, hier_avg on backend ray) has, not {self.algorithm} on backend "
                f"{self.backend}: use bf16"
            )

    def _check_outer(self) -> None:
        wl = self.workload
        if any(not 0 <= b < 1 for b in wl.betas):
            raise ValueError(f"workload.betas must each be in [0, 1), got {list(wl.betas)}")
        if not ALGORITHMS[self.algorithm].needs_server:
            return
        if not self.outer.plain or self.outer.nesterov or self.warmup_steps:
            raise ValueError(
                f"algorithm {self.algorithm} has no averaging step: outer and warmup_steps "
                "belong to kavg and hier_avg"
            )
        if wl.optimizer != "sgd" and not is_factory(wl.optimizer):
            raise ValueError(
                f"algorithm {self.algorithm} runs SGD locally: optimizer must be sgd or a "
                "factory 'module.path:function'"
            )

    def _check_algorithm_keys(self) -> RunConfig:
        algo = ALGORITHMS[self.algorithm]
        own = " and ".join(", ".join(algo.keys).rsplit(", ", 1))
        foreign = [k for k in ALGORITHM_KEYS if k not in algo.keys and getattr(self, k) is not None]
        if foreign:
            raise ValueError(f"algorithm {algo.name} takes {own}, not {', '.join(foreign)}")
        missing = [k for k in algo.keys if getattr(self, k) is None]
        if missing:
            which = f" (missing: {', '.join(missing)})" if len(algo.keys) > 1 else ""
            raise ValueError(f"algorithm {algo.name} needs {own}{which}")
        if self.backend not in algo.backends:
            raise ValueError(f"algorithm {algo.name} needs backend ray (a parameter server)")
        if algo.name != "hier_avg" and self.hier_groups != "node":
            raise ValueError(f"hier_groups belongs to hier_avg, not {algo.name}")
        if algo.name == "hier_avg":
            if self.S > self.P:
                raise ValueError(f"S={self.S} is larger than P={self.P}")
            if self.P % self.S:
                raise ValueError(f"S={self.S} does not divide P={self.P}")
            if self.K2 % self.K1:
                raise ValueError(f"K2={self.K2} is not a multiple of K1={self.K1}")
        if algo.name == "eamsgd" and self.beta / self.P >= 1:
            raise ValueError(
                f"EAMSGD moving rate alpha = beta / P = {self.beta}/{self.P} must be below 1"
            )
        return self

    @property
    def streaming(self) -> bool:
        """Whether the average streams in fragments (a fragment key is not its default)."""
        return (self.fragments, self.fragment_delay, self.fragment_alpha) != (1, 0, 0.0)

    def _check_fragments(self) -> None:
        """fragments, fragment_delay, fragment_alpha: kavg's, F | K, tau < K/F, and none of
        what they are not built with."""
        if not self.streaming:
            return
        keys = "fragments, fragment_delay and fragment_alpha"
        if self.algorithm != "kavg":
            built = "streaming Hier-AVG is not built" if self.algorithm == "hier_avg" else (
                "it has no averaging step")
            raise ValueError(f"{keys} stream K-AVG's average, not {self.algorithm}'s: {built}")
        if self.K % self.fragments:
            raise ValueError(f"fragments F={self.fragments} must divide K={self.K}")
        if self.fragment_delay >= self.K // self.fragments:
            raise ValueError(
                f"fragment_delay={self.fragment_delay} must be below K/F="
                f"{self.K // self.fragments}: a fragment's average is applied before the next "
                "is launched"
            )
        if self.warmup_steps:
            raise ValueError(f"{keys} take no warmup_steps (a warm-up averages the whole model)")
        schedule = getattr(self, "K_schedule", "constant")
        if schedule != "constant":
            raise ValueError(f"{keys} need K_schedule constant, not {schedule}")

    def _check_K_schedule(self) -> None:
        """K_schedule and its parameters: kavg's, each beside its own schedule, K in bounds."""
        kind, given = self.K_schedule, {
            k: getattr(self, k) for k in ("K_factor", "K_min", "K_max", "K_interval")
            if getattr(self, k) is not None
        }  # fmt: skip
        own = {"constant": (), "stagewise": ("K_factor", "K_max"),
               "adacomm": ("K_min", "K_max", "K_interval")}[kind]  # fmt: skip
        foreign = [k for k in given if k not in own]
        if foreign:
            takes = ", ".join(own) if own else "none of them"
            raise ValueError(f"{', '.join(foreign)} given, but K_schedule {kind} takes {takes}")
        if kind == "constant":
            return
        if self.algorithm != "kavg":
            raise ValueError(f"K_schedule {kind} is built for kavg, not {self.algorithm}")
        lo, hi = self.K_min or 1, self.K_max
        if hi is not None and lo > hi:
            raise ValueError(f"K_min={lo} is above K_max={hi}")
        if not lo <= self.K <= (hi or self.K):
            raise ValueError(f"K={self.K} (the first period) must lie in [K_min, K_max] = "
                             f"[{lo}, {hi if hi is not None else 'none'}]")  # fmt: skip
        if kind == "stagewise" and self.workload.lr.kind != "step":
            raise ValueError(
                "K_schedule stagewise grows K when the lr drops: it needs the step lr schedule "
                f"(workload.lr.halve_every_epochs), not {self.workload.lr.kind}"
            )

    @property
    def workers(self) -> int:
        """Ray Train workers this run needs: P, or one for the simulated backend."""
        return 1 if self.backend == "simulated" else self.P

    @property
    def period(self) -> int:
        """The communication period: K, K2 for Hier-AVG, push_period for Downpour, tau for
        EAMSGD (the steps between two updates a learner makes to the shared model)."""
        return getattr(self, ALGORITHMS[self.algorithm].period_key)

    def trial_name(self, extra: Mapping[str, Any] | None = None) -> str:
        """A stable name for this run or grid point, e.g. ``K4-P8-s0``.

        A point of a sweep over a key the head does not show (lr, batch_size, epochs,
        momentum) gets that key's value appended: ``K4-P8-s0-lr0.05``. ``extra`` overrides
        the appended keys and values (default: the keys this point's sweep varies).
        """
        algo = ALGORITHMS[self.algorithm]
        head = algo.trial_head.format(
            P=self.P, **{k: _name_value(getattr(self, k)) for k in algo.keys}
        )
        if extra is None:
            extra = {key: self.grid_value(key) for key in self._name_extra}
        tail = "".join(f"-{key}{_name_value(value)}" for key, value in extra.items())
        if self.backend == "simulated":
            tail += "-sim"
        return f"{head}-s{self.seed}{tail}"

    def grid_value(self, key: str) -> Any:
        """The value of a sweepable key (see grid_path) in this config."""
        node: Any = self
        for part in grid_path(key) or GRID_KEYS[key]:
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        return node


def _name_value(value: Any) -> str:
    """A value as it appears in a trial name: only characters of NAME_RE."""
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._-]", "", text.replace("+", ""))


class EarlyStopConfig(_Strict):
    """`search.early_stop`: stop a trial that diverged or trails its group (launch/search.py)."""

    margin: Float = Field(
        default=0.05, ge=0, description="how far (accuracy, or loss) a trial may trail the best "
        "trial of its P and seed at an epoch",
    )  # fmt: skip
    min_epoch: Int = Field(default=1, ge=0, le=100_000, description="compare from this epoch on")


class SearchConfig(_Strict):
    """`search:` of a sweep spec: how its grid points are spent (docs/design.md section 11)."""

    strategy: Literal["grid", "refine"] = "grid"
    k_min: Int = Field(default=1, ge=1, le=1_000_000, description="refine without grid.K")
    k_max: Int = Field(default=256, ge=1, le=1_000_000, description="refine without grid.K")
    early_stop: EarlyStopConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) is larger than k_max ({self.k_max})")
        return self


def coarse_k_grid(k_min: int, k_max: int) -> list[int]:
    """The powers of two in [k_min, k_max], with k_min and k_max themselves (the coarse K of
    ``search: refine`` without grid.K; the same as kavg_ray.launch.search.coarse_grid)."""
    ks = {k_min, k_max} | {2**i for i in range(k_max.bit_length()) if k_min <= 2**i <= k_max}
    return sorted(ks)


class SweepSpec(_Strict):
    """A sweep: a run config whose scalars may be replaced by `grid:` lists."""

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    variants: list[dict[str, Any]] = [{}]
    search: SearchConfig = SearchConfig()
    # Simulated grid points that share workload and P run stacked in one trial. A spec
    # without `pack:` packs when every point can be packed (parse_sweep, packable).
    pack: Bool = False
    _points: list[RunConfig] | None = PrivateAttr(default=None)

    def points(self) -> list[RunConfig]:
        """Every grid point as a validated run config, in grid order (the last key fastest).

        Each point's ``trial_name()`` is unique within the sweep: keys outside CORE_KEYS
        that the grid varies are appended to it.
        """
        if self._points is None:
            self._points = self._build_points()
        return list(self._points)

    def _build_points(self) -> list[RunConfig]:
        keys = list(self.grid)
        extra = tuple(k for k in keys if k not in CORE_KEYS)
        out = []
        for variant, values in itertools.product(
            self.variants, itertools.product(*(self.grid[k] for k in keys))
        ):
            doc = _deep_merge(_deep_copy(self.base), variant)
            for key, value in zip(keys, values, strict=True):
                _set_path(doc, grid_path(key), value)
            try:
                cfg = RunConfig.model_validate(doc)
            except ValidationError as exc:
                point = ", ".join(f"{k}={v!r}" for k, v in zip(keys, values, strict=True))
                raise ConfigError(f"grid point ({point}): {_first_error(exc)}") from None
            cfg._name_extra = extra
            out.append(cfg)
        # Where two variants' points would share a name (an outer optimizer against none,
        # say), the settings that the variants vary go into the names too.
        if len({cfg.trial_name() for cfg in out}) < len(out):
            varied = tuple(
                k for k in GRID_KEYS
                if k not in CORE_KEYS and k not in extra
                and len({repr(p.grid_value(k)) for p in out}) > 1
            )  # fmt: skip
            for cfg in out:
                cfg._name_extra = extra + varied
        return out


def _deep_merge(base: dict, over: dict) -> dict:
    """`over` laid on `base`: nested mappings merge, everything else replaces."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = _deep_copy(value)
    return base


def _deep_copy(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _deep_copy(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_deep_copy(v) for v in doc]
    return doc


def _set_path(doc: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        node = doc.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{key}' must be a mapping")
        doc = node
    doc[path[-1]] = value


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{where}: {msg}" if where else msg


class _SafeLoader(yaml.SafeLoader):
    """A safe loader that also refuses aliases, so no alias bomb can expand."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases are not allowed", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201
        # PyYAML keeps the last of two equal keys; a spec that says K twice is ambiguous.
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key_node.value}' is given twice", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a safe loader; every failure is a one-line ConfigError."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such file")
    if not p.is_file():
        raise ConfigError(f"{p}: not a regular file")
    try:
        with p.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{p}: larger than 1 MB, not a config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    try:
        doc = yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["?"])[0]
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{p}: not a config: nested too deeply") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: expected a mapping of keys at the top level")
    return doc


def parse_run(doc: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate one run config document."""
    if "grid" in doc:
        raise ConfigError(f"{source}: has a grid: run it with 'kavg sweep run'")
    try:
        return RunConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_error(exc)}") from None


def parse_sweep(doc: dict[str, Any], source: str = "spec") -> SweepSpec:
    """Validate a sweep spec document and every point of its grid."""
    doc = dict(doc)
    if "grid" not in doc:
        raise ConfigError(f"{source}: has no grid: run a single config with 'kavg train'")
    grid = doc.pop("grid")
    variants = _pop_variants(doc, source)
    search, pack = _parse_search(doc.pop("search", "grid"), doc.pop("pack", None), source)
    if search.strategy == "refine" and isinstance(grid, dict):
        grid = _refine_grid(grid, doc, variants, search, source)
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{source}: grid: must be a non-empty mapping of key -> list")
    _check_grid(grid, doc, variants, source)
    spec = SweepSpec(base=doc, grid=grid, variants=variants, search=search, pack=bool(pack))
    try:
        points = spec.points()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if pack is None:  # fast by default: pack what can be packed, else one trial per point
        can = search.strategy == "grid" and search.early_stop is None
        spec = spec.model_copy(update={"pack": can and all(packable(p) for p in points)})
    _check_search_points(spec, points, source)
    _check_distinct_trial_names(points, source)
    return spec


def _pop_variants(doc: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """The spec's ``variants:`` (removed from ``doc``); one empty variant when absent."""
    variants = doc.pop("variants", [{}])
    if (
        not isinstance(variants, list)
        or not variants
        or not all(isinstance(v, dict) for v in variants)
    ):
        raise ConfigError(f"{source}: variants: must be a non-empty list of mappings")
    return variants


def _check_grid(grid: dict, doc: dict, variants: list, source: str) -> None:
    """Each key of ``grid`` (in order) and the number of points of grid x variants."""
    n_points = 1
    for key, values in grid.items():
        _check_grid_key(key, values, doc, variants, source)
        n_points *= len(values)
        if n_points > MAX_GRID_POINTS:
            break
    if n_points > MAX_GRID_POINTS:
        # The loop stopped early: count every key for the message.
        n_points = 1
        for values in grid.values():
            n_points *= len(values) if isinstance(values, list) else 1
        raise ConfigError(f"{source}: grid has {n_points} points, more than {MAX_GRID_POINTS}")
    n_points *= len(variants)
    if n_points > MAX_GRID_POINTS:
        raise ConfigError(f"{source}: grid has {n_points} points, more than {MAX_GRID_POINTS}")


def _check_grid_key(key: str, values: Any, doc: dict, variants: list, source: str) -> None:
    """``grid.<key>``: sweepable, a non-empty list of distinct scalars, and its setting
    given nowhere else (neither in a variant nor as a scalar of the spec)."""
    path = grid_path(key)
    if path is None:
        raise ConfigError(
            f"{source}: grid.{key}: cannot be swept (sweepable: {', '.join(GRID_KEYS)}, "
            "model_args.NAME, dataset_args.NAME)"
        )
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{source}: grid.{key}: must be a non-empty list")
    if any(isinstance(v, (dict, list)) for v in values):
        raise ConfigError(f"{source}: grid.{key}: values must be scalars")
    seen: set[str] = set()
    for v in values:
        if repr(v) in seen:
            raise ConfigError(f"{source}: grid.{key}: value {v!r} is listed twice")
        seen.add(repr(v))
    if any(_has_path(v, path) for v in variants):
        where = ".".join(path)
        raise ConfigError(
            f"{source}: {where} is given both in variants and in grid.{key}: set it in the "
            f"variants or list it in grid.{key}, not both"
        )
    if _has_path(doc, path):
        raise ConfigError(f"{source}: {_scalar_and_grid(doc, path, key)}")


def _scalar_and_grid(doc: dict, path: tuple[str, ...], key: str) -> str:
    """Why a setting given both as a scalar and in ``grid.<key>`` is refused, and the fix
    (a run config made a sweep keeps its scalar: ``lr: {initial: 0.1}`` plus ``grid.lr``)."""
    where = ".".join(path)
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    others = [k for k in parent if k != path[-1]] if len(path) > 1 else []
    keep = f"; {'.'.join(path[:-1])} keeps {', '.join(others)}" if others else ""
    return (
        f"{where} is given both as a scalar and in grid.{key}: delete {where}, grid.{key} "
        f"sets it for every grid point{keep}"
    )


def _check_distinct_trial_names(points: list[RunConfig], source: str) -> None:
    """No two points of the sweep name the same trial (their results would share a row)."""
    names: set[str] = set()
    for point in points:
        name = point.trial_name()
        if name in names:
            raise ConfigError(
                f"{source}: two grid points are the same run {name} "
                "(grid values that differ only in how they are written?)"
            )
        names.add(name)


def _parse_search(raw: Any, pack: Any, source: str) -> tuple[SearchConfig, bool | None]:
    """`search:` (grid | refine, or a mapping) and `pack:` (true | false; None: not
    given, decided by the points) of a spec."""
    if pack is not None and not isinstance(pack, bool):
        raise ConfigError(f"{source}: pack: must be true or false, got {pack!r}")
    doc = {"strategy": raw} if isinstance(raw, str) else raw
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: search: must be grid, refine or a mapping, got {raw!r}")
    try:
        search = SearchConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(f"{source}: search.{_first_error(exc)}") from None
    if pack and search.strategy == "refine":
        raise ConfigError(
            f"{source}: pack: true runs the whole grid stacked; search: refine chooses K round "
            "by round: use one of them"
        )
    if pack and search.early_stop is not None:
        raise ConfigError(
            f"{source}: search.early_stop stops trials one by one: it needs pack: false"
        )
    return search, pack


def _refine_grid(
    grid: dict, doc: dict, variants: list, search: SearchConfig, source: str
) -> dict:
    """The grid of `search: refine`: grid.K is the coarse K; without it, the powers of two."""
    for algo in [doc.get("algorithm", "kavg")] + [v.get("algorithm") for v in variants]:
        if algo not in (None, "kavg"):
            raise ConfigError(f"{source}: search: refine searches K of algorithm kavg, not {algo}")
    if _has_path(doc, ("K",)) or any(isinstance(v, dict) and "K" in v for v in variants):
        raise ConfigError(
            f"{source}: search: refine chooses K: list the coarse K in grid.K, or leave K "
            f"out (powers of two in [k_min, k_max] = [{search.k_min}, {search.k_max}])"
        )
    if "K" in grid:
        return grid
    return {"K": coarse_k_grid(search.k_min, search.k_max), **grid}


def _check_search_points(spec: SweepSpec, points: list[RunConfig], source: str) -> None:
    """What `search:` and `pack:` ask of every grid point."""
    for p in points:
        if spec.search.strategy == "refine" and p.algorithm != "kavg":
            raise ConfigError(
                f"{source}: search: refine searches K of algorithm kavg; grid point "
                f"{p.trial_name()} is {p.algorithm}"
            )
        if spec.search.strategy == "refine" and p.target_accuracy is not None:
            raise ConfigError(
                f"{source}: search: refine ranks K by final test accuracy (or loss); "
                "target_accuracy (K_opt by time) needs search: grid"
            )
        if spec.pack and not packable(p):
            raise ConfigError(
                f"{source}: pack: true stacks simulated kavg and hier_avg trials; grid point "
                f"{p.trial_name()} is {p.algorithm} on backend {p.backend}"
            )


def packable(cfg: RunConfig) -> bool:
    """Whether a grid point can run in a pack: simulated K-AVG or Hier-AVG."""
    return cfg.backend == "simulated" and cfg.algorithm in ("kavg", "hier_avg")


def _has_path(doc: Any, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return False
        doc = doc[key]
    return True


def load_run(path: str | Path) -> RunConfig:
    """Read and validate a run config file."""
    return parse_run(read_yaml(path), str(path))


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec file."""
    return parse_sweep(read_yaml(path), str(path))
