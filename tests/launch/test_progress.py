"""The driver's view of a sweep (kavg_ray.launch.progress), fed by hand: no Ray.

Restarts are counted and their cost measured on the driver's clock; a failed trial's row
carries the exception line and where its full text is; progress.json says what runs; the
console has one line per trial start and end with a bar and an ETA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kavg_ray import cli
from kavg_ray.config import parse_run
from kavg_ray.launch.progress import TrialTracker, clock, error_headline, progress_bar
from kavg_ray.launch.sweep import _row, trial_error_text
from kavg_ray.results import ResultsStore

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
        ("", "trial failed (Ray gave no error text)"),
    ],
)  # fmt: skip
def test_error_headline(text: str, line: str) -> None:
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
    assert doc["trials"][TID] == {"status": "running", "epoch": 2, "epochs": 4,
                                  "test_acc": 0.7, "wall_time_s": 2.5, "restarts": 0}
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
    assert lines[2] == "[kavg] [####################] 1/1  elapsed 1:05  done"
    assert progress_bar(3, 12, 42.0, width=12) == "[###---------] 3/12  elapsed 0:42  ETA 2:06"
    assert progress_bar(0, 5, 1.0, width=5) == "[-----] 0/5  elapsed 0:01  ETA ?"
    assert clock(3725) == "1:02:05"


def test_quiet_sends_all_output_but_kavgs_lines_to_the_log(tmp_path: Path) -> None:
    """Python prints, logging and writes to fds 1 and 2 (as Ray's C++ core and forwarded
    worker logs do) land in the log; only the echo reaches the terminal."""
    import subprocess
    import sys

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
    import pickle

    with open(tmp_path / "terminal", "w") as terminal:
        tr = TrialTracker(ResultsStore(tmp_path), "s", {TID: CFG}, [TID],
                          echo=lambda line: terminal.write(line))  # fmt: skip
        tr.start(TID)
        copy = pickle.loads(pickle.dumps(tr))
    assert copy.trials[TID].status == "running" and copy.echo("x") is None
