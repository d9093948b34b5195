"""What a sweep's driver keeps and says about its trials, fed by the Tune callback.

:class:`TrialTracker` turns the per-epoch reports of each trial into its history, counts
the restarts of its worker group and what they cost, writes the trial's row when it ends
(with the real error of a failed one), keeps ``<sweep>/progress.json`` current for
``kavg sweep status``, and prints one line when a trial starts and one when it ends, with a
bar over the grid, the elapsed time and an estimate of the time left.

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

import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kavg_ray.config import RunConfig
from kavg_ray.results import ResultsStore

HISTORY_BEFORE = "history_before"  # kavg_ray.train.loop.HISTORY_BEFORE (no torch here)
HISTORY_KEYS = (
    "epoch", "samples", "rounds", "train_loss", "test_loss", "test_acc", "lr",
    "compute_time_s", "comm_time_s", "wait_time_s", "bytes_communicated", "wall_time_s",
    "local_reductions", "global_reductions", "local_comm_time_s", "global_comm_time_s",
    "staleness_mean", "staleness_max", "pushes", "applied",
)  # fmt: skip


def history_row(report: dict) -> dict:
    """The history.parquet fields of one report (``diverged`` kept for the status)."""
    return {k: report[k] for k in (*HISTORY_KEYS, "diverged") if k in report}
ERRORS_DIR = "errors"
MAX_ERROR_CHARS = 300
_EXCEPTION_LINE = re.compile(
    r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failure|Failed|Killed)\w*(:|$)"
)


def error_headline(text: str) -> str:
    """The line of an error text that says what failed: the last ``SomeError: ...`` line
    (the innermost exception of a chained Ray traceback), else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Failure # ")]
    if not lines:
        return "trial failed (Ray gave no error text)"
    pick = next((ln for ln in reversed(lines) if _EXCEPTION_LINE.match(ln)), lines[-1])
    return pick if len(pick) <= MAX_ERROR_CHARS else pick[: MAX_ERROR_CHARS - 3] + "..."


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS or M:SS."""
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def progress_bar(done: int, total: int, elapsed_s: float, width: int = 20) -> str:
    """``[#####---------------] 3/12  elapsed 0:42  ETA 2:06`` (ETA from the pace so far)."""
    filled = int(width * done / total) if total else width
    eta = (
        f"ETA {clock(elapsed_s / done * (total - done))}" if 0 < done < total else
        ("done" if done >= total else "ETA ?")
    )  # fmt: skip
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total}  " \
        f"elapsed {clock(elapsed_s)}  {eta}"


class _Trial:
    """The driver's view of one trial."""

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
    ) -> None:
        self.store, self.sweep, self.configs = store, sweep, configs
        self.echo, self.epoch_lines, self.trial_lines, self.now = (
            echo, epoch_lines, trial_lines, now
        )  # fmt: skip
        self.trials = {tid: _Trial() for tid in todo}
        self.statuses: dict[str, str] = {}
        self.started = now()
        self.done = 0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks, and with them this tracker, into the experiment's
        # state: the echo (it may hold the terminal) stays out of that copy.
        return {**self.__dict__, "echo": _silent}

    # ----------------------------------------------------------------- events

    def start(self, tid: str) -> None:
        trial = self.trials.setdefault(tid, _Trial())
        trial.status = "running"
        if self.trial_lines:
            cfg = self.configs[tid]
            self.echo(f"[kavg] start {tid}  ({cfg.algorithm} P={cfg.P} K={cfg.period} "
                      f"seed={cfg.seed}, {cfg.workload.epochs} epochs)")  # fmt: skip
        self.write_progress()

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
        if self.epoch_lines:
            from kavg_ray.train.loop import format_progress

            self.echo(format_progress(self.configs[tid], result))
        self.write_progress()

    def finish(self, tid: str, error_text: str | None, row_fn: Callable[..., dict]) -> dict:
        """Write the trial's row (``error_text``: None unless it failed); returns the row."""
        trial = self.trials.setdefault(tid, _Trial())
        cfg = self.configs[tid]
        error, error_file = "", ""
        if error_text is not None:
            error = error_headline(error_text)
            error_file = str(self._save_error(tid, error_text))
        row = row_fn(self.sweep, tid, cfg, trial.history, error=error, failed=error_text
                     is not None)  # fmt: skip
        row.update(restarts=trial.restarts, restart_time_s=round(trial.restart_time_s, 3),
                   error_file=error_file)  # fmt: skip
        hist_rows = [
            {"sweep": self.sweep, "trial_id": tid, **{k: h.get(k) for k in HISTORY_KEYS}}
            for h in trial.history
        ]
        self.store.upsert_trial(self.sweep, row, hist_rows)
        trial.status = self.statuses[tid] = row["status"]
        self.done += 1
        if self.trial_lines:
            self.echo(self._end_line(tid, row))
            elapsed = self.now() - self.started
            self.echo(f"[kavg] {progress_bar(self.done, len(self.trials), elapsed)}")
        self.write_progress()
        return row

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
        """``<sweep>/progress.json``: every trial of this run, its status and last epoch."""
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
            }
        self.store.write_progress(self.sweep, {
            "updated_unix": time.time(), "total": len(self.trials), "finished": self.done,
            "elapsed_s": round(self.now() - self.started, 3), "trials": trials,
        })  # fmt: skip


def _silent(line: str) -> None:
    """The echo of an unpickled tracker (Tune's saved experiment state)."""


def _finite_or_none(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None
