"""`kavg calibrate` (kavg_ray.launch.calibrate): sizes, timing over gloo, the Ray run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kavg_ray.analysis.costmodel import fit_alpha_beta, parse_network
from kavg_ray.errors import BadInputError
from kavg_ray.launch.calibrate import format_fit, parse_sizes, profile_of, time_averages
from tests.distributed import run_distributed
from tests.ray_head import RayHead

KAVG = Path(sys.executable).with_name("kavg")


def test_parse_sizes() -> None:
    assert parse_sizes("4k, 1M,64KB,1000") == [1000, 4000, 64000, 1_000_000]
    assert parse_sizes("1.5M,10") == [8, 1_500_000]  # rounded down to float32 elements
    for bad in ("", "4k", "4x,8k", "0,8k", "5G,8k", "-4,8k"):
        with pytest.raises(BadInputError):
            parse_sizes(bad)


def _check_times(rank: int, world: int, out: str) -> None:
    times = time_averages([400, 4_000_000], repeats=3, warmup=1)
    assert len(times) == 2 and all(t > 0 for t in times)
    Path(out, f"rank{rank}.json").write_text(json.dumps(times))


def test_time_averages_agree_across_ranks(tmp_path: Path) -> None:
    run_distributed(_check_times, 2, str(tmp_path))
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert a == b  # every rank returns the means of the shortest rank's times
    assert a[1] > a[0]  # 4 MB takes longer than 400 B


def _check_gap(rank: int, world: int, out: str) -> None:
    import time

    start = time.perf_counter()
    times = time_averages([400, 4_000], repeats=3, warmup=1, min_seconds=0.0, gap_s=0.05)
    Path(out, f"rank{rank}.json").write_text(json.dumps([time.perf_counter() - start, *times]))


def test_time_averages_compute_for_the_gap_before_each_average(tmp_path: Path) -> None:
    run_distributed(_check_gap, 2, str(tmp_path))
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # 2 sizes x (1 warm-up + 3 timed) averages, each after 50 ms of computation
    assert a[0] >= 8 * 0.05 and b[0] >= 8 * 0.05
    assert a[1:] == b[1:] and all(t < 0.05 for t in a[1:])  # the gap is not timed


def test_profile_round_trip(tmp_path: Path) -> None:
    samples = [(2, 1e3, 1e-4 + 1e-6), (2, 1e6, 1e-4 + 1e-3), (4, 1e6, 3e-4 + 1.5e-3)]
    fit = fit_alpha_beta(samples)
    details = {"address": "local (127.0.0.1)", "backend": "gloo", "P": [2, 4], "repeats": 3,
               "measurements": []}  # fmt: skip
    net = profile_of(fit, details, "lab")
    from kavg_ray.analysis.costmodel import write_profile

    path = write_profile(tmp_path / "lab.json", net)
    back = parse_network(str(path))
    assert back.name == "lab"
    assert back.inter.alpha == pytest.approx(fit.alpha) and back.inter.beta == pytest.approx(
        fit.beta
    )
    assert json.loads(path.read_text())["calibration"]["P"] == [2, 4]
    assert "alpha =" in format_fit(fit).splitlines()[0]


def test_cli_rejects_bad_sizes_before_starting_ray(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(KAVG), "calibrate", "--P", "2", "--sizes", "4x", "--out", str(tmp_path / "p.json")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: bad size")


@pytest.mark.ray
def test_calibrate_on_ray(tmp_path: Path, ray_head: RayHead) -> None:
    out = tmp_path / "lab.yaml"
    proc = subprocess.run(
        [str(KAVG), "calibrate", "--P", "2", "--sizes", "4k,4M", "--repeats", "3",
         "--out", str(out), "--name", "lab", "--gap-ms", "5", "--address", ray_head.address],
        capture_output=True, text=True, timeout=300, env=ray_head.env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("alpha = ")
    net = parse_network(str(out))
    assert net.name == "lab" and net.inter.beta > 0 and net.inter.alpha >= 0
    assert net.extra["calibration"]["gap_s"] == 0.005  # the profile says how it was timed
