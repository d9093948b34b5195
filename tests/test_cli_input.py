"""Bad input through the real `kavg` command line, one subprocess per case.

Every case must: exit with code 2; print exactly one line, ``error: ...``, on stderr and
nothing on stdout; show no traceback; create nothing in the working directory (no
``kavg_results/``); finish quickly; and never import torch or Ray (checked by a
``sitecustomize`` that records, at exit, which heavy modules the process loaded).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

HEAVY_MODULES = ("torch", "torchvision", "ray", "sklearn")
# Each case is one fresh interpreter (about 0.1 s, 0.4 s when pandas is imported). That
# nothing heavy starts is checked by the import log; the limit only catches a hang, with
# room for a machine at load 15 (a deep-nesting case took 5.8 s there).
TIME_LIMIT_S = 30.0

SITECUSTOMIZE = f"""
import atexit, os, sys

def _record_heavy_imports():
    heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]
    with open(os.environ["KAVG_TEST_IMPORT_LOG"], "w") as f:
        f.write(" ".join(heavy))

if os.environ.get("KAVG_TEST_IMPORT_LOG"):
    atexit.register(_record_heavy_imports)
"""

RUN = {
    "name": "t",
    "workload": {"dataset": "digits", "model": "mlp", "epochs": 1, "lr": {"initial": 0.1}},
    "algorithm": "kavg",
    "K": 2,
    "P": 2,
    "seed": 0,
}
HIER = {**{k: v for k, v in RUN.items() if k != "K"}, "algorithm": "hier_avg", "P": 4}


def run_doc(**changes) -> str:
    doc = {**RUN, **changes}
    return yaml.safe_dump({k: v for k, v in doc.items() if v is not None}, sort_keys=False)


def hier_doc(**changes) -> str:
    doc = {**HIER, **changes}
    return yaml.safe_dump({k: v for k, v in doc.items() if v is not None}, sort_keys=False)


def sweep_doc(grid, **changes) -> str:
    doc = {**RUN, "K": None, "P": None, "seed": None, **changes, "grid": grid}
    return yaml.safe_dump({k: v for k, v in doc.items() if v is not None}, sort_keys=False)


def workload(**changes) -> dict:
    return {**RUN["workload"], **changes}


ALIAS_BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [
        f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]"
        for p, c in zip("abcdefghi", "bcdefghij", strict=True)
    ]
)
TRAIN = ("train", "bad.yaml")
SWEEP = ("sweep", "run", "bad.yaml")
SUBMIT = ("sweep", "submit", "bad.yaml", "--address", "http://127.0.0.1:1")

# (id, argv, content of bad.yaml (None: no file), a fragment the error line must hold)
CASES = [
    # --- kavg train: values and types
    ("K-string", TRAIN, run_doc(K="four"), "K: Input should be a valid integer"),
    ("K-bool", TRAIN, run_doc(K=True), "K: Input should be a valid integer"),
    ("K-zero", TRAIN, run_doc(K=0), "K: Input should be greater than or equal to 1"),
    ("K-negative", TRAIN, run_doc(K=-4), "K: Input should be greater than or equal to 1"),
    ("P-zero", TRAIN, run_doc(P=0), "P: Input should be greater than or equal to 1"),
    ("P-negative", TRAIN, run_doc(P=-2), "P: Input should be greater than or equal to 1"),
    ("P-list", TRAIN, run_doc(P=[1, 2]), "P: Input should be a valid integer"),
    ("S-not-dividing-P", TRAIN, hier_doc(S=3, K1=1, K2=2), "S=3 does not divide P=4"),
    ("K2-not-multiple-of-K1", TRAIN, hier_doc(S=2, K1=3, K2=4),
     "K2=4 is not a multiple of K1=3"),
    ("hier-missing-K2", TRAIN, hier_doc(S=2, K1=3), "needs S, K1 and K2 (missing: K2)"),
    ("unknown-algorithm", TRAIN, run_doc(algorithm="hogwild"),
     "algorithm: Input should be 'kavg', 'hier_avg', 'downpour' or 'eamsgd'"),
    ("unknown-model", TRAIN, run_doc(workload=workload(model="alexnet")),
     "workload.model: Input should be"),
    ("unknown-dataset", TRAIN, run_doc(workload=workload(dataset="imagenet")),
     "workload.dataset: Input should be"),
    ("lr-zero", TRAIN, run_doc(workload=workload(lr={"initial": 0})),
     "workload.lr.initial: Input should be greater than 0"),
    ("lr-negative", TRAIN, run_doc(workload=workload(lr={"initial": -0.1})),
     "workload.lr.initial: Input should be greater than 0"),
    ("unknown-top-key", TRAIN, run_doc(epochs=3), "epochs: unknown key"),
    ("unknown-nested-key", TRAIN, run_doc(workload=workload(batchsize=8)),
     "workload.batchsize: unknown key"),
    ("model-needs-images", TRAIN, run_doc(workload=workload(dataset="synthetic", model="cnn")),
     "model cnn needs images"),
    ("cifar10-no-data", TRAIN,
     run_doc(workload=workload(dataset="cifar10", model="vgg16", data_dir="no/such/dir")),
     "CIFAR-10 not found: no cifar-10-batches-py under 'no/such/dir'"),
    ("name-dotdot", TRAIN, run_doc(name="../x"), "name '../x' may only hold letters"),
    ("grid-given-to-train", TRAIN, sweep_doc({"K": [1, 2]}),
     "has a grid: run it with 'kavg sweep run'"),
    # --- kavg train: the file itself
    ("missing-file", ("train", "nosuch.yaml"), None, "nosuch.yaml: no such file"),
    ("directory", ("train", "."), None, ".: not a regular file"),
    ("not-utf8", TRAIN, b"name: t\nK: \xff\xfe\x00\n", "bad.yaml: not UTF-8 text"),
    ("binary-garbage", TRAIN, bytes(range(256)) * 4, "bad.yaml: not UTF-8 text"),
    ("control-chars", TRAIN, b"K: 1\x00\x07\n", "bad.yaml: not valid YAML"),
    ("unbalanced-brackets", TRAIN, "K: [1, 2\nP: {3\n", "bad.yaml: not valid YAML"),
    ("deep-nesting", TRAIN, "K: " + "[" * 50_000, "bad.yaml: not a config: nested too deeply"),
    ("alias-bomb", TRAIN, ALIAS_BOMB, "YAML aliases are not allowed"),
    ("python-tag", TRAIN, '!!python/object/apply:os.system ["echo hi"]\n',
     "could not determine a constructor for the tag"),
    ("top-level-list", TRAIN, "- K: 1\n- K: 2\n", "expected a mapping of keys at the top level"),
    ("empty-file", TRAIN, "", "expected a mapping of keys at the top level"),
    # --- kavg sweep run
    ("grid-too-large", SWEEP, sweep_doc({"K": list(range(1, 102)), "seed": list(range(100))}),
     "grid has 10100 points, more than 10000"),
    ("grid-duplicates", SWEEP, sweep_doc({"K": [1, 2, 2]}), "grid.K: value 2 is listed twice"),
    ("grid-empty-list", SWEEP, sweep_doc({"K": []}), "grid.K: must be a non-empty list"),
    ("grid-empty-mapping", SWEEP, sweep_doc({}), "grid: must be a non-empty mapping"),
    ("grid-unsweepable", SWEEP, sweep_doc({"K": [1], "model": ["mlp", "cnn"]}),
     "grid.model: cannot be swept"),
    ("grid-bad-point", SWEEP, sweep_doc({"K": [2, 0]}),
     "grid point (K=0): K: Input should be greater than or equal to 1"),
    ("grid-and-scalar", SWEEP, sweep_doc({"K": [1, 2]}, K=4),
     "K is given both as a scalar and in grid.K"),
    ("no-grid-to-sweep", SWEEP, run_doc(), "has no grid: run a single config with 'kavg train'"),
    ("sweep-name-in-file", SWEEP, sweep_doc({"K": [1]}, name="../x"),
     "name '../x' may only hold letters"),
    ("sweep-name-option", (*SWEEP, "--name", "../x"), sweep_doc({"K": [1]}),
     "name '../x' may only hold letters"),
    ("sweep-alias-bomb", SWEEP, ALIAS_BOMB, "YAML aliases are not allowed"),
    ("sweep-missing-file", ("sweep", "run", "nosuch.yaml"), None, "nosuch.yaml: no such file"),
    # --- kavg sweep submit (nothing is contacted: the address is checked, not dialled)
    ("submit-env-no-equals", (*SUBMIT, "--env", "NCCL_DEBUG"), sweep_doc({"K": [1]}),
     "--env 'NCCL_DEBUG': expected KEY=VALUE"),
    ("submit-env-bad-key", (*SUBMIT, "--env", "1X=2"), sweep_doc({"K": [1]}),
     "--env '1X=2': expected KEY=VALUE"),
    ("submit-env-twice", (*SUBMIT, "--env", "A=1", "--env", "A=2"), sweep_doc({"K": [1]}),
     "--env A: given twice"),
    ("submit-env-reserved", (*SUBMIT, "--env", "KAVG_SWEEP_SPEC=x"), sweep_doc({"K": [1]}),
     "--env KAVG_SWEEP_SPEC: reserved"),
    # --- kavg results
    ("results-show-dotdot", ("results", "show", "../x"), None, "name '../x' may only hold"),
    ("results-kopt-dotdot", ("results", "kopt", "../x"), None, "name '../x' may only hold"),
    ("results-show-unknown", ("results", "show", "nosuch"), None, "unknown sweep 'nosuch'"),
    # --- duplicate keys: PyYAML would keep the last one silently
    ("yaml-duplicate-key", TRAIN, "K: 2\nP: 2\nK: 4\n", "(line 3): key 'K' is given twice"),
    ("yaml-duplicate-nested-key", TRAIN, "K: 2\nworkload: {epochs: 1, epochs: 2}\n",
     "key 'epochs' is given twice"),
    ("grid-duplicate-key", SWEEP, "name: t\ngrid: {K: [1, 2], P: [1], K: [8]}\n",
     "(line 2): key 'K' is given twice"),
    ("estimate-duplicate-key", ("theory", "estimate", "bad.yaml"), "K: 2\nK: 2\n",
     "key 'K' is given twice"),
    # --- names and storage, refused before Ray starts
    ("sweep-name-empty", (*SWEEP, "--name", ""), sweep_doc({"K": [1]}), "--name is empty"),
    ("submit-name-empty", (*SUBMIT, "--name", ""), sweep_doc({"K": [1]}), "--name is empty"),
    ("train-storage-under-file", (*TRAIN, "--storage", "bad.yaml/out"), run_doc(),
     "--storage bad.yaml/out: bad.yaml is a file, not a directory"),
    ("sweep-storage-is-file", (*SWEEP, "--storage", "bad.yaml"), sweep_doc({"K": [1]}),
     "--storage bad.yaml: is a file, not a directory"),
    ("train-storage-empty", (*TRAIN, "--storage", ""), run_doc(), "--storage is empty"),
    ("results-list-storage-file", ("results", "list", "--storage", "bad.yaml"), "x: 1\n",
     "--storage bad.yaml: is a file, not a directory"),
    ("results-kopt-storage-file", ("results", "kopt", "s", "--storage", "bad.yaml"), "x: 1\n",
     "--storage bad.yaml: is a file, not a directory"),
    # --- cluster addresses, refused before anything is dialled
    ("train-address-garbage", (*TRAIN, "--address", "garbage::!!"), run_doc(),
     "--address 'garbage::!!': expected HOST:PORT"),
    ("sweep-address-garbage", (*SWEEP, "--address", "garbage::!!"), sweep_doc({"K": [1]}),
     "--address 'garbage::!!': expected HOST:PORT"),
    ("train-address-auto-no-cluster", (*TRAIN, "--address", "auto"), run_doc(),
     "--address auto: no running Ray cluster found on this machine"),
    ("sweep-address-auto-no-cluster", (*SWEEP, "--address", "auto"), sweep_doc({"K": [1]}),
     "--address auto: no running Ray cluster found on this machine"),
    ("sweep-address-no-port", (*SWEEP, "--address", "127.0.0.1"), sweep_doc({"K": [1]}),
     "--address '127.0.0.1': expected HOST:PORT"),
    ("sweep-address-port-range", (*SWEEP, "--address", "10.0.0.1:70000"),
     sweep_doc({"K": [1]}), "--address '10.0.0.1:70000': expected HOST:PORT"),
    ("sweep-address-dashboard", (*SWEEP, "--address", "http://127.0.0.1:8265"),
     sweep_doc({"K": [1]}), "that is a dashboard address, for 'kavg sweep submit'"),
    ("sweep-address-empty", (*SWEEP, "--address", " "), sweep_doc({"K": [1]}),
     "--address is empty"),
    ("calibrate-address-garbage", ("calibrate", "--P", "2", "--address", "ray://:1"), None,
     "--address 'ray://:1': expected HOST:PORT"),
    # --- baselines
    ("eamsgd-beta-too-large", TRAIN, run_doc(K=None, algorithm="eamsgd", tau=1, beta=3.0),
     "alpha = beta / P = 3.0/2 must be below 1"),
    ("downpour-fetch-zero", TRAIN,
     run_doc(K=None, algorithm="downpour", fetch_period=0, push_period=1),
     "fetch_period: Input should be greater than or equal to 1"),
]  # fmt: skip


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("site")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_kavg(
    args, cwd: Path, site_dir: Path, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, float, str]:
    """Run `python -m kavg_ray.cli ARGS` in `cwd`; returns (result, seconds, heavy imports)."""
    log = site_dir / f"imports-{os.getpid()}-{time.monotonic_ns()}.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAVG_", "RAY_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(site_dir), env.get("PYTHONPATH", "")]).rstrip(":")
    env["KAVG_TEST_IMPORT_LOG"] = str(log)
    # `--address auto` looks for the cluster `ray start` recorded under $RAY_TMPDIR/ray:
    # an empty folder here, so that a Ray running elsewhere on the machine is not found.
    env["RAY_TMPDIR"] = str(site_dir / "no-ray")
    env.update(extra_env or {})
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "kavg_ray.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert log.exists(), "the import recorder did not run"
    heavy = log.read_text()
    log.unlink()
    return proc, seconds, heavy


@pytest.mark.parametrize(("args", "content", "fragment"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_is_refused_cleanly(tmp_path, site_dir, args, content, fragment):
    if content is not None:
        data = content if isinstance(content, bytes) else content.encode()
        (tmp_path / "bad.yaml").write_bytes(data)
    before = _listing(tmp_path)

    proc, seconds, heavy = run_kavg(args, tmp_path, site_dir)

    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0][7:].strip(), lines
    assert fragment in lines[0], lines[0]
    assert _listing(tmp_path) == before  # nothing created: no kavg_results/, no spec copy
    assert heavy == "", f"bad input imported {heavy}"
    assert seconds < TIME_LIMIT_S, seconds


@pytest.mark.parametrize(
    "args",
    [("--help",), ("train", "--help"), ("sweep", "run", "--help"), ("results", "show", "-h")],
)
def test_help_is_fast_and_light(tmp_path, site_dir, args):
    proc, seconds, heavy = run_kavg(args, tmp_path, site_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ")
    assert proc.stderr == ""
    assert heavy == ""
    assert seconds < TIME_LIMIT_S
    assert _listing(tmp_path) == set()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("train",), "Missing argument 'CONFIG'"),
        (("sweep", "run", "x.yaml", "--bogus"), "No such option '--bogus'"),
        (("results", "show", "s", "--format", "xml"), "Invalid value for '--format'"),
        (("frobnicate",), "No such command 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2(tmp_path, site_dir, args, fragment):
    proc, seconds, heavy = run_kavg(args, tmp_path, site_dir)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert fragment in proc.stderr
    assert heavy == ""
    assert _listing(tmp_path) == set()


def test_the_import_recorder_sees_heavy_imports(tmp_path, site_dir):
    # The check above is only worth something if the recorder notices a heavy import.
    log = site_dir / "probe.txt"
    env = {**os.environ, "PYTHONPATH": str(site_dir), "KAVG_TEST_IMPORT_LOG": str(log)}
    subprocess.run([sys.executable, "-c", "import sklearn"], env=env, check=True, cwd=tmp_path)
    assert log.read_text() == "sklearn"


def test_config_module_imports_no_heavy_module():
    code = (
        "import sys, kavg_ray.cli, kavg_ray.config\n"
        f"print(' '.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("address", "timeout", "fragment"),
    [
        # Nothing listens: refused at once (it once waited 205 s for Ray to give up).
        ("127.0.0.1:{port}", "10", "connection refused"),
        # A host that never answers (TEST-NET-1, RFC 5737): the stated limit, then one line.
        ("192.0.2.1:6379", "1", ""),
    ],
)
def test_an_address_that_does_not_answer_fails_in_one_line(
    tmp_path, site_dir, address, timeout, fragment
):
    address = address.format(port=_free_port())
    (tmp_path / "bad.yaml").write_text(sweep_doc({"K": [1]}))
    proc, seconds, heavy = run_kavg(
        (*SWEEP, "--address", address), tmp_path, site_dir, {"KAVG_CONNECT_TIMEOUT_S": timeout}
    )
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no Ray cluster answers at {address}")
    assert f"of {timeout} s, KAVG_CONNECT_TIMEOUT_S" in lines[0] and fragment in lines[0].lower()
    assert proc.stdout == "" and heavy == ""
    assert seconds < float(timeout) + TIME_LIMIT_S
    assert _listing(tmp_path) == {"bad.yaml"}
