"""Every use kavg makes of Ray's private APIs and undocumented behaviour, in one module.

Each is listed in :data:`RELIANCES` with the reason kavg needs it. They were checked on
Ray :data:`CHECKED_ON`; pyproject.toml pins Ray to that release line, and
tests/launch/test_ray_private.py fails, naming the reason, when the installed Ray no longer
has one of them (:func:`missing`). Nothing here starts Ray.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

CHECKED_ON = "2.60.0"

#: Ray's switch for its single-machine mode (the default on macOS and Windows).
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: Ray Train's switch for Train V2, and how often its controller polls the workers.
TRAIN_V2_ENV = "RAY_TRAIN_V2_ENABLED"
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
#: What Ray says when a new local node misses its fixed 30 s to register (a plain
#: Exception: no type to catch).
STARTUP_TIMEOUT_TEXT = "timed out during startup"
#: How Ray's state API, called without an address, finds its cluster: the API server's
#: URL wins, then the cluster address (else ray_current_cluster, else a scan of every
#: gcs_server process on the machine).
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
ADDRESS_ENV = "RAY_ADDRESS"
#: The worker_process_setup_hook kavg gives its Ray job (:func:`address_own_cluster`).
OWN_CLUSTER_HOOK = "kavg_ray.launch.ray_private.address_own_cluster"


@dataclass(frozen=True)
class Reliance:
    """One thing of Ray's that kavg relies on: ``module:attribute`` (``module`` alone for
    its source text), the constant's value or a phrase in the source, and why."""

    target: str
    why: str
    value: str | None = None
    in_source: str | None = None


RELIANCES = (
    Reliance(
        "ray._private.services:resolve_ip_for_localhost",
        "Ray replaces a loopback address given to `ray start` by the machine's external one; "
        "a worker node of a loopback-only cluster (cluster/local.sh) must keep 127.0.0.1",
    ),
    Reliance(
        "ray._private.services:node_ip_address_from_perspective",
        "the address Ray dials for a loopback cluster address, to tell a loopback-only "
        "cluster on this machine (kavg then keeps Ray in single-machine mode)",
    ),
    Reliance(
        "ray._private.ray_constants:ENABLE_RAY_CLUSTER",
        "read once at import; False (single-machine mode) makes a local Ray bind 127.0.0.1",
    ),
    Reliance(
        "ray._private.ray_constants:ENABLE_RAY_CLUSTERS_ENV_VAR",
        "the variable that carries single-machine mode to the processes Ray starts",
        value=SINGLE_MACHINE_ENV,
    ),
    Reliance(
        "ray.train.v2._internal.constants:V2_ENABLED_ENV_VAR",
        "kavg's trainers and Tune callback are Train V2's",
        value=TRAIN_V2_ENV,
    ),
    Reliance(
        "ray.train.v2._internal.constants:HEALTH_CHECK_INTERVAL_S_ENV_VAR",
        "a worker's report waits for the controller's poll (2 s by default): per-epoch "
        "reports of small models would spend most of their time waiting",
        value=HEALTH_CHECK_ENV,
    ),
    Reliance(
        "ray._private.node",
        "a local node that misses its 30 s to register fails with a plain Exception; kavg "
        "retries the start when the message says so",
        in_source=STARTUP_TIMEOUT_TEXT,
    ),
    Reliance(
        "ray.train.torch.config:_TorchBackend",
        "kavg's torch backend (launch/torch_backend.py) is Ray's with its own on_start, so "
        "that the process group's store and gloo listen on the node's Ray address only",
    ),
    Reliance(
        "ray.train.torch.config:_set_torch_distributed_env_vars",
        "kavg's on_start sets the workers' RANK, LOCAL_RANK ... as Ray's own does",
    ),
    Reliance(
        "ray.train.v2._internal.callbacks.backend_setup",
        "Train V2 hands the backend's on_start the worker group, whose execute, "
        "execute_single and execute_single_async run a function on its workers",
        in_source="self._backend.on_start(execution_group, self._backend_config)",
    ),
    Reliance(
        "ray.train.v2._internal.state.util",
        "Train V2's PlacementGroupCleaner (one per run) and its state actor ask the state "
        "API whether the controller lives with no address: Ray looks for the cluster, and "
        "with two local Rays up (two sweeps at once) fails ('Found multiple active Ray "
        "instances') or reads the other one; kavg's workers name their own",
        in_source="get_actor(actor_id, timeout=timeout)",
    ),
    Reliance(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner",
        "the PlacementGroupCleaner polls is_actor_alive (above) every second while a run "
        "lives, and removes the run's placement group when it says the controller is gone",
        in_source="is_actor_alive(",
    ),
    Reliance(
        "ray.dashboard.utils",
        "the state API without an address uses $RAY_ADDRESS before any discovery: "
        "kavg's worker_process_setup_hook sets it to the worker's own cluster",
        in_source="os.environ.get(ray_constants.RAY_ADDRESS_ENVIRONMENT_VARIABLE)",
    ),
    Reliance(
        "ray._private.ray_constants:RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE",
        "this variable wins over $RAY_ADDRESS there: kavg's workers drop it",
        value=API_SERVER_ENV,
    ),
)


def missing() -> list[str]:
    """What of :data:`RELIANCES` the installed Ray lacks, one line each with the reason."""
    problems = []
    for r in RELIANCES:
        module_name, _, attr = r.target.partition(":")
        try:
            module = importlib.import_module(module_name)
            if attr and not hasattr(module, attr):
                raise AttributeError(f"no attribute {attr}")
            if r.value is not None and getattr(module, attr) != r.value:
                raise ValueError(f"is {getattr(module, attr)!r}, not {r.value!r}")
            if r.in_source is not None and r.in_source not in inspect.getsource(module):
                raise ValueError(f"no longer says {r.in_source!r}")
        except Exception as exc:  # noqa: BLE001 - every way of being gone is reported
            problems.append(f"{r.target}: {exc} (needed because {r.why})")
    return problems


def keep_loopback(is_loopback: Callable[[str], bool]) -> None:
    """Make Ray's ``resolve_ip_for_localhost`` leave the addresses ``is_loopback`` accepts
    alone (in this process: `python -m kavg_ray.launch.loopback start ...`)."""
    from ray._private import services

    original = services.resolve_ip_for_localhost

    def resolve(host: str) -> str:
        return host if host and is_loopback(host) else original(host)

    services.resolve_ip_for_localhost = resolve


def single_machine_mode() -> None:
    """Make the local Ray about to start listen on 127.0.0.1 only.

    Ray turns a node IP of 127.0.0.1 given to ray.init into the machine's external address
    and binds its servers on every interface; in single-machine mode it uses the loopback
    as the node IP and binds there. The variable reaches the processes Ray starts; the
    constant is set too, because Ray read it at import. A local Ray is one node: nothing
    is lost.
    """
    from ray._private import ray_constants

    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def address_own_cluster() -> None:
    """Point Ray's address discovery in this worker process at the worker's own cluster.

    kavg's Ray job runs this in every worker process (``worker_process_setup_hook``,
    :data:`OWN_CLUSTER_HOOK`; inherited by the actors its trials create, Ray Train's
    detached PlacementGroupCleaner included). Ray code that calls the state API without an
    address would otherwise look for the cluster: with two local Rays on the machine it
    fails, or finds the other. Never raises: a failing hook would end the worker.
    """
    try:
        import ray

        address = ray.get_runtime_context().gcs_address
        if address:
            os.environ.pop(API_SERVER_ENV, None)
            os.environ[ADDRESS_ENV] = address
    except Exception:  # noqa: BLE001 - discovery is left as Ray has it
        pass


def external_address() -> str:
    """The address Ray would give this machine's node (what it dials for 127.0.0.1)."""
    from ray._private.services import node_ip_address_from_perspective

    return node_ip_address_from_perspective()


def is_startup_timeout(exc: BaseException) -> bool:
    """Whether ray.init failed because a new local node missed its time to register."""
    return STARTUP_TIMEOUT_TEXT in str(exc)
