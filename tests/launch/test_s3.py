"""A sweep whose storage is an S3 bucket (moto's server on 127.0.0.1, tests/s3_server.py).

One small sweep (two 1-learner trials) on the shared Ray head, its K_opt table read back
from the bucket, and one resume after a row was lost: no row lost or duplicated, every file
in the bucket (results, spec, Ray Train's checkpoints), and nothing written to the working
folder (where ``--storage s3://...`` once made a folder ``s3:``). Ray's logs and the lock
stay on this machine, under ``$KAVG_CACHE_DIR``. The store itself against S3, without Ray:
tests/test_results_s3.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from kavg_ray.analysis.results import ResultsStore

from ..ray_head import RayHead
from ..s3_server import CREDENTIALS, S3Server, serving_bucket

pytestmark = pytest.mark.ray

BUCKET, PREFIX, SWEEP = "kavg-test", "team/results", "s3grid"
TRIALS = ["K1-P1-s0", "K4-P1-s0"]


@pytest.fixture
def s3() -> Iterator[S3Server]:
    yield from serving_bucket(BUCKET)


def test_sweep_on_s3_storage_resumes_without_losing_or_repeating_rows(
    tmp_path: Path, ray_head: RayHead, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = s3.uri(BUCKET, PREFIX)
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    env = {**ray_head.env, **CREDENTIALS, "KAVG_CACHE_DIR": str(cache)}
    for key, value in {**CREDENTIALS, "KAVG_CACHE_DIR": str(cache)}.items():
        monkeypatch.setenv(key, value)  # this process reads the bucket too
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": SWEEP,
        "workload": {"dataset": "digits", "model": "mlp", "epochs": 2, "batch_size": 16,
                     "lr": {"initial": 0.1}},
        "grid": {"K": [1, 4], "P": [1], "seed": [0]},
        "resources": {"cpus_per_worker": 0.5},
    }))  # fmt: skip

    def kavg(*args: str) -> subprocess.CompletedProcess:
        on_ray = args[:2] == ("sweep", "run")
        address = ("--address", ray_head.address) if on_ray else ()
        return subprocess.run(
            [sys.executable, "-m", "kavg_ray.cli", *args, "--storage", uri, *address],
            cwd=work, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    out = kavg("sweep", "run", str(spec))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert sum(ln.startswith("[kavg] end ") for ln in out.stdout.splitlines()) == 2
    # Where the results are, as a URI with its query at the end (not s3:/... joined).
    assert f"results: s3://{BUCKET}/{PREFIX}/{SWEEP}?endpoint_override=" in out.stdout

    keys = s3.keys(BUCKET, PREFIX)
    for name in ("trials.parquet", "history.parquet", "spec.json", "progress.json"):
        assert f"{SWEEP}/{name}" in keys, keys
    for tid in TRIALS:  # Ray Train's checkpoints went to the bucket too
        assert any(k.startswith(f"{SWEEP}/ray/train/{tid}/") and k.endswith("learner-0.pt")
                   for k in keys), keys  # fmt: skip
    assert not any("/logs/" in k or k.endswith(".lock") for k in keys), keys
    # Logs and the lock: on this machine, under the cache folder.
    local = cache / "remote" / "s3" / BUCKET / "team" / "results" / SWEEP
    assert list((local / "logs").glob("sweep-*.log")) and (local / ".lock").is_file()

    kopt = kavg("results", "kopt", SWEEP, "--format", "json")
    assert kopt.returncode == 0, kopt.stderr
    (row,) = json.loads(kopt.stdout)
    store = ResultsStore(uri)
    first = store.read_trials(SWEEP)
    assert sorted(first["trial_id"]) == TRIALS and set(first["status"]) == {"completed"}
    best = first.sort_values(["final_test_acc", "K"], ascending=[False, True]).iloc[0]
    assert (row["P"], row["K_opt"], row["n_seeds"]) == (1, best["K"], 1)

    # Lose one trial's row in the bucket, as a sweep interrupted before it ended would.
    key = f"{BUCKET}/{PREFIX}/{SWEEP}/trials.parquet"
    kept = pq.read_table(key, filesystem=s3.filesystem())
    kept = kept.filter(pc.equal(kept["trial_id"], "K1-P1-s0"))
    pq.write_table(kept, key, filesystem=s3.filesystem())

    resumed = kavg("sweep", "run", str(spec), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "1 finished, 1 to run" in resumed.stdout
    ends = [ln.split()[2] for ln in resumed.stdout.splitlines() if ln.startswith("[kavg] end ")]
    assert ends == ["K4-P1-s0"]

    final = ResultsStore(uri).read_trials(SWEEP)
    assert sorted(final["trial_id"]) == TRIALS  # each once: none lost, none repeated
    assert set(final["status"]) == {"completed"}
    history = ResultsStore(uri).read_history(SWEEP)
    pairs = sorted(zip(history["trial_id"], history["epoch"], strict=True))
    assert pairs == [(t, e) for t in TRIALS for e in (1, 2)]
    again = final.set_index("trial_id").loc["K4-P1-s0", "final_test_acc"]
    assert again == first.set_index("trial_id").loc["K4-P1-s0", "final_test_acc"]

    # Nothing in the working folder (no "s3:" folder), and no stray "s3:" anywhere here.
    assert list(work.iterdir()) == []
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith("s3:")]
