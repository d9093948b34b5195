"""Tests for kavg_ray.config: run configs, sweep specs, grid expansion and safe YAML reading."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from kavg_ray.config import (
    GRID_KEYS,
    MAX_GRID_POINTS,
    NAME_RE,
    ConfigError,
    LRConfig,
    RunConfig,
    load_run,
    load_sweep,
    parse_run,
    parse_sweep,
    read_yaml,
)

ROOT = Path(__file__).resolve().parent.parent


def _names(spec) -> list[str]:
    return [p.trial_name() for p in spec.points()]


def _run_error(doc: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_run(doc)
    return str(info.value)


def _sweep_error(doc: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_sweep(doc)
    return str(info.value)


# --- the shipped examples ---------------------------------------------------------------


def test_example_config_parses_as_written():
    cfg = load_run(ROOT / "configs" / "digits-kavg.yaml")
    assert cfg.name == "digits-kavg"
    assert (cfg.algorithm, cfg.backend, cfg.K, cfg.P, cfg.seed) == ("kavg", "ray", 4, 2, 0)
    wl = cfg.workload
    assert (wl.dataset, wl.model, wl.epochs, wl.batch_size) == ("digits", "mlp", 5, 16)
    assert (wl.lr.initial, wl.lr.halve_every_epochs) == (0.1, 50)
    assert cfg.resources.use_gpu is False
    assert cfg.resources.cpus_per_worker == 0.5
    assert cfg.period == 4
    assert cfg.trial_name() == "K4-P2-s0"


def test_quickstart_sweep_expands_in_grid_order():
    spec = load_sweep(ROOT / "sweeps" / "quickstart.yaml")
    points = spec.points()
    assert len(points) == 12
    # itertools.product order: the last grid key (seed) varies fastest.
    assert [p.trial_name() for p in points] == [
        f"K{k}-P16-s{s}-sim" for k in (1, 4, 16) for s in range(4)
    ]  # fmt: skip
    assert [(p.K, p.seed) for p in points][:5] == [(1, 0), (1, 1), (1, 2), (1, 3), (4, 0)]
    for p in points:
        assert p.name == "quickstart"
        assert (p.workload.steps, p.workload.batch_size, p.workload.lr.initial) == (930, 16, 0.3)
        assert p.resources.cpus_per_worker == 1.0
        assert p.target_accuracy is None  # the demo ranks K by accuracy
    # Expanding twice gives the same points; the spec's base is not modified by expansion.
    assert _names(spec) == [p.trial_name() for p in points]
    assert "K" not in spec.base and "P" not in spec.base


# --- defaults --------------------------------------------------------------------------


def test_defaults():
    cfg = RunConfig.model_validate({"K": 3})
    assert (cfg.name, cfg.algorithm, cfg.backend, cfg.P, cfg.seed) == ("run", "kavg", "ray", 1, 0)
    assert (cfg.S, cfg.K1, cfg.K2, cfg.target_accuracy) == (None, None, None, None)
    wl = cfg.workload
    assert (wl.dataset, wl.model, wl.epochs, wl.batch_size) == ("digits", "mlp", 10, 16)
    assert (wl.lr.initial, wl.lr.halve_every_epochs) == (0.1, None)
    assert (wl.momentum, wl.weight_decay, wl.sampling) == (0.0, 0.0, "shard")
    assert (wl.data_dir, wl.download, wl.synthetic) == (None, False, None)
    res = cfg.resources
    assert (res.use_gpu, res.cpus_per_worker, res.gpus_per_worker) == (False, 1.0, 1.0)
    assert res.max_concurrent_trials is None
    assert cfg.failure.max_failures == 0
    assert cfg.trial_name() == "K3-P1-s0"


def test_configs_are_frozen():
    cfg = RunConfig.model_validate({"K": 3})
    with pytest.raises(Exception, match="frozen"):
        cfg.K = 4


# --- the learning-rate schedule ----------------------------------------------------------


def test_lr_halving_schedule_exact_values():
    lr = LRConfig(initial=0.8, halve_every_epochs=2)
    assert [lr.at_epoch(e) for e in range(7)] == [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1]
    every = LRConfig(initial=1.0, halve_every_epochs=1)
    assert [every.at_epoch(e) for e in range(5)] == [1.0, 0.5, 0.25, 0.125, 0.0625]
    assert LRConfig(initial=0.3, halve_every_epochs=50).at_epoch(49) == 0.3
    assert LRConfig(initial=0.3, halve_every_epochs=50).at_epoch(50) == 0.15
    assert LRConfig(initial=0.3, halve_every_epochs=50).at_epoch(100) == 0.075


def test_lr_constant_without_halving():
    lr = LRConfig(initial=0.05)
    assert [lr.at_epoch(e) for e in (0, 1, 10, 1000)] == [0.05] * 4


@pytest.mark.parametrize(
    ("lr", "message"),
    [
        ({"initial": 0}, "workload.lr.initial: Input should be greater than 0"),
        ({"initial": -0.1}, "workload.lr.initial: Input should be greater than 0"),
        ({"initial": 0.1, "halve_every_epochs": 0}, "workload.lr.halve_every_epochs: Input"),
        ({"initial": float("inf")}, "workload.lr.initial: Input should be a finite number"),
        ({"initial": True}, "workload.lr.initial: Input should be a number, not a boolean"),
        ({"halve_every_epochs": 5}, "workload.lr.initial: Field required"),
    ],
)
def test_bad_learning_rates(lr, message):
    assert _run_error({"K": 1, "workload": {"lr": lr}}).startswith(f"config: {message}")


def test_lr_written_with_exponent_is_a_number():
    # PyYAML reads 1e-3 (no dot) as the string "1e-3": it must still be a learning rate.
    doc = yaml.safe_load("K: 1\nworkload: {lr: {initial: 1e-3}}\n")
    assert doc["workload"]["lr"]["initial"] == "1e-3"
    assert parse_run(doc).workload.lr.initial == 0.001


# --- types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"K": True}, "config: K: Input should be a valid integer"),
        ({"K": "4"}, "config: K: Input should be a valid integer"),
        ({"K": 4.0}, "config: K: Input should be a valid integer"),
        ({"K": 1, "P": 0}, "config: P: Input should be greater than or equal to 1"),
        ({"K": 0}, "config: K: Input should be greater than or equal to 1"),
        ({"K": 1, "seed": -1}, "config: seed: Input should be greater than or equal to 0"),
        ({"K": 1, "resources": {"use_gpu": "yes"}}, "config: resources.use_gpu: Input"),
        ({"K": 1, "algorithm": "hogwild"}, "config: algorithm: Input should be 'kavg'"),
        ({"K": 1, "workload": {"model": "alexnet"}}, "config: workload.model: Input should be"),
        ({"K": 1, "workload": {"dataset": "imagenet"}}, "config: workload.dataset: Input should"),
        ({"K": 1, "Kk": 2}, "config: Kk: unknown key"),
        ({"K": 1, "workload": {"lr": {"initial": 0.1, "half": 2}}},
         "config: workload.lr.half: unknown key"),
        ({"K": 1, "name": 5}, "config: name: Input should be a valid string"),
    ],
)  # fmt: skip
def test_bad_values_and_types(doc, message):
    assert _run_error(doc).startswith(message)


# --- Hier-AVG --------------------------------------------------------------------------


def _hier(**kw) -> dict:
    return {"algorithm": "hier_avg", "P": 8, "S": 4, "K1": 2, "K2": 8, **kw}


def test_hier_avg_valid():
    cfg = parse_run(_hier())
    assert (cfg.S, cfg.K1, cfg.K2, cfg.P, cfg.K) == (4, 2, 8, 8, None)
    assert cfg.period == 8
    assert cfg.trial_name() == "S4-K1_2-K2_8-P8-s0"
    assert parse_run(_hier(S=8, K1=3, K2=3)).period == 3  # S == P and K2 == K1 are fine


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_hier(S=3), "S=3 does not divide P=8"),
        (_hier(P=6, S=4), "S=4 does not divide P=6"),
        (_hier(K1=3, K2=8), "K2=8 is not a multiple of K1=3"),
        (_hier(K1=4, K2=2), "K2=2 is not a multiple of K1=4"),
        (_hier(S=16), "S=16 is larger than P=8"),
        (_hier(S=None), "algorithm hier_avg needs S, K1 and K2 (missing: S)"),
        (_hier(K1=None), "algorithm hier_avg needs S, K1 and K2 (missing: K1)"),
        (_hier(K2=None, S=None), "algorithm hier_avg needs S, K1 and K2 (missing: S, K2)"),
        (_hier(K=4), "algorithm hier_avg takes S, K1 and K2, not K"),
        ({"K": 4, "S": 2}, "algorithm kavg takes K, not S"),
        ({"P": 2}, "algorithm kavg needs K"),
    ],
)
def test_hier_avg_and_kavg_checks(doc, message):
    assert _run_error(doc) == f"config: {message}"


# --- workloads -------------------------------------------------------------------------


def test_cifar10_without_data_is_refused(tmp_path):
    doc = {"K": 1, "workload": {"dataset": "cifar10", "model": "vgg16"}}
    doc["workload"]["data_dir"] = str(tmp_path / "nowhere")
    msg = _run_error(doc)
    assert msg.startswith("config: workload: CIFAR-10 not found: no cifar-10-batches-py under")
    (tmp_path / "nowhere" / "cifar-10-batches-py").mkdir(parents=True)
    assert parse_run(doc).workload.dataset == "cifar10"
    doc["workload"]["data_dir"] = str(tmp_path / "elsewhere")
    doc["workload"]["download"] = True
    assert parse_run(doc).workload.download is True


@pytest.mark.parametrize(
    ("workload", "message"),
    [
        ({"dataset": "synthetic", "model": "cnn"}, "model cnn needs images; dataset synthetic"),
        ({"dataset": "digits", "model": "vgg16"},
         "model vgg16 needs images of at least 32x32; dataset digits has 8x8"),
        ({"synthetic": {"dim": 4}}, "'synthetic' options given but dataset is not 'synthetic'"),
        ({"dataset": "synthetic", "synthetic": {"dims": 4}}, "dims: unknown key"),
        ({"dataset": "synthetic", "synthetic": {"n_train": 0}}, "n_train: Input should be"),
        ({"dataset": "synthetic", "synthetic": {"task": "ranking"}}, "task: Input should be"),
    ],
)  # fmt: skip
def test_workload_mismatches_are_refused(workload, message):
    assert message in _run_error({"K": 1, "workload": workload})


def test_valid_workloads():
    for dataset, model in [("digits", "cnn"), ("digits", "nin"), ("digits", "resnet18"),
                           ("synthetic", "linear"), ("synthetic", "mlp")]:  # fmt: skip
        assert parse_run({"K": 1, "workload": {"dataset": dataset, "model": model}})
    syn = {"task": "least_squares", "dim": 5, "noise": 0.5}
    cfg = parse_run({"K": 1, "workload": {"dataset": "synthetic", "synthetic": syn}})
    assert cfg.workload.synthetic == syn  # kept as the plain dict the data module takes


def test_error_messages_are_one_line():
    msg = _run_error({"K": 1, "name": "a\nb\rc\x1b[31m"})
    assert "\n" not in msg and "\r" not in msg and "\x1b" not in msg
    assert "a\\nb\\rc\\x1b[31m" in msg
    assert len(str(ConfigError("x" * 100_000))) <= 1000


# --- sweeps ----------------------------------------------------------------------------


def test_grid_sets_nested_keys():
    base = {"name": "s", "K": 2, "workload": {"lr": {"halve_every_epochs": 5}, "epochs": 3}}
    doc = {**base, "grid": {"lr": [0.1, 0.05], "batch_size": [8, 32]}}
    spec = parse_sweep(doc)
    points = spec.points()
    assert [p.workload.lr.initial for p in points] == [0.1, 0.1, 0.05, 0.05]
    assert [p.workload.batch_size for p in points] == [8, 32, 8, 32]
    assert all(p.workload.lr.halve_every_epochs == 5 for p in points)  # the rest is kept
    assert all(p.workload.epochs == 3 and p.K == 2 for p in points)
    assert [p.trial_name() for p in points] == [
        "K2-P1-s0-lr0.1-batch_size8",
        "K2-P1-s0-lr0.1-batch_size32",
        "K2-P1-s0-lr0.05-batch_size8",
        "K2-P1-s0-lr0.05-batch_size32",
    ]
    assert spec.base["workload"] == {"lr": {"halve_every_epochs": 5}, "epochs": 3}
    assert "grid" not in doc["workload"] and doc["grid"]  # the caller's doc is not changed


def test_grid_over_lr_gives_distinct_trial_names():
    spec = parse_sweep({"K": 4, "P": 2, "grid": {"lr": [0.1, 0.05, 1e-5, 1e20]}})
    names = _names(spec)
    assert names == ["K4-P2-s0-lr0.1", "K4-P2-s0-lr0.05", "K4-P2-s0-lr1e-05", "K4-P2-s0-lr1e20"]
    assert all(NAME_RE.match(n) for n in names)


def test_core_keys_are_not_repeated_in_trial_names():
    spec = parse_sweep({"grid": {"K": [1, 2], "epochs": [2], "momentum": [0.0, 0.9]}})
    assert _names(spec) == [
        "K1-P1-s0-epochs2-momentum0.0", "K1-P1-s0-epochs2-momentum0.9",
        "K2-P1-s0-epochs2-momentum0.0", "K2-P1-s0-epochs2-momentum0.9",
    ]  # fmt: skip


def test_trial_name_extra_argument():
    cfg = RunConfig.model_validate({"K": 4, "P": 2})
    assert cfg.trial_name() == "K4-P2-s0"
    assert cfg.trial_name({"lr": 0.05}) == "K4-P2-s0-lr0.05"
    assert cfg.trial_name({}) == "K4-P2-s0"
    point = parse_sweep({"K": 4, "P": 2, "grid": {"lr": [0.05]}}).points()[0]
    assert point.trial_name() == "K4-P2-s0-lr0.05"
    assert point.trial_name({}) == "K4-P2-s0"


def test_hier_avg_grid():
    spec = parse_sweep(
        {"algorithm": "hier_avg", "P": 4, "K1": 1, "grid": {"S": [1, 2, 4], "K2": [2, 4]}}
    )
    assert _names(spec)[:3] == ["S1-K1_1-K2_2-P4-s0", "S1-K1_1-K2_4-P4-s0", "S2-K1_1-K2_2-P4-s0"]
    assert len(spec.points()) == 6


def test_grid_size_limit():
    ok = parse_sweep({"grid": {"K": list(range(1, 101)), "seed": list(range(100))}})
    assert len(ok.points()) == MAX_GRID_POINTS == 10_000
    start = time.perf_counter()
    msg = _sweep_error({"grid": {"K": list(range(1, 102)), "seed": list(range(100))}})
    assert msg == "spec: grid has 10100 points, more than 10000"
    big = {"grid": {k: list(range(1, 1001)) for k in ("K", "P", "seed", "epochs")}}
    assert _sweep_error(big) == "spec: grid has 1000000000000 points, more than 10000"
    assert time.perf_counter() - start < 0.5  # refused before any point is built


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"K": 1}, "spec: has no grid: run a single config with 'kavg train'"),
        ({"grid": {}}, "spec: grid: must be a non-empty mapping of key -> list"),
        ({"grid": [1, 2]}, "spec: grid: must be a non-empty mapping of key -> list"),
        ({"grid": None}, "spec: grid: must be a non-empty mapping of key -> list"),
        ({"grid": {"K": []}}, "spec: grid.K: must be a non-empty list"),
        ({"grid": {"K": 4}}, "spec: grid.K: must be a non-empty list"),
        ({"grid": {"K": [[1, 2]]}}, "spec: grid.K: values must be scalars"),
        ({"grid": {"K": [1, 2, 2]}}, "spec: grid.K: value 2 is listed twice"),
        ({"grid": {"model": ["mlp", "cnn"]}}, "spec: grid.model: cannot be swept (sweepable: "
         + ", ".join(GRID_KEYS) + ", model_args.NAME, dataset_args.NAME)"),
        ({"K": 2, "grid": {"K": [1, 2]}}, "spec: K is given both as a scalar and in grid.K"),
        ({"workload": {"lr": {"initial": 0.1}}, "K": 1, "grid": {"lr": [0.1, 0.2]}},
         "spec: workload.lr.initial is given both as a scalar and in grid.lr"),
        ({"grid": {"K": [1, 0]}},
         "spec: grid point (K=0): K: Input should be greater than or equal to 1"),
        ({"algorithm": "hier_avg", "K1": 1, "K2": 2, "grid": {"P": [4, 6], "S": [4]}},
         "spec: grid point (P=6, S=4): S=4 does not divide P=6"),
        ({"name": "../x", "grid": {"K": [1]}},
         "spec: grid point (K=1): name '../x' may only hold letters, digits, '.', '_' and '-'"),
        ({"workload": {"lr": 0.1}, "K": 1, "grid": {"lr": [0.1]}},
         "spec: 'lr' must be a mapping"),
        ({"K": 1, "grid": {"lr": [0.1, "0.1"]}},
         "spec: two grid points are the same run K1-P1-s0-lr0.1"),
    ],
)  # fmt: skip
def test_bad_sweeps(doc, message):
    assert _sweep_error(doc).startswith(message)


def test_run_config_with_grid_is_refused():
    assert _run_error({"grid": {"K": [1]}}) == "config: has a grid: run it with 'kavg sweep run'"


# --- reading YAML safely ------------------------------------------------------------------


def _read_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    return str(info.value)


def test_read_yaml_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("K: 2\nworkload: {lr: {initial: 0.5}}\n")
    assert read_yaml(p) == {"K": 2, "workload": {"lr": {"initial": 0.5}}}
    assert load_run(p).trial_name() == "K2-P1-s0"


def test_alias_bomb_is_refused_fast(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    msg = _read_error(p)
    assert time.perf_counter() - start < 0.5
    assert msg == f"{p}: not valid YAML (line 2): YAML aliases are not allowed"


def test_single_alias_is_refused(tmp_path):
    p = tmp_path / "alias.yaml"
    p.write_text("base: &b {K: 1}\nother: *b\n")
    assert "YAML aliases are not allowed" in _read_error(p)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'!!python/object/apply:os.system ["echo hi"]\n',
         "not valid YAML (line 1): could not determine a constructor for the tag "
         "'tag:yaml.org,2002:python/object/apply:os.system'"),
        (b"K: \xff\xfe\n", "not UTF-8 text"),
        (b"K: [1, 2\nP: {\n", "not valid YAML"),
        (b"K: 1\x00\x01\n", "not valid YAML"),
        (b"- 1\n- 2\n", "expected a mapping of keys at the top level"),
        (b"", "expected a mapping of keys at the top level"),
        (b"just a string\n", "expected a mapping of keys at the top level"),
        (b"a: 1\n---\nb: 2\n", "not valid YAML"),
        (b"K: " + b"[" * 20_000, "not a config: nested too deeply"),
        (b"K: 1\n" + b"#" * 1_000_001, "larger than 1 MB, not a config"),
    ],
)  # fmt: skip
def test_read_yaml_refuses_bad_files(tmp_path, content, message):
    p = tmp_path / "bad.yaml"
    p.write_bytes(content)
    msg = _read_error(p)
    assert msg.startswith(f"{p}: {message}")
    assert "\n" not in msg


def test_read_yaml_missing_and_directory(tmp_path):
    assert _read_error(tmp_path / "none.yaml") == f"{tmp_path / 'none.yaml'}: no such file"
    assert _read_error(tmp_path) == f"{tmp_path}: not a regular file"


def test_variants_mix_algorithms_in_one_sweep() -> None:
    spec = load_sweep(ROOT / "sweeps" / "hier_vs_kavg.yaml")
    names = [p.trial_name() for p in spec.points()]
    assert names == [
        "K8-P4-s0", "K8-P4-s1", "S2-K1_2-K2_8-P4-s0", "S2-K1_2-K2_8-P4-s1",
        "K2-P4-s0", "K2-P4-s1",
    ]  # fmt: skip
    hier = spec.points()[2]
    assert (hier.algorithm, hier.S, hier.K1, hier.K2, hier.K) == ("hier_avg", 2, 2, 8, None)
    assert hier.period == 8 and spec.points()[0].period == 8


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ([], "variants: must be a non-empty list"),
        ("kavg", "variants: must be a non-empty list"),
        ([{"algorithm": "kavg", "K": 2}, {"algorithm": "kavg", "K": 2}], "same run"),
        ([{"algorithm": "kavg", "P": 2}], "both in variants and in grid"),
        ([{"algorithm": "hier_avg", "S": 3, "K1": 1, "K2": 2}], "does not divide"),
    ],
)
def test_bad_variants(variants, message: str) -> None:
    doc = {"variants": variants, "grid": {"P": [4], "seed": [0]}}
    with pytest.raises(ConfigError, match=message):
        parse_sweep(doc)


def test_theory_estimate_key() -> None:
    cfg = parse_run({"K": 2, "theory": "estimate"})
    assert cfg.theory == "estimate"
    with pytest.raises(ConfigError, match="theory"):
        parse_run({"K": 2, "theory": "guess"})


def test_checkpoint_schedule_exact():
    from kavg_ray.launch.ray_train import checkpoint_due

    def due(every: int, epochs: int) -> list[int]:
        cfg = RunConfig.model_validate(
            {"K": 2, "P": 2, "workload": {"epochs": epochs},
             "failure": {"checkpoint_every_epochs": every}}
        )
        return [e for e in range(1, epochs + 1) if checkpoint_due(cfg, e)]

    assert due(1, 4) == [1, 2, 3, 4]
    assert due(2, 5) == [2, 4, 5]
    assert due(3, 7) == [3, 6, 7]
    assert due(10, 4) == [4]
    assert due(0, 4) == []
    with pytest.raises(ValueError, match="checkpoint_every_epochs"):
        RunConfig.model_validate({"K": 2, "P": 2, "failure": {"checkpoint_every_epochs": -1}})


def test_a_diverged_epoch_is_checkpointed_when_checkpoints_are_on():
    from kavg_ray.launch.ray_train import checkpoint_due

    def cfg(every: int) -> RunConfig:
        return RunConfig.model_validate(
            {"K": 2, "P": 2, "workload": {"epochs": 9},
             "failure": {"checkpoint_every_epochs": every}}
        )  # fmt: skip

    assert checkpoint_due(cfg(4), 3, diverged=True)
    assert not checkpoint_due(cfg(4), 3, diverged=False)
    assert not checkpoint_due(cfg(0), 3, diverged=True)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        # A run config made a sweep keeps its lr scalar: the message says what to delete
        # and that the schedule's other keys stay (README, "Configs and sweep specs").
        ({"workload": {"lr": {"initial": 0.1, "halve_every_epochs": 5}}, "K": 1,
          "grid": {"lr": [0.1, 0.3]}},
         "spec: workload.lr.initial is given both as a scalar and in grid.lr: delete "
         "workload.lr.initial, grid.lr sets it for every grid point; workload.lr keeps "
         "halve_every_epochs"),
        ({"K": 2, "grid": {"K": [1, 2]}},
         "spec: K is given both as a scalar and in grid.K: delete K, grid.K sets it for every "
         "grid point"),
        ({"variants": [{"K": 2}], "grid": {"K": [1, 2]}},
         "spec: K is given both in variants and in grid.K: set it in the variants or list it "
         "in grid.K, not both"),
    ],
)  # fmt: skip
def test_a_setting_both_scalar_and_swept_is_refused_with_the_fix(doc, message):
    assert _sweep_error(doc) == message
    # The fix works: the lr schedule's other keys stay beside grid.lr.
    if "lr" in doc.get("grid", {}):
        fixed = {**doc, "workload": {"lr": {"halve_every_epochs": 5}}}
        assert [p.workload.lr.halve_every_epochs for p in parse_sweep(fixed).points()] == [5, 5]


def test_gpu_memory_gb_is_for_gpu_trials_and_positive():
    assert RunConfig.model_validate({"K": 1}).resources.gpu_memory_gb is None
    ok = parse_run({"K": 1, "resources": {"use_gpu": True, "gpu_memory_gb": 79.5}})
    assert ok.resources.gpu_memory_gb == 79.5
    assert _run_error({"K": 1, "resources": {"gpu_memory_gb": 40}}) == (
        "config: resources.gpu_memory_gb is for GPU trials: it needs use_gpu: true"
    )
    for bad in (0, -1, True, "big", float("inf"), 10_000):
        message = _run_error({"K": 1, "resources": {"use_gpu": True, "gpu_memory_gb": bad}})
        assert message.startswith("config: resources.gpu_memory_gb: "), message


def test_a_step_budget_config_survives_its_dump() -> None:
    """The sweep hands each trial its config as a JSON dump: a step budget's dump must
    validate again (the epochs default is left out), and an epoch budget keeps epochs."""
    doc = {"workload": {"dataset": "text", "model": "gpt", "steps": 20, "eval_every_steps": 10},
           "K": 2}  # fmt: skip
    cfg = RunConfig.model_validate(doc)
    dumped = cfg.model_dump(mode="json")
    assert "epochs" not in dumped["workload"] and dumped["workload"]["steps"] == 20
    assert RunConfig.model_validate(dumped) == cfg
    epochs = RunConfig.model_validate({"K": 2, "workload": {"epochs": 3}}).model_dump(mode="json")
    assert epochs["workload"]["epochs"] == 3 and epochs["workload"]["steps"] is None
