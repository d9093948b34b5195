"""Config keys of workloads of one's own (docs/design.md section 8): factories by import path,
their arguments, text/gpt options and grids over factory arguments by dotted keys."""

from __future__ import annotations

import pytest

from kavg_ray.config import parse_run, parse_sweep
from kavg_ray.errors import ConfigError

OWN = {"dataset": "my_pkg.data:load_data", "model": "my_pkg.models:build_model"}


def _run(**workload):
    return parse_run({"K": 2, "P": 2, "workload": workload})


def test_factories_and_their_arguments_are_kept_as_written() -> None:
    wl = _run(**OWN, dataset_args={"root": "/data/x"}, model_args={"width": 256},
              loss="my_pkg.losses:smooth_l1", task="regression").workload  # fmt: skip
    assert (wl.dataset, wl.model, wl.loss, wl.task) == (
        "my_pkg.data:load_data", "my_pkg.models:build_model", "my_pkg.losses:smooth_l1",
        "regression",
    )  # fmt: skip
    assert wl.dataset_args == {"root": "/data/x"} and wl.model_args == {"width": 256}
    assert (wl.in_memory_mb, wl.num_workers) == (512.0, 1)


@pytest.mark.parametrize(
    ("workload", "message"),
    [
        ({"dataset": "my_pkg.data"}, "workload.dataset: Input should be 'digits', 'synthetic',"
         " 'cifar10', 'mnist', 'fashion_mnist', 'cifar100', 'text' or 'mnist1d', or a factory "
         "'module.path:function'"),
        ({"model": "pkg:fn:x"}, "workload.model: Input should be 'linear'"),
        ({"loss": "huber"}, "workload.loss: Input should be 'cross_entropy' or 'mse', or a "
         "factory 'module.path:function'"),
        ({"dataset": "digits", "dataset_args": {"root": "x"}},
         "workload: dataset_args given, but digits takes none (a factory or text / mnist1d "
         "does)"),
        ({"model_args": {"width": 3}}, "workload: model_args given, but mlp takes none"),
        ({"dataset": "text", "model": "gpt", "dataset_args": {"seq_len": 1}},
         "workload: dataset_args.seq_len: Input should be greater than or equal to 2"),
        ({"dataset": "text", "model": "gpt", "model_args": {"depth": 3}},
         "workload: model_args.depth: unknown key"),
        ({"dataset": "text", "model": "gpt", "model_args": {"dim": 30, "heads": 4}},
         "workload: model_args: heads=4 does not divide dim=30"),
        ({"dataset": "text", "model": "mlp"}, "workload: model mlp does not take dataset text"),
        ({"dataset": "digits", "model": "gpt"}, "workload: model gpt does not take dataset"),
        ({"dataset": "mnist", "data_dir": "no/such"},
         "workload: MNIST not found: no MNIST/raw under 'no/such'"),
        ({"dataset": "cifar100", "model": "resnet18", "data_dir": "no/such"},
         "workload: CIFAR-100 not found: no cifar-100-python under 'no/such'"),
        ({**OWN, "num_workers": -1}, "workload.num_workers: Input should be greater than"),
    ],
)  # fmt: skip
def test_bad_workloads_are_refused(workload: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _run(**workload)
    assert str(info.value).startswith(f"config: {message}"), str(info.value)


def test_built_in_models_on_a_dataset_factory_are_not_checked_for_image_sizes() -> None:
    # The factory's items are only known when it runs (kavg_ray.train.factories).
    assert _run(dataset="pkg:data", model="vgg16").workload.model == "vgg16"
    assert _run(dataset="text", model="pkg:lm").workload.dataset == "text"


def test_a_grid_over_factory_arguments_by_dotted_key() -> None:
    spec = parse_sweep({
        "workload": {**OWN, "model_args": {"depth": 2}},
        "grid": {"K": [1, 4], "model_args.width": [128, 256], "dataset_args.root": ["/a"]},
    })  # fmt: skip
    points = spec.points()
    assert [p.trial_name() for p in points] == [
        "K1-P1-s0-model_args.width128-dataset_args.roota",
        "K1-P1-s0-model_args.width256-dataset_args.roota",
        "K4-P1-s0-model_args.width128-dataset_args.roota",
        "K4-P1-s0-model_args.width256-dataset_args.roota",
    ]
    assert points[1].workload.model_args == {"depth": 2, "width": 256}
    assert points[1].workload.dataset_args == {"root": "/a"}
    assert points[1].grid_value("model_args.width") == 256
    # Each point's workload is distinct (hashable despite its dict arguments).
    assert len({p.workload for p in points}) == 2


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"model_args": [1]}, "grid.model_args: cannot be swept"),
        ({"optimizer_args.width": [1]}, "grid.optimizer_args.width: cannot be swept"),
        ({"model_args.1x": [1]}, "grid.model_args.1x: cannot be swept"),
    ],
)
def test_bad_dotted_grid_keys(grid: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_sweep({"workload": OWN, "K": 1, "grid": grid})


def test_a_dotted_key_given_twice_is_refused() -> None:
    doc = {"workload": {**OWN, "model_args": {"width": 8}}, "K": 1,
           "grid": {"model_args.width": [16, 32]}}  # fmt: skip
    with pytest.raises(ConfigError, match="workload.model_args.width is given both as a scalar"):
        parse_sweep(doc)
