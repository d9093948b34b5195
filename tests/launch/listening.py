"""Which TCP addresses a set of processes listens on, from /proc (Linux), for the loopback
tests: a process's sockets are the ``socket:[inode]`` links under /proc/PID/fd, and
/proc/net/tcp{,6} maps each listening inode to its local address."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

LISTEN = "0A"


def pids_naming(text: str) -> set[int]:
    """Processes whose command line holds ``text`` (e.g. a Ray temp dir)."""
    out = set()
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if text.encode() in Path(f"/proc/{p}/cmdline").read_bytes():
                    out.add(int(p))
            except OSError:
                pass
    return out


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


def _address(hex_addr: str) -> tuple[str, int]:
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1])), int(port, 16)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words)), int(port, 16)


def listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(host, port, pid) of every listening TCP socket of ``pids``, sorted."""
    owned = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == LISTEN and f[9] in owned:
                host, port = _address(f[1])
                found.append((host, port, owned[f[9]]))
    return sorted(found)


def loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, or IPv4-mapped loopback (::ffff:127.0.0.1, gRPC's IPv4 on IPv6)."""
    ip = ipaddress.ip_address(host)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()[-50:]
    except OSError:
        return "?"
