"""Downpour and EAMSGD on a parameter server (kavg_ray.train.parameter_server).

The learner loops run here in-process against a plain ParameterServer object (P = 1);
the last test runs both algorithms for real on Ray (P = 2, one sweep, one Ray start).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from kavg_ray.analysis.results import ResultsStore
from kavg_ray.config import ConfigError, RunConfig, parse_run, parse_sweep
from kavg_ray.train import train
from kavg_ray.train.data import epoch_indices, load_dataset
from kavg_ray.train.models import build_model
from kavg_ray.train.parameter_server import ParameterServer, initial_params

from ..ray_head import RayHead
from ..workloads import diverging_least_squares

CPU = torch.device("cpu")
DIGITS = {
    "dataset": "digits",
    "model": "mlp",
    "epochs": 2,
    "batch_size": 16,
    "lr": {"initial": 0.1, "halve_every_epochs": 1},
}
DOWNPOUR = {"algorithm": "downpour", "fetch_period": 1, "push_period": 1}
EAMSGD = {"algorithm": "eamsgd", "tau": 1, "beta": 0.25}


def _cfg(workload: dict = DIGITS, **doc) -> RunConfig:
    return RunConfig.model_validate({"workload": workload, "P": 1, "seed": 7, **doc})


def _run(cfg: RunConfig, server: ParameterServer | None = None, resume: dict | None = None):
    """Run the algorithm's loop on one learner; returns (server, [(metrics, state)])."""
    server = server or ParameterServer(initial_params(cfg))
    reports: list = []
    train(cfg, lambda m, s: reports.append((m, s)), server=server, resume=resume)
    return server, reports


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _sgd_step(model: torch.nn.Module, x, y, lr: float, loss_fn=F.cross_entropy) -> None:
    """One plain SGD step, p <- p - lr * grad."""
    loss = loss_fn(model(x), y)
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(p.grad * lr)


def _half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * F.mse_loss(out, y)


# --- the server ------------------------------------------------------------------------


def test_server_applies_every_push_from_concurrent_threads() -> None:
    size, threads, per_thread = 200_000, 8, 200
    server = ParameterServer(np.zeros(size, dtype=np.float32))
    versions: list[int] = []

    def learner() -> None:
        for _ in range(per_thread):
            version, _ = server.pull()
            versions.append(server.push(np.ones(size, dtype=np.float32), version))

    pool = [threading.Thread(target=learner) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    n = threads * per_thread
    version, params = server.pull()
    stats = server.stats()
    assert version == n and sorted(versions) == list(range(1, n + 1))  # one step per push
    assert stats["pushes"] == stats["applied"] == stats["window_updates"] == n
    np.testing.assert_array_equal(params, np.full(size, n, dtype=np.float32))
    assert 0 <= stats["staleness_mean"] <= stats["staleness_max"] <= n - 1

    # A malformed push is received but not applied, and changes nothing.
    with pytest.raises(ValueError, match="update of 3 values"):
        server.push(np.ones(3, dtype=np.float32), version)
    after = server.stats(reset=True)
    assert (after["pushes"], after["applied"], after["version"]) == (n + 1, n, n)
    assert math.isnan(server.stats()["staleness_mean"])  # the window was reset


def test_server_staleness_counts_updates_since_the_pull() -> None:
    server = ParameterServer(np.zeros(2, dtype=np.float32))
    v_a, _ = server.pull()  # learner a pulls version 0
    v_b, _ = server.pull()  # learner b pulls version 0
    server.push(np.ones(2, dtype=np.float32), v_a)  # staleness 0, version 1
    server.push(np.ones(2, dtype=np.float32), v_b)  # staleness 1 (a's push), version 2
    v_a, _ = server.pull()
    server.push(np.ones(2, dtype=np.float32), v_a)  # staleness 0
    stats = server.stats()
    assert stats["version"] == 3
    assert stats["staleness_mean"] == pytest.approx(1 / 3) and stats["staleness_max"] == 1
    with pytest.raises(ValueError, match="newer than the server"):
        server.push(np.ones(2, dtype=np.float32), 7)


def test_elastic_exchange_by_hand() -> None:
    """center += alpha (x - center), returning the center before; three exchanges."""
    server = ParameterServer(np.array([0.0, 4.0], dtype=np.float32))
    alpha = 0.5
    version, before = server.elastic(np.array([2.0, 0.0], dtype=np.float32), alpha, 0)
    assert version == 1 and before.tolist() == [0.0, 4.0]
    assert server.pull()[1].tolist() == [1.0, 2.0]
    version, before = server.elastic(np.array([3.0, 2.0], dtype=np.float32), alpha, 1)
    assert version == 2 and before.tolist() == [1.0, 2.0]
    assert server.pull()[1].tolist() == [2.0, 2.0]
    # A stale exchange (the learner last saw version 1) is applied and counted as stale.
    version, before = server.elastic(np.array([-2.0, 6.0], dtype=np.float32), alpha, 1)
    assert server.pull()[1].tolist() == [0.0, 4.0]
    assert server.stats()["staleness_max"] == 1 and version == 3
    with pytest.raises(ValueError, match="alpha"):
        server.elastic(np.zeros(2, dtype=np.float32), 1.0, 3)


# --- the learner loops, P = 1 ----------------------------------------------------------


def test_downpour_single_learner_is_sequential_sgd_exactly() -> None:
    cfg = _cfg(**DOWNPOUR)
    server, reports = _run(cfg)

    data = load_dataset("digits")
    torch.manual_seed(cfg.seed)
    model = build_model("mlp", data.input_shape, data.num_classes)
    steps = 0
    for epoch in range(cfg.workload.epochs):
        lr = cfg.workload.lr.at_epoch(epoch)
        for idx in epoch_indices(data.n_train, 16, 0, 1, epoch, cfg.seed):
            _sgd_step(model, data.train_x[idx], data.train_y[idx], lr)
            steps += 1
    reference = _flat(model)
    version, center = server.pull()
    assert torch.equal(torch.from_numpy(center), reference)
    metrics, state = reports[-1]
    assert torch.equal(state["engine"]["local"], reference)
    assert version == steps == metrics["rounds"] == metrics["pushes"] == metrics["applied"]
    assert metrics["staleness_max"] == 0 and metrics["staleness_mean"] == 0
    # Pulls (one before the first step, one per step) and pushes: each moves the model.
    assert metrics["bytes_communicated"] == (2 * steps + 1) * reference.numel() * 4
    assert [m["epoch"] for m, _ in reports] == [1, 2] and not metrics["diverged"]
    assert metrics["test_acc"] > 0.8


def test_eamsgd_single_learner_follows_the_elastic_rule() -> None:
    """Three local steps, each followed by an exchange with the center (tau = 1)."""
    workload = {
        "dataset": "synthetic",
        "synthetic": {"task": "least_squares", "n_train": 48, "n_test": 16, "dim": 5},
        "model": "linear",
        "epochs": 1,
        "batch_size": 16,
        "lr": {"initial": 0.1},
    }
    cfg = _cfg(workload, **EAMSGD)  # alpha = beta / P = 0.25
    server, reports = _run(cfg)

    data = load_dataset("synthetic", synthetic=workload["synthetic"])
    torch.manual_seed(cfg.seed)
    model = build_model("linear", data.input_shape, 1)
    center = _flat(model).clone()
    for idx in epoch_indices(48, 16, 0, 1, 0, cfg.seed):
        _sgd_step(model, data.train_x[idx], data.train_y[idx], 0.1, _half_mse)
        x = _flat(model)
        e = (x - center) * 0.25
        center = center + e
        with torch.no_grad():
            model[1].weight.copy_((x - e).view_as(model[1].weight))
    version, got = server.pull()
    assert version == 3
    assert torch.equal(torch.from_numpy(got), center)
    metrics, state = reports[-1]
    assert torch.equal(state["engine"]["local"], _flat(model))
    assert not torch.equal(center, _flat(model))  # the learner is pulled, not replaced
    assert metrics["rounds"] == 3 and metrics["bytes_communicated"] == (1 + 2 * 3) * 5 * 4


@pytest.mark.parametrize(
    "doc",
    [
        {"algorithm": "downpour", "fetch_period": 3, "push_period": 2},
        {"algorithm": "eamsgd", "tau": 3, "beta": 0.9},
    ],
)
def test_resume_matches_an_uninterrupted_run(doc: dict) -> None:
    """Local model, accumulator, momentum and the server's center all survive a restart."""
    workload = {**DIGITS, "momentum": 0.9, "epochs": 2, "batch_size": 32}
    cfg = _cfg(workload, **doc)
    full_server, full = _run(cfg)
    _, partial = _run(_cfg({**workload, "epochs": 1}, **doc))
    # The restarted run gets a fresh server (as a restarted trial would); rank 0 restores it.
    server, resumed = _run(cfg, resume=partial[-1][1])
    assert [m["epoch"] for m, _ in resumed] == [2]
    assert [m["epoch"] for m in resumed[0][0]["history_before"]] == [1]
    assert torch.equal(resumed[-1][1]["engine"]["local"], full[-1][1]["engine"]["local"])
    assert np.array_equal(server.pull()[1], full_server.pull()[1])
    for key in ("rounds", "pushes", "applied", "samples", "bytes_communicated", "test_loss"):
        assert resumed[-1][0][key] == full[-1][0][key], key
    # A finished run resumed again trains nothing and reports its end once.
    _, again = _run(cfg, resume=full[-1][1])
    ((metrics, state),) = again
    assert state is None and metrics["epoch"] == 2 and len(metrics["history_before"]) == 1


def test_divergence_is_reported_and_stops() -> None:
    workload = diverging_least_squares(epochs=4)
    for doc in (DOWNPOUR, EAMSGD):
        _, reports = _run(_cfg(workload, **doc))
        assert len(reports) == 1 and reports[0][0]["diverged"] is True, doc
    _, reports = _run(_cfg({**workload, "lr": {"initial": 0.05}}, **DOWNPOUR))
    assert len(reports) == 4 and not reports[-1][0]["diverged"]


# --- config ----------------------------------------------------------------------------


def test_config_names_periods_and_grid() -> None:
    down = parse_run({"P": 4, **DOWNPOUR})
    assert (down.trial_name(), down.period) == ("downpour-f1-p1-P4-s0", 1)
    eam = parse_run({"P": 4, "algorithm": "eamsgd", "tau": 4, "beta": 0.9})
    assert (eam.trial_name(), eam.period) == ("eamsgd-t4-b0.9-P4-s0", 4)
    spec = parse_sweep(
        {"algorithm": "eamsgd", "grid": {"tau": [1, 4], "beta": [0.5, 0.9], "P": [2]}}
    )
    assert [p.trial_name() for p in spec.points()] == [
        "eamsgd-t1-b0.5-P2-s0", "eamsgd-t1-b0.9-P2-s0",
        "eamsgd-t4-b0.5-P2-s0", "eamsgd-t4-b0.9-P2-s0",
    ]  # fmt: skip
    mixed = parse_sweep(
        {
            "variants": [{"algorithm": "kavg", "K": 16}, DOWNPOUR],
            "grid": {"P": [2], "lr": [0.1, 1.0]},
        }
    )
    assert [p.trial_name() for p in mixed.points()] == [
        "K16-P2-s0-lr0.1", "K16-P2-s0-lr1.0",
        "downpour-f1-p1-P2-s0-lr0.1", "downpour-f1-p1-P2-s0-lr1.0",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("doc", "fetch", "push", "tau", "beta", "name"),
    [
        # Downpour: fetch and push every step; EAMSGD: Zhang et al.'s beta 0.9 and tau 10.
        ({"algorithm": "downpour"}, 1, 1, None, None, "downpour-f1-p1-P2-s0"),
        ({"algorithm": "downpour", "push_period": 4}, 1, 4, None, None, "downpour-f1-p4-P2-s0"),
        ({"algorithm": "downpour", "fetch_period": None}, 1, 1, None, None,
         "downpour-f1-p1-P2-s0"),
        ({"algorithm": "eamsgd"}, None, None, 10, 0.9, "eamsgd-t10-b0.9-P2-s0"),
        ({"algorithm": "eamsgd", "tau": 4}, None, None, 4, 0.9, "eamsgd-t4-b0.9-P2-s0"),
        ({"algorithm": "eamsgd", "beta": 0.5}, None, None, 10, 0.5, "eamsgd-t10-b0.5-P2-s0"),
    ],
)  # fmt: skip
def test_baselines_have_defaults_and_stable_names(doc, fetch, push, tau, beta, name) -> None:
    cfg = parse_run({**doc, "P": 2})
    assert (cfg.fetch_period, cfg.push_period, cfg.tau, cfg.beta) == (fetch, push, tau, beta)
    # The name is the one of the config with every default written out.
    explicit = {k: v for k, v in zip(("fetch_period", "push_period", "tau", "beta"),
                                     (fetch, push, tau, beta), strict=True) if v is not None}
    assert cfg.trial_name() == parse_run({**doc, **explicit, "P": 2}).trial_name() == name
    assert parse_run(cfg.model_dump(mode="json")) == cfg  # a worker reads back the same


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"algorithm": "downpour", "fetch_period": 1}, None),
        ({"algorithm": "eamsgd", "tau": 2}, None),
        ({"algorithm": "eamsgd", "P": 1}, None),
        ({"algorithm": "eamsgd", "tau": 2, "P": 4, "beta": 4.0}, "beta / P = 4.0/4 must be"),
        ({**DOWNPOUR, "K": 4}, "algorithm downpour takes fetch_period and push_period, not K"),
        ({**EAMSGD, "S": 2}, "takes tau and beta, not S"),
        ({**DOWNPOUR, "tau": 2}, "not tau"),
        ({"K": 4, "tau": 2}, "algorithm kavg takes K, not tau"),
        ({**EAMSGD, "beta": 0.9, "P": 1}, None),
        ({**EAMSGD, "beta": 1.5, "P": 2}, None),
        ({**EAMSGD, "beta": 2.0, "P": 2}, "alpha = beta / P = 2.0/2 must be below 1"),
        ({**EAMSGD, "beta": 0}, "beta: Input should be greater than 0"),
        ({**DOWNPOUR, "push_period": 0}, "push_period: Input should be greater than or equal"),
    ],
)
def test_config_validation(doc: dict, message: str | None) -> None:
    if message is None:
        parse_run(doc)
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_run(doc)


# --- a real run on Ray -----------------------------------------------------------------


@pytest.mark.ray
def test_sweep_on_ray_learns_and_marks_divergence(tmp_path: Path, ray_head: RayHead) -> None:
    """One sweep, one Ray start: Downpour and EAMSGD learn with P = 2; a huge step diverges."""
    least_squares = {
        "dataset": "synthetic",
        "model": "linear",
        "synthetic": {"task": "least_squares"},
        "lr": {"initial": 50.0},
    }
    spec = {
        "name": "asgd",
        "workload": {**DIGITS, "epochs": 4, "lr": {"initial": 0.1}},
        "variants": [
            DOWNPOUR,
            {"algorithm": "eamsgd", "tau": 4, "beta": 0.9},
            {**DOWNPOUR, "push_period": 2, "workload": least_squares},
        ],
        "grid": {"P": [2]},
        "resources": {"cpus_per_worker": 0.5},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = subprocess.run(
        [sys.executable, "-m", "kavg_ray.cli", "sweep", "run", "spec.yaml", "--storage", "store",
         "--address", ray_head.address],
        cwd=tmp_path, env=ray_head.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]

    store = ResultsStore(tmp_path / "store")
    rows = {r["trial_id"]: r for r in store.read_trials("asgd").to_dict("records")}
    assert set(rows) == {"downpour-f1-p1-P2-s0", "eamsgd-t4-b0.9-P2-s0", "downpour-f1-p2-P2-s0"}
    steps = 4 * (1437 // 32)  # per learner: 4 epochs of 44 steps
    down, eam = rows["downpour-f1-p1-P2-s0"], rows["eamsgd-t4-b0.9-P2-s0"]
    bad = rows["downpour-f1-p2-P2-s0"]
    for row, rounds in ((down, 2 * steps), (eam, 2 * (steps // 4))):
        assert row["status"] == "completed", row
        assert row["final_test_acc"] >= 0.85, row
        assert row["rounds"] == row["pushes"] == row["applied"] == rounds
        # Per learner: one pull to start, then the model's size per pull/push (x2 exchange).
        assert row["bytes_communicated"] == (1 + 2 * rounds // 2) * 9610 * 4
        assert row["staleness_mean"] >= 0 and row["staleness_max"] >= row["staleness_mean"]
    assert (down["K"], eam["K"]) == (1, 4)
    # Two learners pushing after every step against one server: some pushes are stale.
    assert down["staleness_max"] >= 1
    assert bad["status"] == "diverged"
    # Through Ray, the row says where and how (the loss: NaN, inf, or finite with
    # parameters that are not).
    assert bad["error"].startswith("diverged at epoch 1: "), bad["error"]
    history = store.read_history("asgd")
    assert history[history["trial_id"] == "downpour-f1-p2-P2-s0"]["epoch"].tolist() == [1]
    assert sorted(history[history["trial_id"] == "eamsgd-t4-b0.9-P2-s0"]["epoch"]) == [1, 2, 3, 4]


def test_an_optimizer_factory_steps_the_learners() -> None:
    """workload.optimizer "module:function" on the parameter server: torch's own SGD by
    import path moves Downpour's learner as the built-in SGD does, and an RMSprop run
    resumes equal to an uninterrupted one (its state is checkpointed)."""
    builtin_server, _ = _run(_cfg(**DOWNPOUR))
    factory_server, reports = _run(_cfg({**DIGITS, "optimizer": "torch.optim:SGD"}, **DOWNPOUR))
    builtin, factory = builtin_server.pull()[1], factory_server.pull()[1]
    assert np.allclose(factory, builtin, rtol=0, atol=1e-6)
    assert reports[-1][0]["pushes"] == reports[-1][0]["applied"] > 0

    rms = {**DIGITS, "optimizer": "torch.optim:RMSprop", "lr": {"initial": 0.001}}
    for doc in (DOWNPOUR, EAMSGD):
        full_server, full = _run(_cfg(rms, **doc))
        _, partial = _run(_cfg({**rms, "epochs": 1}, **doc))
        assert "optimizer" in partial[-1][1]["engine"]
        server, resumed = _run(_cfg(rms, **doc), resume=partial[-1][1])
        assert torch.equal(resumed[-1][1]["engine"]["local"], full[-1][1]["engine"]["local"])
        assert np.array_equal(server.pull()[1], full_server.pull()[1])
        assert full[-1][0]["test_acc"] > 0.5
