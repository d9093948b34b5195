"""What a sweep's driver keeps and says about its trials, fed by the Tune callback.

:class:`TrialTracker` turns the per-epoch reports of each trial into its history, counts
the restarts of its worker group and what they cost, writes the trial's row when it ends
(with the real error of a failed one), keeps ``<sweep>/progress.json`` current for
``kavg sweep status``, and prints one line when a trial starts and one when it ends, with a
bar over the grid, the elapsed time and an estimate of the time left (``rich.progress``).
Output that is no terminal (a log, CI, a pipe) gets plain lines: no colour, no redrawing.

The bar and its estimate count **work**: epochs (a step budget's trials: steps) done against
those planned across the sweep's trials, so that a pack, whose points all end together,
moves the bar at each of its evaluations. A trial's work done is its last reported epoch
(step), or all of its budget once it ended (whatever its status). The estimate of the time
left is the pace so far: elapsed x (planned - done) / done (:func:`eta_seconds`). A pack
prints one line per evaluation its points have all reported (:meth:`TrialTracker.pack_line`),
before its last: the points still training and their range of test accuracy.

A failed trial's reason is the innermost exception of the chain Ray hands back (Tune's
pickled error: a ``RayTaskError`` around Ray Train's ``WorkerGroupError`` around what a
worker raised), as ``TypeName: first line``; only a trial without an exception object gets
the last line of its error text.

Restarts: when Ray Train restarts a trial's worker group, the run resumes from its last
checkpoint and its own clock (``wall_time_s``) resumes from the checkpoint's, so the loop's
wall time leaves the restart out. The driver measures it: ``restart_time_s`` is the time
between the last report before the failure and the first after the restart, less the
training that first report covers, summed over the trial's ``restarts``. It includes
detecting the failure, starting the new workers, loading the checkpoint and the training
lost since it. ``wall_time_s`` stays the loop's time; add the two for the trial's time.

Imports no Ray: the Tune callback in :mod:`kavg_ray.launch.sweep` calls it.
"""

from __future__ import annotations

import io
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kavg_ray.analysis.results import ResultsStore
from kavg_ray.config import RunConfig
from kavg_ray.metrics import HISTORY_BEFORE, HISTORY_KEYS, is_finite_number


def history_row(report: dict) -> dict:
    """The history.parquet fields of one report (``diverged`` kept for the status)."""
    return {k: report[k] for k in (*HISTORY_KEYS, "diverged") if k in report}


ERRORS_DIR = "errors"
MAX_ERROR_CHARS = 300
NO_ERROR_TEXT = "trial failed (Ray gave no error text)"
# Where Ray keeps the exception it wraps: ControllerError, WorkerHealthCheckFailedError,
# UserExceptionWithTraceback (Ray Train V2) and RayTaskError (the actor task Tune ran).
# Unpickled exceptions lose __cause__ and __context__, these attributes they keep.
_WRAPPED_ATTRS = ("controller_failure", "health_check_failure", "_base_exc", "cause")


def _wrapped(exc: BaseException) -> BaseException | None:
    """The exception that ``exc`` wraps or was raised from, None for the innermost."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        # Ray Train's WorkerGroupError, one exception per failed rank: the lowest rank's
        # (which rank's comes first in Ray's own text is not specified).
        return failures[min(failures)]
    for name in _WRAPPED_ATTRS:
        inner = getattr(exc, name, None)
        if isinstance(inner, BaseException) and inner is not exc:
            return inner
    if exc.__cause__ is not None:
        return exc.__cause__
    return None if exc.__suppress_context__ else exc.__context__


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of ``exc``'s chain (Ray's wrappers and Python's)."""
    seen = {id(exc)}
    while (inner := _wrapped(exc)) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def failure_reason(exc: BaseException) -> str:
    """``TypeName: first line of the message`` of ``exc``'s innermost exception."""
    root = root_cause(exc)
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    name = type(root).__name__
    return _cap(f"{name}: {lines[0]}" if lines else name)


def error_headline(text: str) -> str:
    """The reason in an error text, for a trial without an exception object: its last
    line (Tune's ``Failure # n`` headers left out)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Failure # ")]
    return _cap(lines[-1]) if lines else NO_ERROR_TEXT


def _cap(line: str) -> str:
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def _exception_text(exc: BaseException) -> str:
    """The full text of ``exc`` with its chain, for the errors file when Tune wrote none."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def eta_seconds(elapsed: float, done: float, total: float) -> float | None:
    """Seconds left at the pace so far: ``elapsed * (total - done) / done``; 0 once all is
    done, None (unknown) before any work is."""
    if done >= total:
        return 0.0
    if done <= 0 or elapsed <= 0:
        return None
    return elapsed * (total - done) / done


def format_eta(seconds: float | None) -> str:
    """``H:MM:SS``, rounded up (rich's style); ``-:--:--`` when unknown."""
    if seconds is None:
        return "-:--:--"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes // 60:d}:{minutes % 60:02d}:{secs:02d}"


def _amount(x: float) -> str:
    return f"{x:g}" if x != int(x) else str(int(x))


class _Display:
    """Where the tracker's lines go, and the grid's bar over the work planned (epochs or
    steps), the trials ended, the elapsed time and the estimate of the time left, kept by
    a ``rich.progress.Progress``.

    ``console`` None: every line (the bar's too, after each trial's end and each pack's
    evaluation) goes to ``echo`` as plain text. ``console`` on a terminal: lines print
    above a bar that redraws there.
    """

    def __init__(
        self, echo: Callable[[str], None], console: Console | None, total: int,
        now: Callable[[], float], work: float = 0.0, unit: str = "epochs",
    ) -> None:  # fmt: skip
        self.echo, self.console, self.now, self.unit = echo, console, now, unit
        self.started = now()
        # Rich's own test for a terminal that can redraw (a dumb one cannot).
        self.live = console is not None and console.is_interactive
        self.progress = Progress(
            TextColumn("[kavg]", markup=False), BarColumn(bar_width=20),
            TextColumn("{task.fields[trials]}", markup=False),
            TextColumn("{task.fields[work]}", markup=False), TextColumn("elapsed"),
            TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}", markup=False),
            console=console if self.live else _plain_console(), auto_refresh=False,
            # Ray's output goes to the log through fds 1 and 2: rich must not take it.
            redirect_stdout=False, redirect_stderr=False, get_time=now,
        )  # fmt: skip
        self.task = self.progress.add_task(
            "trials", total=work or 1, trials=f"0/{total} trials",
            work=f"0/{_amount(work)} {unit}", eta=format_eta(None),
        )  # fmt: skip

    def line(self, text: str) -> None:
        """One line above the bar (on a terminal) or to ``echo``."""
        if self.console is None:
            self.echo(text)
        else:
            # Whole lines as they are: no markup ("[kavg]"), no colouring, no wrapping.
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def update(self, done: int, total: int, work_done: float, work: float, *,
               show: bool) -> None:  # fmt: skip
        """The bar at ``work_done`` of ``work`` (``done`` of ``total`` trials ended);
        ``show``: a line of it too when not live."""
        eta = eta_seconds(self.now() - self.started, work_done, work)
        self.progress.update(
            self.task, total=work or 1, completed=work_done if work else done >= total,
            trials=f"{done}/{total} trials",
            work=f"{_amount(work_done)}/{_amount(work)} {self.unit}", eta=format_eta(eta),
        )  # fmt: skip
        if self.live:
            if done < total:
                self.progress.start()
            self.progress.refresh()
            if done >= total:
                self.close()
        elif show:
            self.line(self.bar_text())

    def bar_text(self) -> str:
        """The bar, elapsed time and estimate as one plain line."""
        out = _plain_console()
        out.print(self.progress.get_renderable())
        return out.file.getvalue().rstrip()

    def close(self) -> None:
        """Ends a live bar (it stays, with the cursor shown again); nothing otherwise."""
        if self.progress.live.is_started:
            self.progress.stop()


def _plain_console() -> Console:
    """A console that renders to a string without colour or control codes, whatever the
    environment says (FORCE_COLOR, COLUMNS)."""
    return Console(file=io.StringIO(), width=200, color_system=None, force_terminal=False,
                   force_jupyter=False, force_interactive=False, legacy_windows=False)  # fmt: skip


class _Trial:
    """The driver's view of one trial."""

    pack: str | None = None  # the pack trial it trains in (packed points)
    pack_points: int = 1  # the points of that pack (its row's pack_points)
    started_s: float | None = None  # on the sweep's clock (seconds since it started)
    reported_s: float | None = None  # its last report, on the sweep's clock

    def __init__(self) -> None:
        self.history: list[dict] = []
        self.last_arrival: float | None = None
        self.restarts = 0
        self.restart_time_s = 0.0
        self.status = "pending"


class TrialTracker:
    """The trials of one sweep run as the driver sees them (see the module's docstring)."""

    def __init__(
        self,
        store: ResultsStore,
        sweep: str,
        configs: dict[str, RunConfig],
        todo: list[str],
        *,
        echo: Callable[[str], None] = print,
        epoch_lines: bool = False,
        trial_lines: bool = True,
        now: Callable[[], float] = time.monotonic,
        console: Console | None = None,
    ) -> None:
        """``echo`` gets each line as plain text; ``console``, a rich console on the
        terminal, gets them instead, above a bar that redraws (see :class:`_Display`)."""
        self.store, self.sweep, self.configs = store, sweep, configs
        self.echo, self.epoch_lines, self.trial_lines, self.now = (
            echo, epoch_lines, trial_lines, now
        )  # fmt: skip
        self.trials = {tid: _Trial() for tid in todo}
        self.statuses: dict[str, str] = {}
        self.started = now()
        self.done = 0
        self.pack_shown: dict[str, float] = {}  # a pack's last evaluation printed
        self.display = self._new_display(echo, console)

    def _new_display(self, echo: Callable[[str], None], console: Console | None) -> _Display:
        units = {work_unit(self.configs[t]) for t in self.trials}
        unit = units.pop() if len(units) == 1 else "epochs and steps"
        return _Display(echo, console, len(self.trials), self.now, self.work()[1], unit)

    def work(self) -> tuple[float, float]:
        """(done, planned): epochs (steps of a step budget) over this run's trials; an
        ended trial counts its whole budget."""
        done = planned = 0.0
        for tid, trial in self.trials.items():
            cfg = self.configs[tid]
            budget = float(work_budget(cfg))
            planned += budget
            done += budget if tid in self.statuses else min(budget, _work_of(trial, cfg))
        return done, planned

    def _show(self, *, show: bool) -> None:
        """The bar at the work done so far (``show``: a line of it when not live)."""
        done, planned = self.work()
        self.display.update(self.done, len(self.trials), done, planned, show=show)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks, and with them this tracker, into the experiment's
        # state: the echo and the display (they may hold the terminal) stay out of that
        # copy, which says nothing.
        return {**self.__dict__, "echo": _silent, "display": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.display = self._new_display(_silent, None)

    def close(self) -> None:
        """Ends a live bar (kavg_ray.launch.sweep does when Tune returns, however it ends)."""
        self.display.close()

    # ----------------------------------------------------------------- events

    def start(self, tid: str, pack: str | None = None) -> None:
        """``tid`` began, alone or as a point of the pack trial ``pack``."""
        trial = self.trials.setdefault(tid, _Trial())
        trial.status = "running"
        trial.pack, trial.started_s = pack, self.now() - self.started
        if self.trial_lines:
            cfg = self.configs[tid]
            self.display.line(
                f"[kavg] start {tid}  ({cfg.algorithm} P={cfg.P} K={cfg.period} "
                f"seed={cfg.seed}, {_budget_words(cfg)})"
            )
            self._show(show=False)
        self.write_progress()

    def start_pack(self, pack: str, tids: list[str]) -> None:
        """The pack trial ``pack`` began, with its points ``tids``: one line for them all."""
        lines, self.trial_lines = self.trial_lines, False
        try:
            for tid in tids:
                self.start(tid, pack=pack)
        finally:
            self.trial_lines = lines
        for tid in tids:
            self.trials[tid].pack_points = len(tids)
        if lines:
            cfgs = [self.configs[t] for t in tids]

            def values(f: Callable[[RunConfig], Any]) -> str:
                return ",".join(str(v) for v in sorted({f(c) for c in cfgs}))

            self.display.line(
                f"[kavg] start {pack}  ({len(tids)} points: {values(lambda c: c.algorithm)} "
                f"P={cfgs[0].P} K={values(lambda c: c.period)} "
                f"seed={values(lambda c: c.seed)}, {_budget_words(cfgs[0])})"
            )
            self._show(show=False)

    def result(self, tid: str, result: dict) -> None:
        """One report of a trial: its history so far, and a restart if it is one."""
        if "epoch" not in result:
            return
        trial = self.trials.setdefault(tid, _Trial())
        trial.status = "running"
        arrival = self.now()
        before = result.get(HISTORY_BEFORE)
        # A report after others that carries earlier epochs, or repeats one, comes from a
        # restarted worker group (a resumed sweep's first report carries them too).
        restarted = bool(trial.history) and (
            before is not None or result["epoch"] <= trial.history[-1]["epoch"]
        )
        if restarted and trial.last_arrival is not None:
            resumed_wall = before[-1].get("wall_time_s", 0.0) if before else 0.0
            trained = max(0.0, float(result.get("wall_time_s", 0.0)) - resumed_wall)
            trial.restarts += 1
            trial.restart_time_s += max(0.0, arrival - trial.last_arrival - trained)
        if before:
            # A run resumed from a checkpoint: its earlier epochs come with it.
            trial.history[:] = [history_row(h) for h in before]
        # A restarted worker group re-reports from its checkpoint: keep the latest.
        trial.history[:] = [r for r in trial.history if r["epoch"] < result["epoch"]]
        trial.history.append(history_row(result))
        trial.last_arrival = arrival
        trial.reported_s = arrival - self.started
        if self.epoch_lines:
            from kavg_ray.train.loop import format_progress

            self.display.line(format_progress(self.configs[tid], result))
        if self.trial_lines:
            # A live bar moves on with each report; a pack's evaluation gets its line.
            line = self.pack_line(trial.pack) if trial.pack is not None else None
            if line:
                self.display.line(line)
            self._show(show=line is not None)
        self.write_progress()

    def pack_line(self, pack: str) -> str | None:
        """The line of the pack trial ``pack`` once every point of it still training has
        reported an evaluation not yet printed, before its last (the points' end lines say
        that one); None otherwise."""
        tids = [t for t, tr in self.trials.items() if tr.pack == pack]
        open_ = [t for t in tids if t not in self.statuses]
        if not open_:
            return None
        cfg = self.configs[open_[0]]
        reached = min(_work_of(self.trials[t], self.configs[t]) for t in open_)
        if reached <= self.pack_shown.get(pack, 0.0) or reached >= work_budget(cfg):
            return None
        self.pack_shown[pack] = reached
        lasts = {t: self.trials[t].history[-1] for t in open_}
        where = f"{work_unit(cfg)[:-1]} {_amount(reached)}/{work_budget(cfg)}"
        accs = {t: h["test_acc"] for t, h in lasts.items() if is_finite_number(h.get("test_acc"))}
        line = f"[kavg] {pack}  {where}  {len(open_)} of {len(tids)} points training"
        if accs:
            best = max(accs, key=lambda t: (accs[t], -open_.index(t)))
            line += (f"  test accuracy {min(accs.values()):.4f} to {accs[best]:.4f} "
                     f"(best {best})")  # fmt: skip
        return line

    def finish(
        self, tid: str, error_text: str | None, row_fn: Callable[..., dict],
        exception: BaseException | None = None,
    ) -> dict:  # fmt: skip
        """Write the trial's row; returns the row. A failed trial has an ``error_text``
        (Tune's error file, may be empty) or an ``exception``, or both; the row's error is
        the exception's reason (:func:`failure_reason`), else the text's last line."""
        trial = self.trials.setdefault(tid, _Trial())
        cfg = self.configs[tid]
        failed = error_text is not None or exception is not None
        error, error_file = self._failure(tid, error_text, exception) if failed else ("", "")
        row = row_fn(self.sweep, tid, cfg, trial.history, error=error, failed=failed)
        row.update(restarts=trial.restarts, restart_time_s=round(trial.restart_time_s, 3),
                   error_file=error_file)  # fmt: skip
        if trial.pack is not None:  # its wall and compute times are the pack's
            row["pack_points"] = trial.pack_points
        hist_rows = [
            {"sweep": self.sweep, "trial_id": tid, **{k: h.get(k) for k in HISTORY_KEYS}}
            for h in trial.history
        ]
        self.store.upsert_trial(self.sweep, row, hist_rows)
        trial.status = self.statuses[tid] = row["status"]
        self.done += 1
        if self.trial_lines:
            self.display.line(self._end_line(tid, row))
            # A pack's points end together: its bar line once the last has.
            pack = trial.pack
            self._show(show=pack is None or all(
                t in self.statuses for t, tr in self.trials.items() if tr.pack == pack))
        self.write_progress()
        return row

    def _failure(
        self, tid: str, error_text: str | None, exception: BaseException | None
    ) -> tuple[str, str]:
        """A failed trial's reason, and the file its full error text is saved in."""
        text = error_text or (_exception_text(exception) if exception else "") or NO_ERROR_TEXT
        reason = failure_reason(exception) if exception is not None else error_headline(text)
        return reason, str(self._save_error(tid, text))

    # ----------------------------------------------------------------- output

    def _end_line(self, tid: str, row: dict) -> str:
        acc = row.get("final_test_acc", math.nan)
        restarts = f", {row['restarts']} restart(s) +{row['restart_time_s']:.0f}s" if row[
            "restarts"] else ""  # fmt: skip
        head = (
            f"[kavg] end   {tid}  {row['status']}  acc {acc:.4f}  "
            f"{row.get('wall_time_s', math.nan):.1f}s{restarts}"
        )
        if row.get("error"):
            head += f"  error: {row['error']}"
        return head

    def _save_error(self, tid: str, text: str) -> Path:
        """The full error text, in ``<sweep>/errors/<trial>.txt`` (the row names it)."""
        folder = self.store.sweep_dir(self.sweep) / ERRORS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{tid}.txt"
        path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        return path

    def write_progress(self) -> None:
        """``<sweep>/progress.json``: every trial of this run, its status and last epoch;
        when it started and last reported (``started_s``, ``reported_s``: seconds on the
        sweep's clock, as ``elapsed_s``) and, for a packed point, its pack trial."""
        trials = {}
        for tid, trial in self.trials.items():
            last = trial.history[-1] if trial.history else {}
            trials[tid] = {
                "status": trial.status,
                "epoch": last.get("epoch"),
                "epochs": self.configs[tid].workload.epochs,
                "test_acc": _finite_or_none(last.get("test_acc")),
                "wall_time_s": _finite_or_none(last.get("wall_time_s")),
                "restarts": trial.restarts,
                "started_s": _rounded(trial.started_s),
                "reported_s": _rounded(trial.reported_s),
            }
            if trial.pack is not None:
                trials[tid]["pack"] = trial.pack
            wl = self.configs[tid].workload
            if wl.step_budget:  # its last evaluated step, of how many
                trials[tid].update(step=last.get("step"), steps=wl.steps)
        done, planned = self.work()
        elapsed = self.now() - self.started
        eta = eta_seconds(elapsed, done, planned)
        self.store.write_progress(self.sweep, {
            "updated_unix": time.time(), "total": len(self.trials), "finished": self.done,
            "elapsed_s": round(elapsed, 3), "trials": trials,
            "work": {"done": done, "planned": planned, "unit": self.display.unit},
            "eta_s": None if eta is None else round(eta, 3),
        })  # fmt: skip


def _budget_words(cfg: RunConfig) -> str:
    wl = cfg.workload
    return f"{wl.steps} steps" if wl.step_budget else f"{wl.epochs} epochs"


def work_unit(cfg: RunConfig) -> str:
    """What a trial's work is counted in: ``steps`` for a step budget, else ``epochs``."""
    return "steps" if cfg.workload.step_budget else "epochs"


def work_budget(cfg: RunConfig) -> int:
    """A trial's planned work: its steps (step budget) or epochs."""
    wl = cfg.workload
    return int(wl.steps) if wl.step_budget else int(wl.epochs)


def _work_of(trial: _Trial, cfg: RunConfig) -> float:
    """A running trial's work done: its last reported step (step budget) or epoch."""
    if not trial.history:
        return 0.0
    value = trial.history[-1].get("step" if cfg.workload.step_budget else "epoch")
    return float(value) if is_finite_number(value) else 0.0


def _silent(line: str) -> None:
    """The echo of an unpickled tracker (Tune's saved experiment state)."""


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _finite_or_none(x: Any) -> float | None:
    return float(x) if is_finite_number(x) else None
