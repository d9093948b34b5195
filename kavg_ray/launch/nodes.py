"""What a sweep joined to a cluster (``--address``) needs from its other nodes.

**The user's code.** A workload of one's own names factories ``module.path:function``
(docs/design.md section 8), imported on the driver from the current folder or
``PYTHONPATH``. Ray adds the driver's current folder to the workers' ``sys.path`` by its
path, which exists only on the driver's machine. :func:`user_code` lists the top-level
module (a ``.py`` file) or package (a folder) of every factory that is not installed
(outside site-packages and the interpreter's own folders, and not kavg_ray itself);
``connect`` ships them as Ray's runtime_env ``py_modules``, so every node imports the
driver's copy. Inside a submitted Ray job nothing is added: the job's runtime_env
(``kavg sweep submit --working-dir``) already reaches every worker.

**The storage.** Ray Train's workers write their checkpoints under the sweep's folder in
the storage, and the driver writes the results store there: on a cluster of more than one
node, a local path must be one folder that every node sees (a shared file system), or
the storage an object-store URI. :func:`check_shared_storage` writes a marker file with a
random token into the storage on the driver and reads it back from a task on every
alive node; a node that does not see it refuses the sweep (exit 2, one line naming the
fix). The marker is removed afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import site
import sys
import sysconfig
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from kavg_ray.config import RunConfig, is_factory
from kavg_ray.errors import KavgError, SweepError

MARKER_PREFIX = ".kavg-shared-check-"
#: Seconds to wait for every node to answer the storage check.
CHECK_TIMEOUT_S = 120.0


def _installed_roots() -> list[str]:
    paths = sysconfig.get_paths()
    roots = [paths[k] for k in ("purelib", "platlib", "stdlib", "platstdlib") if k in paths]
    roots += [*site.getsitepackages(), site.getusersitepackages()]
    roots += [sys.base_prefix, sys.base_exec_prefix]
    return [os.path.realpath(r) for r in roots if r]


def _is_under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def module_location(top: str) -> str | None:
    """Where top-level module ``top`` comes from: its folder (a package) or its ``.py``
    file; None when it is not found, not pure Python, or split over several folders."""
    cwd = os.getcwd()
    if cwd not in sys.path:  # factories import as `python -m` would (factories.resolve)
        sys.path.insert(0, cwd)
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations is not None:
        folders = list(spec.submodule_search_locations)
        return folders[0] if len(folders) == 1 else None
    if spec.origin and spec.origin.endswith(".py"):
        return spec.origin
    return None


def user_code(points: Sequence[RunConfig]) -> list[str]:
    """The folders and ``.py`` files of the factories' top-level modules that are not
    installed: what the other nodes need shipped (as ``py_modules``)."""
    tops = sorted({
        name.partition(":")[0].split(".")[0]
        for p in points
        for name in (p.workload.dataset, p.workload.model, p.workload.loss)
        if name and is_factory(name)
    })  # fmt: skip
    roots = _installed_roots()
    found = []
    for top in tops:
        if top == "kavg_ray":
            continue
        where = module_location(top)
        if where is not None and not _is_under(os.path.realpath(where), roots):
            found.append(os.path.abspath(where))
    return found


def in_submitted_job() -> bool:
    """Whether this driver runs as a Ray job (its runtime_env reaches every worker)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


# --------------------------------------------------------------------------- storage


def is_local_storage(storage: str) -> bool:
    return "://" not in storage


def _node_sees(path: str, token: str) -> bool:
    """On a node: whether ``path`` holds ``token``."""
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def _ask_nodes(path: str, token: str) -> dict[str, bool]:
    """Run :func:`_node_sees` on every alive node; node address -> its answer."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    task = ray.remote(num_cpus=0)(_node_sees)
    refs = {
        n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(path, token)
        for n in nodes
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=CHECK_TIMEOUT_S)
    done = set(ready)
    return {name: (ray.get(ref) if ref in done else None) for name, ref in refs.items()}


def alive_nodes() -> list[dict]:
    """The connected cluster's alive nodes (``ray.nodes()`` entries)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def alive_node_count() -> int:
    return len(alive_nodes())


def check_shared_storage(
    storage: str,
    *,
    nodes: Callable[[], int] = alive_node_count,
    ask: Callable[[str, str], dict[str, bool | None]] = _ask_nodes,
) -> None:
    """Refuse (exit 2) a local ``storage`` that some alive node of a cluster of several
    nodes does not see; nothing to check on one node or for an object-store URI."""
    if not is_local_storage(storage) or nodes() < 2:
        return
    folder = Path(storage).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = folder / f"{MARKER_PREFIX}{token}"
    marker.write_text(token)
    try:
        answers = ask(str(marker), token)
    finally:
        marker.unlink(missing_ok=True)
    silent = sorted(name for name, seen in answers.items() if seen is None)
    blind = sorted(name for name, seen in answers.items() if seen is False)
    if blind:
        raise SweepError(
            f"--storage {storage}: node{'s' if len(blind) > 1 else ''} {', '.join(blind)} "
            f"cannot see {folder}: give a folder that every node mounts at that path (a "
            "shared file system) or an object-store URI (s3://BUCKET/PREFIX)"
        )
    if silent:
        raise KavgError(
            f"--storage {storage}: node{'s' if len(silent) > 1 else ''} {', '.join(silent)} "
            f"did not answer the shared-storage check within {CHECK_TIMEOUT_S:g} s"
        )
