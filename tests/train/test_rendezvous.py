"""The process group's sockets listen on one address (kavg_ray.train.rendezvous): rank 0's
rendezvous store and gloo's, in the default group and in a subgroup. torch alone would put
the store on every interface (``::``). Two gloo processes per case, no Ray."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kavg_ray.train import rendezvous
from tests.launch.listening import listening


def _external_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one."""
    for _, name in socket.if_nameindex():
        for address in rendezvous.interface_addresses(name):
            ip = ipaddress.ip_address(address)
            if ip.version == 4 and not ip.is_loopback:
                return address
    return None


def _learner(rank: int, world: int, how: str, host: str, port: int, queue) -> None:  # noqa: ANN001
    torch.set_num_threads(1)
    os.environ.pop(rendezvous.GLOO_IFNAME_ENV, None)
    timeout = timedelta(seconds=60)
    if how == "env":  # python -m kavg_ray.train given RANK ... by hand (no torchrun agent)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR=host,
                          MASTER_PORT=str(port))  # fmt: skip
        rendezvous.init_from_env("gloo", timeout)
    else:  # Ray Train's backend: the node's address, rank 0's socket bound first
        rendezvous.pin_gloo(host)
        rendezvous.init_group("gloo", rank, world, host, port, timeout)
    sub = dist.new_group([0, 1])  # Hier-AVG's subgroups: gloo listens again
    t = torch.ones(4)
    dist.all_reduce(t)
    dist.all_reduce(t, group=sub)
    queue.put((rank, t.tolist(), listening({os.getpid()})))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo's teardown can abort a rank whose peer left first


def _sockets(how: str, host: str) -> list[tuple[str, int, int]]:
    if how == "env":
        with socket.socket() as s:
            s.bind((rendezvous.resolve(host), 0))
            port = s.getsockname()[1]
    else:
        port = rendezvous.listen(host)  # stands for rank 0's worker: inherited by the spawn
        rendezvous._bound.pop(port).close()  # spawned rank 0 binds it again by port
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_learner, args=(r, 2, how, host, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(t == [4.0] * 4 for _, t, _ in got)
    return [s for _, _, found in got for s in found]


CASES = [("group", "127.0.0.1"), ("env", "localhost")]


@pytest.mark.parametrize(("how", "host"), CASES)
def test_a_local_group_listens_on_the_loopback_only(how: str, host: str) -> None:
    sockets = _sockets(how, host)
    # The store (rank 0) and at least one gloo listener per rank.
    assert len(sockets) >= 3, sockets
    assert {h for h, _, _ in sockets} == {"127.0.0.1"}, sockets


def test_a_cluster_group_listens_on_the_nodes_address_only() -> None:
    address = _external_address()
    if address is None:
        pytest.skip("this machine has no address beside the loopback")
    sockets = _sockets("group", address)
    assert len(sockets) >= 3, sockets
    assert {h for h, _, _ in sockets} == {address}, sockets


def test_interfaces_of_addresses() -> None:
    loopback = rendezvous.interface_of("127.0.0.1")
    assert loopback is not None and "127.0.0.1" in rendezvous.interface_addresses(loopback)
    assert rendezvous.interface_of("203.0.113.250") is None  # TEST-NET-3: held by no one
    assert rendezvous.interface_of("not an address") is None
    assert rendezvous.resolve("localhost") in ("127.0.0.1", "::1")


def test_a_gloo_interface_the_user_chose_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(rendezvous.GLOO_IFNAME_ENV, "eth7")
    assert rendezvous.pin_gloo("127.0.0.1") == "eth7"
    monkeypatch.delenv(rendezvous.GLOO_IFNAME_ENV)
    assert rendezvous.pin_gloo("203.0.113.250") is None
    assert rendezvous.GLOO_IFNAME_ENV not in os.environ
    assert rendezvous.pin_gloo("127.0.0.1") == rendezvous.interface_of("127.0.0.1")
    assert os.environ[rendezvous.GLOO_IFNAME_ENV] == rendezvous.interface_of("127.0.0.1")
