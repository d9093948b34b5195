"""Failures survived with nothing lost (real Ray, through the CLI).

- a learner killed by the config's fault injection (`failure.inject`) resumes from the
  last checkpoint (`failure.checkpoint_every_epochs: 2`, so two epochs back) and ends
  bit-identical to a run without a fault;
- a learner's process SIGKILLed from outside (found through Ray's state API on a head
  this test starts) is restarted the same way;
- a sweep driver SIGKILLed mid-sweep leaves its finished trials, takes its local Ray
  down with it, and `--resume` runs only the missing trials;
- Ctrl-C (SIGINT to the process group) mid-sweep keeps the finished rows, exits 1 and
  prints the command that finishes the sweep;
- a 40-trial sweep (sweeps/load.yaml, packed on the simulated backend) completes with every row
  while another process reads the store.

The fault-injection, learner-kill and load tests run on the pytest run's shared Ray head
(tests/ray_head.py): a killed learner is Ray Train's to restart, and the head lives on.
The driver-kill and Ctrl-C tests start their own local Ray, because what they check is
that the Ray a killed or interrupted driver started goes with it; it runs under its own
short RAY_TMPDIR, so its processes can be told apart from other Ray clusters on the
machine (and nothing else is ever killed). The reference runs without a fault are the
same worker loop on gloo in spawned processes (no Ray).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kavg_ray.analysis.results import ResultsStore
from kavg_ray.config import RunConfig
from kavg_ray.train import train

from ..distributed import run_distributed
from ..ray_head import RayHead, pids_under

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
WORKLOAD = {"dataset": "digits", "model": "mlp", "batch_size": 16, "lr": {"initial": 0.1}}
# Every metric of a report that the trajectory determines (wall clock excluded).
TRAJECTORY = ("epoch", "samples", "rounds", "train_loss", "test_loss", "test_acc")


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short RAY_TMPDIR of this test's own (unix socket paths must stay short)."""
    d = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))
    yield d
    # A driver's Ray takes a moment to wind down; after the 40-trial sweep at load 10 one
    # of its processes once took over 60 s to exit.
    deadline = time.monotonic() + 180
    while (leftovers := pids_under(d)) and time.monotonic() < deadline:
        time.sleep(1)
    for pid in leftovers:  # only processes of this test's own Ray
        _kill(pid)
    shutil.rmtree(d, ignore_errors=True)
    assert not leftovers, f"processes of this test's Ray outlived it: {leftovers}"


def _env(ray_tmp: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "RAY_DEDUP_LOGS": "0",
        "PYTHONUNBUFFERED": "1",
        "RAY_TMPDIR": str(ray_tmp),
        **extra,
    }


def _ray_log(sweep_dir: Path) -> str:
    """What Ray, Tune and the workers said during the runs of a sweep (its logs folder)."""
    return "".join(p.read_text() for p in sorted((sweep_dir / "logs").glob("*.log")))


def _kavg(*args: str, cwd: Path, env: dict, **popen) -> subprocess.Popen:
    """Start `kavg ARGS` with stdout and stderr going to files in cwd."""
    with open(cwd / "stdout.txt", "a") as out, open(cwd / "stderr.txt", "a") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "kavg_ray.cli", *args],
            cwd=cwd, env=env, stdout=out, stderr=err, text=True, **popen,
        )  # fmt: skip


def _wait(proc: subprocess.Popen, cwd: Path, timeout: float = 600) -> tuple[int, str, str]:
    rc = proc.wait(timeout=timeout)
    return rc, (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_until(predicate, timeout: float, what: str, poll: float = 0.5):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _reference_rank(rank: int, world: int, doc: dict, out: str) -> None:
    cfg = RunConfig.model_validate(doc)
    reports: list[dict] = []
    train(cfg, lambda m, s: reports.append(m), rank=rank, world_size=world)
    if rank == 0:
        Path(out).write_text(json.dumps(reports))


class Reference(threading.Thread):
    """The run of ``doc`` without any fault: gloo, one torch thread per learner (as the
    Ray workers), in the background while the Ray run goes on."""

    def __init__(self, doc: dict, out: Path) -> None:
        super().__init__(daemon=True)
        doc = {k: v for k, v in doc.items() if k != "failure"}
        self.doc, self.out, self.error = doc, out, None
        self.start()

    def run(self) -> None:
        try:
            run_distributed(_reference_rank, self.doc["P"], self.doc, str(self.out))
        except BaseException as exc:  # reported by reports()
            self.error = exc

    def reports(self) -> list[dict]:
        self.join(timeout=600)
        assert self.error is None, self.error
        return json.loads(self.out.read_text())


def _tune_results(storage: Path, sweep: str, trial: str) -> list[dict]:
    """Every result Tune received for ``trial`` (its result.json, one line per report)."""
    (path,) = (storage / sweep / "ray").glob(f"tune-*/{trial}/result.json")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _assert_same_trajectory(history, reference: list[dict]) -> None:  # noqa: ANN001
    got = history[list(TRAJECTORY)].to_dict("records")
    want = [{k: r[k] for k in TRAJECTORY} for r in reference]
    # Resumed from every learner's own state (model, momentum, averager counters, RNG)
    # with the same data order: the trajectory is the uninterrupted one, bit for bit.
    assert got == want


# ---------------------------------------------------------------------------- tests


def test_injected_fault_resumes_from_checkpoint_exactly(tmp_path: Path, ray_head: RayHead) -> None:
    config = {
        "name": "fault",
        "workload": {**WORKLOAD, "epochs": 5},
        "K": 4,
        "P": 2,
        "resources": {"cpus_per_worker": 0.5},
        # Checkpoints after epochs 2, 4 and 5: the fault at epoch 4 rolls back to epoch 2.
        "failure": {
            "max_failures": 1,
            "checkpoint_every_epochs": 2,
            "inject": {"rank": 1, "epoch": 4},
        },
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    proc = _kavg("train", "run.yaml", "--storage", "store", "--address", ray_head.address,
                 cwd=tmp_path, env=ray_head.env)  # fmt: skip
    reference = Reference(config, tmp_path / "reference.json")
    rc, out, err = _wait(proc, tmp_path)
    assert rc == 0, err[-3000:]

    # Rank 1 died once (the marker stops the restarted group from dying again) ...
    train_dir = tmp_path / "store" / "fault" / "ray" / "train" / "K4-P2-s0"
    assert (train_dir / "fault-injected-rank1-epoch4").is_file()
    assert "[FailurePolicy] RETRY" in _ray_log(tmp_path / "store" / "fault")
    # ... and the restarted group began at epoch 3 from the epoch-2 checkpoint (epoch 3
    # had none): its first report carries the epochs before the checkpoint.
    results = _tune_results(tmp_path / "store", "fault", "K4-P2-s0")
    resumed = [r for r in results if r.get("history_before")]
    assert [(r["epoch"], [h["epoch"] for h in r["history_before"]]) for r in resumed] == [
        (3, [1, 2])
    ]

    store = ResultsStore(tmp_path / "store")
    (row,) = store.read_trials("fault").to_dict("records")
    assert row["status"] == "completed"
    # The restart is counted, and what it cost (detection, new workers, the lost epochs
    # since the epoch-2 checkpoint) is beside the loop's own wall time, not hidden in it.
    assert row["restarts"] == 1 and row["restart_time_s"] > 1.0
    history = store.read_history("fault")
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5]
    ref = reference.reports()
    _assert_same_trajectory(history, ref)
    assert row["final_test_acc"] == ref[-1]["test_acc"]


def test_learner_killed_from_outside_is_restarted(tmp_path: Path, ray_head: RayHead) -> None:
    epochs = 60
    config = {
        "name": "killed",
        "workload": {**WORKLOAD, "epochs": epochs},
        "K": 4,
        "P": 2,
        "resources": {"cpus_per_worker": 0.5},
        "failure": {"max_failures": 1},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env, address = ray_head.env, ray_head.address
    # The learners run on the shared head: Ray Train restarts them, the head lives on.
    proc = _kavg(
        "train", "run.yaml", "--storage", "store", "--address", address,
        cwd=tmp_path, env=env,
    )  # fmt: skip
    reference = Reference(config, tmp_path / "reference.json")
    query = (
        "import json, sys\n"
        "from ray.util.state import list_actors\n"
        "actors = list_actors(address=sys.argv[1], filters=[('class_name', '=', "
        "'RayTrainWorker'), ('state', '=', 'ALIVE')], raise_on_missing_output=False)\n"
        "print(json.dumps(sorted(a.pid for a in actors)))\n"
    )

    def learner_pids() -> list[int] | None:
        if proc.poll() is not None:
            raise AssertionError((tmp_path / "stderr.txt").read_text()[-3000:])
        q = subprocess.run(
            [sys.executable, "-c", query, address],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        pids = json.loads(q.stdout.strip().splitlines()[-1]) if q.returncode == 0 else []
        return pids if len(pids) == 2 else None

    pids = _wait_until(learner_pids, 240, "two alive RayTrainWorker actors", poll=1)
    stdout = tmp_path / "stdout.txt"
    _wait_until(lambda: "epoch 1/" in stdout.read_text(), 240, "the first epoch", 0.1)
    victim = pids[-1]
    os.kill(victim, signal.SIGKILL)
    seen = stdout.read_text()
    assert f"epoch {epochs}/{epochs}" not in seen, "the run ended before the kill"
    rc, out, err = _wait(proc, tmp_path)
    assert rc == 0, err[-3000:]
    log = _ray_log(tmp_path / "store" / "killed")
    assert f"pid={victim}" in log and "[FailurePolicy] RETRY" in log
    (row,) = ResultsStore(tmp_path / "store").read_trials("killed").to_dict("records")
    assert row["restarts"] == 1 and row["restart_time_s"] > 0

    results = _tune_results(tmp_path / "store", "killed", "K4-P2-s0")
    resumed = [r for r in results if r.get("history_before")]
    assert len(resumed) == 1, "the killed run was not resumed from a checkpoint"
    store = ResultsStore(tmp_path / "store")
    (row,) = store.read_trials("killed").to_dict("records")
    assert row["status"] == "completed"
    history = store.read_history("killed")
    assert history["epoch"].tolist() == list(range(1, epochs + 1))
    _assert_same_trajectory(history, reference.reports())


def test_driver_killed_mid_sweep_then_resume(tmp_path: Path, ray_tmp: Path) -> None:
    spec = {
        "name": "killdriver",
        "workload": {**WORKLOAD, "epochs": 3},
        "grid": {"K": [1, 16], "P": [1, 2], "seed": [0]},
        "resources": {"cpus_per_worker": 0.5, "max_concurrent_trials": 2},
    }
    names = {f"K{k}-P{p}-s0" for k in (1, 16) for p in (1, 2)}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    args = ("sweep", "run", "spec.yaml", "--storage", "store")
    driver = _kavg(*args, cwd=tmp_path, env=_env(ray_tmp), start_new_session=True)
    trials_file = tmp_path / "store" / "killdriver" / "trials.parquet"
    store = ResultsStore(tmp_path / "store")
    try:
        _wait_until(trials_file.exists, 400, "the first finished trial")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    # The local Ray that the driver started dies with it (Ray's kernel fate sharing,
    # and the driver's process group): nothing of that session is left running.
    _wait_until(lambda: not pids_under(ray_tmp), 60, "the driver's Ray to exit")
    before = store.read_trials("killdriver")
    done = set(before["trial_id"])
    assert before["trial_id"].is_unique and 1 <= len(done) < len(names)

    (tmp_path / "stdout.txt").unlink()
    resumed = _kavg(*args, "--resume", cwd=tmp_path, env=_env(ray_tmp))
    rc, out, err = _wait(resumed, tmp_path)
    assert rc == 0, err[-3000:]
    assert f"{len(done)} finished, {len(names) - len(done)} to run" in out
    ran = [line.split()[2] for line in out.splitlines() if line.startswith("[kavg] end ")]
    assert sorted(ran) == sorted(names - done)

    trials = store.read_trials("killdriver")
    assert sorted(trials["trial_id"]) == sorted(names)
    assert set(trials["status"]) == {"completed"}
    # The rows of the first run are kept as they were.
    first = before.set_index("trial_id").loc[sorted(done), "final_test_acc"].tolist()
    assert trials.set_index("trial_id").loc[sorted(done), "final_test_acc"].tolist() == first
    history = store.read_history("killdriver")
    pairs = list(zip(history["trial_id"], history["epoch"], strict=True))
    assert sorted(pairs) == sorted((t, e) for t in names for e in (1, 2, 3))


def test_ctrl_c_keeps_finished_rows_and_says_how_to_resume(tmp_path: Path, ray_tmp: Path) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) mid-sweep: exit 1, rows kept."""
    spec = {
        "name": "interrupted",
        "workload": {**WORKLOAD, "epochs": 3},
        "grid": {"K": [1, 2, 4], "P": [1], "seed": [0]},
        "resources": {"cpus_per_worker": 0.5, "max_concurrent_trials": 1},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    driver = _kavg("sweep", "run", "spec.yaml", "--storage", "store", cwd=tmp_path,
                   env=_env(ray_tmp), start_new_session=True)  # fmt: skip
    trials_file = tmp_path / "store" / "interrupted" / "trials.parquet"
    try:
        _wait_until(trials_file.exists, 400, "the first finished trial")
        os.killpg(driver.pid, signal.SIGINT)
        rc, out, err = _wait(driver, tmp_path, timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    _wait_until(lambda: not pids_under(ray_tmp), 60, "the driver's Ray to exit")
    done = ResultsStore(tmp_path / "store").finished_trial_ids("interrupted")
    assert 1 <= len(done) < 3, done
    assert rc == 1, (rc, out[-2000:], err[-2000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {3 - len(done)} of 3 grid points did not finish"), last
    assert last.endswith("finish them with: kavg sweep run spec.yaml --resume --storage store")


class StoreReader(threading.Thread):
    """Reads a sweep's store over and over while the sweep writes it, as `kavg results` and
    `kavg sweep status` do from another terminal."""

    def __init__(self, storage: Path, sweep: str) -> None:
        super().__init__(daemon=True)
        self.store, self.sweep, self.folder = ResultsStore(storage), sweep, storage / sweep
        self.counts: list[int] = []
        self.errors: list[str] = []
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.is_set():
            if not self.folder.exists():  # an unknown sweep until the driver makes it
                time.sleep(0.05)
                continue
            try:
                trials = self.store.read_trials(self.sweep)
                history = self.store.read_history(self.sweep)
                if not trials["trial_id"].is_unique or len(history) < len(trials):
                    self.errors.append(f"torn read: {len(trials)} rows, {len(history)} epochs")
                self.counts.append(len(trials))
            except Exception as exc:  # noqa: BLE001 - every failed read is a finding
                self.errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)


def test_load_sweep_of_40_trials(tmp_path: Path, ray_head: RayHead) -> None:
    # Many trials through the driver's callback and the store, read meanwhile, nothing
    # lost: 40 points packed (simulated backend, one Tune trial per P), each written as it
    # ends. One Ray Train worker group per trial (the other Ray tests' business) cost 741 s
    # for these 40 on 2 cores, and 427 s unpacked on the simulated backend.
    load = yaml.safe_load((ROOT / "sweeps" / "load.yaml").read_text())
    spec = {**load, "backend": "simulated", "pack": True}
    (tmp_path / "load.yaml").write_text(yaml.safe_dump(spec))
    grid = spec["grid"]
    n = len(grid["K"]) * len(grid["P"]) * len(grid["seed"])
    assert n >= 40
    reader = StoreReader(tmp_path / "store", "load")
    start = time.monotonic()
    proc = _kavg(
        "sweep", "run", "load.yaml", "--storage", "store", "--address", ray_head.address,
        cwd=tmp_path, env=ray_head.env,
    )  # fmt: skip
    rc, out, err = _wait(proc, tmp_path, timeout=1200)
    wall = time.monotonic() - start
    reader.done.set()
    reader.join(timeout=60)
    assert rc == 0, err[-3000:]
    store = ResultsStore(tmp_path / "store")
    trials = store.read_trials("load")
    assert len(trials) == n and trials["trial_id"].is_unique
    assert set(trials["status"]) == {"completed"}
    history = store.read_history("load")
    assert len(history) == n * spec["workload"]["epochs"]
    # Every read while the sweep wrote succeeded, and rows were only ever added.
    assert reader.errors == []
    assert len(reader.counts) > 10 and reader.counts == sorted(reader.counts)
    assert len(set(reader.counts)) >= 3 and reader.counts[-1] <= n  # it saw the store grow
    conc = spec["resources"]["max_concurrent_trials"]
    print(f"\nload: {n} trials in {wall:.0f} s = {60 * n / wall:.1f} trials/min "
          f"at max_concurrent_trials {conc}, load average {os.getloadavg()[0]:.1f}; "
          f"{len(reader.counts)} reads saw {sorted(set(reader.counts))} rows")  # fmt: skip
