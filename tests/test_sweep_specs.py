"""Every sweep spec shipped under sweeps/ validates, and the paper specs say what the paper says.

Validation only (no torch, no Ray): each ``sweeps/**/*.yaml`` with a ``grid:`` is read with
:func:`kavg_ray.config.load_sweep` and expanded; one without is a run config for
:func:`kavg_ray.config.load_run`. ``sweeps/paper/`` holds the full-scale specs of the K-AVG
paper's section 4 (GPU cluster); ``sweeps/paper-small/`` their scaled-down twins for a
2-core CPU machine (docs/reproduction/README.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kavg_ray.config import RunConfig, SweepSpec, load_run, load_sweep, read_yaml

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = ROOT / "sweeps"
PAPER = SWEEPS / "paper"
SMALL = SWEEPS / "paper-small"
MNIST1D = SWEEPS / "mnist1d"  # the claims study on MNIST-1D (docs/reproduction/README.md)
SPECS = sorted(SWEEPS.rglob("*.yaml"))

PAPER_P = {8, 16, 32, 64, 128}
PAPER_K = {1, 2, 4, 16, 32, 64}
# Each full-scale spec and its scaled-down twin(s).
TWINS = {
    "fig1_fig3_vgg16_asgd": ["small_fig1_4_asgd"],
    "fig2_fig4_nin_asgd": ["small_fig1_4_asgd"],
    "fig5_vgg16_k": ["small_fig5_mlp", "small_fig5_mlp_lr1", "small_fig5_mlp_real"],
    "fig6_nin_k": ["small_fig6_cnn", "small_fig6_cnn_real"],
    "fig7_vgg16_sgd_gap": ["small_fig7_mlp"],
    "fig7_nin_sgd_gap": ["small_fig7_cnn"],
}
# What a CPU twin may use on the 2-core development machine.
SMALL_CPUS = 2
SMALL_MAX_TRIALS = 24


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _sweep(path: Path) -> SweepSpec:
    return load_sweep(path)


def _points(name: str, folder: Path = PAPER) -> list[RunConfig]:
    return _sweep(folder / f"{name}.yaml").points()


def _values(points: list[RunConfig], attr: str) -> set:
    return {getattr(p, attr) for p in points}


def test_specs_found() -> None:
    assert SPECS, "no sweep specs under sweeps/"
    assert {p.stem for p in PAPER.glob("*.yaml")} == set(TWINS)
    assert {p.stem for p in SMALL.glob("*.yaml")} == {t for ts in TWINS.values() for t in ts}


@pytest.mark.parametrize("path", SPECS, ids=_rel)
def test_spec_validates_and_expands(path: Path) -> None:
    doc = read_yaml(path)
    if "grid" not in doc:
        cfg = load_run(path)
        assert cfg.name == doc.get("name", "run") and cfg.P == doc.get("P", 1)
        assert cfg.trial_name().startswith(f"K{cfg.K}-P{cfg.P}-s{cfg.seed}")
        return
    spec = _sweep(path)
    points = spec.points()
    # Every combination of the grid's values, once per variant, in the grid's own values.
    expected = len(spec.variants)
    for values in spec.grid.values():
        expected *= len(values)
    assert len(points) == expected
    for key, values in spec.grid.items():
        assert {p.grid_value(key) for p in points} == set(values), key
    assert {p.name for p in points} == {doc["name"]}
    names = [p.trial_name() for p in points]
    assert len(set(names)) == len(names), f"{_rel(path)}: duplicate trial names"


def test_sweep_names_unique() -> None:
    names = [read_yaml(p).get("name") for p in SPECS]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes, f"two specs share a sweep name: {sorted(dupes)}"


@pytest.mark.parametrize("path", sorted([*PAPER.glob("*.yaml"), *SMALL.glob("*.yaml")]), ids=_rel)
def test_paper_spec_named_after_file_and_commented(path: Path) -> None:
    text = path.read_text()
    assert read_yaml(path)["name"] == path.stem
    assert text.startswith("#"), f"{_rel(path)}: no header comment"
    assert "Figure" in text.split("\nname:")[0]


@pytest.mark.parametrize("name", sorted(TWINS))
def test_paper_spec_is_a_gpu_cifar_run_of_600_epochs(name: str) -> None:
    path = PAPER / f"{name}.yaml"
    header = path.read_text().split("\nname:")[0]
    assert "GPUs per trial = P" in header and "GPU-hours" in header
    for p in _points(name):
        wl, res = p.workload, p.resources
        assert (wl.dataset, wl.download, wl.epochs) == ("cifar10", True, 600)
        assert wl.data_dir
        assert (wl.lr.initial, wl.lr.halve_every_epochs) == (1.0, 50)
        assert res.use_gpu and res.gpus_per_worker == 1
        assert p.backend == "ray"
        assert wl.model == ("vgg16" if "vgg16" in name else "nin")


@pytest.mark.parametrize("name", ["fig5_vgg16_k", "fig6_nin_k"])
def test_fig5_fig6_settings(name: str) -> None:
    points = _points(name)
    assert _values(points, "P") == PAPER_P
    assert _values(points, "K") == PAPER_K
    assert _values(points, "algorithm") == {"kavg"}
    assert {p.workload.batch_size for p in points} == {32}
    assert len(points) == len(PAPER_P) * len(PAPER_K)


@pytest.mark.parametrize("name", ["fig1_fig3_vgg16_asgd", "fig2_fig4_nin_asgd"])
def test_fig1_to_fig4_settings(name: str) -> None:
    points = _points(name)
    assert _values(points, "algorithm") == {"kavg", "downpour", "eamsgd"}
    assert {p.K for p in points if p.algorithm == "kavg"} == {16}
    for algo in ("kavg", "downpour", "eamsgd"):
        assert {p.P for p in points if p.algorithm == algo} == PAPER_P
    assert {p.workload.batch_size for p in points} == {16}


@pytest.mark.parametrize("name", ["fig7_vgg16_sgd_gap", "fig7_nin_sgd_gap"])
def test_fig7_settings(name: str) -> None:
    points = _points(name)
    assert _values(points, "P") == PAPER_P | {1}  # P = 1: the sequential SGD baseline
    assert _values(points, "algorithm") == {"kavg"}
    assert {p.workload.batch_size for p in points} == {32}


@pytest.mark.parametrize("path", sorted(SMALL.glob("*.yaml")), ids=_rel)
def test_small_twin_fits_two_cpu_cores(path: Path) -> None:
    points = _sweep(path).points()
    assert len(points) <= SMALL_MAX_TRIALS
    for p in points:
        assert not p.resources.use_gpu
        assert p.workload.dataset in ("digits", "synthetic")
        assert p.workers * p.resources.cpus_per_worker <= SMALL_CPUS
        if p.backend == "ray" and p.algorithm == "kavg":
            assert p.P <= 4


def test_small_twins_keep_each_figures_structure() -> None:
    sim5 = _points("small_fig5_mlp", SMALL)
    sim6 = _points("small_fig6_cnn", SMALL)
    for points in (sim5, sim6):
        # K_opt per P: several P beyond what real processes allow here, K = 1 and K > 1.
        assert len(_values(points, "P")) >= 3 and max(_values(points, "P")) > 4
        assert 1 in _values(points, "K") and len(_values(points, "K")) >= 4
        assert _values(points, "backend") == {"simulated"}
    lr1 = _points("small_fig5_mlp_lr1", SMALL)
    assert {p.workload.lr.initial for p in lr1} == {1.0}  # the paper's gamma0
    assert {(p.K, p.P) for p in lr1} == {(p.K, p.P) for p in sim5}
    # Each real-backend check repeats one P of its simulated twin with the same workload.
    for sim, real in ((sim5, "small_fig5_mlp_real"), (sim6, "small_fig6_cnn_real")):
        real_points = _points(real, SMALL)
        assert _values(real_points, "backend") == {"ray"}
        assert _values(real_points, "P") <= _values(sim, "P")
        assert _values(real_points, "K") <= _values(sim, "K")
        assert {p.workload for p in real_points} <= {p.workload for p in sim}
    asgd = _points("small_fig1_4_asgd", SMALL)
    assert _values(asgd, "algorithm") == {"kavg", "downpour", "eamsgd"}
    assert {p.K for p in asgd if p.algorithm == "kavg"} == {16}
    assert {p.workload.lr.initial for p in asgd} == {1.0}
    for name in ("small_fig7_mlp", "small_fig7_cnn"):
        assert 1 in _values(_points(name, SMALL), "P")


@pytest.mark.parametrize("path", sorted(MNIST1D.glob("*.yaml")), ids=_rel)
def test_mnist1d_claim_spec_says_what_it_tests_and_fits_two_cpu_cores(path: Path) -> None:
    text = path.read_text()
    header = text.split("\nname:")[0]
    assert text.startswith("#") and "laim" in header and "Cost here" in header, _rel(path)
    assert read_yaml(path)["name"] == path.stem
    spec = _sweep(path)
    points = spec.points()
    for p in points:
        assert p.workload.dataset == "mnist1d" and not p.resources.use_gpu
        assert p.workers * p.resources.cpus_per_worker <= SMALL_CPUS
        if p.backend == "ray":
            assert p.P <= 4  # real processes only for the spot checks and claim (c)
    if _values(points, "backend") == {"simulated"}:
        assert spec.pack and len(_values(points, "seed")) >= 5


# ------------------------------------------------------------------ make demo's quickstart
QUICKSTART = SWEEPS / "quickstart.yaml"


def _readme_quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]


def test_quickstart_spec_is_what_the_readme_says() -> None:
    points = _sweep(QUICKSTART).points()
    assert _values(points, "P") == {16}
    assert _values(points, "K") == {1, 4, 16}
    assert _values(points, "seed") == {0, 1, 2, 3}
    assert (_values(points, "backend"), _values(points, "algorithm")) == ({"simulated"}, {"kavg"})
    assert _sweep(QUICKSTART).pack and len(points) == 12
    for p in points:
        wl = p.workload
        assert (wl.dataset, wl.model) == ("mnist1d", "mlp1d")
        assert wl.dataset_args == {"num_samples": 10000}
        assert (wl.steps, wl.eval_every_steps, wl.batch_size, wl.lr.initial) == (930, 310, 16, 0.3)
        assert p.target_accuracy is None  # ranked by accuracy; time comes from --network
    readme = _readme_quickstart()
    said = ("P = 16 learners", "K in {1, 4, 16}, 4 seeds", "12 runs", "MNIST-1D", "10,000",
            "930 local steps", "lr 0.3, batch 16", "40-100-100-10 MLP")  # fmt: skip
    for words in said:
        assert words in " ".join(readme.split()), words
    # The demo prices the sweep on the two networks, target and step time the README names.
    demo = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    price = (ROOT / "Makefile").read_text().split("DEMO_PRICE :=", 1)[1].split("\n", 1)[0]
    assert "kavg sweep run sweeps/quickstart.yaml --resume" in demo
    assert "--by time --target 0.58 --step-time 0.0005" in price
    assert [line.split("--network ")[1] for line in demo.splitlines() if "--network" in line] == [
        "ib400", "wan400g"]  # fmt: skip
    assert "58% test accuracy" in " ".join(readme.split()) and "0.5 ms" in readme


def test_quickstart_readme_table_follows_from_its_runs() -> None:
    """The K_opt row pasted in the README is what kopt_table makes of the runs' final
    accuracies pasted above it (the packed runs end with these; rerunning all 12 in
    process takes about 20 s here, too slow for this file)."""
    import re

    import pandas as pd

    from kavg_ray.analysis.results import kopt_table

    readme = _readme_quickstart()
    ends = re.findall(r"\[kavg\] end   K(\d+)-P16-s(\d)-sim  completed  acc ([0-9.]+)", readme)
    assert len(ends) == 12
    trials = pd.DataFrame(
        [{"algorithm": "kavg", "dataset": "mnist1d", "model": "mlp1d", "P": 16, "K": int(k),
          "seed": int(s), "status": "completed", "final_test_acc": float(a)}
         for k, s, a in ends]
    )  # fmt: skip
    row = kopt_table(trials, by="accuracy").iloc[0]
    shown = re.search(
        r"\n +kavg mnist1d mlp1d 16 +(\d+) +(\w+) +([0-9.]+) +(\d+ \([0-9.]+\)) +([0-9.]+) "
        r"+([0-9.]+) +([0-9.]+) +([0-9.]+) +([0-9.]+) +([0-9.]+)",
        readme,
    )  # the first such row: K_opt by accuracy
    assert shown is not None
    assert (int(row["K_opt"]), row["verdict"], row["credible_set"]) == (4, "clear", "4 (1.00)")
    assert shown.groups()[:4] == ("4", "clear", f"{row['freq_best']:g}", row["credible_set"])
    assert float(shown.group(5)) == pytest.approx(row["freq_k1"])  # 0.002
    for i, key in zip(range(6, 11), ("diff_vs_k1", "diff_vs_k1_lo", "diff_vs_k1_hi", "mean",
                                     "std"), strict=True):  # fmt: skip
        assert float(shown.group(i)) == pytest.approx(row[key], abs=5e-5), key
    assert set(row["K_values_tried"].split(",")) == {"1", "4", "16"}
