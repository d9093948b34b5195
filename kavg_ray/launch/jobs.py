"""Sweeps as Ray Jobs: submit to a cluster's dashboard, follow, stop (`kavg sweep submit`...).

A submitted sweep is one Ray Job whose entrypoint is `python -m kavg_ray.cli sweep run
spec.yaml --address auto --storage DIR --name NAME`, run on the head node by the
cluster. The spec travels as text in the job's environment (`KAVG_SWEEP_SPEC`), and
`python -m kavg_ray.launch.job_entry` writes it to `spec.yaml` before running the sweep. (A
`working_dir` holding the spec was tried first: on this stack the driver of such a job
died importing torch, "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so".) The
package itself must be installed on the cluster's nodes (the image), or shipped with
`--ship-package` (`py_modules`, the local `kavg_ray` folder; its dependencies must
still be on the nodes).

Token authentication (on by default in Ray 2.60): the dashboard answers 401 without
`Authorization: Bearer <token>`. Ray's own client adds that header only when
`RAY_AUTH_MODE=token` is set in this process, so the header is added here from the
first of `RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`.

The storage directory must be one path that the head node (where the driver writes
the results store) and this machine (for `kavg sweep status`) both see: the same
folder on a local cluster, a shared mount on a real one. A relative `--storage` is
made absolute here, on the submitting machine.

Imports Ray only inside the functions that talk to a cluster.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import time
from pathlib import Path
from typing import Any

from kavg_ray.errors import JobsError
from kavg_ray.metrics import is_finite_number

JOB_ID_PREFIXES = ("raysubmit_",)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SPEC_NAME = "spec.yaml"
RESUME_ENV = "KAVG_RESUME_COMMAND"  # inside a job: how to finish the sweep, for messages
SPEC_ENV = "KAVG_SWEEP_SPEC"  # the spec's text, in the job's environment
MAX_SPEC_BYTES = 100_000  # one environment variable holds at most 128 KiB on Linux




def auth_token() -> str | None:
    """The cluster token: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    paths = [os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")]
    for path in paths:
        if path and os.path.isfile(path):
            try:
                token = Path(path).read_text().strip()
            except OSError:
                continue
            if token:
                return token
    return None


def auth_headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_dashboard_address(address: str | None) -> str:
    """The dashboard's HTTP address; Ray Jobs are submitted over HTTP, not GCS or ray://."""
    if not address:
        raise JobsError(
            "give the cluster's dashboard address, e.g. --address http://127.0.0.1:8265 "
            "(or set RAY_ADDRESS)",
            2,
        )
    if not address.startswith(("http://", "https://")):
        raise JobsError(
            f"--address {address}: jobs go to the dashboard's HTTP address, "
            "e.g. http://HOST:8265 (not a GCS address or ray://)",
            2,
        )
    return address.rstrip("/")


def client(address: str | None):  # noqa: ANN201 - ray's JobSubmissionClient
    """A JobSubmissionClient for the dashboard at ``address``, with the token when known."""
    address = check_dashboard_address(address or os.environ.get("RAY_ADDRESS"))
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as exc:  # connection refused, 401 ...
        msg = _first_line(exc)
        raise JobsError(f"cannot reach the Ray dashboard at {address}: {msg}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_job_id(text: str) -> bool:
    return text.startswith(JOB_ID_PREFIXES)


def dashboard_link(address: str, job_id: str) -> str:
    return f"{address.rstrip('/')}/#/jobs/{job_id}"


def absolute_storage(storage: str) -> str:
    if "://" in storage:
        return storage
    return os.path.abspath(os.path.expanduser(storage))


ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_env(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`--env KEY=VALUE` options as a dict; a malformed pair or a reserved key is bad input."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not ENV_KEY.fullmatch(key):
            raise JobsError(f"--env {pair!r}: expected KEY=VALUE with a shell variable name", 2)
        if key == SPEC_ENV:
            raise JobsError(f"--env {key}: reserved for the spec that kavg sends", 2)
        if key in env:
            raise JobsError(f"--env {key}: given twice", 2)
        env[key] = value
    return env


def entrypoint(sweep: str, storage: str, resume: bool = False, python: str = "python") -> str:
    """The job's command: `python -m kavg_ray.launch.job_entry` writes the spec from the job's
    environment to spec.yaml and runs `kavg sweep run spec.yaml --address auto ...`."""
    args = [python, "-m", "kavg_ray.launch.job_entry", "--storage", storage, "--name", sweep]
    if resume:
        args.append("--resume")
    return shlex.join(args)


def submit(
    spec_path: str,
    address: str,
    storage: str,
    sweep: str,
    n_trials: int,
    *,
    resume: bool = False,
    ship_package: bool = False,
    python: str = "python",
    env_vars: dict[str, str] | None = None,
    working_dir: str | None = None,
) -> tuple[str, str]:
    """Submit the (already validated) spec as a Ray Job; returns (job_id, dashboard link).

    ``env_vars`` reach the job's driver and every worker (the job's runtime_env);
    ``working_dir`` is a folder of the user's code shipped with the job (see
    :func:`job_runtime_env`).
    """
    address = check_dashboard_address(address)
    jc = client(address)
    spec_text = Path(spec_path).read_text()
    if len(spec_text.encode()) > MAX_SPEC_BYTES:
        raise JobsError(f"{spec_path}: larger than {MAX_SPEC_BYTES} bytes, too big for a job", 2)
    runtime_env = job_runtime_env(spec_text, env_vars, ship_package, working_dir)
    try:
        job_id = jc.submit_job(
            entrypoint=entrypoint(sweep, storage, resume, python),
            runtime_env=runtime_env,
            metadata={"kavg_sweep": sweep, "kavg_storage": storage, "kavg_trials": str(n_trials)},
        )
    except Exception as exc:
        raise JobsError(f"job submission to {address} failed: {_first_line(exc)}") from None
    return job_id, dashboard_link(address, job_id)


def job_runtime_env(
    spec_text: str,
    env_vars: dict[str, str] | None = None,
    ship_package: bool = False,
    working_dir: str | None = None,
) -> dict[str, Any]:
    """The job's runtime_env: the spec and ``env_vars`` as environment variables; with
    ``ship_package`` the local kavg_ray as a py_module; with ``working_dir`` that folder
    uploaded as Ray's ``working_dir``, so that the driver and every worker run in (and
    import from) a copy of it: the factories of a workload of one's own (docs/design.md 8)."""
    runtime_env: dict[str, Any] = {
        # sweep.connect leaves out of its ray.init any key set here: Ray refuses both.
        "env_vars": {**(env_vars or {}), SPEC_ENV: spec_text, "PYTHONUNBUFFERED": "1"},
    }
    if ship_package:
        import kavg_ray

        runtime_env["py_modules"] = [os.path.dirname(os.path.abspath(kavg_ray.__file__))]
    if working_dir is not None:
        runtime_env["working_dir"] = check_working_dir(working_dir)
    return runtime_env


def check_working_dir(path: str) -> str:
    """``--working-dir``: an existing folder, as an absolute path (exit 2 otherwise)."""
    if not path.strip():
        raise JobsError("--working-dir is empty", 2)
    if not os.path.isdir(path):
        what = "is not a folder" if os.path.exists(path) else "does not exist"
        raise JobsError(f"--working-dir {path}: {what}", 2)
    return os.path.abspath(path)


def job_info(address: str | None, job_id: str) -> dict[str, Any]:
    """State, message and kavg metadata of one job."""
    jc = client(address)
    try:
        info = jc.get_job_info(job_id)
    except Exception as exc:
        msg = _first_line(exc)
        if "does not exist" in msg or "404" in msg:
            raise JobsError(f"no job {job_id} on this cluster", 2) from None
        raise JobsError(f"cannot read job {job_id}: {msg}") from None
    return {
        "job_id": job_id,
        "state": str(getattr(info.status, "value", info.status)),
        "message": info.message or "",
        "metadata": dict(info.metadata or {}),
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def logs(address: str | None, job_id: str) -> str:
    jc = client(address)
    try:
        return jc.get_job_logs(job_id)
    except Exception as exc:
        raise JobsError(f"cannot read the logs of job {job_id}: {_first_line(exc)}", 2) from None


def follow_logs(address: str | None, job_id: str, echo) -> None:  # noqa: ANN001
    """Print the job's logs as they come, until the job ends."""
    import asyncio

    jc = client(address)

    async def tail() -> None:
        async for chunk in jc.tail_job_logs(job_id):
            echo(chunk, nl=False)

    try:
        asyncio.run(tail())
    except Exception as exc:
        raise JobsError(f"cannot follow the logs of job {job_id}: {_first_line(exc)}") from None


def stop(address: str | None, job_id: str) -> bool:
    """Ask the cluster to stop the job; False if it had already ended."""
    info = job_info(address, job_id)
    if info["state"] in TERMINAL:
        return False
    try:
        return bool(client(address).stop_job(job_id))
    except Exception as exc:
        raise JobsError(f"cannot stop job {job_id}: {_first_line(exc)}") from None


def total_trials(spec_doc: dict) -> int:
    """Grid points of a stored spec (1 for a single run config)."""
    from kavg_ray.config import parse_sweep

    if "grid" not in spec_doc:
        return 1
    return len(parse_sweep(spec_doc).points())


def sweep_progress(sweep: str, storage: str, total: int | None = None) -> dict[str, Any]:
    """Trials finished / total and the best result so far, from the results store."""
    from kavg_ray.analysis.results import ResultsStore

    store = ResultsStore(storage)
    d = store.sweep_dir(sweep)
    out: dict[str, Any] = {"sweep": sweep, "storage": storage, "finished": 0,
                           "total": total, "counts": {}, "best": None}  # fmt: skip
    if not d.is_dir():
        return out
    if (d / "spec.json").exists():
        try:
            out["total"] = total_trials(store.read_spec(sweep))
        except Exception:  # a spec this version cannot parse: keep the job's count
            pass
    trials = store.read_trials(sweep)
    ended = trials[trials["status"].isin(("completed", "diverged"))]["trial_id"]
    progress = store.read_progress(sweep)
    out["running"] = running_trials(progress, set(ended))
    if progress and isinstance(progress.get("work"), dict):  # epochs (steps) done / planned
        out["work"] = {**progress["work"], "eta_s": progress.get("eta_s"),
                       "age_s": round(max(0.0, time.time() - float(
                           progress.get("updated_unix") or time.time())), 1)}  # fmt: skip
    if len(trials):
        out["finished"] = int(len(trials))
        out["counts"] = {str(k): int(v) for k, v in trials["status"].value_counts().items()}
        ok = trials[trials["status"] != "failed"]
        ok = ok[ok["final_test_acc"].notna()]
        if len(ok):
            row = ok.sort_values(["final_test_acc", "K"], ascending=[False, True]).iloc[0]
            out["best"] = {
                "trial_id": str(row["trial_id"]),
                "final_test_acc": float(row["final_test_acc"]),
                "P": _num(row["P"]),
                "K": _num(row["K"]),
                "wall_time_s": _num(row["wall_time_s"]),
            }
    return out


def running_trials(progress: dict[str, Any] | None, finished: set[str]) -> list[dict[str, Any]]:
    """The trials progress.json lists as running and the store has no row for yet, each
    with its last epoch, accuracy, the age of its last report (of the sweep's, from an
    older progress.json), how long ago it started, and its pack (packed points)."""
    if not progress:
        return []
    import time

    age = max(0.0, time.time() - float(progress.get("updated_unix") or time.time()))
    elapsed = progress.get("elapsed_s")

    def ago(at: Any) -> float | None:  # a time on the sweep's clock, as seconds ago
        if not is_finite_number(at) or not is_finite_number(elapsed):
            return None
        return round(max(0.0, age + elapsed - at), 1)

    out = []
    for tid, t in sorted((progress.get("trials") or {}).items()):
        if t.get("status") != "running" or tid in finished:
            continue
        reported = ago(t.get("reported_s"))
        out.append(
            {"trial_id": tid, "epoch": t.get("epoch"), "epochs": t.get("epochs"),
             "step": t.get("step"), "steps": t.get("steps"),
             "test_acc": t.get("test_acc"), "restarts": t.get("restarts", 0),
             "report_age_s": round(age, 1) if reported is None else reported,
             "started_age_s": ago(t.get("started_s")), "pack": t.get("pack")}
        )  # fmt: skip
    return out


def _num(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f):
        return None
    return int(f) if f.is_integer() else f


def _running_line(run: dict[str, Any]) -> str:
    """One running trial of `kavg sweep status`: its epoch, or what it does before its
    first report (a packed point trains in its pack, which reports after the epoch)."""
    acc, pack = run.get("test_acc"), run.get("pack")
    steps = run.get("steps")  # a step budget counts steps, not epochs
    if run.get("epoch"):
        done = (f"step {run['step']}/{steps}" if steps and run.get("step") is not None
                else f"epoch {run['epoch']}/{run['epochs']}")  # fmt: skip
        done += f", test accuracy {acc:.4f}" if is_finite_number(acc) else ""
        done += f", packed in {pack}" if pack else ""
    elif pack:
        done = f"packed in {pack}: training (first epoch not reported yet)"
    else:
        done = f"starting ({steps} steps)" if steps else f"starting ({run['epochs']} epochs)"
    restarts = f", {run['restarts']} restart(s)" if run.get("restarts") else ""
    started = run.get("started_age_s")
    when = (f"started {started:.0f} s ago" if not run.get("epoch") and started is not None
            else f"last report {run['report_age_s']:.0f} s ago")  # fmt: skip
    return f"running: {run['trial_id']}  {done}{restarts}  ({when})"


def _work_line(work: dict[str, Any]) -> str:
    """The work of the sweep's last run (progress.json): done / planned and its estimate
    of the time left when it last wrote."""
    from kavg_ray.launch.progress import format_eta

    eta = work.get("eta_s")
    return (
        f"progress: {work['done']:g}/{work['planned']:g} {work['unit']} done, ETA "
        f"{format_eta(eta if is_finite_number(eta) else None)} at the last report "
        f"({work['age_s']:.0f} s ago)"
    )


def format_status(status: dict[str, Any]) -> str:
    lines = []
    if "job_id" in status:
        line = f"job {status['job_id']}: {status['state']}"
        if status.get("message"):
            line += f"  ({status['message']})"
        lines.append(line)
    total = status.get("total")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(status.get("counts", {}).items()))
    lines.append(
        f"sweep '{status['sweep']}': {status['finished']}/{total if total else '?'} trials "
        f"finished{' (' + counts + ')' if counts else ''}"
    )
    for run in status.get("running", []):
        lines.append(_running_line(run))
    if status.get("work"):
        lines.append(_work_line(status["work"]))
    best = status.get("best")
    if best:
        lines.append(
            f"best so far: {best['trial_id']} final test accuracy {best['final_test_acc']:.4f} "
            f"(P={best['P']}, K={best['K']})"
        )
    from kavg_ray.analysis.storage import join

    lines.append(f"results: {join(status['storage'], status['sweep'])}")
    return "\n".join(lines)
