"""A pack's progress as the driver sees it (kavg_ray.launch.progress), fed by hand through
the Tune callback: one start line per pack, one line per evaluation its points have all
reported, and a bar and estimate that count epochs (steps) done against those planned."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from kavg_ray import cli
from kavg_ray.analysis.results import ResultsStore
from kavg_ray.config import parse_run
from kavg_ray.launch import plans
from kavg_ray.launch.progress import TrialTracker, eta_seconds, format_eta
from kavg_ray.launch.sweep import _row

PACK = {c.trial_name(): c for c in (
    parse_run({"name": "s", "workload": {"epochs": 3}, "K": k, "P": 2, "backend": "simulated"})
    for k in (1, 4)
)}  # fmt: skip
K1, K4 = PACK


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _report(epoch: int, acc: float, point: str, done: bool = False, **extra) -> dict:
    return {"epoch": epoch, "test_acc": acc, "test_loss": 1.0, "train_loss": 1.0, "lr": 0.1,
            "rounds": epoch, "comm_time_s": 0.0, "wall_time_s": 10.0 * epoch,
            "samples": epoch, "point": point, "point_done": done, **extra}  # fmt: skip


def _bar_tail(line: str) -> str:
    """A bar line without its bar (the glyphs): trials, work, elapsed and ETA."""
    assert line.startswith("[kavg] ")
    return line[len("[kavg] ") + 20 + 1 :]


def test_eta_is_the_pace_so_far_rounded_up() -> None:
    assert eta_seconds(30.0, 1, 4) == 90.0
    assert eta_seconds(80.0, 3, 4) == pytest.approx(80 / 3)
    assert format_eta(eta_seconds(80.0, 3, 4)) == "0:00:27"
    assert eta_seconds(10.0, 0, 4) is None and format_eta(None) == "-:--:--"
    assert eta_seconds(10.0, 4, 4) == 0.0 and format_eta(0.0) == "0:00:00"
    assert format_eta(3724.2) == "1:02:05"


def test_a_pack_reports_each_evaluation_and_counts_epochs(tmp_path: Path) -> None:
    """Two points, 3 epochs each (6 planned); K4 diverges at epoch 2."""
    now, lines = Clock(), []
    tr = TrialTracker(ResultsStore(tmp_path), "s", PACK, list(PACK), echo=lines.append,
                      now=now)  # fmt: skip
    cb = plans.make_callback(tr, _row, {}, lambda t: "")
    (pack,) = plans.plan_packs(list(PACK.values()), budget_bytes=2**40)
    trial = SimpleNamespace(trial_id="t0", config={"trial": plans.pack_entry(0, pack)})
    cb.on_trial_start(0, [], trial)
    assert lines == ["[kavg] start pack0-P2-2pts  (2 points: kavg P=2 K=1,4 seed=0, 3 epochs)"]
    now.t = 10.0
    cb.on_trial_result(0, [], trial, _report(1, 0.6, K1))
    assert len(lines) == 1  # K4 has not reported epoch 1 yet
    cb.on_trial_result(0, [], trial, _report(1, 0.55, K4))
    assert lines[1] == (
        "[kavg] pack0-P2-2pts  epoch 1/3  2 of 2 points training  "
        f"test accuracy 0.5500 to 0.6000 (best {K1})"
    )
    # 2 of 6 epochs in 10 s: 20 s for the other 4.
    assert _bar_tail(lines[2]) == "0/2 trials 2/6 epochs elapsed 0:00:10 ETA 0:00:20"
    doc = json.loads((tmp_path / "s" / "progress.json").read_text())
    assert doc["work"] == {"done": 2.0, "planned": 6.0, "unit": "epochs"}
    assert doc["eta_s"] == 20.0
    assert {t: doc["trials"][t]["epoch"] for t in PACK} == {K1: 1, K4: 1}

    now.t = 20.0
    cb.on_trial_result(0, [], trial, _report(2, 0.7, K1))
    cb.on_trial_result(0, [], trial, _report(2, float("nan"), K4, True, diverged=True))
    # The accuracy range is over the points with one; then K4 ends, and counts its budget.
    assert lines[3] == (
        "[kavg] pack0-P2-2pts  epoch 2/3  2 of 2 points training  "
        f"test accuracy 0.7000 to 0.7000 (best {K1})"
    )
    assert _bar_tail(lines[4]) == "0/2 trials 4/6 epochs elapsed 0:00:20 ETA 0:00:10"
    assert lines[5].startswith(f"[kavg] end   {K4}  diverged  acc nan")
    assert len(lines) == 6  # K1 trains on: no bar line until the pack has ended
    assert json.loads((tmp_path / "s" / "progress.json").read_text())["work"]["done"] == 5.0

    now.t = 30.0
    cb.on_trial_result(0, [], trial, _report(3, 0.8, K1, True))
    # The last epoch prints no pack line: the point's end line says it.
    assert lines[6] == f"[kavg] end   {K1}  completed  acc 0.8000  30.0s"
    assert _bar_tail(lines[7]) == "2/2 trials 6/6 epochs elapsed 0:00:30 ETA 0:00:00"
    assert len(lines) == 8
    assert tr.statuses == {K4: "diverged", K1: "completed"}
    rows = ResultsStore(tmp_path).read_trials("s").set_index("trial_id")
    assert rows.loc[K1, "pack_points"] == 2 and rows.loc[K4, "pack_points"] == 2


def test_a_step_budget_counts_steps(tmp_path: Path) -> None:
    cfg = parse_run({"name": "s", "K": 2, "P": 2, "workload": {
        "dataset": "text", "model": "gpt", "steps": 150, "eval_every_steps": 50}})
    tid, now, lines = cfg.trial_name(), Clock(), []
    tr = TrialTracker(ResultsStore(tmp_path), "s", {tid: cfg}, [tid], echo=lines.append,
                      now=now)  # fmt: skip
    tr.start(tid)
    now.t = 12.0
    tr.result(tid, {"epoch": 0.46, "step": 50, "test_acc": 0.3, "wall_time_s": 12.0})
    assert tr.work() == (50.0, 150.0)
    doc = json.loads((tmp_path / "s" / "progress.json").read_text())
    assert doc["work"] == {"done": 50.0, "planned": 150.0, "unit": "steps"} and doc["eta_s"] == 24.0
    assert tr.display.bar_text().endswith("0/1 trials 50/150 steps elapsed 0:00:12 ETA 0:00:24")


def test_sweep_status_shows_the_work_done_and_its_eta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = Clock()
    tr = TrialTracker(ResultsStore(tmp_path), "s", PACK, list(PACK), echo=lambda _: None,
                      now=now)  # fmt: skip
    tr.start_pack("pack0-P2-2pts", list(PACK))
    now.t = 10.0
    tr.result(K1, _report(1, 0.6, K1))
    written = json.loads((tmp_path / "s" / "progress.json").read_text())["updated_unix"]
    monkeypatch.setattr("time.time", lambda: written + 4.0)
    out = CliRunner().invoke(cli.main, ["sweep", "status", "s", "--storage", str(tmp_path)])
    assert out.exit_code == 0, out.output
    # 1 of 6 epochs in 10 s: 50 s left when it was written, 4 s ago.
    assert "progress: 1/6 epochs done, ETA 0:00:50 at the last report (4 s ago)" in (
        out.stdout.splitlines()
    )
