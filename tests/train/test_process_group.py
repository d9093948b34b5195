"""The process-group engine (K-AVG, Hier-AVG) against sequential references in one process."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kavg_ray.config import RunConfig
from kavg_ray.train import train
from kavg_ray.train.data import epoch_indices, load_dataset
from kavg_ray.train.models import build_model

from ..distributed import run_distributed
from ..workloads import diverging_least_squares


def run_training(cfg: RunConfig, rank: int, world: int, device, report, resume=None) -> dict:
    """One learner of ``cfg`` on the process-group engine (rank of ``world``)."""
    return train(cfg, report, rank=rank, world_size=world, device=device, resume=resume)


def _config(**overrides) -> RunConfig:
    doc = {
        "workload": {
            "dataset": "digits",
            "model": "mlp",
            "epochs": 2,
            "batch_size": 16,
            "lr": {"initial": 0.1, "halve_every_epochs": 1},
        },
        "K": 3,
        "P": 1,
        "seed": 7,
    }
    doc.update(overrides)
    return RunConfig.model_validate(doc)


def sequential_reference(cfg: RunConfig) -> list[dict[str, torch.Tensor]]:
    """All P learners of K-AVG (or Hier-AVG) stepped one after another in one process."""
    data = load_dataset(cfg.workload.dataset)
    torch.manual_seed(cfg.seed)
    first = build_model(cfg.workload.model, data.input_shape, data.num_classes)
    learners = [copy.deepcopy(first) for _ in range(cfg.P)]
    opts = [torch.optim.SGD(m.parameters(), lr=cfg.workload.lr.initial) for m in learners]
    wl, step = cfg.workload, 0
    for epoch in range(wl.epochs):
        batches = [
            epoch_indices(data.n_train, wl.batch_size, r, cfg.P, epoch, cfg.seed, wl.sampling)
            for r in range(cfg.P)
        ]
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = wl.lr.at_epoch(epoch)
        for i in range(len(batches[0])):
            for r, (model, opt) in enumerate(zip(learners, opts, strict=True)):
                idx = batches[r][i]
                loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            step += 1
            if cfg.algorithm == "kavg":
                groups = [list(range(cfg.P))] if step % cfg.K == 0 else []
            elif step % cfg.K2 == 0:
                groups = [list(range(cfg.P))]
            elif step % cfg.K1 == 0:
                groups = [list(range(g, g + cfg.S)) for g in range(0, cfg.P, cfg.S)]
            else:
                groups = []
            with torch.no_grad():
                for group in groups:
                    for tensors in zip(*(learners[r].parameters() for r in group), strict=True):
                        mean = torch.stack(tensors).mean(0)
                        for t in tensors:
                            t.copy_(mean)
    return [m.state_dict() for m in learners]


def _compare_with_reference(rank: int, world: int, doc: dict) -> None:
    cfg = RunConfig.model_validate(doc)
    states = []
    metrics = run_training(cfg, rank, world, torch.device("cpu"), lambda m, s: states.append(s))
    reference = sequential_reference(cfg)[rank]
    assert len(states) == cfg.workload.epochs
    for name, value in reference.items():
        torch.testing.assert_close(states[-1]["engine"]["model"][name], value, rtol=0, atol=1e-5)
    assert metrics["epoch"] == cfg.workload.epochs
    # The wait for the last learner is part of the averaging time, and the checkpoint
    # keeps it (settled: nothing unsettled travels).
    assert 0.0 <= metrics["wait_time_s"] <= metrics["comm_time_s"]
    comm = states[-1]["engine"]["comm"]
    assert sum(c["wait_seconds"] for c in comm.values()) == pytest.approx(metrics["wait_time_s"])
    assert all(set(c) == {"count", "seconds", "bytes", "wait_seconds"} for c in comm.values())
    # Evaluation averaged the models but must not have left them averaged.
    if world > 1:
        others = [torch.empty_like(v) for v in [reference["1.weight"]] * world]
        torch.distributed.all_gather(others, states[-1]["engine"]["model"]["1.weight"].contiguous())
        assert not torch.equal(others[0], others[-1])


@pytest.mark.parametrize("world", [2, 4])
def test_kavg_worker_equals_sequential_reference(world: int) -> None:
    doc = _config(P=world, K=3).model_dump(mode="json")
    run_distributed(_compare_with_reference, world, doc)


def test_hier_avg_worker_equals_sequential_reference() -> None:
    doc = _config(P=4, K=None, algorithm="hier_avg", S=2, K1=2, K2=6).model_dump(mode="json")
    run_distributed(_compare_with_reference, 4, doc)


def test_single_learner_worker_equals_plain_sgd_loop() -> None:
    """P = 1: the worker loop is sequential SGD exactly, whatever K."""
    cfg = _config(P=1, K=5)
    states = []
    run_training(cfg, 0, 1, torch.device("cpu"), lambda m, s: states.append(s))
    (reference,) = sequential_reference(_config(P=1, K=1))
    for name, value in reference.items():
        assert torch.equal(states[-1]["engine"]["model"][name], value), name


def test_resume_from_checkpoint_state_matches_uninterrupted_run() -> None:
    cfg = _config(P=1, K=4, workload={**_config().workload.model_dump(), "momentum": 0.9})
    full, partial = [], []
    run_training(cfg, 0, 1, torch.device("cpu"), lambda m, s: full.append((m, s)))
    one_epoch = cfg.model_copy(update={"workload": cfg.workload.model_copy(update={"epochs": 1})})
    run_training(one_epoch, 0, 1, torch.device("cpu"), lambda m, s: partial.append((m, s)))
    resumed = []
    run_training(
        cfg, 0, 1, torch.device("cpu"), lambda m, s: resumed.append((m, s)), resume=partial[-1][1]
    )
    assert [m["epoch"] for m, _ in resumed] == [2]
    for name, value in full[-1][1]["engine"]["model"].items():
        assert torch.equal(resumed[-1][1]["engine"]["model"][name], value), name
    assert resumed[-1][0]["rounds"] == full[-1][0]["rounds"]
    assert resumed[-1][0]["samples"] == full[-1][0]["samples"]
    # The epochs before the checkpoint travel with the first report after it.
    assert [m["epoch"] for m in resumed[0][0]["history_before"]] == [1]
    assert resumed[0][0]["history_before"][0]["test_loss"] == full[0][0]["test_loss"]

    # Resuming a run that had already finished trains nothing and reports its end once.
    again = []
    run_training(cfg, 0, 1, torch.device("cpu"), lambda m, s: again.append((m, s)), full[-1][1])
    ((metrics, state),) = again
    assert state is None and metrics["epoch"] == 2
    assert [m["epoch"] for m in metrics["history_before"]] == [1]


def test_divergence_is_reported_and_stops() -> None:
    """Least squares with a step far beyond 2/L blows up: reported as diverged, then stop."""
    workload = diverging_least_squares(epochs=5)
    cfg = RunConfig.model_validate({"workload": workload, "K": 2, "P": 1})
    reports = []
    metrics = run_training(cfg, 0, 1, torch.device("cpu"), lambda m, s: reports.append(m))
    assert metrics["diverged"] is True
    assert len(reports) == 1  # stopped after the first epoch
    workload["lr"] = {"initial": 0.05}
    stable = RunConfig.model_validate({"workload": workload, "K": 2, "P": 1})
    reports.clear()
    metrics = run_training(stable, 0, 1, torch.device("cpu"), lambda m, s: reports.append(m))
    assert metrics["diverged"] is False and len(reports) == 5
