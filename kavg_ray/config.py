"""Run configs and sweep specs: parsing and validation.

Everything here imports only pydantic and yaml, so a bad file is refused in well
under a second, before torch or Ray are loaded.
"""

from __future__ import annotations

import itertools
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
}
# Swept keys that the trial name ``K4-P2-s0`` does not already show; a grid over them
# appends ``-lr0.05``, ``-batch_size32`` ... so that every grid point has its own name.
CORE_KEYS = ("P", "seed", *ALGORITHM_KEYS)
MAX_GRID_POINTS = 10_000
MAX_FILE_BYTES = 1_000_000
# The side of the images of each data set (None: flat vectors), and the smallest image
# side each convolutional model accepts (see kavg_ray.models); checked here so that a
# mismatch is refused before Ray starts rather than inside a worker.
_IMAGE_SIDE = {"digits": 8, "cifar10": 32, "synthetic": None}
_MIN_IMAGE_SIDE = {"cnn": 2, "vgg16": 32, "nin": 4, "resnet18": 8}


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
    """The options of the synthetic data set (kavg_ray.data.make_synthetic)."""

    task: Literal["classification", "least_squares"] = "classification"
    n_train: Int = Field(default=2048, ge=1, le=10_000_000)
    n_test: Int = Field(default=512, ge=1, le=10_000_000)
    dim: Int = Field(default=20, ge=1, le=1_000_000)
    num_classes: Int = Field(default=4, ge=2, le=100_000)
    noise: Float = Field(default=0.1, ge=0)
    cluster_std: Float = Field(default=1.0, ge=0)
    seed: Int = Field(default=0, ge=0, le=2**32 - 1)


class LRConfig(_Strict):
    """The paper's step-size schedule: gamma0, halved every N epochs."""

    initial: Float = Field(gt=0, description="initial learning rate gamma0")
    halve_every_epochs: Int | None = Field(
        default=None, ge=1, description="halve the rate every this many epochs (none: constant)"
    )

    def at_epoch(self, epoch: int) -> float:
        """Learning rate for a 0-based epoch."""
        if self.halve_every_epochs is None:
            return self.initial
        return self.initial * 0.5 ** (epoch // self.halve_every_epochs)


class WorkloadConfig(_Strict):
    """What is trained: data set, model, budget and optimizer."""

    dataset: Literal["digits", "synthetic", "cifar10"] = "digits"
    model: Literal["linear", "mlp", "cnn", "vgg16", "nin", "resnet18"] = "mlp"
    epochs: Int = Field(default=10, ge=1, le=100_000)
    batch_size: Int = Field(default=16, ge=1, le=1_000_000)
    lr: LRConfig = LRConfig(initial=0.1)
    momentum: Float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: Float = Field(default=0.0, ge=0.0)
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

    @model_validator(mode="after")
    def _check_data(self) -> WorkloadConfig:
        side = _IMAGE_SIDE[self.dataset]
        need = _MIN_IMAGE_SIDE.get(self.model)
        if need is not None and side is None:
            raise ValueError(f"model {self.model} needs images; dataset {self.dataset} has none")
        if need is not None and side < need:
            raise ValueError(
                f"model {self.model} needs images of at least {need}x{need}; "
                f"dataset {self.dataset} has {side}x{side}"
            )
        if self.dataset == "cifar10" and not self.download:
            root = Path(self.data_dir or "./data")
            if not (root / "cifar-10-batches-py").is_dir():
                raise ValueError(
                    f"CIFAR-10 not found: no cifar-10-batches-py under '{root}' "
                    "(set workload.data_dir, or download: true where there is internet)"
                )
        if self.synthetic is not None and self.dataset != "synthetic":
            raise ValueError("'synthetic' options given but dataset is not 'synthetic'")
        return self


class ResourcesConfig(_Strict):
    """What each learner asks Ray for."""

    use_gpu: Bool = False
    cpus_per_worker: Float = Field(default=1.0, gt=0, le=1024)
    gpus_per_worker: Float = Field(default=1.0, ge=0, le=64)
    max_concurrent_trials: Int | None = Field(default=None, ge=1)


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
    theory: Literal["estimate"] | None = Field(
        default=None, description="'estimate': probe L, M, F gap and predict K_opt per P"
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
        return self._check_algorithm_keys()

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
        """The value of a sweepable key (see GRID_KEYS) in this config."""
        node: Any = self
        for part in GRID_KEYS[key]:
            node = getattr(node, part)
        return node


def _name_value(value: Any) -> str:
    """A value as it appears in a trial name: only characters of NAME_RE."""
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._-]", "", text.replace("+", ""))


class SweepSpec(_Strict):
    """A sweep: a run config whose scalars may be replaced by `grid:` lists."""

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    variants: list[dict[str, Any]] = [{}]
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
                _set_path(doc, GRID_KEYS[key], value)
            try:
                cfg = RunConfig.model_validate(doc)
            except ValidationError as exc:
                point = ", ".join(f"{k}={v!r}" for k, v in zip(keys, values, strict=True))
                raise ConfigError(f"grid point ({point}): {_first_error(exc)}") from None
            cfg._name_extra = extra
            out.append(cfg)
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
    variants = doc.pop("variants", [{}])
    if (
        not isinstance(variants, list)
        or not variants
        or not all(isinstance(v, dict) for v in variants)
    ):
        raise ConfigError(f"{source}: variants: must be a non-empty list of mappings")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{source}: grid: must be a non-empty mapping of key -> list")
    n_points = 1
    for key, values in grid.items():
        if key not in GRID_KEYS:
            raise ConfigError(
                f"{source}: grid.{key}: cannot be swept (sweepable: {', '.join(GRID_KEYS)})"
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
        if any(_has_path(v, GRID_KEYS[key]) for v in variants):
            where = ".".join(GRID_KEYS[key])
            raise ConfigError(f"{source}: {where} is given both in variants and in grid.{key}")
        if _has_path(doc, GRID_KEYS[key]):
            where = ".".join(GRID_KEYS[key])
            raise ConfigError(f"{source}: {where} is given both as a scalar and in grid.{key}")
        n_points *= len(values)
        if n_points > MAX_GRID_POINTS:
            break
    if n_points > MAX_GRID_POINTS:
        n_points = 1
        for values in grid.values():
            n_points *= len(values) if isinstance(values, list) else 1
        raise ConfigError(f"{source}: grid has {n_points} points, more than {MAX_GRID_POINTS}")
    n_points *= len(variants)
    if n_points > MAX_GRID_POINTS:
        raise ConfigError(f"{source}: grid has {n_points} points, more than {MAX_GRID_POINTS}")
    spec = SweepSpec(base=doc, grid=grid, variants=variants)
    try:
        points = spec.points()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    names: set[str] = set()
    for point in points:
        name = point.trial_name()
        if name in names:
            raise ConfigError(
                f"{source}: two grid points are the same run {name} "
                "(grid values that differ only in how they are written?)"
            )
        names.add(name)
    return spec


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
