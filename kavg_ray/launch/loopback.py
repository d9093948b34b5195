"""Ray's command line for a worker node of a loopback-only cluster (cluster/local.sh).

Ray 2.60 replaces a loopback address (``127.0.0.1``, ``localhost``, ``::1``) given as a
node IP or a cluster address by the machine's external address, so a worker node told
``ray start --address 127.0.0.1:PORT`` dials the head on an address the head does not
listen on when it is bound to the loopback. ``python -m kavg_ray.launch.loopback start
...`` is ``ray start ...`` with loopback addresses kept as given; the node then takes
127.0.0.1 as its IP (the address it reaches the head by) and Ray binds its servers there.

(The head and drivers use Ray's single-machine mode instead,
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which worker nodes refuse.)
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP or ``localhost``, brackets allowed) is the loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main() -> None:
    from kavg_ray.launch.ray_private import keep_loopback

    keep_loopback(is_loopback)
    from ray.scripts.scripts import main as ray_main

    ray_main()


if __name__ == "__main__":
    main()
