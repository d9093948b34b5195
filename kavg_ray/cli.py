"""The `kavg` command line.

Inputs are validated before torch or Ray are imported, so a bad file costs a
fraction of a second and launches nothing. Exit codes: 0 success, 2 bad input,
1 a failure at run time.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any

import click

FORMATS = click.Choice(["table", "csv", "json"])


class BadInput(click.ClickException):
    """One line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _user_errors(fn: Callable) -> Callable:
    """The project's errors (kavg_ray.errors) end the command: one line, their exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kavg_ray.errors import KavgError

        try:
            return fn(*args, **kwargs)
        except KavgError as exc:
            if exc.exit_code == 2:
                raise BadInput(str(exc)) from None
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def _storage(storage: str | None, write: bool = False) -> str:
    """The results folder (--storage, $KAVG_STORAGE, ./kavg_results), refused (exit 2) when
    it is empty or is, or lies under, a file (and, for ``write``, when it is not writable);
    or an s3:// or gs:// URI, refused (exit 2) when kavg cannot serve its scheme."""
    from kavg_ray.analysis.storage import check_uri, is_uri
    from kavg_ray.launch.address import check_storage

    if storage is None:
        storage = os.environ.get("KAVG_STORAGE") or "./kavg_results"
    # Before the folder checks: a URI (or a broken one, s3:bucket) is never a folder.
    storage = check_uri(storage)
    return storage if is_uri(storage) else check_storage(storage, write=write)


def _is_uri(storage: str) -> bool:
    from kavg_ray.analysis.storage import is_uri

    return is_uri(storage)


@contextlib.contextmanager
def _out_folder(out: str) -> Iterator[tuple[str, Callable[[str], str], list[str]]]:
    """--out of plot and report: yields (the local folder to write, how to name a file
    written there, a list of lines to print once the files are where they belong). An
    s3:// or gs:// --out is a temporary folder whose files go up there at the end."""
    from kavg_ray.analysis.storage import check_uri, is_uri, storage_root

    lines: list[str] = []
    if not is_uri(check_uri(out, "--out")):
        yield out, str, lines
    else:
        import tempfile
        from pathlib import Path

        root = storage_root(out)
        with tempfile.TemporaryDirectory(prefix="kavg-out-") as tmp:

            def name(path: str) -> str:
                return str(root.joinpath(*Path(path).relative_to(tmp).parts))

            yield tmp, name, lines
            for f in sorted(Path(tmp).rglob("*")):
                if f.is_file():
                    root.joinpath(*f.relative_to(tmp).parts).upload(f)
    for line in lines:
        click.echo(line)


def _at(storage: str, *parts: str) -> str:
    """``storage/parts`` as the user writes it (a URI keeps its ?query at the end)."""
    from kavg_ray.analysis.storage import join

    return join(storage, *parts)


def _address(address: str | None) -> str | None:
    """--address checked before Ray starts: its form (exit 2) and that it answers (exit 1)."""
    from kavg_ray.launch.address import check_address

    return check_address(address)


def _check_name(name: str) -> str:
    from kavg_ray.config import NAME_RE

    if not name:
        raise BadInput("--name is empty: give a name of letters, digits, '.', '_' and '-'")
    if not NAME_RE.match(name) or name in (".", ".."):
        raise BadInput(f"name '{name}' may only hold letters, digits, '.', '_' and '-'")
    return name


def _check_factories(points: list) -> None:
    """Import and try every workload of one's own (docs/design.md section 8) once, on the CPU,
    before anything launches; built-in workloads need no torch here."""
    from kavg_ray.config import is_factory

    todo = {}
    for p in points:
        wl = p.workload
        if any(is_factory(name or "") for name in (wl.dataset, wl.model, wl.loss, wl.optimizer)):
            # Once per distinct data, model, loss and optimizer: a grid over K adds no check.
            keys = ("dataset", "dataset_args", "model", "model_args", "loss", "task",
                    "in_memory_mb", "optimizer")  # fmt: skip
            todo.setdefault((wl.model_dump_json(include=set(keys)), p.backend), p)
    if todo:
        from kavg_ray.train.workload import check_workload

        for p in todo.values():
            check_workload(p)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """kavg: find the best model-averaging period K for K-AVG and Hier-AVG on Ray."""


@main.command()
@click.argument("config", type=click.Path(dir_okay=True))
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray)")
@click.option("--storage", default=None, help="results directory [./kavg_results, $KAVG_STORAGE]")
@click.option("--verbose", "-v", is_flag=True, help="show Ray's and the workers' output live")
@_user_errors
def train(config: str, address: str | None, storage: str | None, verbose: bool) -> None:
    """Train one model with K-AVG (or Hier-AVG) on P Ray Train workers."""
    from kavg_ray.config import load_run, read_yaml

    cfg = load_run(config)
    _check_factories([cfg])
    storage = _storage(storage, write=True)
    address = _address(address)
    from kavg_ray.launch.sweep import run_sweep

    tid = cfg.trial_name()
    statuses = run_sweep(
        cfg.name, [cfg], read_yaml(config), storage, address=address, overwrite=True,
        progress=True, verbose=verbose, echo=click.echo,
    )  # fmt: skip
    from kavg_ray.analysis.results import load_trials

    row = load_trials(cfg.name, storage).set_index("trial_id").loc[tid]
    waited = float(row["wait_time_s"])
    wait = f" (of which {waited:.2f}s waiting for the last learner)" if waited > 0 else ""
    click.echo(
        f"summary: {cfg.algorithm} P={cfg.P} {'K=' + str(cfg.K) if cfg.K else ''} "
        f"status {row['status']}  final test accuracy {row['final_test_acc']:.4f}  "
        f"wall time {row['wall_time_s']:.1f}s  averaging time {row['comm_time_s']:.2f}s{wait}  "
        f"bytes averaged {int(row['bytes_communicated']):,}  rounds {int(row['rounds'])}"
    )
    from kavg_ray.launch.jobs import absolute_storage

    click.echo(f"results: {_at(absolute_storage(storage), cfg.name)}")  # from any folder
    if statuses.get(tid) == "failed":
        click.echo(f"error: run failed: {row['error']}", err=True)
        sys.exit(1)


@main.group()
def sweep() -> None:
    """Run sweeps over K and P."""


@sweep.command("run")
@click.argument("spec", type=click.Path(dir_okay=True))
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray)")
@click.option("--storage", default=None, help="results directory [./kavg_results, $KAVG_STORAGE]")
@click.option("--name", default=None, help="sweep name (default: the spec's name)")
@click.option("--resume", is_flag=True, help="run only the grid points with no finished row")
@click.option("--verbose", "-v", is_flag=True, help="show Ray's, Tune's and workers' output live")
@_user_errors
def sweep_run(
    spec: str, address: str | None, storage: str | None, name: str | None, resume: bool,
    verbose: bool,
) -> None:  # fmt: skip
    """Run a sweep spec on Ray Tune and print the K_opt table."""
    from kavg_ray.config import load_sweep, read_yaml

    parsed = load_sweep(spec)
    points = parsed.points()
    _check_factories(points)
    sweep_name = _check_name(name if name is not None else points[0].name)
    storage = _storage(storage, write=True)
    address = _address(address)
    from kavg_ray.analysis import results
    from kavg_ray.launch.sweep import run_sweep

    run_sweep(
        sweep_name, points, read_yaml(spec), storage, address=address, resume=resume,
        verbose=verbose, echo=click.echo, search=parsed.search, pack=parsed.pack,
    )  # fmt: skip
    trials = results.load_trials(sweep_name, storage)
    by = "time" if points[0].target_accuracy else results.ranked_by(trials)
    if by == "time" and _simulated_times(trials):  # the cost model prices their time
        by = results.ranked_by(trials)
        click.echo(f"\nK_opt by time of simulated trials: kavg results kopt {sweep_name} "
                   "--by time --network NETWORK (the cost model)")  # fmt: skip
    click.echo(f"\nK_opt by {by} for sweep '{sweep_name}' ({len(trials)} trials):")
    table = results.kopt_table(trials, by=by, history=results.load_history(sweep_name, storage))
    click.echo(results.format_frame(table, "table"), nl=False)
    _echo_where_results_are(sweep_name, storage, by)
    # Failed trials have no finished row either: both kinds are what --resume reruns.
    status = dict(zip(trials["trial_id"], trials["status"], strict=True))
    missing = [
        p.trial_name()
        for p in points
        if status.get(p.trial_name()) not in results.FINISHED_STATUSES
    ]
    if missing:
        n_failed = sum(1 for t in missing if status.get(t) == "failed")
        command = os.environ.get("KAVG_RESUME_COMMAND") or shlex.join(
            ["kavg", "sweep", "run", spec, "--resume"]
            + (["--name", sweep_name] if name else [])
            + (["--storage", storage] if storage != _storage(None) else [])
            + (["--address", address] if address else [])
        )
        click.echo(
            f"error: {len(missing)} of {len(points)} grid points did not finish "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}"
            + (f"; {n_failed} failed, see '"
               + shlex.join(["kavg", "results", "show", sweep_name]
                            + (["--storage", storage] if storage != _storage(None) else []))
               + "'" if n_failed else "")
            + f"); finish them with: {command}",
            err=True,
        )
        sys.exit(1)


def _echo_where_results_are(sweep_name: str, storage: str, by: str) -> None:
    """Where a sweep's results are, and the commands that read them from any folder: the
    default storage, ./kavg_results, is relative to the folder the sweep ran in."""
    from kavg_ray.launch.jobs import absolute_storage

    at = ["--storage", absolute_storage(storage)]
    click.echo(f"results: {_at(at[1], sweep_name)}")
    click.echo("kopt:    " + shlex.join(
        ["kavg", "results", "kopt", sweep_name, *(["--by", by] if by == "time" else []), *at]))
    click.echo("plot:    " + shlex.join(
        ["kavg", "results", "plot", sweep_name, "--out", f"plots/{sweep_name}", *at]))
    click.echo("report:  " + shlex.join(
        ["kavg", "results", "report", sweep_name, "--out", f"reports/{sweep_name}", *at]))


@sweep.command("submit")
@click.argument("spec", type=click.Path(dir_okay=True))
@click.option("--address", default=None, help="the dashboard, http://HOST:8265 [$RAY_ADDRESS]")
@click.option("--storage", default=None, help="results directory, as the head node sees it")
@click.option("--name", default=None, help="sweep name (default: the spec's name)")
@click.option("--resume", is_flag=True, help="run only the grid points with no finished row")
@click.option("--ship-package", is_flag=True, help="upload the local kavg_ray (py_modules)")
@click.option("--working-dir", default=None, type=click.Path(),
              help="a folder of your code (factories) to ship with the job; every node "
              "imports from it")
@click.option("--python", default="python", show_default=True, help="Python on the head node")
@click.option(
    "--env",
    "env",
    multiple=True,
    metavar="KEY=VALUE",
    help="an environment variable for the job and its workers (repeatable)",
)
@_user_errors
def sweep_submit(
    spec: str, address: str | None, storage: str | None, name: str | None, resume: bool,
    ship_package: bool, python: str, env: tuple[str, ...], working_dir: str | None = None,
) -> None:  # fmt: skip
    """Submit a sweep to a Ray cluster as a Ray Job; prints the job id and its dashboard page."""
    from kavg_ray.config import load_sweep
    from kavg_ray.launch import jobs

    address = jobs.check_dashboard_address(address or os.environ.get("RAY_ADDRESS"))
    env_vars = jobs.parse_env(env)
    points = load_sweep(spec).points()
    if working_dir is not None:
        working_dir = jobs.check_working_dir(working_dir)
        sys.path.insert(0, working_dir)  # the factories import from it here as on the nodes
    _check_factories(points)
    sweep_name = _check_name(name if name is not None else points[0].name)
    storage = jobs.absolute_storage(_storage(storage))
    # A URI is checked by the job's driver (the head's credentials, not necessarily ours).
    if not resume and not _is_uri(storage) and os.path.exists(
        os.path.join(storage, sweep_name, "trials.parquet")
    ):
        raise BadInput(
            f"sweep '{sweep_name}' already has results under {storage}; "
            "use --resume to finish it or --name for a new sweep"
        )
    job_id, link = jobs.submit(
        spec, address, storage, sweep_name, len(points), resume=resume,
        ship_package=ship_package, python=python, env_vars=env_vars, working_dir=working_dir,
    )  # fmt: skip
    click.echo(f"submitted sweep '{sweep_name}' ({len(points)} trials) as job {job_id}")
    click.echo(f"dashboard: {link}")
    click.echo(f"follow: kavg sweep status {job_id} --address {address}")
    click.echo(f"results: {_at(storage, sweep_name)}")


@sweep.command("status")
@click.argument("name_or_job")
@click.option("--address", default=None, help="the dashboard, http://HOST:8265 [$RAY_ADDRESS]")
@click.option("--storage", default=None, help="results directory [the job's, ./kavg_results]")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@_user_errors
def sweep_status(name_or_job: str, address: str | None, storage: str | None, fmt: str) -> None:
    """A sweep's progress: job state (for a job id), trials finished / total, best so far."""
    import json

    from kavg_ray.launch import jobs

    if jobs.is_job_id(name_or_job):
        info = jobs.job_info(address, name_or_job)
        meta = info["metadata"]
        if "kavg_sweep" not in meta:
            raise BadInput(f"job {name_or_job} is not a kavg sweep")
        total = int(meta["kavg_trials"]) if meta.get("kavg_trials", "").isdigit() else None
        st = jobs.sweep_progress(
            meta["kavg_sweep"], storage or meta.get("kavg_storage") or _storage(None), total
        )
        status = {**{k: info[k] for k in ("job_id", "state", "message")}, **st}
    else:
        sweep_name = _check_name(name_or_job)
        storage = _storage(storage)
        from kavg_ray.analysis.results import ResultsStore

        if not ResultsStore(storage).sweep_dir(sweep_name).is_dir():
            raise BadInput(f"unknown sweep '{sweep_name}' under {storage}")
        status = jobs.sweep_progress(sweep_name, storage)
    if fmt == "json":
        click.echo(json.dumps(status, default=str))
    else:
        click.echo(jobs.format_status(status))


@sweep.command("logs")
@click.argument("job_id")
@click.option("--address", default=None, help="the dashboard, http://HOST:8265 [$RAY_ADDRESS]")
@click.option("--follow", "-f", is_flag=True, help="keep printing until the job ends")
@_user_errors
def sweep_logs(job_id: str, address: str | None, follow: bool) -> None:
    """Print a submitted sweep's logs."""
    from kavg_ray.launch import jobs

    if follow:
        jobs.follow_logs(address, job_id, click.echo)
    else:
        click.echo(jobs.logs(address, job_id), nl=False)


@sweep.command("stop")
@click.argument("job_id")
@click.option("--address", default=None, help="the dashboard, http://HOST:8265 [$RAY_ADDRESS]")
@_user_errors
def sweep_stop(job_id: str, address: str | None) -> None:
    """Stop a submitted sweep; the trials finished so far stay in the results store."""
    from kavg_ray.launch import jobs

    if jobs.stop(address, job_id):
        click.echo(f"stopping job {job_id}; finished trials stay in the results store")
    else:
        click.echo(f"job {job_id} had already ended")


@main.group("results")
def results_group() -> None:
    """Query stored sweeps."""


@results_group.command("list")
@click.option("--storage", default=None, help="results directory [./kavg_results, $KAVG_STORAGE]")
@click.option("--format", "fmt", type=FORMATS, default="table")
@_user_errors
def results_list(storage: str | None, fmt: str) -> None:
    """List the sweeps in the store."""
    from kavg_ray.analysis import results

    click.echo(results.format_frame(results.ResultsStore(_storage(storage)).list_sweeps(), fmt))


def _show_on_network(sweep_name: str, storage: str, trials: Any, net: tuple, fmt: str) -> tuple:
    """`results show --network`: the trials with the cost model's columns; (frame, the
    columns the table adds)."""
    network = net[0]
    df = _predict_on(sweep_name, storage, net, trials, require_target=False)
    if fmt == "table":
        click.echo(f"network assumed: {network.describe()}")
    cols = ["predicted_time_to_target_s", "predicted_time_s", "predicted_comm_time_s",
            "measured_transfer_time_s"]  # fmt: skip
    return df, cols


def _predict_on(sweep_name: str, storage: str, net: tuple, trials: Any, **kw: Any) -> Any:
    """costmodel.predict_sweep on ``net`` = (network, step time, target), sizing the models
    of trials that moved no bytes."""
    from kavg_ray.analysis import costmodel

    network, step_time, target = net
    return costmodel.predict_sweep(
        sweep_name, storage, network, trials=trials, step_time=step_time, target=target,
        model_bytes=_model_bytes(), **kw,
    )


def _model_bytes() -> Callable:
    """The cost model's sizer for trials that moved no bytes: ``(model, dataset, the spec's
    workload) -> bytes``, the model built as the run built it (torch, on the meta device)."""
    from kavg_ray.config import RunConfig
    from kavg_ray.train.stacked import config_model_bytes

    def size(model: str, dataset: str, workload: Any) -> int:
        doc = {**dict(workload or {}), "model": model, "dataset": dataset}
        try:
            cfg = RunConfig.model_validate({"workload": doc, "backend": "simulated", "K": 1})
            return config_model_bytes(cfg)
        except (ValueError, RuntimeError, OSError) as exc:
            raise BadInput(f"cannot size model {model!r} on {dataset}: {exc}") from None

    return size


_NETWORK_HELP = (
    "a preset (nvlink, ib200, ib400, eth1g, eth10g, eth100g, wan400g, wan100g, wan10g), "
    "alpha=S,bandwidth=GB/s"
)


def _network_options(fn: Callable) -> Callable:
    """--network, --step-time and --target (docs/design.md section 10), passed as `net`, a tuple
    (costmodel.Network or None, step time or None, target or None), checked before use."""

    @wraps(fn)
    def wrapper(
        *args: Any, network: str | None, step_time: float | None, target: float | None, **kw: Any
    ) -> Any:
        if network is None:
            if step_time is not None or target is not None:
                raise BadInput("--step-time and --target need --network")
            return fn(*args, net=None, **kw)
        from kavg_ray.analysis.costmodel import parse_network

        return fn(*args, net=(parse_network(network), step_time, target), **kw)

    for opt in (
        click.option("--target", type=float, default=None,
                     help="target accuracy for --network [the sweep's target_accuracy]"),
        click.option("--step-time", type=float, default=None,
                     help="seconds per local step on the target hardware [measured]"),
        click.option("--network", default=None,
                     help=f"predict time on {_NETWORK_HELP} or a profile FILE"),
    ):  # fmt: skip
        wrapper = opt(wrapper)
    return wrapper


@results_group.command("show")
@click.argument("sweep_name")
@click.option("--storage", default=None, help="results directory [./kavg_results, $KAVG_STORAGE]")
@click.option("--format", "fmt", type=FORMATS, default="table")
@_user_errors
@_network_options
def results_show(sweep_name: str, storage: str | None, fmt: str, net: tuple | None) -> None:
    """Show a sweep's trials (with --network, each one's predicted time on that network
    beside the measured one, and its measured transfer beside the predicted)."""
    from kavg_ray.analysis import results

    df = results.load_trials(_check_name(sweep_name), _storage(storage))
    # A failed trial's full text is in its errors file (a diverged or stopped one has none).
    error_files = df["error_file"].fillna("").astype(str).str.strip().ne("").any()
    predicted: list[str] = []
    if net is not None:
        df, predicted = _show_on_network(sweep_name, _storage(storage), df, net, fmt)
    if fmt == "table":
        cols = ["trial_id", "algorithm", "backend", "P", "K", "S", "K1", "K2", "seed",
                "status", "final_test_acc", "best_test_acc", "time_to_target_s",
                "wall_time_s", "global_reductions", "local_reductions", "comm_time_s",
                "wait_time_s", "global_comm_time_s", "local_comm_time_s", "staleness_mean",
                "staleness_max", "pushes", "applied", "restarts", "restart_time_s",
                *predicted, "error"]  # fmt: skip
        df = results.show_columns(df, cols)
    click.echo(results.format_frame(df, fmt), nl=False)
    if fmt == "table" and "error" in df.columns and error_files:
        click.echo("full error texts: " + _at(
            _storage(storage), sweep_name, "errors", "TRIAL.txt"))  # fmt: skip


def _kopt_on_network(sweep_name: str, storage: str, fmt: str, by: str, net: tuple) -> None:
    """`results kopt --by time --network ...`: K_opt by predicted time on that network."""
    from kavg_ray.analysis import costmodel, results

    if by != "time":
        raise BadInput("--network predicts time: use it with --by time")
    network = net[0]
    trials = _trials_with_predictions(_check_name(sweep_name), storage)
    pred = _predict_on(sweep_name, storage, net, trials)
    if fmt == "table":
        click.echo(f"network assumed: {network.describe()}")
    click.echo(results.format_frame(costmodel.kopt_by_predicted_time(pred), fmt),
               nl=fmt != "table")  # fmt: skip
    if fmt != "table":  # machine-readable output: the K_opt frame alone
        return
    click.echo(f"K_opt by predicted time on {network.name}: mean time to the target. "
               f"{KOPT_LEGEND}")  # fmt: skip
    speedup = costmodel.asgd_speedup_table(pred)
    if any(c.startswith("speedup_over_") for c in speedup.columns):
        click.echo("K-AVG against the parameter server on this network (mean predicted time "
                   "to the end of the budget, s; speed-up = their time / K-AVG's):")  # fmt: skip
        click.echo(results.format_frame(speedup, fmt))


@results_group.command("kopt")
@click.argument("sweep_name")
@click.option("--by", type=click.Choice(["accuracy", "time", "loss"]), default=None,
              help="accuracy, time to target, or final test loss (lower is better) "
              "[accuracy; loss for a sweep without accuracy]")
@click.option("--storage", default=None, help="results directory [./kavg_results, $KAVG_STORAGE]")
@click.option("--format", "fmt", type=FORMATS, default="table")
@click.option("--score", default="last", show_default=True,
              help="a trial's score: last (the final evaluation), last:N (the mean of the "
              "last N), best (the best evaluation); accuracy and loss only")
@click.option("--uncertainty", is_flag=True,
              help="the full bootstrap table over seeds and a K_opt(P) fit")
@click.option("--n-boot", type=click.IntRange(1, 1_000_000), default=1000, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="bootstrap seed")
@_user_errors
@_network_options
def results_kopt(
    sweep_name: str, by: str, storage: str | None, fmt: str, score: str = "last",
    uncertainty: bool = False, n_boot: int = 1000, seed: int = 0, net: tuple | None = None,
) -> None:  # fmt: skip
    """The best K per P (by final accuracy, by time to the target accuracy, or by final
    test loss), and how sure it is: how often it is best over paired bootstrap resamples
    of the seeds, the credible set of K, how often K = 1 is best, K_opt against K = 1, and
    a verdict (clear, narrow, inconclusive, single seed) with what would settle it.

    With --uncertainty: how often each K is best over bootstrap resamples of the seeds,
    and K_opt(P) = a * P^b fitted across P, with predictions at P not run.
    """
    from kavg_ray.analysis import results

    storage = _storage(storage)
    if not results.SCORE_RE.match(score):
        raise BadInput(f"--score {score!r}: expected last, last:N (N >= 1) or best")
    if net is not None:
        if uncertainty:
            raise BadInput("--uncertainty does not combine with --network")
        if score != "last":
            raise BadInput("--network ranks by predicted time: --score does not apply")
        return _kopt_on_network(sweep_name, storage, fmt, by, net)
    trials = _trials_with_predictions(_check_name(sweep_name), storage)
    history = results.load_history(sweep_name, storage)
    by = by or results.ranked_by(trials)
    if by == "time" and score != "last":
        raise BadInput("--score ranks accuracy or loss: by time it is last")
    if by == "time" and _simulated_times(trials):
        raise BadInput(_simulated_times(trials))
    if uncertainty:
        from kavg_ray.analysis import uncertainty as unc

        frames = unc.uncertainty_report(
            trials, by=by, n_boot=n_boot, seed=seed, score=score, history=history
        )
        click.echo(unc.format_uncertainty(frames, fmt, n_boot, seed), nl=False)
        return
    try:
        table = results.kopt_table(
            trials, by=by, score=score, history=history, n_boot=n_boot, seed=seed
        )
    except ValueError as exc:  # e.g. last:N of a sweep without a history
        raise BadInput(str(exc)) from None
    click.echo(results.format_frame(table, fmt), nl=fmt != "table")
    if fmt == "table":  # under the table: its output still starts with the header
        click.echo(f"K_opt by {by}: {_score_words(score, by)}. {KOPT_LEGEND}")


#: Under `kavg results kopt`'s table: what its new columns say (docs/design.md section 11).
KOPT_LEGEND = (
    "freq_best: how often K_opt is best over paired bootstrap resamples of the seeds;\n"
    "credible_set: the fewest K that are best in at least 0.8 of them; freq_k1: how often "
    "K = 1 is best;\n"
    "diff_vs_k1: K_opt minus K = 1 on the same seeds, with its 90% interval [lo, hi]."
)


def _simulated_times(trials: Any) -> str:
    """Why ``trials`` cannot be ranked by their measured time (simulated learners share a
    process and communicate nothing: the cost model prices them), or ""."""
    backend = trials["backend"] if "backend" in trials.columns else None
    n = 0 if backend is None else int((backend == "simulated").sum())
    if not n:
        return ""
    return (f"{n} simulated trial(s): their learners share one process and communicate "
            "nothing, so K_opt by time comes from the cost model: add --network (e.g. "
            "--network eth10g)")  # fmt: skip


def _score_words(score: str, by: str) -> str:
    if by == "time":
        return "mean time to the target"
    what = "accuracy" if by == "accuracy" else "test loss"
    if score == "best":
        return f"best {what} of each run"
    if score == "last":
        return f"final {what}"
    return f"{what}, mean of the last {score.split(':')[1]} evaluations"


def _trials_with_predictions(sweep_name: str, storage: str):  # noqa: ANN202
    """The trials, with `predicted_kopt` when the sweep ran the probe (`theory: estimate`)."""
    from kavg_ray.analysis.results import ResultsStore, attach_predictions

    store = ResultsStore(storage)
    return attach_predictions(store.read_trials(sweep_name), store.read_theory(sweep_name))


@results_group.command("plot")
@click.argument("sweep_name")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder for PNGs")
@click.option("--storage", default=None, help="results directory [./kavg_results, $KAVG_STORAGE]")
@_user_errors
@_network_options
def results_plot(sweep_name: str, out: str, storage: str | None, net: tuple | None = None) -> None:
    """Plot accuracy against K per P, accuracy per epoch, K_opt, speedup and gap (PNG);
    with --network, also the predicted time to target against K on that network."""
    from kavg_ray.analysis import plots, results

    storage = _storage(storage)
    trials = _trials_with_predictions(_check_name(sweep_name), storage)
    history = results.load_history(sweep_name, storage)
    with _out_folder(out) as (folder, shown, lines):  # an s3:// --out: uploaded at the end
        written, skipped = plots.save_all_detailed(trials, history, folder)
        if net is not None:
            network = net[0]
            pred = _predict_on(sweep_name, storage, net, trials)
            try:
                fig = plots.predicted_time_vs_k(pred, network.name)
            except plots.PlotDataError as exc:
                skipped["predicted_time_vs_k"] = str(exc)
            else:
                written.append(os.path.join(folder, plots.PREDICTED_TIME_FILE))
                fig.savefig(written[-1], dpi=plots.DPI, format="png")
        lines += [shown(str(path)) for path in written]
    for name, why in skipped.items():
        click.echo(f"skipped {name}: {why}", err=True)


@results_group.command("report")
@click.argument("sweep_name")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--storage", default=None, help="results directory [./kavg_results, $KAVG_STORAGE]")
@_user_errors
@_network_options
def results_report(
    sweep_name: str, out: str, storage: str | None, net: tuple | None = None
) -> None:
    """One Markdown page: spec, tables, K_opt per P and the plots (and, with --network,
    K_opt by predicted time on that network)."""
    from kavg_ray.analysis.report import write_report

    storage = _storage(storage)
    net = None if net is None else (*net, _model_bytes())
    with _out_folder(out) as (folder, shown, lines):  # an s3:// --out: uploaded at the end
        lines.append(shown(str(write_report(_check_name(sweep_name), storage, folder,
                                            network=net))))  # fmt: skip


@main.command()
@click.option("--address", default=None, help="Ray cluster address [a local Ray on 127.0.0.1]")
@click.option("--P", "P", type=click.IntRange(2), multiple=True, required=True,
              help="workers to average over (repeatable: one fit over all)")
@click.option("--sizes", default="4k,64k,1M,8M,32M", show_default=True,
              help="bytes per average, comma-separated (decimal k, M, G)")
@click.option("--repeats", type=click.IntRange(1, 10_000), default=10, show_default=True)
@click.option("--gpu", is_flag=True, help="one GPU per worker and NCCL (default: CPU and gloo)")
@click.option("--cpus-per-worker", type=click.FloatRange(0, min_open=True), default=None,
              help="CPUs per worker [1, less if the cluster has fewer than P]")
@click.option("--out", default="network-profile.json", show_default=True,
              help="profile file to write (.json, or .yaml/.yml)")
@click.option("--name", default=None, help="the profile's name [the file's stem]")
@click.option("--gap-ms", type=click.FloatRange(0), default=2.0, show_default=True,
              help="compute this long before each timed average, as training does "
                   "(0: back to back, behind a barrier)")
@_user_errors
def calibrate(
    address: str | None, P: tuple[int, ...], sizes: str, repeats: int, gpu: bool,
    cpus_per_worker: float | None, out: str, name: str | None, gap_ms: float,
) -> None:  # fmt: skip
    """Time averages of several sizes over P Ray workers, fit alpha and beta by least
    squares, print the fit and its residuals, and write a profile for --network FILE."""
    from kavg_ray.launch.calibrate import parse_sizes

    size_list = parse_sizes(sizes)
    if not out.lower().endswith((".json", ".yaml", ".yml")):
        raise BadInput(f"--out {out!r} must end in .json, .yaml or .yml")
    address = _address(address)
    from kavg_ray.launch import calibrate as cal

    fit, details = cal.calibrate(
        sorted(set(P)), size_list, address=address, repeats=repeats, use_gpu=gpu,
        cpus_per_worker=cpus_per_worker, gap_s=gap_ms / 1e3,
        echo=lambda m: click.echo(m, err=True),
    )  # fmt: skip
    click.echo(cal.format_fit(fit))
    click.echo(f"profile: {cal.write_calibration(out, fit, details, name)}")


@main.group()
def theory() -> None:
    """The K-AVG bound: predicted K_opt from L, M and F(w1) - F*."""


def _powers_of_two(k_max: int) -> list[int]:
    ks, k = [], 1
    while k <= k_max:
        ks.append(k)
        k *= 2
    return ks


def _step_budget(step_budget: float | None, old_S: float | None) -> float:
    """`theory predict`'s budget: --step-budget, or its old spelling --S (S is Hier-AVG's
    group size everywhere else), accepted for this release with a warning on stderr."""
    if old_S is not None:
        if step_budget is not None:
            raise BadInput("--S is the old spelling of --step-budget: give only --step-budget")
        click.echo("warning: --S is deprecated and will be removed in the next release: use "
                   "--step-budget (S is Hier-AVG's group size elsewhere)", err=True)  # fmt: skip
        step_budget = old_S
    if step_budget is None:
        raise BadInput("missing option --step-budget (local steps per learner, N*K)")
    if not step_budget > 0:
        raise BadInput(f"--step-budget must be > 0, got {step_budget:g}")
    return step_budget


@theory.command("predict")
@click.option("--L", "L", type=float, required=True, help="Lipschitz constant of the gradient")
@click.option("--M", "M", type=float, required=True, help="variance bound of a stochastic gradient")
@click.option("--F-gap", "F_gap", type=float, required=True, help="F(w1) - F*")
@click.option("--gamma", type=float, required=True, help="step size")
@click.option("--B", "B", type=int, required=True, help="mini-batch size per learner")
@click.option("--P", "P", type=int, multiple=True, required=True, help="learners (repeatable)")
@click.option("--step-budget", "step_budget", type=float, default=None,
              help="local steps per learner, N*K (Theorem 3.4's S; `kavg theory estimate` "
              "reports it as step_budget)  [required]")
@click.option("--S", "old_S", type=float, default=None, hidden=True,
              help="deprecated spelling of --step-budget (removed in the next release)")
@click.option("--delta", type=float, default=0.5, show_default=True, help="slack of (3.1)")
@click.option("--k-max", type=int, default=1024, show_default=True)
@click.option("--format", "fmt", type=FORMATS, default="table")
def theory_predict(
    L: float, M: float, F_gap: float, gamma: float, B: int, P: tuple[int, ...],
    step_budget: float | None, delta: float, k_max: int, fmt: str, old_S: float | None = None,
) -> None:  # fmt: skip
    """Print B(K) of (3.44) for K = 1, 2, 4, ... and the predicted K_opt for each P."""
    from kavg_ray.analysis import theory as th

    S = _step_budget(step_budget, old_S)
    rows = []
    try:
        for p in P:
            ks = _powers_of_two(k_max)
            table = th.bound_table(F_gap, L, M, gamma, B, p, S, delta, ks)
            try:
                kopt, note = th.predict_kopt(F_gap, L, M, gamma, B, p, S, delta, k_max), ""
            except ValueError as exc:
                kopt = th.predict_kopt(
                    F_gap, L, M, gamma, B, p, S, delta, k_max, enforce_conditions=False
                )
                note = f"conditions of Theorem 3.1 fail ({exc}); argmin of (3.44) as a formula"
            for row in table:
                rows.append({"P": p, **row, "K_opt": kopt})
            more = th.kopt_greater_than_one(F_gap, L, M, gamma, B, p, S, delta)
            click.echo(
                f"P={p}: predicted K_opt = {kopt}  (sufficient condition (3.47) for "
                f"K_opt > 1: {'holds' if more else 'does not hold'}){'  ' + note if note else ''}",
                err=True,
            )
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    import pandas as pd

    from kavg_ray.analysis.results import format_frame

    click.echo(format_frame(pd.DataFrame(rows), fmt))


@theory.command("estimate")
@click.argument("config", type=click.Path(dir_okay=True))
@click.option("--probe-steps", type=int, default=50, show_default=True)
@click.option("--F-star", "F_star", type=float, default=None, help="a known lower bound F*")
@click.option("--delta", type=float, default=0.5, show_default=True)
@click.option("--format", "fmt", type=FORMATS, default="table")
@_user_errors
def theory_estimate(
    config: str, probe_steps: int, F_star: float | None, delta: float, fmt: str
) -> None:
    """Estimate L, M, F(w1) - F* on the config's workload; predict K_opt per P."""
    from kavg_ray.config import ConfigError, load_run, load_sweep, read_yaml

    doc = read_yaml(config)
    if "grid" in doc:
        points = load_sweep(config).points()
        cfg, P_values = points[0], sorted({p.P for p in points})
    else:
        cfg = load_run(config)
        P_values = [cfg.P]
    if probe_steps < 2:
        raise ConfigError("--probe-steps must be at least 2")
    _check_factories([cfg])
    from kavg_ray.train.estimate import estimate_constants, predict_for_config

    est = estimate_constants(cfg, probe_steps=probe_steps, F_star=F_star)
    click.echo(
        f"L = {est.L:.6g} ({est.L_method})\nM = {est.M:.6g} ({est.M_method})\n"
        f"F(w1) - F* = {est.F_gap:.6g} (F(w1) = {est.F0:.6g}, F* = {est.F_star:.6g})"
    )
    rows = predict_for_config(cfg, est, P_values, delta=delta)
    import pandas as pd

    from kavg_ray.analysis.results import format_frame

    table = pd.DataFrame([{k: v for k, v in r.items() if k != "curve"} for r in rows])
    click.echo(format_frame(table, fmt))


if __name__ == "__main__":
    main()
