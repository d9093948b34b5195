"""What kavg asks Ray Train for: the process group's backend and timeout (no Ray started)."""

from __future__ import annotations

import pytest


def test_the_process_group_timeout_reaches_ray_train(monkeypatch: pytest.MonkeyPatch) -> None:
    from kavg_ray.config import parse_run
    from kavg_ray.launch.ray_train import make_trainer

    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "1")
    cfg = parse_run({"K": 4, "P": 2, "resources": {"nccl_timeout_s": 60}})
    backend = make_trainer(cfg, "/tmp/unused", "t").backend_config
    assert (backend.backend, backend.timeout_s) == ("gloo", 60)
    gpu = parse_run({"K": 4, "P": 2, "resources": {"use_gpu": True}})
    backend = make_trainer(gpu, "/tmp/unused", "t").backend_config
    assert (backend.backend, backend.timeout_s) == ("cpu:gloo,cuda:nccl", 1800)


def test_a_checkpoint_loads_onto_this_workers_device(tmp_path) -> None:  # noqa: ANN001
    import torch

    from kavg_ray.launch.ray_train import STATE_FILE, load_learner_state

    torch.save({"w": torch.ones(3), "rng": torch.get_rng_state()},
               tmp_path / STATE_FILE.format(rank=1))  # fmt: skip
    # "meta" stands in for another GPU than the one that saved it.
    state = load_learner_state(tmp_path, 1, torch.device("meta"))
    assert state["w"].device == torch.device("meta") == state["rng"].device


def test_checkpoint_folders_name_the_epoch_or_the_step() -> None:
    """A step budget's epochs are fractional: its checkpoints are named by the step (this
    failed every step-budget trial on Ray before)."""
    from kavg_ray.config import RunConfig
    from kavg_ray.launch.ray_train import checkpoint_name

    epochs = RunConfig.model_validate({"K": 2, "workload": {"epochs": 3}})
    assert checkpoint_name(epochs, {"epoch": 3}) == "epoch-000003"
    steps = RunConfig.model_validate(
        {"K": 2, "workload": {"dataset": "text", "model": "gpt", "steps": 150,
                              "eval_every_steps": 50}}
    )  # fmt: skip
    assert checkpoint_name(steps, {"epoch": 0.4625, "step": 50}) == "step-000000050"
