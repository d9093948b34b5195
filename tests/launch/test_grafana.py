"""The Grafana dashboard (cluster/grafana/kavg.json) against a real Prometheus.

A Prometheus on 127.0.0.1 scrapes the shared Ray head (through the service-discovery file
Ray writes) while a 2-trial sweep runs on it; then every panel's query, with the
dashboard's variables filled in as Grafana would, must return a line per trial with K
and P for its legend. Grafana itself is not run: what it would chart is what Prometheus
answers to these queries.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kavg_ray.analysis.results import ResultsStore
from tests.ray_head import RayHead, free_port

pytestmark = pytest.mark.ray

BOARD = Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "kavg.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SWEEP = {
    "name": "graf",
    "workload": {"dataset": "digits", "model": "mlp", "epochs": 3, "batch_size": 16,
                 "lr": {"initial": 0.1}},
    "grid": {"K": [1, 4], "P": [2], "seed": [0]},
    "resources": {"cpus_per_worker": 0.5, "max_concurrent_trials": 1},
}  # fmt: skip
TRIALS = {"K1-P2-s0": ("1", "2"), "K4-P2-s0": ("4", "2")}  # trial -> its K and P tags
# The dashboard's variables as Grafana fills them: "All" for session and cluster (the
# local head has no ray_io_cluster label, and ".*" matches its absence), this sweep.
VARIABLES = {"$SessionName": ".*", "$Cluster": ".*", "$Sweep": "graf"}


class Prometheus:
    """A Prometheus process of this test, and its HTTP API."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def get(self, path: str, **params: str | float) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as resp:
            return json.loads(resp.read())

    def why(self) -> str:
        """What Prometheus scrapes and logged, for a failure message."""
        try:
            targets = json.dumps(self.get("/api/v1/targets")["data"], indent=1)[-4000:]
        except OSError as exc:
            targets = f"(no targets page: {exc})"
        return f"targets:\n{targets}\nlog:\n{self.log.read_text()[-2000:]}"


@pytest.fixture
def prometheus(tmp_path: Path, ray_head: RayHead) -> Iterator[Prometheus]:
    if not Path(PROMETHEUS).exists():
        pytest.skip("no Prometheus binary (Debian: apt-get install prometheus; .ci/run does)")
    # Scrape every second: a trial's gauges leave Ray's endpoint when its worker exits.
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ray", "file_sd_configs": [
            {"files": [str(ray_head.service_discovery_file)], "refresh_interval": "1s"}]}],
    }  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port, log = free_port(), tmp_path / "prometheus.txt"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    prom = Prometheus(proc, f"http://127.0.0.1:{port}", log)
    try:
        _wait_ready(prom)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _wait_ready(prom: Prometheus, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert prom.proc.poll() is None, f"Prometheus exited:\n{prom.log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"Prometheus not ready in {timeout} s:\n{prom.log.read_text()[-3000:]}")


def _fill(text: str) -> str:
    for name, value in VARIABLES.items():
        text = text.replace(name, value)
    assert "$" not in text, f"a variable the test does not fill: {text}"
    return text


def panel_queries() -> dict[str, str]:
    """Each panel's title and its one query, variables filled in."""
    panels = json.loads(BOARD.read_text())["panels"]
    assert all(len(p["targets"]) == 1 for p in panels)
    return {p["title"]: _fill(p["targets"][0]["expr"]) for p in panels}


def _series(prom: Prometheus, expr: str, start: float) -> list[dict]:
    """The series of ``expr`` over the run (each: labels, values)."""
    body = prom.get("/api/v1/query_range", query=expr, start=start, end=time.time(), step=1)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _missing(series: list[dict]) -> set[str]:
    """The trials ``series`` lacks a line for, with its K and P legend labels."""
    seen = {s["metric"].get("trial"): (s["metric"].get("K"), s["metric"].get("P"))
            for s in series}  # fmt: skip
    return {trial for trial, kp in TRIALS.items() if seen.get(trial) != kp}


def _variable_values(prom: Prometheus, start: float) -> dict[str, set[str]]:
    """What the dashboard's label_values variables would offer (Grafana's query)."""
    offered = {}
    for var in json.loads(BOARD.read_text())["templating"]["list"]:
        if var["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
        assert match, var["query"]
        body = prom.get("/api/v1/series", **{"match[]": _fill(match[1])}, start=start,
                        end=time.time())  # fmt: skip
        offered[var["name"]] = {s[match[2]] for s in body["data"] if match[2] in s}
    return offered


def run_sweep(ray_head: RayHead, cwd: Path) -> None:
    (cwd / "spec.yaml").write_text(yaml.safe_dump(SWEEP))
    out = subprocess.run(
        [sys.executable, "-m", "kavg_ray.cli", "sweep", "run", "spec.yaml",
         "--storage", "store", "--address", ray_head.address],
        cwd=cwd, env=ray_head.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = ResultsStore(cwd / "store").read_trials("graf").to_dict("records")
    assert sorted((r["trial_id"], r["status"]) for r in rows) == [
        (t, "completed") for t in sorted(TRIALS)
    ]


def test_every_panel_charts_both_trials(
    prometheus: Prometheus, ray_head: RayHead, tmp_path: Path
) -> None:
    start = time.time() - 5
    run_sweep(ray_head, tmp_path)
    queries = panel_queries()
    # Scrapes and Ray's exports trail the run by a few seconds: wait for the last ones.
    deadline, missing = time.monotonic() + 120, dict.fromkeys(queries, set(TRIALS))
    while missing and time.monotonic() < deadline:
        missing = {
            title: lacking for title, expr in queries.items()
            if (lacking := _missing(_series(prometheus, expr, start)))
        }  # fmt: skip
        if missing:
            time.sleep(2)
    assert not missing, f"panels without a trial's line: {missing}\n{prometheus.why()}"

    offered = _variable_values(prometheus, start)
    assert offered["SessionName"], prometheus.why()
    assert "graf" in offered["Sweep"]
    assert offered["Cluster"] == set()  # no ray_io_cluster label on a local head
    _check_values(prometheus, queries, start)


def _check_values(prom: Prometheus, queries: dict[str, str], start: float) -> None:
    """The charted numbers are the trials' own: 44 steps an epoch (1437 samples, 2 x 16)."""

    def values(title: str) -> dict[str, set[float]]:
        return {s["metric"]["trial"]: {float(v) for _, v in s["values"]}
                for s in _series(prom, queries[title], start)}  # fmt: skip

    assert set().union(*values("Epochs finished").values()) <= {1.0, 2.0, 3.0}
    # K-AVG: no local averages, and a global one every K steps: 44 / K an epoch.
    assert set().union(*values("Local averages").values()) == {0.0}
    averages = values("Global averages")
    assert averages["K1-P2-s0"] <= {44.0, 88.0, 132.0}, averages
    assert averages["K4-P2-s0"] <= {11.0, 22.0, 33.0}, averages
    accuracy = set().union(*values("Test accuracy").values())
    assert all(0.0 < a <= 1.0 for a in accuracy), accuracy
    waits, spent = values("Wait time (cumulative)"), values("Averaging time (cumulative)")
    assert all(w >= 0 for w in set().union(*waits.values())), waits
    assert all(t > 0 for t in set().union(*spent.values())), spent
