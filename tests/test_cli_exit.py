"""`kavg sweep run` when grid points are left unfinished: exit 1, one line that names
them and gives the command that finishes the sweep (no Ray: the sweep itself is faked)."""

from __future__ import annotations

import shlex

import pytest
import yaml
from click.testing import CliRunner

from kavg_ray import cli
from kavg_ray.analysis.results import ResultsStore
from kavg_ray.launch.sweep import trial_row

SPEC = {
    "name": "partial",
    "workload": {"dataset": "digits", "model": "mlp", "epochs": 2, "lr": {"initial": 0.1}},
    "grid": {"K": [1, 2, 4], "P": [1]},
}
EPOCH = {"test_acc": 0.9, "test_loss": 0.3, "train_loss": 0.2, "wall_time_s": 1.0}


def _fake_sweep(statuses: list[str]):
    """A run_sweep that records `statuses` for the first grid points and stops there."""

    def run_sweep(sweep, points, spec_doc, storage, **kwargs):  # noqa: ANN001, ANN003
        store = ResultsStore(storage)
        store.write_spec(sweep, spec_doc)
        for cfg, status in zip(points, statuses, strict=False):
            history = [{"epoch": e, **EPOCH} for e in range(1, 3 if status != "failed" else 2)]
            row = trial_row(sweep, cfg.trial_name(), cfg, history, status,
                            "worker died" if status == "failed" else "")  # fmt: skip
            store.upsert_trial(sweep, row, [])
        return dict(zip([p.trial_name() for p in points], statuses, strict=False))

    return run_sweep


@pytest.mark.parametrize(
    ("statuses", "args", "expected"),
    [
        # Interrupted after one trial: two never ran.
        (["completed"], [],
         "error: 2 of 3 grid points did not finish (K2-P1-s0, K4-P1-s0); finish them with: "
         "kavg sweep run spec.yaml --resume --storage {store}"),
        # A failed trial is unfinished too, and its count points at the table; the
        # cluster address is part of the command.
        (["completed", "failed", "diverged"], ["--address", "ray://head:10001"],
         "error: 1 of 3 grid points did not finish (K2-P1-s0; 1 failed, see 'kavg results "
         "show partial --storage {store}'); finish them with: kavg sweep run spec.yaml "
         "--resume --storage {store} "
         "--address ray://head:10001"),
    ],
)  # fmt: skip
def test_unfinished_grid_points_exit_1_with_the_resume_command(
    tmp_path, monkeypatch, statuses, args, expected
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KAVG_STORAGE", raising=False)
    monkeypatch.delenv("KAVG_RESUME_COMMAND", raising=False)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    monkeypatch.setattr("kavg_ray.launch.sweep.run_sweep", _fake_sweep(statuses))
    # The address is not dialled here (that is tests/test_cli_input.py's business).
    monkeypatch.setattr("kavg_ray.launch.address.probe", lambda address, timeout_s=None: None)
    store = str(tmp_path / "store")
    result = CliRunner().invoke(
        cli.main, ["sweep", "run", "spec.yaml", "--storage", store, *args]
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == expected.format(store=store)
    assert "K_opt by accuracy" in result.stdout  # the table of what finished comes first


def test_all_points_finished_exits_0(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    monkeypatch.setattr(
        "kavg_ray.launch.sweep.run_sweep", _fake_sweep(["completed", "diverged", "completed"])
    )
    result = CliRunner().invoke(cli.main, ["sweep", "run", "spec.yaml", "--storage", "s"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


@pytest.mark.parametrize("target", [None, 0.5])
def test_the_last_lines_say_where_the_results_are_and_how_to_read_them(
    tmp_path, monkeypatch, target
):
    """`cd examples && kavg sweep run ...` stores under examples/kavg_results (the default
    storage is relative to the folder the sweep ran in): the last lines name it absolutely
    and give the commands that read it from any folder (K_opt by time: --by time)."""
    (tmp_path / "examples").mkdir()
    monkeypatch.chdir(tmp_path / "examples")
    monkeypatch.delenv("KAVG_STORAGE", raising=False)
    spec = {**SPEC, "target_accuracy": target} if target else SPEC
    (tmp_path / "examples" / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setattr("kavg_ray.launch.sweep.run_sweep", _fake_sweep(["completed"] * 3))
    result = CliRunner().invoke(cli.main, ["sweep", "run", "spec.yaml"])
    assert result.exit_code == 0, result.output
    store = tmp_path / "examples" / "kavg_results"
    by = ["--by time"] if target else []
    assert result.stdout.splitlines()[-4:] == [
        f"results: {store / 'partial'}",
        " ".join(["kopt:    kavg results kopt partial", *by, f"--storage {store}"]),
        f"plot:    kavg results plot partial --out plots/partial --storage {store}",
        f"report:  kavg results report partial --out reports/partial --storage {store}",
    ]
    monkeypatch.chdir(tmp_path)  # elsewhere: the printed command finds the sweep
    command = shlex.split(result.stdout.splitlines()[-3].split(maxsplit=1)[1])
    kopt = CliRunner().invoke(cli.main, command[1:])
    assert kopt.exit_code == 0 and kopt.stdout.startswith("algorithm"), kopt.output


def test_show_points_at_error_files_only_when_a_trial_failed(tmp_path, monkeypatch):
    """A diverged trial's error is where and how it diverged; only a failed trial has a
    full error text to point at."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    monkeypatch.setattr("kavg_ray.launch.sweep.run_sweep", _fake_sweep(["diverged"] * 3))
    run = CliRunner().invoke(cli.main, ["sweep", "run", "spec.yaml", "--storage", "s"])
    assert run.exit_code == 0, run.output
    show = CliRunner().invoke(cli.main, ["results", "show", "partial", "--storage", "s"])
    assert show.exit_code == 0, show.output
    assert "diverged at epoch 2: parameters not finite (train loss 0.2)" in show.stdout
    assert "full error texts" not in show.stdout
