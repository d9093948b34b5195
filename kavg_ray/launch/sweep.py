"""Sweeps over K and P with Ray Tune, writing the results store as trials finish.

Each Tune trial is a function that builds a `TorchTrainer` with P workers and
forwards its reports to Tune (`TuneReportCallback`, the Train V2 pattern). The
driver keeps every trial's per-epoch reports and writes the trial's row and
history the moment it ends, so a driver that dies loses no finished trial.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kavg_ray.analysis.results import ResultsStore
from kavg_ray.analysis.schedules import SCHEDULE_PARAMS
from kavg_ray.config import ALGORITHMS, RunConfig, SearchConfig
from kavg_ray.errors import KavgError, SweepError
from kavg_ray.launch import console, nodes, plans, ray_private
from kavg_ray.launch.placement import check_hier_groups
from kavg_ray.launch.progress import HISTORY_KEYS, TrialTracker  # noqa: F401 - HISTORY_KEYS: API
from kavg_ray.metrics import divergence_reason, is_finite_number


def trial_row(
    sweep: str, trial_id: str, cfg: RunConfig, history: list[dict], status: str, error: str = ""
) -> dict[str, Any]:
    """The trials.parquet row of one trial, derived from its per-epoch reports (a diverged
    trial's ``error`` says where and how: :func:`~kavg_ray.metrics.divergence_reason`)."""
    last = history[-1] if history else {}
    if status == "diverged" and not error:
        error = divergence_reason(last)
    accs = [h["test_acc"] for h in history if is_finite_number(h.get("test_acc"))]
    target = cfg.target_accuracy
    reached = [h["wall_time_s"] for h in history if target and h.get("test_acc", 0) >= target]
    row = {
        "sweep": sweep,
        "trial_id": trial_id,
        **_setting_columns(cfg),
        "status": status,
        "final_test_acc": last.get("test_acc", math.nan),
        "final_test_loss": last.get("test_loss", math.nan),
        "final_train_loss": last.get("train_loss", math.nan),
        "best_test_acc": max(accs) if accs else math.nan,
        "time_to_target_s": reached[0] if reached else math.nan,
        "wall_time_s": last.get("wall_time_s", math.nan),
        "compute_time_s": last.get("compute_time_s", math.nan),
        "comm_time_s": last.get("comm_time_s", math.nan),
        "wait_time_s": last.get("wait_time_s", math.nan),
        "bytes_communicated": last.get("bytes_communicated", 0),
        "rounds": last.get("rounds", 0),
        "samples": last.get("samples", 0),
        "step": last.get("step", 0),
        "tokens": last.get("tokens", 0),
        "samples_per_s": last.get("samples_per_s", math.nan),
        "tokens_per_s": last.get("tokens_per_s", math.nan),
        "error": error,
    }
    # K-AVG's every average is global: the columns let both algorithms sit side by side.
    row["local_reductions"] = last.get("local_reductions", 0)
    row["global_reductions"] = last.get("global_reductions", row["rounds"])
    row["local_comm_time_s"] = last.get("local_comm_time_s", 0.0)
    row["global_comm_time_s"] = last.get("global_comm_time_s", row["comm_time_s"])
    if cfg.algorithm == "hier_avg":  # 1.0: every group's learners shared a node
        row["local_on_node"] = last.get("local_on_node", math.nan)
    if ALGORITHMS[cfg.algorithm].needs_server:
        # Parameter-server runs: staleness (mean of the per-epoch means, overall max).
        means = [h["staleness_mean"] for h in history if is_finite_number(h.get("staleness_mean"))]
        maxes = [h["staleness_max"] for h in history if is_finite_number(h.get("staleness_max"))]
        row["staleness_mean"] = sum(means) / len(means) if means else math.nan
        row["staleness_max"] = max(maxes) if maxes else math.nan
        row["pushes"] = last.get("pushes", 0)
        row["applied"] = last.get("applied", 0)
    # Factory (and text/gpt) arguments, a column each: a sweep over model_args.width
    # gets K_opt per width (results.kopt_table).
    for key in ("dataset_args", "model_args"):
        for name, value in getattr(cfg.workload, key).items():
            scalar = isinstance(value, (int, float, str, bool))
            row[f"{key}.{name}"] = value if scalar else json.dumps(value, sort_keys=True)
    return row


def _setting_columns(cfg: RunConfig) -> dict[str, Any]:
    """The columns of a trial row that say what was run (before its status and results)."""
    wl = cfg.workload
    return {
        "algorithm": cfg.algorithm, "model": wl.model, "dataset": wl.dataset,
        "backend": cfg.backend, "P": cfg.P, "K": cfg.period, "S": cfg.S, "K1": cfg.K1,
        "K2": cfg.K2, "seed": cfg.seed, "lr": wl.lr.initial, "batch_size": wl.batch_size,
        "epochs": wl.epochs, "momentum": wl.momentum, "optimizer": wl.optimizer,
        "outer_lr": cfg.outer.lr, "outer_momentum": cfg.outer.momentum,
        "outer_nesterov": cfg.outer.nesterov, "warmup_steps": cfg.warmup_steps,
        "lr_schedule": wl.lr.kind, "lr_warmup_steps": wl.lr.warmup_steps, "min_lr": wl.lr.min_lr,
        "grad_clip": wl.grad_clip or 0.0,  # 0: no clipping
        "grad_accum": wl.grad_accum, "precision": wl.precision,
        "tf32": "default" if wl.tf32 is None else str(wl.tf32).lower(),
        "steps": math.nan if wl.steps is None else wl.steps,
        "fragments": cfg.fragments, "fragment_delay": cfg.fragment_delay,
        "fragment_alpha": cfg.fragment_alpha, "payload": cfg.payload,
        "payload_error_feedback": cfg.payload_error_feedback,
        "K_schedule": cfg.K_schedule, **{k: getattr(cfg, k) for k in SCHEDULE_PARAMS},
    }  # fmt: skip


def estimate_theory(points: list[RunConfig], echo=print) -> dict:
    """`theory: estimate`: probe L, M, F gap once per workload; predict K_opt per P."""
    from kavg_ray.train.estimate import estimate_constants, predict_for_config

    by_workload: dict[str, list[RunConfig]] = {}
    for p in points:
        by_workload.setdefault(p.workload.model_dump_json(), []).append(p)
    estimates, predictions = [], []
    for group in by_workload.values():
        cfg = group[0]
        echo(f"[kavg] theory: probing {cfg.workload.dataset}/{cfg.workload.model} ...")
        est = estimate_constants(cfg)
        estimates.append({"workload": cfg.workload.model_dump(mode="json"), **est.to_dict()})
        for row in predict_for_config(cfg, est, sorted({p.P for p in group})):
            wl = cfg.workload
            predictions.append(
                {"dataset": wl.dataset, "model": wl.model, "lr": wl.lr.initial,
                 "batch_size": wl.batch_size, **row}
            )  # fmt: skip
            echo(f"[kavg] theory: P={row['P']} predicted K_opt {row['predicted_kopt']}")
    return {"estimates": estimates, "predictions": predictions}


def _status(cfg: RunConfig, history: list[dict]) -> str:
    if history and history[-1].get("diverged"):
        return "diverged"
    wl = cfg.workload
    if not history or (
        history[-1].get("step", 0) < wl.steps if wl.steps else history[-1]["epoch"] < wl.epochs
    ):
        return "failed"
    return "completed"


def _trial_fn(config: dict) -> None:
    """One Tune trial: a TorchTrainer with P workers, reporting into this trial."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from kavg_ray.launch.ray_train import make_trainer, start_server

    trial = config["trial"]
    cfg = RunConfig.model_validate(trial["run"])
    server = None
    if ALGORITHMS[cfg.algorithm].needs_server:
        # Downpour/EAMSGD: the trial owns a parameter-server actor for its learners.
        server = start_server(cfg)
    try:
        trainer = make_trainer(
            cfg, trial["train_storage"], trial["trial_id"], callbacks=[TuneReportCallback()],
            server=server,
        )  # fmt: skip
        trainer.fit()
    finally:
        if server is not None:
            import ray

            ray.kill(server)


def _row(sweep: str, tid: str, cfg: RunConfig, history: list[dict], *, error: str,
         failed: bool, stopped: str = "") -> dict[str, Any]:  # fmt: skip
    """``stopped``: why early stopping ended the trial (status ``stopped``, unless it
    diverged)."""
    status = "failed" if failed else _status(cfg, history)
    if stopped and not failed and status != "diverged":
        status, error = "stopped", stopped
    return trial_row(sweep, tid, cfg, history, status, error)


def trial_error_text(trial: Any) -> str:
    """A failed Tune trial's error text: Tune's error.txt in the trial's local folder (Tune
    writes it there before calling back; the copy in storage is only synced later)."""
    path = getattr(trial, "error_file", None)
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    return str(trial.get_error() or "")


def job_env_vars() -> dict[str, str]:
    """The env_vars of the Ray job this driver runs in ({} outside a submitted job)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        env = json.loads(raw).get("runtime_env", {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in env.items()}


def connect(
    address: str | None, log: Path | None = None, py_modules: list[str] | None = None
) -> bool:
    """Connect to a running Ray cluster, or start a local one (dashboard on 127.0.0.1).

    Returns False when this process was connected already (nothing was done). A failure
    is one KavgError line (``log``: where Ray's own account of it is). ``py_modules``: the
    user's code shipped to a cluster's nodes (kavg_ray.launch.nodes.user_code).
    """
    try:
        return _connect(address, py_modules)
    except Exception as exc:
        raise _connect_error(address, exc, log) from None


def _connect_error(address: str | None, exc: Exception, log: Path | None) -> KavgError:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    where = f"the Ray cluster at {address}" if address else "a local Ray"
    see = f" (Ray's log: {log})" if log else ""
    if "AuthenticationError" in type(exc).__name__ or "InvalidAuthToken" in text or (
        "auth" in text.lower() and "token" in text.lower()
    ):
        return KavgError(
            f"{where} asks for token authentication: set RAY_AUTH_MODE=token and give its "
            "token in RAY_AUTH_TOKEN or ~/.ray/auth_token (ray get-auth-token on the head)"
            + see, 2,
        )  # fmt: skip
    return KavgError(f"cannot {'join' if address else 'start'} {where}: {first}{see}")


def _connect(address: str | None, py_modules: list[str] | None = None) -> bool:
    import ray

    if ray.is_initialized():
        return False
    env = {
        ray_private.TRAIN_V2_ENV: "1",
        # A worker's report blocks until the Train controller polls it, every 2 s by
        # default: per-epoch reports of small models would spend most time waiting.
        ray_private.HEALTH_CHECK_ENV: os.environ.get(ray_private.HEALTH_CHECK_ENV, "0.2"),
    }
    # Inside a submitted Ray job the job's runtime_env already reaches every worker, and
    # Ray refuses a ray.init runtime_env that sets one of its keys again: its value wins.
    job_env = job_env_vars()
    env = {k: v for k, v in env.items() if k not in job_env}
    os.environ.update(env)
    if address:
        runtime_env = _runtime_env(env, address)
        if py_modules and not nodes.in_submitted_job():
            runtime_env["py_modules"] = list(py_modules)
        if _loopback_bound(address):
            ray_private.single_machine_mode()
        ray.init(address=address, runtime_env=runtime_env)
        return True
    for attempt in range(3):
        try:
            ray_private.single_machine_mode()
            ray.init(
                include_dashboard=True, dashboard_host="127.0.0.1",
                _node_ip_address="127.0.0.1", runtime_env=_runtime_env(env, None),
            )  # fmt: skip
            return True
        except Exception as exc:
            # Ray gives a new local node 30 s to register; a loaded machine can miss that.
            if not ray_private.is_startup_timeout(exc) or attempt == 2:
                raise
            ray.shutdown()


def _runtime_env(env: dict[str, str], address: str | None) -> dict[str, Any]:
    """The job's runtime_env (a new dict each time: ray.init adds to it). Its workers are
    told their own cluster (ray_private.address_own_cluster): Ray Train's placement-group
    cleaner asks the state API with no address, and Ray's own search finds two clusters
    when two local sweeps run at once (or the other one). Not inside a submitted job (whose
    runtime_env is the job's) nor through Ray Client."""
    runtime_env: dict[str, Any] = {"env_vars": dict(env)}
    if not nodes.in_submitted_job() and not (address or "").startswith("ray://"):
        runtime_env["worker_process_setup_hook"] = ray_private.OWN_CLUSTER_HOOK
    return runtime_env


def _loopback_bound(address: str) -> bool:
    """Whether ``address`` is a cluster on this machine that listens on the loopback only
    (cluster/local.sh): a loopback HOST:PORT whose port does not answer on the machine's
    external address. Ray would dial that external address; kavg then keeps 127.0.0.1."""
    import socket

    from kavg_ray.launch.address import split_host_port
    from kavg_ray.launch.loopback import is_loopback

    try:
        host, port = split_host_port(address)
    except KavgError:  # auto, ray://...: Ray resolves those
        return False
    if address.startswith("ray://") or not is_loopback(host):
        return False
    external = ray_private.external_address()
    if is_loopback(external):
        return False
    try:
        with socket.create_connection((external, port), timeout=2):
            return False
    except OSError:
        return True


def local_resources(points: list[RunConfig]) -> dict[str, float]:
    """What a local Ray started by this process will have, known without starting it."""
    total = {"CPU": float(os.cpu_count() or 1), "GPU": 0.0}
    if any(p.resources.use_gpu for p in points):
        import torch

        total["GPU"] = float(torch.cuda.device_count())
    return total


def check_placement(points: list[RunConfig], total: dict[str, float] | None = None) -> None:
    """Refuse a sweep whose largest trial no node set of the cluster could place."""
    if total is None:
        import ray

        total = ray.cluster_resources()
    for cfg in points:
        res = cfg.resources
        need_cpu = cfg.workers * res.cpus_per_worker
        if need_cpu > total.get("CPU", 0) + 1e-9:
            raise SweepError(
                f"trial {cfg.trial_name()} needs {need_cpu:g} CPUs ({cfg.workers} workers x "
                f"{res.cpus_per_worker:g}) but the cluster has {total.get('CPU', 0):g}"
            )
        need_gpu = cfg.workers * res.gpus_per_worker if res.use_gpu else 0
        if need_gpu > total.get("GPU", 0) + 1e-9:
            raise SweepError(
                f"trial {cfg.trial_name()} needs {need_gpu:g} GPUs but the cluster has "
                f"{total.get('GPU', 0):g}"
            )


def check_simulated_memory(
    points: list[RunConfig], *, local: bool = True, cluster_nodes: list[dict] | None = None,
    joined: bool = False,
) -> None:  # fmt: skip
    """Refuse, before starting, a simulated trial whose stacked learners cannot fit the
    device that will run it (``plans.memory_budget``). A GPU trial on a cluster without
    ``resources.gpu_memory_gb`` is checked once the cluster is ``joined`` (Ray's report
    of its GPU nodes, ``cluster_nodes``: ``ray.nodes()`` read then when None); the worker
    checks again before training."""
    sim = [p for p in points if p.backend == "simulated"]
    if not sim:
        return
    from kavg_ray.train.packed import pack_memory_bytes

    for cfg in sim:
        res = cfg.resources
        if res.use_gpu and not local and res.gpu_memory_gb is None and not joined:
            continue
        budget, source = plans.memory_budget(cfg, local=local, nodes=cluster_nodes)
        need = pack_memory_bytes([cfg])
        if budget is not None and need > budget:
            hint = ", set resources.gpu_memory_gb," if res.use_gpu else ""
            raise SweepError(
                f"trial {cfg.trial_name()}: simulated P={cfg.P} {cfg.workload.model} needs "
                f"~{need / plans.GIB:.1f} GiB; the device has {budget / plans.GIB:.1f} GiB "
                f"({source}). Lower P or batch_size{hint} or run with backend: ray"
            )


def default_concurrency(points: list[RunConfig]) -> int:
    """As many trials at once as the cluster's CPUs hold of the largest trial."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    largest = max(p.workers * p.resources.cpus_per_worker for p in points)
    return max(1, int(cpus // largest))


def _plan_run(
    store: ResultsStore,
    sweep: str,
    points: list[RunConfig],
    by_id: dict[str, RunConfig],
    spec_doc: dict,
    resume: bool,
    overwrite: bool,
    address: str | None,
    search: SearchConfig | None,
) -> tuple[list[str], plans.RefinePlan | None]:
    """The trial ids to run and the refining search's plan, after the checks that must
    pass before Ray starts (placement on a local Ray, memory of simulated points)."""
    store.check_writable()  # an object store's bucket exists
    has_spec = (store.sweep_dir(sweep) / "spec.json").exists()
    todo = _todo(store, sweep, by_id, spec_doc, resume, overwrite, has_spec)
    todo_points = [by_id[t] for t in todo]
    if address is None and todo:
        check_placement(todo_points, local_resources(todo_points))
    check_simulated_memory(todo_points, local=address is None)
    return todo, _refine_plan(store, sweep, points, by_id, search, resume and has_spec)


def run_sweep(
    sweep: str,
    points: list[RunConfig],
    spec_doc: dict,
    storage: str,
    *,
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    verbose: bool = False,
    echo=print,
    search: SearchConfig | None = None,
    pack: bool = False,
) -> dict[str, str]:
    """Run every grid point not yet finished; returns trial_id -> status of this run.

    ``search`` and ``pack``: the spec's (kavg_ray.launch.plans): refine K round by round,
    stop trials early, or run simulated points packed in one trial per workload and P.

    ``progress``: print every epoch (``kavg train``) instead of a line per trial start and
    end. Unless ``verbose``, Ray's, Tune's and the workers' output goes to
    ``<sweep>/logs/`` (kavg_ray.launch.console) and only kavg's own lines show (with a
    live bar when they reach a terminal).
    """
    store = ResultsStore(storage)
    by_id = {p.trial_name(): p for p in points}
    todo, plan = _plan_run(
        store, sweep, points, by_id, spec_doc, resume, overwrite, address, search
    )
    todo_points = [by_id[t] for t in todo]
    if resume:
        echo(f"[kavg] resume {sweep}: {len(by_id) - len(todo)} finished, {len(todo)} to run")
    if not todo and not (plan is not None and plan.has_work()):
        return {}
    sweep_dir = store.sweep_dir(sweep)
    # Logs stay on this machine: in the sweep's folder, or beside its lock when the store
    # is an object store (docs/design.md section 5).
    log = _ray_log(store.local_dir(sweep), _plan_words(len(todo), pack), verbose, progress, echo)
    # Ray's output while it connects goes to a temporary file: a cluster that cannot be
    # joined leaves nothing under the storage (the file moves into logs/ once joined).
    with console.quiet(log, staged=True) as quiet_echo, _joined(
        address, quiet_echo, todo_points or points
    ):
        say = echo if log is None else quiet_echo
        _check_joined(address, storage, todo_points)
        _prepare(store, sweep, spec_doc, points, todo, resume, say)
        tracker = _tracker(store, sweep, by_id, todo, say, progress, log is not None)
        root = sweep_dir.resolve()
        layout = _layout(todo_points, root, plan, search, pack, local=address is None)
        _tune(tracker, todo_points or points, root, verbose, layout)
    return tracker.statuses


@contextmanager
def _joined(address: str | None, quiet_echo: Any, points: list[RunConfig]) -> Iterator[None]:
    """Connect to Ray (``address``, else a private local Ray) for the body, then shut down
    a connection this call made. Ray's output while it connects goes to ``quiet_echo``'s
    staged file."""
    # A cluster's other nodes import the user's factories from the shipped copy.
    shipped = nodes.user_code(points) if address else None
    connected_here = connect(address, quiet_echo.log, shipped)
    quiet_echo.settle()
    try:
        yield
    finally:
        if connected_here:
            import ray

            # Ends Ray's forwarding of worker logs, so the caller's table prints last.
            ray.shutdown()


def _tracker(
    store: ResultsStore, sweep: str, by_id: dict[str, RunConfig], todo: list[str], say: Any,
    progress: bool, quiet: bool,
) -> TrialTracker:  # fmt: skip
    """The run's trial lines: every epoch (``progress``) or a line per trial start and
    end, with a live bar when ``quiet`` (Ray's output in the log)."""
    return TrialTracker(
        store, sweep, by_id, todo, echo=say, epoch_lines=progress, trial_lines=not progress,
        console=console.rich_console(say) if quiet else None,
    )


def _check_joined(address: str | None, storage: str, todo_points: list[RunConfig]) -> None:
    """The checks that need the cluster joined, before anything is written: a storage
    every node sees and the cluster's GPU memory (a cluster only), placement, and
    Hier-AVG's groups on nodes."""
    if address:
        nodes.check_shared_storage(storage)
        check_simulated_memory(todo_points, local=False, joined=True)
    check_placement(todo_points)
    check_hier_groups(todo_points)


def _plan_words(points: int, pack: bool) -> str:
    """How the sweep runs its grid points, for its first line."""
    if pack:
        return f"{points} grid points packed (stacked per workload and P; pack: false opts out)"
    return f"{points} trials, one per grid point"


def _ray_log(
    sweep_dir: Path, plan: str, verbose: bool, progress: bool, echo: Any
) -> Path | None:
    """Where Ray's, Tune's and the workers' output goes (None with ``verbose``: the
    terminal), said once for a sweep with its ``plan`` (:func:`_plan_words`); nothing is
    created here."""
    if verbose:
        return None
    log = console.log_path(sweep_dir, "train" if progress else "sweep")
    if not progress:
        echo(f"[kavg] sweep {sweep_dir.name}: {plan}; Ray, Tune and worker logs: {log}")
    return log


def _refine_plan(
    store: ResultsStore, sweep: str, points: list[RunConfig], by_id: dict[str, RunConfig],
    search: SearchConfig | None, feed_stored: bool,
) -> plans.RefinePlan | None:  # fmt: skip
    """The refining search of ``search: refine`` (None otherwise), fed the stored rows."""
    if search is None or search.strategy != "refine":
        return None
    plan = plans.RefinePlan(points, by_id, search, store.sweep_dir(sweep).resolve())
    if feed_stored:
        plan.feed(store.read_trials(sweep))
    return plan


def _todo(
    store: ResultsStore, sweep: str, by_id: dict[str, RunConfig], spec_doc: dict,
    resume: bool, overwrite: bool, has_spec: bool,
) -> list[str]:  # fmt: skip
    """The trial ids this run trains: those without a finished row (``resume``), or all."""
    if resume:
        if has_spec and store.read_spec(sweep) != json.loads(json.dumps(spec_doc, default=str)):
            raise SweepError(
                f"sweep '{sweep}' was started from a different spec; "
                "resume it with the same spec, or give a new --name"
            )
        done = store.finished_trial_ids(sweep) if has_spec else set()
        return [tid for tid in by_id if tid not in done]
    if not overwrite and (store.sweep_dir(sweep) / "trials.parquet").exists():
        raise SweepError(
            f"sweep '{sweep}' already has results under {store.storage}; "
            "use --resume to finish it or --name for a new sweep"
        )
    return list(by_id)


def _prepare(
    store: ResultsStore, sweep: str, spec_doc: dict, points: list[RunConfig], todo: list[str],
    resume: bool, say: Any,
) -> None:  # fmt: skip
    """Before the trials: the spec stored, the theory probed, stale checkpoints cleared."""
    store.write_spec(sweep, spec_doc)
    if points[0].theory == "estimate" and (resume is False or store.read_theory(sweep) is None):
        store.write_theory(sweep, estimate_theory(points, say))
    if not resume:
        # Ray Train resumes a run of the same name from its checkpoints: a fresh sweep
        # must not pick up an older run's.
        for tid in todo:
            store.remove_tree(sweep, "ray", "train", tid)


def _layout(
    todo: list[RunConfig], sweep_root: Path, plan: plans.RefinePlan | None,
    search: SearchConfig | None, pack: bool, local: bool = True,
) -> plans.Layout:  # fmt: skip
    """The trials of this run: proposed by the refining search, packs, or one per point
    (``local``: on a local Ray, whose GPU is this machine's)."""
    if plan is not None:
        return plans.refine_layout(plan, _trial_fn)
    if pack:
        return plans.pack_layout(plans.plan_packs(todo, local=local))
    return plans.grid_layout(todo, sweep_root, _trial_fn, search)


def _tune(
    tracker: TrialTracker, todo: list[RunConfig], sweep_root: Path, verbose: bool,
    layout: plans.Layout,
) -> None:  # fmt: skip
    """Run ``layout``'s trials (``todo``: the grid points) as one Tune experiment; the
    tracker's live bar (if any) is closed however it ends."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    # Tune's own loggers: result.json only (TensorBoard cannot log a trial's history).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    res = todo[0].resources
    callback = plans.make_callback(tracker, _row, layout.stopped, trial_error_text)
    tuner = tune.Tuner(
        layout.trainable,
        param_space=layout.param_space,
        tune_config=tune.TuneConfig(
            max_concurrent_trials=res.max_concurrent_trials or default_concurrency(todo),
            trial_name_creator=lambda t: t.config["trial"]["trial_id"],
            trial_dirname_creator=lambda t: t.config["trial"]["trial_id"],
            **layout.tune_kwargs,
        ),
        run_config=tune.RunConfig(
            name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(sweep_root / "ray"),
            callbacks=[callback, JsonLoggerCallback()],
            verbose=1 if verbose else 0,
        ),
    )
    try:
        tuner.fit()
    finally:
        tracker.close()
