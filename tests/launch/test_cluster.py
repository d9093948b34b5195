"""A real multi-node Ray cluster on 127.0.0.1: `cluster/local.sh`, Ray Jobs, auth, metrics.

One module-wide cluster (`cluster/local.sh up`: a head and one worker node, token
authentication on, free ports, its own temp dir and token) serves every test; the
last test takes it down and checks that none of its processes is left. It is never
stopped with `ray stop`, which would stop every Ray on the machine (other tests'
clusters included): `local.sh down` ends the `ray start --block` processes it started
and then any process whose command line names the cluster's own temp dir.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from kavg_ray.analysis.results import ResultsStore
from tests.ray_head import pids_under

from .listening import command, listening, loopback

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
LOCAL_SH = ROOT / "cluster" / "local.sh"
BIN = Path(sys.executable).parent


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _free_base() -> int:
    """A base with 20 free ports above it, outside Ray's worker port range."""
    for _ in range(200):
        base = random.randrange(20000, 32000, 20)
        if all(_free(base + i) for i in range(20)):
            return base
    raise RuntimeError("no free port range")


def _pids_naming(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            pids.append(int(d.name))
    return pids


class Cluster:
    def __init__(self) -> None:
        # Short: Ray's unix socket paths live under the temp dir.
        self.state = Path(tempfile.mkdtemp(prefix="kvt-", dir="/tmp"))
        self.port, self.dash, self.client = _free_port(), _free_port(), _free_port()
        self.base = _free_base()
        self.token = uuid.uuid4().hex
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_TOKEN": self.token,
            "KAVG_CLUSTER_DIR": str(self.state),
            "KAVG_RAY_PORT": str(self.port),
            "KAVG_DASHBOARD_PORT": str(self.dash),
            "KAVG_CLIENT_PORT": str(self.client),
            "KAVG_PORT_BASE": str(self.base),
            "KAVG_WORKERS": "1",
            "KAVG_NUM_CPUS": "1",
            # Metrics reach the node's exporter every 2 s instead of every 10 s.
            "RAY_metrics_report_interval_ms": "2000",
            "RAY_DEDUP_LOGS": "0",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.metrics_seen = ""

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dash}"

    def metrics_ports(self) -> list[int]:
        return [self.base + 3, self.base + 13]

    def sh(self, cmd: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(LOCAL_SH), cmd], env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    def kavg(self, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "kavg_ray.cli", *args], cwd=cwd, env=self.env,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    t0 = time.monotonic()
    up = c.sh("up")
    if up.returncode != 0:
        logs = "".join(p.read_text()[-2000:] for p in c.state.glob("node-*.log"))
        c.sh("down")
        pytest.fail(f"local.sh up failed:\n{up.stdout}\n{up.stderr}\n{logs}")
    print(f"cluster up in {time.monotonic() - t0:.0f}s")
    yield c
    c.sh("down")
    for pid in _pids_naming(str(c.state / "ray")):
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    shutil.rmtree(c.state, ignore_errors=True)


def _get(url: str, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def test_cluster_has_two_nodes(cluster: Cluster) -> None:
    out = cluster.sh("status", timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    active = out.stdout.split("Active:")[1].split("Pending:")[0]
    assert len(re.findall(r"node_", active)) == 2, out.stdout


def test_cluster_listens_on_loopback_only(cluster: Cluster) -> None:
    """Every listening socket of both nodes (GCS, raylets, agents, metrics exporters, Ray
    Client, dashboard) is on the loopback."""
    sockets = listening(set(_pids_naming(str(cluster.state / "ray"))))
    assert len({pid for _, _, pid in sockets}) >= 4, sockets
    outside = [(h, p, command(pid)) for h, p, pid in sockets if not loopback(h)]
    assert outside == [], f"listening beyond the loopback: {outside}"
    assert ("127.0.0.1", cluster.dash) in {(h, p) for h, p, _ in sockets}


def test_dashboard_needs_the_token(cluster: Cluster) -> None:
    url = f"{cluster.address}/api/jobs/"
    status, _ = _get(url)
    assert status == 401
    status, _ = _get(url, {"Authorization": "Bearer not-the-token"})
    assert status == 403
    status, body = _get(url, {"Authorization": f"Bearer {cluster.token}"})
    assert status == 200 and isinstance(json.loads(body), list)


def test_bad_input_submits_nothing(cluster: Cluster, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: x\nworkload: {dataset: nope}\ngrid: {K: [1]}\n")
    out = cluster.kavg("sweep", "submit", "bad.yaml", "--address", cluster.address, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("error:"), out.stderr
    assert "Traceback" not in out.stderr
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(SPEC))
    out = cluster.kavg(
        "sweep", "submit", "ok.yaml", "--address", f"127.0.0.1:{cluster.port}", cwd=tmp_path
    )
    assert out.returncode == 2 and "http://HOST:8265" in out.stderr, out.stderr
    out = cluster.kavg("sweep", "status", "raysubmit_nope", "--address", cluster.address,
                       cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "no job raysubmit_nope" in out.stderr, out.stderr
    auth = {"Authorization": f"Bearer {cluster.token}"}
    status, body = _get(f"{cluster.address}/api/jobs/", auth)
    assert json.loads(body) == []


SPEC = {
    "name": "tiny",
    "workload": {"dataset": "digits", "model": "mlp", "epochs": 2, "batch_size": 16,
                 "lr": {"initial": 0.1}},
    "grid": {"P": [2]},
    # K-AVG on real workers, and one point of every other engine (stacked learners, a
    # parameter server): the dashboard must see them all. P = 1 adds nothing across nodes.
    "variants": [{"K": 1}, {"K": 2}, {"K": 1, "backend": "simulated"},
                 {"algorithm": "downpour", "fetch_period": 1, "push_period": 1}],
    # Each node offers 1 CPU: a P=2 trial (2 x 0.75 CPU) must put its learners on both
    # nodes.
    "resources": {"cpus_per_worker": 0.75, "max_concurrent_trials": 2},
}  # fmt: skip
KAVG_TRIALS = {f"K{k}-P2-s0" for k in (1, 2)}
OTHER_TRIALS = {"K1-P2-s0-sim", "downpour-f1-p1-P2-s0"}
TRIALS = KAVG_TRIALS | OTHER_TRIALS


def _train_workers(cluster: Cluster) -> list[dict]:
    """Every RayTrainWorker actor the cluster has had (the state API keeps dead ones)."""
    out = subprocess.run(
        [str(Path(BIN, "ray")), "list", "actors", "--address", cluster.address,
         "--filter", "class_name=RayTrainWorker", "--detail", "--format", "json",
         "--limit", "1000"],
        env={**cluster.env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_submit_status_logs_kopt(cluster: Cluster, tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    t0 = time.monotonic()
    # A key that kavg also sets for its Ray session: the job's value must win, not clash.
    out = cluster.kavg("sweep", "submit", "spec.yaml", "--address", cluster.address,
                       "--storage", "store", "--env", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.3",
                       cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    job = re.search(r"as job (\S+)", out.stdout).group(1)
    assert f"{cluster.address}/#/jobs/{job}" in out.stdout

    state, status = "", {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        st = cluster.kavg("sweep", "status", job, "--address", cluster.address,
                          "--format", "json", cwd=tmp_path)  # fmt: skip
        assert st.returncode == 0, st.stderr[-2000:]
        status = json.loads(st.stdout)
        state = status["state"]
        # Gauges are exported while the trial's worker lives: look while it runs.
        cluster.metrics_seen += _scrape(cluster)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = cluster.kavg("sweep", "logs", job, "--address", cluster.address, cwd=tmp_path)
    assert state == "SUCCEEDED", f"{status}\n{logs.stdout[-4000:]}"
    print(f"job {job} succeeded after {time.monotonic() - t0:.0f}s")
    assert logs.returncode == 0 and "K_opt by accuracy" in logs.stdout
    assert status["sweep"] == "tiny"
    assert Path(status["storage"]).resolve() == (tmp_path / "store").resolve()
    assert (status["finished"], status["total"]) == (4, 4)
    assert status["counts"] == {"completed": 4}
    assert status["best"]["trial_id"] in TRIALS
    assert status["best"]["final_test_acc"] > 0.5

    by_name = cluster.kavg("sweep", "status", "tiny", "--storage", "store", cwd=tmp_path)
    assert by_name.returncode == 0, by_name.stderr
    assert "4/4 trials finished (4 completed)" in by_name.stdout
    assert "best so far:" in by_name.stdout

    kopt = cluster.kavg("results", "kopt", "tiny", "--storage", "store", "--format", "json",
                        cwd=tmp_path)  # fmt: skip
    assert kopt.returncode == 0, kopt.stderr
    rows = [r for r in json.loads(kopt.stdout) if r["algorithm"] == "kavg"]
    real = [r for r in rows if r.get("backend", "ray") == "ray"]
    assert [r["P"] for r in real] == [2] and all(r["K_opt"] in (1, 2) for r in real)

    # The sweep ran across both nodes: each P=2 trial's two learners (one placement
    # group) sat on two different nodes, joined by one gloo group; a simulated trial
    # is one worker.
    groups: dict[str, set[str]] = {}
    for actor in _train_workers(cluster):
        groups.setdefault(actor["placement_group_id"], set()).add(actor["node_id"])
    assert sorted(len(nodes) for nodes in groups.values()) == [1, 2, 2, 2], groups

    stop = cluster.kavg("sweep", "stop", job, "--address", cluster.address, cwd=tmp_path)
    assert stop.returncode == 0 and "already ended" in stop.stdout
    cluster.finished_job = job


WORKLOAD_PY = """
import torch
from torch import nn
from torch.utils.data import TensorDataset


def blobs(n=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(2, (n,), generator=gen)
    x = torch.randn(n, 2, generator=gen) + 6 * y[:, None].float()
    return TensorDataset(x[: n // 2], y[: n // 2]), TensorDataset(x[n // 2 :], y[n // 2 :])


def tiny(width=8):
    return nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, 2))
"""


def test_submit_ships_the_users_code_with_working_dir(cluster: Cluster, tmp_path: Path) -> None:
    """The model and data set live only in a folder sent with the job: the nodes import
    them from it (the submitting machine checks them from it too)."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "kavg_blobs.py").write_text(WORKLOAD_PY)
    spec = {"name": "own", "workload": {"dataset": "kavg_blobs:blobs", "model": "kavg_blobs:tiny",
            "epochs": 2, "batch_size": 16, "lr": {"initial": 0.1}},
            "grid": {"K": [1], "P": [2]}, "resources": {"cpus_per_worker": 0.75}}  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = cluster.kavg("sweep", "submit", "spec.yaml", "--address", cluster.address,
                       "--storage", "store", "--working-dir", "code", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    job = re.search(r"as job (\S+)", out.stdout).group(1)
    state, deadline = "", time.monotonic() + 600
    while time.monotonic() < deadline:
        st = cluster.kavg("sweep", "status", job, "--address", cluster.address,
                          "--format", "json", cwd=tmp_path)  # fmt: skip
        state = json.loads(st.stdout)["state"] if st.returncode == 0 else ""
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = cluster.kavg("sweep", "logs", job, "--address", cluster.address, cwd=tmp_path)
    assert state == "SUCCEEDED", logs.stdout[-4000:]
    rows = ResultsStore(tmp_path / "store").read_trials("own").to_dict("records")
    assert [(r["trial_id"], r["status"]) for r in rows] == [("K1-P2-s0", "completed")]
    assert rows[0]["final_test_acc"] > 0.75  # two separated blobs (chance: 0.5), 8 steps


def test_sweep_run_joins_both_nodes(cluster: Cluster, tmp_path: Path) -> None:
    """`kavg sweep run --address` from a driver whose factories the nodes do not have (a
    folder on the driver's PYTHONPATH only): they are shipped; the storage is checked from
    both nodes (one machine: both see it) and the check leaves nothing behind; the P = 2
    trial's learners sit on both nodes, and its process group listens on the nodes' Ray
    address (127.0.0.1 here) only."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "kavg_blobs_run.py").write_text(WORKLOAD_PY)
    spec = {"name": "joined", "workload": {"dataset": "kavg_blobs_run:blobs",
            "model": "kavg_blobs_run:tiny", "epochs": 6, "batch_size": 8,
            "lr": {"initial": 0.1}},
            "grid": {"K": [2], "P": [2]}, "resources": {"cpus_per_worker": 0.75}}  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**cluster.env, "RAY_AUTH_MODE": "token",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(code)]))}  # fmt: skip
    driver = subprocess.Popen(
        [sys.executable, "-m", "kavg_ray.cli", "sweep", "run", "spec.yaml", "--address",
         f"127.0.0.1:{cluster.port}", "--storage", "store"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: dict[tuple[str, int], int] = {}  # (host, port) -> pid
    trainers: set[int] = set()  # Ray Train workers (a process's title changes per task)
    deadline = time.monotonic() + 600
    while driver.poll() is None and time.monotonic() < deadline:
        for host, port, pid in listening(set(pids_under(cluster.state))):
            seen[(host, port)] = pid
            if "RayTrainWorker" in command(pid):
                trainers.add(pid)
        time.sleep(0.2)
    if driver.poll() is None:
        driver.kill()
    out, err = driver.communicate(timeout=60)
    assert driver.returncode == 0, out[-2000:] + err[-3000:]
    rows = ResultsStore(tmp_path / "store").read_trials("joined").to_dict("records")
    assert [(r["trial_id"], r["status"]) for r in rows] == [("K2-P2-s0", "completed")]
    assert not list((tmp_path / "store").glob(".kavg-shared-check-*"))
    group = [(h, p) for (h, p), pid in seen.items() if pid in trainers and h == "127.0.0.1"]
    assert len(trainers) >= 2 and len(group) >= 3, (trainers, seen)
    outside = [(h, p, command(pid)) for (h, p), pid in seen.items() if not loopback(h)]
    assert outside == [], f"listening beyond the nodes' address: {outside}"


def _scrape(cluster: Cluster) -> str:
    """The kavg lines of every node's Prometheus endpoint."""
    text = ""
    for port in cluster.metrics_ports():
        try:
            body = _get(f"http://127.0.0.1:{port}/metrics")[1]
        except OSError:
            continue
        text += "".join(line + "\n" for line in body.splitlines() if "kavg_" in line)
    return text


def test_trial_metrics_reach_prometheus(cluster: Cluster) -> None:
    if not getattr(cluster, "finished_job", None):
        pytest.skip("needs the submitted sweep")
    from kavg_ray.launch.dashboard import GAUGES

    # The counter outlives the trial's worker; the gauges were seen while trials ran.
    deadline = time.monotonic() + 30
    while "ray_kavg_epochs_total{" not in cluster.metrics_seen and time.monotonic() < deadline:
        cluster.metrics_seen += _scrape(cluster)
        time.sleep(2)
    text = cluster.metrics_seen
    want = {f"ray_{name}" for name in GAUGES} | {"ray_kavg_epochs_total"}
    missing = sorted(n for n in want if f"{n}{{" not in text)
    assert not missing, f"missing {missing}; seen:\n{text[-3000:]}"
    acc = [line for line in text.splitlines() if line.startswith("ray_kavg_test_accuracy{")]
    assert all('sweep="tiny"' in line for line in acc)
    # Every engine records: stacked learners and parameter-server learners too.
    counted = {
        re.search(r'trial="([^"]+)"', line).group(1)
        for line in text.splitlines() if line.startswith("ray_kavg_epochs_total{")
    }  # fmt: skip
    assert OTHER_TRIALS <= counted, counted
    assert {re.search(r'trial="([^"]+)"', line).group(1) for line in acc} <= TRIALS
    assert all(0.0 < float(line.rsplit(" ", 1)[1]) <= 1.0 for line in acc)


def test_local_down_leaves_nothing(cluster: Cluster) -> None:
    temp = str(cluster.state / "ray")
    assert _pids_naming(temp)
    # A drain long enough for a loaded machine (Ray's processes took over 30 s to leave at
    # load 12): down must return once the nodes have stopped, well before the drain ends
    # (it used to wait the drain out every time).
    cluster.env["KAVG_DOWN_TIMEOUT"] = "120"
    t0 = time.monotonic()
    out = cluster.sh("down", timeout=300)
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert _pids_naming(temp) == []
    assert took < 110, took
    assert not (cluster.state / "pids").exists()


def test_connect_passes_addresses_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from kavg_ray.launch import sweep

    seen = []
    for key in ("RAY_TRAIN_V2_ENABLED", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        monkeypatch.setenv(key, os.environ.get(key, "1"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: seen.append(address))
    for address in ("auto", "ray://head:10001", "head:6379", "10.0.0.5:6379"):
        sweep.connect(address)
    assert seen == ["auto", "ray://head:10001", "head:6379", "10.0.0.5:6379"]


def test_connect_inside_a_job_leaves_the_jobs_env_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job whose runtime_env sets a key that connect() also sets: Ray must merge them."""
    import ray
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from kavg_ray.launch import sweep

    job_env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "NCCL_DEBUG": "INFO"}
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": job_env}})
    )
    for key in ("RAY_TRAIN_V2_ENABLED", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        monkeypatch.setenv(key, os.environ.get(key, "1"))
    seen = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: seen.append(kw["runtime_env"]))
    sweep.connect("auto")
    (runtime_env,) = seen
    assert runtime_env == {"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}}
    merged = _merge_runtime_env({"env_vars": job_env}, runtime_env)
    assert merged is not None and merged["env_vars"] == {**job_env, "RAY_TRAIN_V2_ENABLED": "1"}
    # Without the job's keys left out, Ray refuses the pair (the bug this guards against).
    both = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}}
    assert _merge_runtime_env({"env_vars": job_env}, both) is None


def test_cluster_configs_parse() -> None:
    readme = (ROOT / "cluster" / "README.md").read_text()
    (gpu,) = list(yaml.safe_load_all((ROOT / "cluster" / "gpu-cluster.yaml").read_text()))
    assert gpu["cluster_name"] and gpu["docker"]["image"] in readme
    workers = gpu["available_node_types"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    assert "8265" in json.dumps(gpu) and "8265" in readme

    (rc,) = list(yaml.safe_load_all((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text()))
    assert rc["kind"] == "RayCluster" and rc["apiVersion"].startswith("ray.io/")
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] in readme
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}
    (group,) = rc["spec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1

    (job,) = list(yaml.safe_load_all((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text()))
    assert job["kind"] == "RayJob"
    assert "kavg_ray.cli sweep run" in job["spec"]["entrypoint"]
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]
    for name in ("ray_kavg_test_accuracy", "RAY_AUTH_MODE", "auth_token"):
        assert name in readme
