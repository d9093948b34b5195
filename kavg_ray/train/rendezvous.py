"""The process group's sockets on one address: the rendezvous store and gloo's.

torch's ``env://`` and ``tcp://`` rendezvous start rank 0's ``TCPStore`` server on every
interface (``::``, dual stack) whatever ``MASTER_ADDR`` says, and gloo listens on the
address the machine's host name resolves to. Those sockets take no password: a run that is
private to the machine must keep them on the loopback, and one on a cluster on the address
the cluster uses (docs/design.md section 6).

- :func:`listen` binds rank 0's store socket on one address (port 0: a free port) and keeps
  it; :func:`init_group` hands it to the ``TCPStore`` server (``master_listen_fd``), so the
  store listens there and nowhere else, and initialises the default group over that store.
- :func:`pin_gloo` sets ``GLOO_SOCKET_IFNAME`` to the interface that holds the address: gloo
  binds that interface's address, for the default group and every subgroup this process
  creates later (Hier-AVG's). A ``GLOO_SOCKET_IFNAME`` already set wins.

Used by Ray Train's backend (kavg_ray.launch.torch_backend: the node's Ray address) and by
``python -m kavg_ray.train`` (``MASTER_ADDR``). Linux: interfaces are read with
``SIOCGIFADDR`` (IPv4) and from /proc/net/if_inet6 (IPv6). Imports no Ray.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"
SIOCGIFADDR = 0x8915
#: Sockets bound by :func:`listen` for rank 0's store, by port, until init_group takes one.
_bound: dict[int, socket.socket] = {}


def interface_addresses(name: str) -> set[str]:
    """The addresses of network interface ``name`` (its IPv4 address and IPv6 ones)."""
    found: set[str] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            req = struct.pack("256s", name.encode()[:15])
            found.add(socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24]))
        except OSError:  # no IPv4 address
            pass
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) == 6 and fields[5] == name:
            found.add(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    return found


def interface_of(address: str) -> str | None:
    """The network interface that holds ``address`` (an IP), or None."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return None
    for _, name in socket.if_nameindex():
        if any(ipaddress.ip_address(a) == ip for a in interface_addresses(name)):
            return name
    return None


def resolve(host: str) -> str:
    """``host`` as an IP (``localhost`` -> 127.0.0.1); unchanged when it does not resolve."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError:
        return host


def pin_gloo(address: str) -> str | None:
    """Make gloo listen on ``address`` (an IP of this machine) in this process: sets
    ``GLOO_SOCKET_IFNAME`` to its interface. Returns the interface, None when no interface
    holds the address (gloo then keeps its default: the host name's address)."""
    if os.environ.get(GLOO_IFNAME_ENV):
        return os.environ[GLOO_IFNAME_ENV]
    name = interface_of(address)
    if name is not None:
        os.environ[GLOO_IFNAME_ENV] = name
    return name


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def listen(host: str) -> int:
    """Bind rank 0's store socket on ``host`` (an IP of this machine), a free port; the
    socket waits in this process for :func:`init_group`. Returns the port."""
    sock = _bind(host, 0)
    port = sock.getsockname()[1]
    _bound[port] = sock
    return port


def init_group(
    backend: str, rank: int, world_size: int, master_addr: str, master_port: int,
    timeout: timedelta,
) -> None:  # fmt: skip
    """``dist.init_process_group`` over a ``TCPStore`` whose server, on rank 0, listens on
    ``master_addr`` only: the socket :func:`listen` bound, else one bound here on
    ``master_addr:master_port``. The other ranks dial ``master_addr:master_port``."""
    if rank == 0:
        sock = _bound.pop(master_port, None) or _bind(master_addr, master_port)
        store = dist.TCPStore(
            master_addr, master_port, world_size, True, timeout,
            master_listen_fd=sock.detach(),
        )  # fmt: skip
    else:
        store = dist.TCPStore(master_addr, master_port, world_size, False, timeout)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timeout
    )


#: torchrun's agent hosts the store its processes join (``TORCHELASTIC_USE_AGENT_STORE``).
AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"


def init_from_env(backend: str, timeout: timedelta) -> None:
    """The default group of a process that torchrun started, or that was given ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` by hand (``python -m kavg_ray.train``).

    A ``MASTER_ADDR`` on the loopback (torchrun's default, ``localhost``) means every
    process is on this machine: gloo listens on the loopback. Under torchrun the store is
    its agent's (torchrun binds it); otherwise kavg creates it, listening on ``MASTER_ADDR``
    only (rank 0 must hold that address).
    """
    master = resolve(os.environ.get("MASTER_ADDR", "127.0.0.1"))
    try:
        local = ipaddress.ip_address(master).is_loopback
    except ValueError:
        local = False
    if local:
        pin_gloo(master)
    if os.environ.get(AGENT_STORE_ENV, "").lower() == "true":
        dist.init_process_group(backend, timeout=timeout)
        return
    init_group(
        backend, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), master,
        int(os.environ.get("MASTER_PORT", "29500")), timeout,
    )  # fmt: skip
