"""The driver's view of a sweep (kavg_ray.launch.progress), fed by hand: no Ray cluster.

Restarts are counted and their cost measured on the driver's clock; a failed trial's row
carries the innermost exception of the chain Ray hands back (Ray's exception types built
here as Ray builds them) and where its full text is; progress.json says what runs; the
console has one line per trial start and end with rich's bar and ETA, plain where it is no
terminal.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from ray import cloudpickle
from ray.exceptions import RayTaskError
from ray.train.v2._internal.exceptions import (
    UserExceptionWithTraceback,
    WorkerHealthCheckFailedError,
)
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError
from rich.console import Console

from kavg_ray import cli
from kavg_ray.analysis.results import ResultsStore
from kavg_ray.config import parse_run
from kavg_ray.launch import console, plans
from kavg_ray.launch.progress import (
    MAX_ERROR_CHARS,
    NO_ERROR_TEXT,
    TrialTracker,
    error_headline,
    failure_reason,
    root_cause,
)
from kavg_ray.launch.sweep import _row, trial_error_text

CFG = parse_run({"name": "s", "workload": {"epochs": 4}, "K": 2, "P": 2})
TID = CFG.trial_name()
# What Tune writes to error.txt for a trial whose worker raised (abridged, same shape).
RAY_ERROR = """Failure # 1 (occurred at 2026-01-01_12-00-00)
ray::ImplicitFunc.train() (pid=4242, ip=127.0.0.1, actor_id=abc)
  File "/x/ray/tune/trainable/trainable.py", line 331, in train
    raise skipped from exception_cause(skipped)
ray.train.ControllerError: Training failed due to controller error:
Worker group is not active. Call WorkerGroup.create() to create a new worker group.
[Rank 1 Traceback]
Traceback (most recent call last):
  File "/x/kavg_ray/train/loop.py", line 120, in run_epochs
    loss_sum, steps = engine.train_epoch(epoch, lr)
RuntimeError: CUDA out of memory on learner 1
"""


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _epoch(e: int, wall: float, **extra) -> dict:
    return {"epoch": e, "test_acc": 0.5 + e / 10, "test_loss": 1.0, "train_loss": 1.0,
            "lr": 0.1, "rounds": e, "comm_time_s": 0.0, "wall_time_s": wall, "samples": e,
            **extra}  # fmt: skip


def _tracker(tmp_path: Path, lines: list[str], now: Clock) -> TrialTracker:
    store = ResultsStore(tmp_path)
    return TrialTracker(store, "s", {TID: CFG}, [TID], echo=lines.append, now=now)


def test_a_restart_is_counted_and_its_cost_measured(tmp_path: Path) -> None:
    now, lines = Clock(), []
    tr = _tracker(tmp_path, lines, now)
    tr.start(TID)
    for e, (t, wall) in enumerate([(5.0, 1.0), (6.0, 2.0)], start=1):
        now.t = t
        tr.result(TID, _epoch(e, wall))
    # The worker group dies in epoch 3, restarts and resumes from the epoch-2 checkpoint:
    # its first report (epoch 3, 1 s of training after the checkpoint's 2 s) comes 30 s
    # after epoch 2's, so the restart cost 29 s that the loop's clock (3 s) leaves out.
    now.t = 36.0
    tr.result(TID, _epoch(3, 3.0, history_before=[_epoch(1, 1.0), _epoch(2, 2.0)]))
    now.t = 37.0
    tr.result(TID, _epoch(4, 4.0))
    row = tr.finish(TID, None, _row)
    assert (row["status"], row["restarts"], row["restart_time_s"]) == ("completed", 1, 29.0)
    assert row["wall_time_s"] == 4.0 and row["error"] == "" and row["error_file"] == ""
    stored = ResultsStore(tmp_path).read_trials("s").iloc[0]
    assert (stored["restarts"], stored["restart_time_s"]) == (1, 29.0)
    assert ResultsStore(tmp_path).read_history("s")["epoch"].tolist() == [1, 2, 3, 4]
    assert "1 restart(s) +29s" in lines[-2]


def test_a_restart_without_checkpoints_starts_over_and_is_counted(tmp_path: Path) -> None:
    now, lines = Clock(), []
    tr = _tracker(tmp_path, lines, now)
    tr.result(TID, _epoch(1, 1.0))
    now.t = 10.0
    tr.result(TID, _epoch(2, 2.0))
    now.t = 25.0
    tr.result(TID, _epoch(1, 1.5))  # epoch 1 again: 25 - 10 - 1.5 s lost
    assert tr.trials[TID].restarts == 1 and tr.trials[TID].restart_time_s == 13.5
    assert [h["epoch"] for h in tr.trials[TID].history] == [1]


def test_a_resumed_sweeps_first_report_is_no_restart(tmp_path: Path) -> None:
    tr = _tracker(tmp_path, [], Clock())
    tr.result(TID, _epoch(3, 3.0, history_before=[_epoch(1, 1.0), _epoch(2, 2.0)]))
    assert tr.trials[TID].restarts == 0
    assert [h["epoch"] for h in tr.trials[TID].history] == [1, 2, 3]


def test_a_failed_trial_carries_its_error_and_where_the_full_text_is(tmp_path: Path) -> None:
    now, lines = Clock(), []
    tr = _tracker(tmp_path, lines, now)
    tr.start(TID)
    tr.result(TID, _epoch(1, 1.0))
    row = tr.finish(TID, RAY_ERROR, _row)
    assert row["status"] == "failed"
    assert row["error"] == "RuntimeError: CUDA out of memory on learner 1"
    assert Path(row["error_file"]) == tmp_path / "s" / "errors" / f"{TID}.txt"
    assert Path(row["error_file"]).read_text() == RAY_ERROR
    assert lines[-2].endswith("error: RuntimeError: CUDA out of memory on learner 1")
    # `kavg results show` gets a short error column because a trial failed.
    out = CliRunner().invoke(cli.main, ["results", "show", "s", "--storage", str(tmp_path)])
    assert out.exit_code == 0, out.output
    header, first = out.stdout.splitlines()[:2]
    assert header.split()[-1] == "error" and "RuntimeError: CUDA out of memory" in first
    assert f"full error texts: {tmp_path}/s/errors/TRIAL.txt" in out.stdout


def test_the_error_is_read_from_tunes_local_file(tmp_path: Path) -> None:
    # Tune calls back before it syncs error.txt to storage: get_error() is None then.
    (tmp_path / "error.txt").write_text(RAY_ERROR)

    class Trial:
        error_file = str(tmp_path / "error.txt")

        def get_error(self) -> None:
            return None

    assert error_headline(trial_error_text(Trial())) == (
        "RuntimeError: CUDA out of memory on learner 1"
    )


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("Traceback (most recent call last):\n  File x\nValueError: bad K\n", "ValueError: bad K"),
        ("ray.exceptions.ActorDiedError: The actor died unexpectedly\n",
         "ray.exceptions.ActorDiedError: The actor died unexpectedly"),
        ("Failure # 1 (occurred at now)\nsomething odd happened\n", "something odd happened"),
        # The last line, whatever it looks like: no pattern picks an earlier one.
        ("ValueError: bad K\n  the worker exited  \n\n", "the worker exited"),
        ("E" * 400, "E" * (MAX_ERROR_CHARS - 3) + "..."),
        ("Failure # 1 (occurred at now)\n", "trial failed (Ray gave no error text)"),
        ("", "trial failed (Ray gave no error text)"),
    ],
)  # fmt: skip
def test_without_an_exception_the_reason_is_the_texts_last_line(text: str, line: str) -> None:
    assert error_headline(text) == line


def test_no_error_or_restart_columns_when_every_trial_went_well(tmp_path: Path) -> None:
    tr = _tracker(tmp_path, [], Clock())
    tr.result(TID, _epoch(4, 4.0))
    tr.finish(TID, None, _row)
    out = CliRunner().invoke(cli.main, ["results", "show", "s", "--storage", str(tmp_path)])
    header = out.stdout.splitlines()[0].split()
    assert "status" in header and not {"error", "restarts", "restart_time_s"} & set(header)
    assert "full error texts" not in out.stdout


def test_progress_json_shows_running_trials(tmp_path: Path) -> None:
    now = Clock()
    tr = _tracker(tmp_path, [], now)
    tr.start(TID)
    now.t = 3.0
    tr.result(TID, _epoch(2, 2.5))
    doc = json.loads((tmp_path / "s" / "progress.json").read_text())
    assert doc["total"] == 1 and doc["finished"] == 0 and doc["elapsed_s"] == 3.0
    # started_s, reported_s: on the sweep's clock (the seconds of elapsed_s).
    assert doc["trials"][TID] == {"status": "running", "epoch": 2, "epochs": 4,
                                  "test_acc": 0.7, "wall_time_s": 2.5, "restarts": 0,
                                  "started_s": 0.0, "reported_s": 3.0}
    tr.finish(TID, None, _row)
    doc = json.loads((tmp_path / "s" / "progress.json").read_text())
    assert doc["finished"] == 1 and doc["trials"][TID]["status"] == "failed"  # 2 of 4 epochs


def test_console_lines_and_eta(tmp_path: Path) -> None:
    now, lines = Clock(), []
    tr = _tracker(tmp_path, lines, now)
    tr.start(TID)
    assert lines == [f"[kavg] start {TID}  (kavg P=2 K=2 seed=0, 4 epochs)"]
    now.t = 65.0
    tr.result(TID, _epoch(4, 60.0))
    tr.finish(TID, None, _row)
    assert lines[1] == f"[kavg] end   {TID}  completed  acc 0.9000  60.0s"
    assert lines[2] == "[kavg] " + "━" * 20 + " 1/1 trials 4/4 epochs elapsed 0:01:05 ETA 0:00:00"
    assert len(lines) == 3


GRID = {c.trial_name(): c for c in (
    parse_run({"name": "s", "workload": {"epochs": 1}, "K": k, "P": 2}) for k in (1, 2, 4, 8)
)}  # fmt: skip


def _run_grid(tr: TrialTracker, now: Clock, ends: list[float]) -> None:
    """Every trial of GRID starts at 0 s; the i-th ends at ``ends[i]`` s."""
    for tid in GRID:
        tr.start(tid)
    for tid, t in zip(GRID, ends, strict=True):
        now.t = t
        tr.result(tid, {"epoch": 1, "test_acc": 0.5, "wall_time_s": t})
        tr.finish(tid, None, _row)


def test_a_stream_that_is_no_terminal_gets_plain_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log, CI or a pipe: no colour and no redrawing, even where the environment asks
    rich for colour; the bar, elapsed time and estimate (the pace so far) after each end."""
    for name, value in {"FORCE_COLOR": "1", "TERM": "xterm-256color", "COLUMNS": "30"}.items():
        monkeypatch.setenv(name, value)
    out, now = io.StringIO(), Clock()
    tr = TrialTracker(ResultsStore(tmp_path), "s", GRID, list(GRID), now=now,
                      echo=lambda line: out.write(line + "\n"))  # fmt: skip
    _run_grid(tr, now, [30.0, 50.0, 80.0, 100.0])
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    k1, k2, k4, k8 = GRID
    assert text.splitlines() == [
        "[kavg] start K1-P2-s0  (kavg P=2 K=1 seed=0, 1 epochs)",
        "[kavg] start K2-P2-s0  (kavg P=2 K=2 seed=0, 1 epochs)",
        "[kavg] start K4-P2-s0  (kavg P=2 K=4 seed=0, 1 epochs)",
        "[kavg] start K8-P2-s0  (kavg P=2 K=8 seed=0, 1 epochs)",
        "[kavg] end   K1-P2-s0  completed  acc 0.5000  30.0s",
        # 1 of 4 in 30 s: 90 s for the other 3.
        "[kavg] " + "━" * 5 + " " * 15 + " 1/4 trials 1/4 epochs elapsed 0:00:30 ETA 0:01:30",
        "[kavg] end   K2-P2-s0  completed  acc 0.5000  50.0s",
        "[kavg] " + "━" * 10 + " " * 10 + " 2/4 trials 2/4 epochs elapsed 0:00:50 ETA 0:00:50",
        "[kavg] end   K4-P2-s0  completed  acc 0.5000  80.0s",
        # 3 in 80 s: 26.7 s for the last, rounded up.
        "[kavg] " + "━" * 15 + " " * 5 + " 3/4 trials 3/4 epochs elapsed 0:01:20 ETA 0:00:27",
        "[kavg] end   K8-P2-s0  completed  acc 0.5000  100.0s",
        "[kavg] " + "━" * 20 + " 4/4 trials 4/4 epochs elapsed 0:01:40 ETA 0:00:00",
    ]
    assert {k1, k2, k4, k8} == set(tr.statuses)


def test_a_piped_sweep_gets_plain_lines_on_stdout_and_nothing_in_the_log(
    tmp_path: Path,
) -> None:
    """The sweep's own path: the tracker's echo is console.quiet's, and stdout a pipe."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from kavg_ray.analysis.results import ResultsStore\n"
        "from kavg_ray.config import parse_run\n"
        "from kavg_ray.launch.console import quiet\n"
        "from kavg_ray.launch.progress import TrialTracker\n"
        "from kavg_ray.launch.sweep import _row\n"
        "cfg = parse_run({'name': 's', 'workload': {'epochs': 1}, 'K': 2, 'P': 2})\n"
        "tid = cfg.trial_name()\n"
        "with quiet(Path(sys.argv[1]) / 'x.log') as echo:\n"
        "    tr = TrialTracker(ResultsStore(Path(sys.argv[1])), 's', {tid: cfg}, [tid],\n"
        "                      echo=echo, now=lambda: 0.0)\n"
        "    tr.start(tid)\n"
        "    tr.finish(tid, 'ValueError: bad K', _row)\n"
    )
    env = {"FORCE_COLOR": "1", "TERM": "xterm-256color", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True, env=env)  # fmt: skip
    assert "\x1b" not in out.stdout and "\r" not in out.stdout and out.stderr == ""
    assert out.stdout.splitlines() == [
        "[kavg] start K2-P2-s0  (kavg P=2 K=2 seed=0, 1 epochs)",
        "[kavg] end   K2-P2-s0  failed  acc nan  nans  error: ValueError: bad K",
        "[kavg] " + "━" * 20 + " 1/1 trials 1/1 epochs elapsed 0:00:00 ETA 0:00:00",
    ]
    assert (tmp_path / "x.log").read_text() == ""


def test_on_a_terminal_the_bar_redraws_below_the_lines(tmp_path: Path) -> None:
    screen, now, echoed = io.StringIO(), Clock(), []
    terminal = Console(file=screen, force_terminal=True, force_interactive=True, width=100,
                       color_system=None)  # fmt: skip
    tr = TrialTracker(ResultsStore(tmp_path), "s", GRID, list(GRID), echo=echoed.append,
                      now=now, console=terminal)  # fmt: skip
    _run_grid(tr, now, [30.0, 50.0, 80.0, 100.0])
    shown = screen.getvalue()
    assert echoed == []  # the terminal console has every line
    # Redrawn in place (carriage return, erase the line), the cursor hidden meanwhile and
    # shown again at the end, below the bar's last state.
    assert shown.startswith("[kavg] start K1-P2-s0  (kavg P=2 K=1 seed=0, 1 epochs)\n\x1b[?25l")
    assert shown.endswith(
        "[kavg] " + "━" * 20 + " 4/4 trials 4/4 epochs elapsed 0:01:40 ETA 0:00:00\n\x1b[?25h"
    )
    # What stays on the screen: each redraw starts on a line it erased first.
    kept = [ln for part in shown.split("\r\x1b[2K") for ln in part.splitlines()[:-1]]
    assert [ln for ln in kept if not ln.startswith("[kavg] ━")] == [
        *(f"[kavg] start {t}  (kavg P=2 K={GRID[t].period} seed=0, 1 epochs)" for t in GRID),
        *(f"[kavg] end   {t}  completed  acc 0.5000  {s:.1f}s"
          for t, s in zip(GRID, [30.0, 50.0, 80.0, 100.0], strict=True)),
    ]  # fmt: skip
    assert not tr.display.progress.live.is_started


def test_quiet_sends_all_output_but_kavgs_lines_to_the_log(tmp_path: Path) -> None:
    """Python prints, logging and writes to fds 1 and 2 (as Ray's C++ core and forwarded
    worker logs do) land in the log; only the echo reaches the terminal."""
    code = (
        "import logging, os, sys\n"
        "from pathlib import Path\n"
        "from kavg_ray.launch.console import quiet\n"
        "print('before')\n"
        "with quiet(Path(sys.argv[1])) as echo:\n"
        "    echo('[kavg] mine')\n"
        "    print('a Tune table'); logging.getLogger('ray').error('PreemptionWatcher')\n"
        "    os.write(1, b'worker log\\n'); os.write(2, b'core warning\\n')\n"
        "print('after'); print('err after', file=sys.stderr)\n"
    )
    log = tmp_path / "x.log"
    out = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.splitlines() == ["before", "[kavg] mine", "after"]
    assert out.stderr.splitlines() == ["err after"]
    assert log.read_text().splitlines() == [
        "a Tune table", "PreemptionWatcher", "worker log", "core warning"
    ]


def test_sweep_status_shows_the_running_trials(tmp_path: Path) -> None:
    cfgs = {c.trial_name(): c for c in (CFG, parse_run({"name": "s", "K": 4, "P": 2}))}
    now = Clock()
    tr = TrialTracker(ResultsStore(tmp_path), "s", cfgs, list(cfgs), echo=lambda _: None,
                      now=now)  # fmt: skip
    first, second = cfgs
    tr.start(first)
    tr.start(second)
    tr.result(first, _epoch(3, 3.0))
    args = ["sweep", "status", "s", "--storage", str(tmp_path)]
    lines = CliRunner().invoke(cli.main, args).stdout.splitlines()
    assert lines[0] == "sweep 's': 0/? trials finished"
    assert lines[1].startswith(f"running: {first}  epoch 3/4, test accuracy 0.8000  (last report")
    assert lines[2].startswith(f"running: {second}  starting (10 epochs)")
    tr.result(first, _epoch(4, 4.0))
    tr.finish(first, None, _row)
    lines = CliRunner().invoke(cli.main, args).stdout.splitlines()
    assert lines[0] == "sweep 's': 1/? trials finished (1 completed)"
    assert [ln.split()[1] for ln in lines if ln.startswith("running:")] == [second]


def test_the_tracker_pickles_without_its_terminal(tmp_path: Path) -> None:
    """Tune pickles its callbacks with the experiment's state; an echo to the terminal
    (a file object) cannot be pickled, and the sweep died there before it was dropped."""
    with open(tmp_path / "terminal", "w") as terminal:
        tr = TrialTracker(ResultsStore(tmp_path), "s", {TID: CFG}, [TID],
                          echo=lambda line: terminal.write(line))  # fmt: skip
        tr.start(TID)
        copy = pickle.loads(pickle.dumps(tr))
    assert copy.trials[TID].status == "running" and copy.echo("x") is None


def test_the_tracker_pickles_without_its_terminal_console(tmp_path: Path) -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, force_interactive=True)
    tr = TrialTracker(ResultsStore(tmp_path), "s", {TID: CFG}, [TID], console=terminal)
    tr.start(TID)
    copy = pickle.loads(pickle.dumps(tr))
    assert copy.display.console is None and copy.display.live is False
    assert copy.display.echo("x") is None and copy.trials[TID].status == "running"
    tr.close()
    assert not tr.display.progress.live.is_started


# ----------------------------------------------------------- the reason of a failure


def _raise(exc: Exception) -> Exception:
    """``exc`` raised and caught, so that it has a traceback as a worker's has."""
    try:
        raise exc
    except Exception as caught:
        return caught


def _task_error(cause: BaseException, function: str = "ImplicitFunc.train") -> RayTaskError:
    """A RayTaskError as the actor that ran ``function`` hands it back to the driver."""
    tb = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
    return RayTaskError(function, tb, cause, proctitle=f"ray::{function}", pid=4242,
                        ip="127.0.0.1")  # fmt: skip


def _tune_error(cause: BaseException) -> BaseException:
    """What Tune gets when a trial's trainer.fit() raised a Ray Train failure: the actor
    task's RayTaskError, as the type that is both it and its cause."""
    return _task_error(cause).as_instanceof_cause()


def _from(outer: Exception, inner: Exception | None) -> Exception:
    try:
        raise outer from inner
    except Exception as caught:
        return caught


def _during(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception:  # outer is raised while handling inner
            raise outer  # noqa: B904 - the implicit chain is what this builds
    except Exception as caught:
        return caught


def _worker_failed(rank_errors: dict[int, BaseException]) -> BaseException:
    return _tune_error(WorkerGroupError("workers failed", rank_errors))


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        # A worker's exception, in Ray Train's WorkerGroupError, in Tune's RayTaskError.
        (_worker_failed({0: _raise(ValueError("bad K"))}), "ValueError: bad K"),
        # Several ranks failed: the lowest rank's.
        (_worker_failed({1: _raise(RuntimeError("CUDA out of memory on learner 1")),
                         0: _raise(ValueError("bad K"))}), "ValueError: bad K"),
        # The worker's own exception still wrapped with its traceback text.
        (_worker_failed({0: UserExceptionWithTraceback(KeyError("lr"), "Traceback ...")}),
         "KeyError: 'lr'"),
        # The controller failed: the first line of its failure's message.
        (_tune_error(ControllerError(RuntimeError(
            "Worker group is not active.\nCall WorkerGroup.create() first."))),
         "RuntimeError: Worker group is not active."),
        (_tune_error(WorkerHealthCheckFailedError(
            "health check failed", _task_error(_raise(OSError("node 10.0.0.2 died")),
                                               "RayTrainWorker.poll_status"))),
         "OSError: node 10.0.0.2 died"),
        (_from(ValueError("no lr in the config"), None), "ValueError: no lr in the config"),
        # No message: the type alone; a long one capped.
        (_tune_error(_raise(MemoryError())), "MemoryError"),
        (ValueError("x" * 400), "ValueError: " + "x" * (MAX_ERROR_CHARS - 15) + "..."),
    ],
)  # fmt: skip
def test_the_reason_is_the_innermost_exception_of_the_chain(
    exc: BaseException, reason: str
) -> None:
    assert failure_reason(exc) == reason
    # As Tune stores it (pickled), and reads it back: the chain Ray keeps survives.
    assert failure_reason(cloudpickle.loads(cloudpickle.dumps(exc))) == reason


@pytest.mark.parametrize(
    ("exc", "reason", "pickled"),
    [
        (_tune_error(_from(RuntimeError("epoch 3 failed"), OSError(28, "No space left"))),
         "OSError: [Errno 28] No space left", "RuntimeError: epoch 3 failed"),
        (_during(ValueError("no lr in the config"), KeyError("lr")), "KeyError: 'lr'",
         "ValueError: no lr in the config"),
    ],
)  # fmt: skip
def test_pythons_chains_are_followed_where_pickling_kept_them(
    exc: BaseException, reason: str, pickled: str
) -> None:
    """``raise ... from`` and raising while handling: followed in this process; pickling
    (how Ray moves exceptions between processes) drops ``__cause__`` and ``__context__``,
    so there the reason is the exception Ray's wrapper holds."""
    assert failure_reason(exc) == reason
    assert failure_reason(cloudpickle.loads(cloudpickle.dumps(exc))) == pickled


def test_a_cycle_in_the_chain_ends_the_walk() -> None:
    first, second = ValueError("a"), KeyError("b")
    first.__cause__, second.__cause__ = second, first
    assert root_cause(first) is second and failure_reason(first) == "KeyError: 'b'"


def test_the_exception_decides_the_reason_and_the_text_is_kept(tmp_path: Path) -> None:
    tr = _tracker(tmp_path, [], Clock())
    exc = _worker_failed({0: _raise(ValueError("bad K"))})
    row = tr.finish(TID, RAY_ERROR, _row, exc)
    # The text's last line names another error: the exception wins, the text is saved.
    assert (row["status"], row["error"]) == ("failed", "ValueError: bad K")
    assert Path(row["error_file"]).read_text() == RAY_ERROR


def test_without_error_text_the_exceptions_own_is_saved(tmp_path: Path) -> None:
    tr = _tracker(tmp_path, [], Clock())
    exc = _from(RuntimeError("epoch 3 failed"), _raise(OSError(28, "No space left")))
    row = tr.finish(TID, "", _row, exc)
    assert row["error"] == "OSError: [Errno 28] No space left"
    assert Path(row["error_file"]).read_text() == "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__)
    )


def test_a_failure_with_neither_text_nor_exception_says_so(tmp_path: Path) -> None:
    row = _tracker(tmp_path, [], Clock()).finish(TID, "", _row)
    assert (row["status"], row["error"]) == ("failed", NO_ERROR_TEXT)
    assert Path(row["error_file"]).read_text() == NO_ERROR_TEXT + "\n"


def _failed_trial(tmp_path: Path, pickled: bytes | None, stored: BaseException | None = None
                  ) -> SimpleNamespace:  # fmt: skip
    """A failed Tune trial as the callback sees it: Tune's error.txt and error.pkl in its
    local folder (``pickled`` None: no error.pkl), ``stored``: the copy in storage."""
    (tmp_path / "error.txt").write_text(RAY_ERROR)
    pkl = tmp_path / "error.pkl"
    if pickled is not None:
        pkl.write_bytes(pickled)
    return SimpleNamespace(
        trial_id="t0", config={"trial": {"trial_id": TID}}, error_file=str(tmp_path / "error.txt"),
        pickled_error_file=str(pkl), get_pickled_error=lambda: stored,
        get_error=lambda: None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("local", "ValueError: bad K"),
        ("storage", "ValueError: bad K"),
        # Unreadable (truncated): the last line of error.txt.
        ("broken", "RuntimeError: CUDA out of memory on learner 1"),
    ],
)
def test_the_callback_reads_the_exception_tune_pickled(
    tmp_path: Path, source: str, reason: str
) -> None:
    exc = _worker_failed({0: _raise(ValueError("bad K"))})
    pickled = {"local": cloudpickle.dumps(exc), "storage": None,
               "broken": cloudpickle.dumps(exc)[:40]}[source]  # fmt: skip
    trial = _failed_trial(tmp_path, pickled, exc if source == "storage" else None)
    tracker = _tracker(tmp_path, [], Clock())
    cb = plans.make_callback(tracker, _row, {}, trial_error_text)
    cb.on_trial_start(0, [], trial)
    cb.on_trial_error(0, [], trial)
    (row,) = ResultsStore(tmp_path).read_trials("s").to_dict("records")
    assert (row["status"], row["error"]) == ("failed", reason)
    assert Path(row["error_file"]).read_text() == RAY_ERROR


def test_a_live_bar_only_on_a_terminal(tmp_path: Path) -> None:
    import pty

    from kavg_ray.launch.console import rich_console

    with console.quiet(tmp_path / "log.txt") as say:  # pytest's stdout: no terminal
        assert rich_console(say) is None
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as tty:
        say.terminal = tty  # type: ignore[attr-defined]
        live = rich_console(say)
        assert live is not None and live.is_terminal and live.file is tty
    os.close(leader)


def _status_lines(tmp_path: Path) -> list[str]:
    args = ["sweep", "status", "s", "--storage", str(tmp_path)]
    return CliRunner().invoke(cli.main, args).stdout.splitlines()


def test_sweep_status_says_packed_points_train_before_their_first_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pack reports after its first epoch: until then its points train, not 'start'.
    Each line's age is its own: since its start, then since its last report."""
    cfgs = {c.trial_name(): c for c in (
        parse_run({"name": "s", "workload": {"epochs": 3}, "K": k, "P": 2,
                   "backend": "simulated"}) for k in (1, 4)
    )}  # fmt: skip
    now = Clock()
    tr = TrialTracker(ResultsStore(tmp_path), "s", cfgs, list(cfgs), echo=lambda _: None,
                      now=now)  # fmt: skip
    cb = plans.make_callback(tr, _row, {}, lambda t: "")
    (pack,) = plans.plan_packs(list(cfgs.values()), budget_bytes=2**40)
    entry = plans.pack_entry(0, pack)
    trial = SimpleNamespace(trial_id="t0", config={"trial": entry})
    cb.on_trial_start(0, [], trial)
    # The sweep's clock: progress.json was written 35 s after the pack started, and it is
    # read 10 s after that.
    now.t = 35.0
    tr.write_progress()
    written = json.loads((tmp_path / "s" / "progress.json").read_text())["updated_unix"]
    monkeypatch.setattr("time.time", lambda: written + 10.0)
    k1, k4 = cfgs
    assert _status_lines(tmp_path)[1:3] == [
        f"running: {k1}  packed in pack0-P2-2pts: training (first epoch not reported yet)  "
        "(started 45 s ago)",
        f"running: {k4}  packed in pack0-P2-2pts: training (first epoch not reported yet)  "
        "(started 45 s ago)",
    ]
    now.t = 40.0
    cb.on_trial_result(0, [], trial, {**_epoch(1, 40.0), "point": k1, "point_done": False})
    written = json.loads((tmp_path / "s" / "progress.json").read_text())["updated_unix"]
    monkeypatch.setattr("time.time", lambda: written + 2.0)
    assert _status_lines(tmp_path)[1] == (
        f"running: {k1}  epoch 1/3, test accuracy 0.6000, packed in pack0-P2-2pts  "
        "(last report 2 s ago)"
    )


def test_sweep_status_of_an_epoch_without_accuracy(tmp_path: Path) -> None:
    """A regression task (or a diverged epoch) has no finite accuracy: the line says the
    epoch without one (it used to raise on None)."""
    tr = _tracker(tmp_path, [], Clock())
    tr.start(TID)
    tr.result(TID, _epoch(2, 2.0, test_acc=float("nan")))
    assert _status_lines(tmp_path)[1].startswith(f"running: {TID}  epoch 2/4  (last report ")


def test_sweep_status_reads_an_older_progress_file(tmp_path: Path) -> None:
    """progress.json of a sweep started before trials carried their times: the sweep's
    last report age, as before."""
    ResultsStore(tmp_path).write_progress("s", {
        "updated_unix": 0.0, "total": 1, "finished": 0, "elapsed_s": 5.0,
        "trials": {TID: {"status": "running", "epoch": None, "epochs": 4, "test_acc": None,
                         "wall_time_s": None, "restarts": 0}},
    })  # fmt: skip
    line = _status_lines(tmp_path)[1]
    assert line.startswith(f"running: {TID}  starting (4 epochs)  (last report ") and (
        line.endswith(" s ago)")
    )


def test_sweep_status_counts_a_step_budget_in_steps(tmp_path: Path) -> None:
    """A step budget's trial: "starting (150 steps)", then its last evaluated step."""
    cfg = parse_run({"name": "s", "K": 2, "P": 2, "workload": {
        "dataset": "text", "model": "gpt", "steps": 150, "eval_every_steps": 50}})
    tid = cfg.trial_name()
    tr = TrialTracker(ResultsStore(tmp_path), "s", {tid: cfg}, [tid], echo=lambda _: None,
                      now=Clock())  # fmt: skip
    tr.start(tid)
    assert _status_lines(tmp_path)[1].startswith(f"running: {tid}  starting (150 steps)")
    tr.result(tid, _epoch(1, 1.0, epoch=0.46, step=50))
    assert _status_lines(tmp_path)[1].startswith(
        f"running: {tid}  step 50/150, test accuracy 0.6000"
    )
