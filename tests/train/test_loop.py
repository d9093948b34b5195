"""The one epoch loop: the metric schema every engine shares, the replay protocol, the
averaging schedule, and that kavg_ray.train runs without Ray."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kavg_ray.config import RunConfig
from kavg_ray.launch.sweep import HISTORY_KEYS
from kavg_ray.metrics import HISTORY_BEFORE, METRIC_KEYS
from kavg_ray.train import train
from kavg_ray.train.averaging import AveragingSchedule
from kavg_ray.train.parameter_server import ParameterServer, initial_params

WORKLOAD = {"dataset": "digits", "model": "mlp", "epochs": 1, "batch_size": 64,
            "lr": {"initial": 0.1}}  # fmt: skip
ENGINES = {
    "process-group kavg": {"K": 4, "P": 1},
    "process-group hier_avg": {"algorithm": "hier_avg", "S": 1, "K1": 2, "K2": 4, "P": 1},
    "stacked kavg": {"K": 4, "P": 2, "backend": "simulated"},
    "stacked hier_avg": {"algorithm": "hier_avg", "S": 2, "K1": 2, "K2": 4, "P": 4,
                         "backend": "simulated"},  # fmt: skip
    "parameter-server downpour": {"algorithm": "downpour", "fetch_period": 2, "push_period": 2},
    "parameter-server eamsgd": {"algorithm": "eamsgd", "tau": 4, "beta": 0.5},
}


def _train(doc: dict, resume: dict | None = None) -> list[tuple[dict, dict | None]]:
    cfg = RunConfig.model_validate({"workload": WORKLOAD, "seed": 1, **doc})
    server = None
    if cfg.algorithm in ("downpour", "eamsgd"):
        server = ParameterServer(initial_params(cfg))
    reports: list = []
    train(cfg, lambda m, s: reports.append((m, s)), server=server, resume=resume)
    return reports


@pytest.mark.parametrize("name", list(ENGINES))
def test_every_engine_reports_the_metric_schema(name: str) -> None:
    (metrics, state), = _train(ENGINES[name])
    assert set(metrics) == set(METRIC_KEYS)
    P = ENGINES[name].get("P", 1)
    steps_per_learner = 1437 // (64 * P)  # the digits training set has 1437 images
    assert metrics["epoch"] == 1 and metrics["samples"] == steps_per_learner * 64 * P
    period = ENGINES[name].get("K") or ENGINES[name].get("K2") or ENGINES[name].get("tau") or 2
    # rounds: averages (K-AVG, Hier-AVG's global ones), pushes (Downpour), exchanges (EAMSGD)
    assert metrics["rounds"] == steps_per_learner // period
    assert 0.0 < metrics["test_acc"] <= 1.0 and math.isfinite(metrics["train_loss"])
    assert set(state) == {"engine", "rng", "counters", "history"}


def test_history_columns_are_metric_keys() -> None:
    assert set(HISTORY_KEYS) <= set(METRIC_KEYS)


def test_a_finished_run_resumed_replays_its_epochs_once_and_trains_nothing() -> None:
    doc = {"K": 2, "P": 2, "backend": "simulated"}
    two = {**WORKLOAD, "epochs": 2}
    cfg = {"workload": two, **doc}
    full = _train(cfg)
    assert [m["epoch"] for m, _ in full] == [1, 2] and HISTORY_BEFORE not in full[0][0]
    again = _train(cfg, resume=full[-1][1])
    assert len(again) == 1
    (metrics, state), = again
    assert state is None and metrics["epoch"] == 2
    assert [m["epoch"] for m in metrics[HISTORY_BEFORE]] == [1]
    # Resumed after epoch 1: the first new report carries epoch 1, then nothing more.
    one = _train({"workload": {**two, "epochs": 1}, **doc})
    rest = _train(cfg, resume=one[-1][1])
    assert [m["epoch"] for m, _ in rest] == [2]
    assert [m["epoch"] for m in rest[0][0][HISTORY_BEFORE]] == [1]
    assert rest[0][0]["test_acc"] == full[1][0]["test_acc"]


@pytest.mark.parametrize(
    ("global_period", "local_period", "expected"),
    [
        (1, None, ["global"] * 6),
        (3, None, [None, None, "global", None, None, "global"]),
        (4, 2, [None, "local", None, "global", None, "local"]),
        (6, 3, [None, None, "local", None, None, "global"]),
        (2, 2, [None, "global", None, "global", None, "global"]),
    ],
)
def test_averaging_schedule(global_period: int, local_period: int | None, expected) -> None:
    schedule = AveragingSchedule(global_period, local_period)
    assert [schedule.action(s) for s in range(1, 7)] == expected
    assert [schedule.in_sync(s) for s in range(1, 7)] == [a == "global" for a in expected]


def test_training_never_imports_ray(tmp_path) -> None:
    """`python -m kavg_ray.train CONFIG` (the torchrun entry) trains P = 1 without Ray."""
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent("""\
        workload: {dataset: digits, model: mlp, epochs: 2, batch_size: 32, lr: {initial: 0.1}}
        K: 2
        P: 1
    """))
    code = (
        "import sys\n"
        "from kavg_ray.train.__main__ import main\n"
        f"rc = main([{str(config)!r}])\n"
        "print('ray imported:', 'ray' in sys.modules)\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("epoch 1/2  test_acc ") and lines[1].startswith("epoch 2/2")
    assert lines[-1] == "ray imported: False"
    assert torch.cuda.is_available() or "cuda" not in out.stderr


def test_torchrun_entry_refuses_a_bad_config(tmp_path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("K: 0\n")
    out = subprocess.run(
        [sys.executable, "-m", "kavg_ray.train", str(config)], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1


def test_random_states_round_trip_on_cpu_and_take_the_gpus_too(monkeypatch) -> None:  # noqa: ANN001
    from kavg_ray.train.loop import random_states, restore_random_states

    states = random_states(torch.device("cpu"))
    assert set(states) == {"rng"}
    first = torch.rand(4)
    restore_random_states(states, torch.device("cpu"))
    assert torch.equal(torch.rand(4), first)
    # On a GPU the device's generator (dropout) is saved and restored too, from host
    # tensors whatever device the checkpoint was loaded onto. Stand-ins: no GPU here.
    calls = []
    seven = torch.full((8,), 7, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: seven)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append((s.device, d)))
    gpu = torch.device("cuda", 1)
    states = random_states(gpu)
    assert set(states) == {"rng", "cuda_rng"} and int(states["cuda_rng"][0]) == 7
    restore_random_states(states, gpu)
    assert calls == [(torch.device("cpu"), gpu)]


# ------------------------------------------------- what a diverged trial's row says


def _diverged_row(tmp_path, cfg: RunConfig, reports: list[dict]) -> dict:  # noqa: ANN001
    """The stored row of a trial whose reports the driver received (no Ray: the tracker
    the Tune callback feeds, fed by hand)."""
    from kavg_ray.analysis.results import ResultsStore
    from kavg_ray.launch.progress import TrialTracker
    from kavg_ray.launch.sweep import _row

    tid = cfg.trial_name()
    tracker = TrialTracker(ResultsStore(tmp_path), "s", {tid: cfg}, [tid], echo=lambda _: None)
    for metrics in reports:
        tracker.result(tid, metrics)
    tracker.finish(tid, None, _row)
    (row,) = ResultsStore(tmp_path).read_trials("s").to_dict("records")
    return row


# lr 1e12 on the MLP: the first steps overflow, the epoch's mean training loss is NaN.
DIVERGING = {**WORKLOAD, "epochs": 3, "lr": {"initial": 1e12}}


@pytest.mark.parametrize("name", list(ENGINES))
def test_a_diverged_trials_error_says_the_epoch_and_the_loss(tmp_path, name: str) -> None:  # noqa: ANN001
    doc = {**ENGINES[name], "workload": DIVERGING}
    reports = [m for m, _ in _train(doc)]
    assert [m["epoch"] for m in reports] == [1] and reports[-1]["diverged"]
    row = _diverged_row(tmp_path, RunConfig.model_validate({"seed": 1, **doc}), reports)
    assert (row["status"], row["error"]) == ("diverged", "diverged at epoch 1: train loss nan")


def test_a_diverged_packed_points_error_says_the_epoch_and_the_loss(tmp_path) -> None:  # noqa: ANN001
    from kavg_ray.train.packed import run_pack

    sim = {"backend": "simulated", "P": 2, "K": 2}
    cfgs = [RunConfig.model_validate({**sim, "workload": w}) for w in
            (DIVERGING, {**DIVERGING, "lr": {"initial": 0.1}})]  # fmt: skip
    reports: list[list[dict]] = [[], []]
    run_pack(cfgs, lambda i, m, done: reports[i].append(m))
    assert [m["epoch"] for m in reports[0]] == [1] and reports[0][-1]["diverged"]
    row = _diverged_row(tmp_path / "a", cfgs[0], reports[0])
    assert (row["status"], row["error"]) == ("diverged", "diverged at epoch 1: train loss nan")
    row = _diverged_row(tmp_path / "b", cfgs[1], reports[1])
    assert (row["status"], row["error"]) == ("completed", "")


@pytest.mark.parametrize(
    ("report", "reason"),
    [
        ({"epoch": 3, "train_loss": math.inf}, "diverged at epoch 3: train loss inf"),
        ({"epoch": 3, "train_loss": math.nan}, "diverged at epoch 3: train loss nan"),
        # A finite mean loss: the evaluated parameters were not finite.
        ({"epoch": 2, "train_loss": 12345.678},
         "diverged at epoch 2: parameters not finite (train loss 1.235e+04)"),
    ],
)  # fmt: skip
def test_the_divergence_reason(report: dict, reason: str) -> None:
    from kavg_ray.launch.sweep import trial_row

    cfg = RunConfig.model_validate({"K": 2, "workload": {**WORKLOAD, "epochs": 5}})
    history = [{"epoch": e, "train_loss": 1.0} for e in range(1, report["epoch"])]
    row = trial_row("s", "t", cfg, [*history, {**report, "diverged": True}], "diverged")
    assert row["error"] == reason
    # A reason given (early stopping's, a failure's) is kept.
    assert trial_row("s", "t", cfg, history, "diverged", "why")["error"] == "why"


# ---------------------------------------------------- the clock stops while reporting


@pytest.mark.parametrize("packed", [False, True])
def test_the_clock_stops_while_reporting(packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """wall_time_s is the loop's training time: a report (Ray's, which waits for the
    controller's poll, with the checkpoint write) is left out. The checkpoint holds the
    clock as it was before its report, so a run resumed from it counts what the
    uninterrupted run counts (docs/design.md section 5)."""
    from kavg_ray.train.packed import run_pack

    cfg = RunConfig.model_validate(
        {"K": 2, "P": 2, "backend": "simulated", "workload": {**WORKLOAD, "epochs": 2}}
    )
    walls: list[float] = []
    # A report that takes 1000 s by the clock the loop reads (no real wait, and no load
    # on the machine can make training look that long).
    real, offset = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real() + offset[0])

    def slow_report(metrics: dict) -> None:
        walls.append(metrics["wall_time_s"])
        offset[0] += 1000.0

    if packed:
        run_pack([cfg, cfg.model_copy(update={"seed": 1})],
                 lambda i, m, done: slow_report(m) if i == 1 else None)  # fmt: skip
    else:
        states: list[dict] = []
        train(cfg, lambda m, s: (states.append(s), slow_report(m)))
        assert states[0]["counters"]["wall_time_s"] == walls[0]
    # The 1000 s of the first epoch's report(s) are not in the second epoch's clock.
    assert len(walls) == 2 and 0 < walls[0] < walls[1] < 1000.0
