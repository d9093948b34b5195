"""Ray Train's process group as kavg starts it (kavg_ray.launch.torch_backend): on_start's
steps on a stand-in worker group of one worker, run in this process (no Ray started); the
real Ray trial is tests/launch/test_loopback.py's."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

from kavg_ray.launch import torch_backend
from kavg_ray.train import rendezvous
from tests.launch.listening import listening

from ..train.test_rendezvous import _external_address


class OneWorker:
    """Runs what on_start sends a worker group of one, here and now."""

    def __len__(self) -> int:
        return 1

    def execute_single(self, rank: int, fn, *args, **kwargs):  # noqa: ANN001, ANN201
        return fn(*args, **kwargs)

    def execute(self, fn, *args, **kwargs):  # noqa: ANN001, ANN201
        return [fn(*args, **kwargs)]

    execute_single_async = execute_single


@pytest.mark.parametrize("where", ["local", "cluster"])
def test_on_start_listens_on_the_nodes_ray_address(monkeypatch, where: str) -> None:  # noqa: ANN001
    address = "127.0.0.1" if where == "local" else _external_address()
    if address is None:
        pytest.skip("this machine has no address beside the loopback")
    monkeypatch.delenv(rendezvous.GLOO_IFNAME_ENV, raising=False)
    monkeypatch.setattr(torch_backend, "node_address", lambda: address)
    env_set = []
    monkeypatch.setattr(torch_backend, "_set_torch_distributed_env_vars",
                        lambda: env_set.append(True))  # fmt: skip
    monkeypatch.setattr(torch_backend.ray, "get", lambda refs: refs)
    before = set(listening({os.getpid()}))
    config = torch_backend.KavgTorchConfig(backend="gloo", timeout_s=30)
    assert isinstance(config.backend_cls(), torch_backend.KavgTorchBackend)
    try:
        config.backend_cls().on_start(OneWorker(), config)
        assert dist.is_initialized() and dist.get_world_size() == 1
        new = [s for s in listening({os.getpid()}) if s not in before]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert env_set == [True]
    assert new and {h for h, _, _ in new} == {address}, new
    assert os.environ[rendezvous.GLOO_IFNAME_ENV] == rendezvous.interface_of(address)


def test_kavgs_trainers_use_it(monkeypatch) -> None:  # noqa: ANN001
    from kavg_ray.config import parse_run
    from kavg_ray.launch.ray_train import make_trainer

    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "1")
    trainer = make_trainer(parse_run({"K": 2, "P": 2}), "/tmp/unused", "t")
    assert type(trainer.backend_config) is torch_backend.KavgTorchConfig
    assert trainer.backend_config.backend_cls is torch_backend.KavgTorchBackend
