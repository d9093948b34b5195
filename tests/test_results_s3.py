"""The results store at an ``s3://`` URI (moto's server on 127.0.0.1, tests/s3_server.py),
and the storage URIs kavg refuses. No Ray: the sweep on S3 is tests/launch/test_s3.py.

Every test runs in an empty working folder and checks that it stays empty: a URI is never
a local path (``--storage s3://b/p`` once wrote a folder ``s3:`` and read it back).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from kavg_ray import cli
from kavg_ray.analysis import storage
from kavg_ray.analysis.results import FINISHED_STATUSES, ResultsStore, kopt_table
from kavg_ray.analysis.storage import RemotePath, StorageError
from kavg_ray.errors import BadInputError, KavgError

from .s3_server import CREDENTIALS, S3Server, _free_port, serving_bucket
from .test_plots import SPEC, hand_history, hand_trials

BUCKET = "kavg-unit"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    yield from serving_bucket(BUCKET)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working folder (cwd), test credentials, a cache folder of its own; the
    working folder must still be empty after the test."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KAVG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KAVG_STORAGE", raising=False)
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    yield folder
    assert list(folder.iterdir()) == []


def _fill(store: ResultsStore, sweep: str) -> pd.DataFrame:
    """The hand-made sweep of tests/test_plots.py (P 1 and 4, K 1, 2, 4) in ``store``."""
    t = hand_trials()
    hist = hand_history(t)
    store.write_spec(sweep, SPEC)
    for row in t.to_dict("records"):
        store.upsert_trial(sweep, row, hist[hist["trial_id"] == row["trial_id"]].to_dict("records"))
    return t


def test_store_round_trip_on_s3(s3: S3Server, work: Path, tmp_path: Path) -> None:
    uri = s3.uri(BUCKET, "unit/round-trip")
    store = ResultsStore(uri)
    assert store.remote and isinstance(store.sweep_dir("hand"), RemotePath)
    t = _fill(store, "hand")
    store.write_theory("hand", {"predictions": []})
    store.write_progress("hand", {"finished": len(t)})

    trials = store.read_trials("hand")
    assert sorted(trials["trial_id"]) == sorted(t["trial_id"])
    history = store.read_history("hand")
    assert len(history) == len(hand_history(t))
    assert store.read_spec("hand") == SPEC
    assert store.read_theory("hand") == {"predictions": []}
    assert store.read_progress("hand") == {"finished": len(t)}
    # The same K_opt as the frame it came from.
    assert kopt_table(trials)[["P", "K_opt", "mean"]].to_dict("records") == kopt_table(t)[
        ["P", "K_opt", "mean"]].to_dict("records")  # fmt: skip

    # Replacing a trial keeps one row and its history once.
    row = trials.iloc[0].to_dict()
    tid = row["trial_id"]
    store.upsert_trial("hand", {**row, "final_test_acc": 0.5}, [{"epoch": 1, "test_acc": 0.5}])
    again = store.read_trials("hand")
    assert len(again) == len(trials) and (again["trial_id"] == tid).sum() == 1
    assert again.set_index("trial_id").loc[tid, "final_test_acc"] == 0.5
    assert (store.read_history("hand")["trial_id"] == tid).sum() == 1

    listed = store.list_sweeps()
    assert listed["sweep"].tolist() == ["hand"] and listed["trials"].tolist() == [len(t)]
    assert store.finished_trial_ids("hand") == set(
        t.loc[t["status"].isin(FINISHED_STATUSES), "trial_id"]
    )

    assert s3.keys(BUCKET, "unit/round-trip") == [
        f"hand/{name}" for name in ("history.parquet", "progress.json", "spec.json",
                                    "theory.json", "trials.parquet")
    ]  # fmt: skip
    # The lock is local (an object store has none): under the cache folder.
    lock = tmp_path / "cache" / "remote" / "s3" / BUCKET / "unit" / "round-trip" / "hand" / ".lock"
    assert lock.is_file() and store.local_dir("hand") == lock.parent

    store.remove_tree("hand")
    assert s3.keys(BUCKET, "unit/round-trip") == []
    with pytest.raises(BadInputError, match="unknown sweep 'hand'"):
        store.read_trials("hand")


def test_a_failed_trials_error_text_goes_to_the_bucket(s3: S3Server, work: Path) -> None:
    from kavg_ray.config import parse_run
    from kavg_ray.launch.progress import TrialTracker
    from kavg_ray.launch.sweep import _row

    uri = s3.uri(BUCKET, "unit/errors")
    cfg = parse_run({"name": "s", "workload": {"epochs": 2}, "K": 2, "P": 2})
    tid = cfg.trial_name()
    tracker = TrialTracker(ResultsStore(uri), "s", {tid: cfg}, [tid], echo=lambda _: None)
    tracker.start(tid)
    row = tracker.finish(tid, "Traceback ...\nValueError: boom\n", _row)
    assert row["status"] == "failed" and row["error"] == "ValueError: boom"
    assert row["error_file"] == storage.join(uri, "s", "errors", f"{tid}.txt")
    assert RemotePath(uri).joinpath("s", "errors", f"{tid}.txt").read_text().endswith("boom\n")
    assert f"s/errors/{tid}.txt" in s3.keys(BUCKET, "unit/errors")


def test_results_commands_read_s3(s3: S3Server, work: Path, tmp_path: Path) -> None:
    uri = s3.uri(BUCKET, "unit/cli")
    t = _fill(ResultsStore(uri), "hand")
    runner = CliRunner()

    def kavg(*args: str) -> str:
        result = runner.invoke(cli.main, [*args, "--storage", uri])
        assert result.exit_code == 0, result.output
        return result.output

    listed = json.loads(kavg("results", "list", "--format", "json"))
    assert [(r["sweep"], r["trials"]) for r in listed] == [("hand", len(t))]
    shown = json.loads(kavg("results", "show", "hand", "--format", "json"))
    assert sorted(r["trial_id"] for r in shown) == sorted(t["trial_id"])
    kopt = json.loads(kavg("results", "kopt", "hand", "--format", "json"))
    assert [(r["P"], r["K_opt"]) for r in kopt] == [
        (r["P"], r["K_opt"]) for r in kopt_table(t).to_dict("records")
    ]
    assert "results: s3://kavg-unit/unit/cli/hand?endpoint_override=" in kavg(
        "sweep", "status", "hand"
    )
    # Plots and the report read the bucket and write where --out says (a local folder).
    kavg("results", "plot", "hand", "--out", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "accuracy_vs_k.png").is_file()
    kavg("results", "report", "hand", "--out", str(tmp_path / "report"))
    text = (tmp_path / "report" / "report.md").read_text()
    assert "s3://kavg-unit/unit/cli/hand" in text and "K_opt" in text
    # ... or to the bucket: --out s3://... (files named by their URIs once uploaded).
    printed = kavg("results", "report", "hand", "--out", s3.uri(BUCKET, "unit/out/report"))
    assert printed.splitlines()[-1] == s3.uri(BUCKET, "unit/out/report/report.md")
    kavg("results", "plot", "hand", "--out", s3.uri(BUCKET, "unit/out/plots"))
    keys = s3.keys(BUCKET, "unit/out")
    assert "report/report.md" in keys and "plots/accuracy_vs_k.png" in keys
    assert {k for k in keys if k.startswith("report/")} >= {"report/accuracy_vs_k.png"}
    line = _refused(["results", "plot", "hand", "--out", "foo://x", "--storage", uri])
    assert line.startswith("error: --out foo://x: kavg cannot store results at foo://")


def _refused(args: list[str]) -> str:
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()  # one line
    return line


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("foo://bucket/prefix", "cannot store results at foo:// URIs"),
        ("file:///tmp/x", "cannot store results at file:// URIs"),
        ("s3:bucket/prefix", "not a URI (write s3://BUCKET/PREFIX)"),
        ("s3:/bucket/prefix", "not a URI"),
        ("s3:///prefix", "names no bucket"),
    ],
)
def test_storage_kavg_cannot_serve_is_refused_in_one_line(work: Path, uri: str, says: str) -> None:
    (tmp := work.parent / "spec.yaml").write_text("name: x\ngrid: {K: [1]}\n")
    for args in (["results", "list"], ["results", "kopt", "x"], ["sweep", "run", str(tmp)],
                 ["sweep", "status", "x"]):  # fmt: skip
        line = _refused([*args, "--storage", uri])
        assert line.startswith("error: --storage ") and says in line, line
    with pytest.raises(BadInputError, match=says.split(" (")[0]):
        ResultsStore(uri)


def test_gs_is_refused_when_pyarrow_has_no_gcs(work: Path, monkeypatch) -> None:  # noqa: ANN001
    assert storage.check_uri("gs://bucket/prefix") == "gs://bucket/prefix"  # served here
    monkeypatch.setitem(storage.SCHEMES, "gs", "pyarrow._no_such_filesystem")
    line = _refused(["results", "list", "--storage", "gs://bucket/prefix"])
    assert "this pyarrow has no Google Cloud Storage filesystem" in line


def test_storage_env_variable_uri_is_checked_too(work: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("KAVG_STORAGE", "foo://bucket")
    assert "foo://" in _refused(["results", "list"])


def test_an_unreachable_store_is_one_line_exit_1(work: Path) -> None:
    uri = f"s3://bucket/p?endpoint_override=127.0.0.1:{_free_port()}&scheme=http"
    result = CliRunner().invoke(cli.main, ["results", "list", "--storage", uri])
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: cannot read {uri}: ") and "connect" in line.lower()


def test_uri_paths_keep_their_query_last(work: Path) -> None:
    uri = "s3://b/pre/fix?endpoint_override=h:1&scheme=http"
    root = RemotePath(uri)
    assert (
        str(root / "sweep" / "ray") == "s3://b/pre/fix/sweep/ray?endpoint_override=h:1&scheme=http"
    )
    assert (root / "a/b").parts == ("a", "b") and (root / "a").name == "a"
    assert storage.join(uri, "sweep", "errors") == str(root / "sweep" / "errors")
    assert storage.join("some/dir", "sweep") == "some/dir/sweep"
    assert storage.local_dir(root / "sweep").parts[-5:] == ("s3", "b", "pre", "fix", "sweep")
    assert storage.storage_root("./kavg_results") == Path("kavg_results")
    assert not storage.is_uri("C:/x") and storage.is_uri("gs://b")
    assert issubclass(StorageError, KavgError) and StorageError("x").exit_code == 1


def test_a_sweep_into_a_missing_bucket_is_refused_before_ray_starts(
    s3: S3Server, work: Path
) -> None:
    spec = work.parent / "spec.yaml"
    spec.write_text("name: x\nworkload: {dataset: digits, model: mlp, epochs: 1}\ngrid: {K: [1]}\n")
    line = _refused(["sweep", "run", str(spec), "--storage", s3.uri("no-such-bucket", "p")])
    assert "bucket 'no-such-bucket' does not exist" in line
    import ray

    assert not ray.is_initialized()


def test_an_option_pyarrow_does_not_know_is_bad_input(work: Path) -> None:
    line = _refused(["results", "list", "--storage", "s3://bucket/p?no_such_option=1"])
    assert line.startswith("error: --storage s3://bucket/p?no_such_option=1: ")
    assert "no_such_option" in line
