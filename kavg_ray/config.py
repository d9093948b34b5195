"""Run configs and sweep specs: parsing and validation.

Everything here imports only pydantic and yaml, so a bad file is refused in well
under a second, before torch or Ray are loaded.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DATASETS = ("digits", "synthetic", "cifar10")
MODELS = ("linear", "mlp", "cnn", "vgg16", "nin", "resnet18")
ALGORITHMS = ("kavg", "hier_avg")
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# Keys a sweep's grid may vary, and where each lives in a run config.
GRID_KEYS = {
    "K": ("K",),
    "P": ("P",),
    "seed": ("seed",),
    "S": ("S",),
    "K1": ("K1",),
    "K2": ("K2",),
    "lr": ("workload", "lr", "initial"),
    "batch_size": ("workload", "batch_size"),
    "epochs": ("workload", "epochs"),
    "momentum": ("workload", "momentum"),
}
MAX_GRID_POINTS = 10_000


class ConfigError(Exception):
    """A config or spec that cannot be run; the message is one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LRConfig(_Strict):
    """The paper's step-size schedule: gamma0, halved every N epochs."""

    initial: float = Field(gt=0, description="initial learning rate gamma0")
    halve_every_epochs: int | None = Field(
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
    epochs: int = Field(default=10, ge=1, le=100_000)
    batch_size: int = Field(default=16, ge=1, le=1_000_000)
    lr: LRConfig = LRConfig(initial=0.1)
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    sampling: Literal["shard", "iid"] = "shard"
    data_dir: str | None = None
    download: bool = False
    synthetic: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_data(self) -> WorkloadConfig:
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

    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=1.0, ge=0)
    max_concurrent_trials: int | None = Field(default=None, ge=1)


class FailureConfig(_Strict):
    """Fault tolerance of one run."""

    max_failures: int = Field(default=0, ge=-1, description="worker-group restarts; -1: forever")


class RunConfig(_Strict):
    """One training run: `kavg train CONFIG.yaml`, or one point of a sweep."""

    name: str = "run"
    workload: WorkloadConfig = WorkloadConfig()
    algorithm: Literal["kavg", "hier_avg"] = "kavg"
    backend: Literal["ray"] = "ray"
    K: int | None = Field(default=None, ge=1, le=1_000_000)
    P: int = Field(default=1, ge=1, le=4096)
    seed: int = Field(default=0, ge=0)
    S: int | None = Field(default=None, ge=1, description="Hier-AVG group size")
    K1: int | None = Field(default=None, ge=1, description="Hier-AVG local period")
    K2: int | None = Field(default=None, ge=1, description="Hier-AVG global period")
    resources: ResourcesConfig = ResourcesConfig()
    failure: FailureConfig = FailureConfig()
    target_accuracy: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if not NAME_RE.match(self.name) or self.name in (".", ".."):
            raise ValueError(f"name '{self.name}' may only hold letters, digits, '.', '_' and '-'")
        if self.algorithm == "kavg":
            if self.K is None:
                raise ValueError("algorithm kavg needs K")
            if any(v is not None for v in (self.S, self.K1, self.K2)):
                raise ValueError("S, K1, K2 belong to algorithm hier_avg; kavg takes K")
        else:
            if None in (self.S, self.K1, self.K2):
                raise ValueError("algorithm hier_avg needs S, K1 and K2")
            if self.K is not None:
                raise ValueError("algorithm hier_avg takes S, K1, K2, not K")
            if self.S > self.P:
                raise ValueError(f"S={self.S} is larger than P={self.P}")
            if self.P % self.S:
                raise ValueError(f"S={self.S} does not divide P={self.P}")
            if self.K2 % self.K1:
                raise ValueError(f"K2={self.K2} is not a multiple of K1={self.K1}")
        return self

    @property
    def period(self) -> int:
        """The global averaging period: K, or K2 for Hier-AVG."""
        return self.K if self.algorithm == "kavg" else self.K2

    def trial_name(self) -> str:
        """A stable name for this grid point, e.g. ``K4-P8-s0``."""
        if self.algorithm == "kavg":
            head = f"K{self.K}-P{self.P}"
        else:
            head = f"S{self.S}-K1{self.K1}-K2{self.K2}-P{self.P}"
        return f"{head}-s{self.seed}"


class SweepSpec(_Strict):
    """A sweep: a run config whose scalars may be replaced by `grid:` lists."""

    base: dict[str, Any]
    grid: dict[str, list[Any]]

    def points(self) -> list[RunConfig]:
        """Every grid point as a validated run config, in grid order."""
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            doc = _deep_copy(self.base)
            for key, value in zip(keys, values, strict=True):
                _set_path(doc, GRID_KEYS[key], value)
            try:
                out.append(RunConfig.model_validate(doc))
            except ValidationError as exc:
                point = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
                raise ConfigError(f"grid point ({point}): {_first_error(exc)}") from None
        return out


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


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a safe loader; every failure is a one-line ConfigError."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such file")
    if not p.is_file():
        raise ConfigError(f"{p}: not a regular file")
    if p.stat().st_size > 1_000_000:
        raise ConfigError(f"{p}: larger than 1 MB, not a config")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    try:
        doc = yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None
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
    grid = doc.pop("grid", None)
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
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"{source}: grid.{key}: duplicate values {values}")
        if GRID_KEYS[key] == (key,) and key in doc:
            raise ConfigError(f"{source}: {key} is given both as a scalar and in grid")
        n_points *= len(values)
    if n_points > MAX_GRID_POINTS:
        raise ConfigError(f"{source}: grid has {n_points} points, more than {MAX_GRID_POINTS}")
    spec = SweepSpec(base=doc, grid=grid)
    try:
        points = spec.points()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if len({p.trial_name() for p in points}) != len(points):
        raise ConfigError(
            f"{source}: grid points share trial names; sweep lr/batch_size/epochs "
            "in separate sweeps"
        )
    return spec


def load_run(path: str | Path) -> RunConfig:
    """Read and validate a run config file."""
    return parse_run(read_yaml(path), str(path))


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec file."""
    return parse_sweep(read_yaml(path), str(path))
