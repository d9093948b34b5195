"""The communication cost model (kavg_ray.analysis.costmodel, docs/design.md section 10)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kavg_ray.analysis import costmodel as cm
from kavg_ray.analysis.results import ResultsStore
from kavg_ray.cli import main
from kavg_ray.errors import BadInputError

KAVG = Path(sys.executable).with_name("kavg")


# --------------------------------------------------------------------------- formulas


@pytest.mark.parametrize(
    ("P", "nbytes", "alpha", "beta", "expected"),
    [
        (1, 1e9, 1e-3, 1e6, 0.0),  # one learner never communicates
        (2, 1e6, 1e-5, 1e9, 2e-5 + 1e-3),  # 2*1*a + 2*1/2 * n/b
        (4, 8e6, 5e-6, 25e9, 6 * 5e-6 + 1.5 * 8e6 / 25e9),
        (8, 0.0, 1e-6, 1e9, 14e-6),  # latency only
        (16, 1e8, 0.0, 1e10, 2 * 15 / 16 * 1e-2),  # bandwidth only
    ],
)
def test_allreduce_time_table(P, nbytes, alpha, beta, expected) -> None:
    assert cm.allreduce_time(P, nbytes, cm.Link(alpha, beta)) == pytest.approx(expected, rel=1e-12)


def test_server_time_counts_learner_and_server_link() -> None:
    learner, server = cm.server_time(4, 10, 6, 1e6, cm.Link(1e-5, 1e9))
    assert learner == pytest.approx(16 * (1e-5 + 1e-3), rel=1e-12)
    assert server == pytest.approx(4 * 10 * 1e-3, rel=1e-12)  # max(pushes, pulls) = 10


def test_presets_carry_their_line_rates() -> None:
    assert cm.PRESETS["eth1g"].inter.beta == pytest.approx(0.125e9)
    assert cm.PRESETS["eth10g"].inter.beta == pytest.approx(1.25e9)
    assert cm.PRESETS["eth100g"].inter.beta == pytest.approx(12.5e9)
    assert cm.PRESETS["ib200"].inter.beta == pytest.approx(25e9)
    assert cm.PRESETS["ib400"].inter.beta == pytest.approx(50e9)
    assert cm.PRESETS["nvlink"].inter.beta == pytest.approx(300e9)
    assert cm.PRESETS["eth10g"].inter.alpha == pytest.approx(30e-6)


def test_parse_network_forms(tmp_path: Path) -> None:
    net = cm.parse_network("alpha=2e-5,bandwidth=3")
    assert (net.inter.alpha, net.inter.beta, net.intra) == (2e-5, 3e9, None)
    both = cm.parse_network("inter=eth10g,intra=nvlink")
    assert both.inter == cm.PRESETS["eth10g"].inter
    assert both.local_link == cm.PRESETS["nvlink"].inter
    assert cm.parse_network("IB200") is cm.PRESETS["ib200"]
    path = cm.write_profile(tmp_path / "p.yaml", net)
    back = cm.parse_network(str(path))
    assert (back.inter.alpha, back.inter.beta) == (2e-5, pytest.approx(3e9))


@pytest.mark.parametrize(
    "spec",
    ["alpha=-1,bandwidth=1", "alpha=0,bandwidth=0", "alpha=1e-5", "ethernet", "alpha=x,bandwidth=1",
     "inter=warp,intra=nvlink", "missing.json"],
)  # fmt: skip
def test_parse_network_rejects(spec: str) -> None:
    with pytest.raises(BadInputError):
        cm.parse_network(spec)


# --------------------------------------------------------------------------- fit


def test_fit_recovers_alpha_and_beta() -> None:
    alpha, beta = 2.5e-5, 3e9
    link = cm.Link(alpha, beta)
    sizes = [1e3, 1e4, 1e5, 1e6, 1e7, 1e8]
    samples = [(P, n, cm.allreduce_time(P, n, link)) for P in (2, 4) for n in sizes]
    fit = cm.fit_alpha_beta(samples)
    assert fit.alpha == pytest.approx(alpha, rel=1e-9)
    assert fit.beta == pytest.approx(beta, rel=1e-9)
    assert fit.rms_rel_error < 1e-9
    assert list(fit.residuals.columns) == ["P", "nbytes", "measured_s", "predicted_s", "rel_error"]


def test_fit_with_noise_is_close_and_clamps_negative_latency() -> None:
    rng = np.random.default_rng(0)
    link = cm.Link(1e-4, 1e9)
    samples = [
        (2, n, cm.allreduce_time(2, n, link) * (1 + 0.02 * rng.standard_normal()))
        for n in np.geomspace(1e3, 1e8, 12)
    ]
    fit = cm.fit_alpha_beta(samples)
    assert fit.alpha == pytest.approx(1e-4, rel=0.1)
    assert fit.beta == pytest.approx(1e9, rel=0.1)
    # Pure bandwidth timings minus a little: the free fit would want alpha < 0.
    bw_only = [(2, n, n / 1e9 - 1e-7) for n in (1e6, 1e7, 1e8)]
    clamped = cm.fit_alpha_beta(bw_only)
    assert clamped.alpha == 0.0
    assert clamped.beta == pytest.approx(1e9, rel=0.05)


def test_fit_needs_two_sizes() -> None:
    with pytest.raises(BadInputError):
        cm.fit_alpha_beta([(2, 1e6, 1e-3), (2, 1e6, 1.1e-3)])


# --------------------------------------------------------------------------- trials

N = 1e8  # bytes per average in the hand-made sweep
STEPS_PER_EPOCH = 100  # per learner: 4000 samples / (P=4 x B=10)
ACC = {1: [0.9, 0.95, 0.97], 4: [0.8, 0.9, 0.95], 16: [0.7, 0.85, 0.9]}


def _hand_sweep() -> tuple[pd.DataFrame, pd.DataFrame]:
    """P=4, B=10, K in {1, 4, 16}: K=1 reaches 0.9 at epoch 1, K=4 at 2, K=16 at 3."""
    trials, hist = [], []
    for K, accs in ACC.items():
        tid = f"K{K}-P4-s0"
        trials.append(
            {"trial_id": tid, "algorithm": "kavg", "model": "mlp", "dataset": "digits",
             "backend": "ray", "P": 4, "K": K, "seed": 0, "batch_size": 10, "epochs": 3,
             "status": "completed", "final_test_acc": accs[-1],
             "bytes_communicated": (3 * STEPS_PER_EPOCH // K) * N,
             "rounds": 3 * STEPS_PER_EPOCH // K}
        )  # fmt: skip
        for e, acc in enumerate(accs, start=1):
            rounds = e * STEPS_PER_EPOCH // K
            hist.append(
                {"trial_id": tid, "epoch": e, "samples": 4000 * e, "rounds": rounds,
                 "test_acc": acc, "compute_time_s": 0.02 * STEPS_PER_EPOCH * e,
                 "comm_time_s": 0.0, "bytes_communicated": rounds * N,
                 "wall_time_s": 5.0 * e}
            )  # fmt: skip
    return pd.DataFrame(trials), pd.DataFrame(hist)


def test_time_to_target_of_a_hand_made_history() -> None:
    trials, hist = _hand_sweep()
    net = cm.parse_network("alpha=1e-5,bandwidth=2")
    pred = cm.predict_trials(trials, hist, net, step_time=0.01, target=0.9).set_index("K")
    per_avg = 2 * 3 * 1e-5 + 1.5 * N / 2e9  # 0.07506 s
    # K=16 reaches 0.9 at epoch 3: 300 local steps, 18 averages.
    assert pred.loc[16, "local_steps_to_target"] == 300
    assert pred.loc[16, "averages_to_target"] == 18
    assert pred.loc[16, "predicted_time_to_target_s"] == pytest.approx(3.0 + 18 * per_avg)
    assert pred.loc[4, "predicted_time_to_target_s"] == pytest.approx(2.0 + 50 * per_avg)
    assert pred.loc[1, "predicted_time_to_target_s"] == pytest.approx(1.0 + 100 * per_avg)
    assert pred.loc[4, "model_bytes"] == N  # bytes_communicated / rounds
    assert pred.loc[4, "measured_time_to_target_s"] == 10.0  # wall time at epoch 2
    # End of the budget (epoch 3) and its communication alone.
    assert pred.loc[1, "predicted_time_s"] == pytest.approx(3.0 + 300 * per_avg)
    assert pred.loc[1, "predicted_comm_time_s"] == pytest.approx(300 * per_avg)
    # Measured step time: compute_time_s / local steps = 0.02 s.
    measured = cm.predict_trials(trials, hist, net, target=0.9).set_index("K")
    assert measured.loc[4, "step_time_s"] == pytest.approx(0.02)
    assert measured.loc[4, "step_time_source"] == "measured"
    # A target nobody reaches: NaN, not a candidate.
    never = cm.predict_trials(trials, hist, net, step_time=0.01, target=0.99)
    assert never["predicted_time_to_target_s"].isna().all()


@pytest.mark.parametrize(("bandwidth", "kopt"), [(1000.0, 1), (5.0, 4), (1.0, 16)])
def test_kopt_by_time_grows_as_bandwidth_falls(bandwidth: float, kopt: int) -> None:
    trials, hist = _hand_sweep()
    net = cm.parse_network(f"alpha=0,bandwidth={bandwidth}")
    pred = cm.predict_trials(trials, hist, net, step_time=0.01, target=0.9)
    table = cm.kopt_by_predicted_time(pred)
    assert list(table["K_opt"]) == [kopt]
    per_avg = 1.5 * N / (bandwidth * 1e9)
    steps, avgs = {1: (100, 100), 4: (200, 50), 16: (300, 18)}[kopt]
    assert table["predicted_time_s"].iloc[0] == pytest.approx(0.01 * steps + avgs * per_avg)
    assert table["measured_time_s"].iloc[0] == 5.0 * steps / 100
    assert list(table["measured_K_opt"]) == [1]  # wall time here is 5 s per epoch


def test_hier_avg_uses_both_links() -> None:
    trial = {
        "trial_id": "h", "algorithm": "hier_avg", "model": "mlp", "dataset": "digits",
        "backend": "ray", "P": 8, "S": 4, "K": 8, "batch_size": 5, "status": "completed",
    }  # fmt: skip
    hist = pd.DataFrame(
        [{"trial_id": "h", "epoch": 1, "samples": 8 * 5 * 64, "rounds": 8, "test_acc": 0.95,
          "global_reductions": 8, "local_reductions": 24, "compute_time_s": 1.0,
          "bytes_communicated": 32 * 1e6, "wall_time_s": 2.0}]
    )  # fmt: skip
    net = cm.parse_network("alpha=1e-5,bandwidth=1,intra_alpha=1e-6,intra_bandwidth=100")
    pred = cm.predict_trials(pd.DataFrame([trial]), hist, net, step_time=0.001, target=0.9)
    g = 8 * (14 * 1e-5 + 2 * 7 / 8 * 1e6 / 1e9)
    loc = 24 * (6 * 1e-6 + 2 * 3 / 4 * 1e6 / 100e9)
    assert pred["model_bytes"].iloc[0] == 1e6  # 32 MB over 8 + 24 reductions
    assert pred["predicted_time_to_target_s"].iloc[0] == pytest.approx(64 * 0.001 + g + loc)


def test_parameter_server_and_speedup() -> None:
    rows, hist = [], []
    for algo, rounds, sent, acc in (("kavg", 4, 4 * 1e6, 0.9), ("downpour", 128, 128e6, 0.9)):
        rows.append({"trial_id": algo, "algorithm": algo, "model": "mlp", "dataset": "digits",
                     "backend": "ray", "P": 2, "K": 16 if algo == "kavg" else 1,
                     "batch_size": 4, "status": "completed"})  # fmt: skip
        hist.append({"trial_id": algo, "epoch": 1, "samples": 2 * 4 * 64, "rounds": rounds,
                     "test_acc": acc, "compute_time_s": 0.64, "bytes_communicated": sent,
                     "wall_time_s": 1.0})  # fmt: skip
    net = cm.parse_network("alpha=1e-4,bandwidth=1")
    pred = cm.predict_trials(
        pd.DataFrame(rows), pd.DataFrame(hist), net, target=0.9, sizer=lambda m, d: 1e6
    ).set_index("algorithm")
    # Downpour: 64 pushes and 64 pulls per learner of 1 MB each.
    learner = 64 * 0.01 + 128 * (1e-4 + 1e-3)
    server = 2 * 64 * 1e-3
    assert pred.loc["downpour", "predicted_time_s"] == pytest.approx(max(learner, server))
    kavg = 64 * 0.01 + 4 * (2e-4 + 1e-3)
    assert pred.loc["kavg", "predicted_time_s"] == pytest.approx(kavg)
    speed = cm.asgd_speedup_table(pred.reset_index())
    assert speed["speedup_over_downpour"].iloc[0] == pytest.approx(max(learner, server) / kavg)


def test_measured_transfer_is_the_averaging_time_less_the_wait() -> None:
    trials, hist = _hand_sweep()
    hist["comm_time_s"] = 2.0 * hist["epoch"]
    hist["wait_time_s"] = 0.5 * hist["epoch"]
    net = cm.parse_network("alpha=1e-5,bandwidth=2")
    pred = cm.predict_trials(trials, hist, net, target=0.9)
    assert list(pred["measured_transfer_time_s"]) == [4.5, 4.5, 4.5]  # epoch 3: 6.0 - 1.5
    # A store written before the wait was measured: unknown, not the whole comm time.
    older = cm.predict_trials(trials, hist.drop(columns="wait_time_s"), net, target=0.9)
    assert older["measured_transfer_time_s"].isna().all()


def test_simulated_step_time_is_shared_by_the_stacked_learners() -> None:
    trials, hist = _hand_sweep()
    trials["backend"] = "simulated"
    pred = cm.predict_trials(trials, hist, cm.PRESETS["nvlink"], target=0.9)
    assert pred["step_time_s"].iloc[0] == pytest.approx(0.02 / 4)
    assert pred["step_time_source"].iloc[0] == "measured/P (simulated)"


def test_model_bytes_from_the_model() -> None:
    # mlp on digits: 64*128 + 128 + 128*10 + 10 parameters (kavg_ray.train.models), float32.
    from kavg_ray.train.models import build_model, model_bytes

    m = build_model("mlp", (1, 8, 8), 10)
    assert model_bytes("mlp", "digits") == 4 * sum(p.numel() for p in m.parameters())
    with pytest.raises(BadInputError):
        model_bytes("mlp", "imagenet")


def test_a_trial_without_bytes_needs_a_sizer() -> None:
    # A simulated trial moved nothing: without a model size its average cannot be priced.
    trial = {"trial_id": "t", "algorithm": "kavg", "P": 2, "K": 1, "model": "mlp",
             "dataset": "digits", "batch_size": 16, "status": "completed"}
    hist = pd.DataFrame([{"trial_id": "t", "epoch": 1, "samples": 64, "rounds": 2,
                          "bytes_communicated": 0, "test_acc": 0.5, "wall_time_s": 1.0}])
    with pytest.raises(BadInputError, match="moved no bytes"):
        cm.predict_trials(pd.DataFrame([trial]), hist, cm.PRESETS["nvlink"], step_time=0.01)
    pred = cm.predict_trials(pd.DataFrame([trial]), hist, cm.PRESETS["nvlink"], step_time=0.01,
                             sizer=lambda m, d: 1000.0)
    assert pred["model_bytes"].iloc[0] == 1000.0


# --------------------------------------------------------------------------- command line


def _store_hand_sweep(root: Path, target: float | None = 0.9) -> None:
    store = ResultsStore(root)
    trials, hist = _hand_sweep()
    for row in trials.to_dict("records"):
        h = hist[hist["trial_id"] == row["trial_id"]].to_dict("records")
        store.upsert_trial("hand", row, h)
    spec = {"name": "hand", "workload": {"dataset": "digits", "model": "mlp"}}
    store.write_spec("hand", {**spec, "target_accuracy": target} if target else spec)


def test_cli_kopt_by_time_on_a_network(tmp_path: Path) -> None:
    _store_hand_sweep(tmp_path)
    runner = CliRunner()
    args = ["results", "kopt", "hand", "--storage", str(tmp_path), "--by", "time"]
    out = {}
    for net in ("alpha=0,bandwidth=1000", "alpha=0,bandwidth=1"):
        res = runner.invoke(
            main, [*args, "--network", net, "--step-time", "0.01", "--format", "json"]
        )
        assert res.exit_code == 0, res.output
        out[net] = json.loads(res.stdout)[0]
    assert out["alpha=0,bandwidth=1000"]["K_opt"] == 1
    assert out["alpha=0,bandwidth=1"]["K_opt"] == 16
    assert out["alpha=0,bandwidth=1"]["predicted_time_s"] == pytest.approx(3 + 18 * 0.15)
    assert out["alpha=0,bandwidth=1"]["measured_time_s"] == 15.0
    csv = runner.invoke(main, [*args, "--network", "eth10g", "--format", "csv"])
    assert csv.exit_code == 0 and "predicted_time_s" in csv.stdout.splitlines()[0]
    table = runner.invoke(main, [*args, "--network", "eth10g"])
    assert table.stdout.startswith("network assumed: eth10g")


def test_cli_show_on_a_network_predicts_every_trial(tmp_path: Path) -> None:
    _store_hand_sweep(tmp_path, target=None)  # per trial, no target is needed
    runner = CliRunner()
    args = ["results", "show", "hand", "--storage", str(tmp_path), "--network",
            "alpha=1e-5,bandwidth=2", "--step-time", "0.01"]  # fmt: skip
    res = runner.invoke(main, [*args, "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["K"]: r for r in json.loads(res.stdout)}
    per_avg = 2 * 3 * 1e-5 + 1.5 * N / 2e9
    assert rows[4]["predicted_comm_time_s"] == pytest.approx(75 * per_avg)  # 300 steps / 4
    assert rows[4]["predicted_time_s"] == pytest.approx(3.0 + 75 * per_avg)
    assert rows[4]["predicted_time_to_target_s"] is None  # no target: not predicted
    table = runner.invoke(main, args)
    assert table.exit_code == 0, table.output
    assert table.stdout.startswith("network assumed: ")
    assert "predicted_comm_time_s" in table.stdout
    assert "predicted_time_to_target_s" not in table.stdout  # all NaN: left out
    # --target asks for the time to it as well.
    res = runner.invoke(main, [*args, "--target", "0.9", "--format", "json"])
    rows = {r["K"]: r for r in json.loads(res.stdout)}
    assert rows[16]["predicted_time_to_target_s"] == pytest.approx(3.0 + 18 * per_avg)


def test_cli_kopt_on_a_network_adds_the_speedup_over_the_parameter_server(tmp_path) -> None:
    _store_hand_sweep(tmp_path)
    store = ResultsStore(tmp_path)
    store.upsert_trial(
        "hand",
        {"trial_id": "downpour-P4-s0", "algorithm": "downpour", "model": "mlp",
         "dataset": "digits", "backend": "ray", "P": 4, "seed": 0, "batch_size": 10,
         "epochs": 3, "status": "completed", "final_test_acc": 0.9},
        [{"trial_id": "downpour-P4-s0", "epoch": e, "samples": 4000 * e, "rounds": 200 * e,
          "test_acc": 0.3 * e, "compute_time_s": 2.0 * e, "comm_time_s": 0.0,
          "bytes_communicated": 200 * e * N, "wall_time_s": 5.0 * e} for e in (1, 2, 3)],
    )  # fmt: skip
    args = ["results", "kopt", "hand", "--storage", str(tmp_path), "--by", "time",
            "--network", "alpha=0,bandwidth=1", "--step-time", "0.01"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    # Per learner: 300 steps of 0.01 s; K-AVG at K in {1, 4, 16} all-reduces 1e8 B over P = 4
    # (2 x 3/4 x 0.1 s a round); Downpour pushes and pulls 1e8 B 600 times, and the server
    # link carries P = 4 times that: 4 x 600 x 0.1 s.
    kavg = sum(3 + 300 // K * 0.15 for K in (1, 4, 16)) / 3  # whole rounds: 18 at K = 16
    line = res.stdout.strip().splitlines()[-1].split()
    assert line[0] == "4" and float(line[-1]) == pytest.approx(240 / kavg, rel=1e-3)
    assert "speed-up" in res.stdout
    json_out = CliRunner().invoke(main, [*args, "--format", "json"])
    assert "speedup" not in json_out.stdout  # machine-readable output: the K_opt table alone


def test_cli_plot_and_report_with_a_network(tmp_path: Path) -> None:
    _store_hand_sweep(tmp_path)
    runner = CliRunner()
    base = ["--storage", str(tmp_path), "--out", str(tmp_path / "out"), "--network", "eth1g"]
    res = runner.invoke(main, ["results", "plot", "hand", *base])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "predicted_time_vs_k.png").stat().st_size > 0
    res = runner.invoke(main, ["results", "report", "hand", *base])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Network assumed: eth1g: alpha 50 us, 0.125 GB/s" in text


def test_cli_needs_a_target(tmp_path: Path) -> None:
    _store_hand_sweep(tmp_path, target=None)
    args = ["results", "kopt", "hand", "--storage", str(tmp_path), "--by", "time"]
    res = CliRunner().invoke(main, [*args, "--network", "eth10g"])
    assert res.exit_code == 2 and "--target" in res.stderr
    res = CliRunner().invoke(main, [*args, "--network", "eth10g", "--target", "0.9"])
    assert res.exit_code == 0


@pytest.mark.parametrize(
    ("network", "needle"),
    [("alpha=-1,bandwidth=10", "alpha"), ("warp9", "unknown network"), ("BAD", "profile")],
)
def test_cli_bad_network_exits_2_with_one_line(tmp_path: Path, network: str, needle: str) -> None:
    _store_hand_sweep(tmp_path)
    if network == "BAD":
        (tmp_path / "bad.json").write_text("{not json")
        network = str(tmp_path / "bad.json")
    proc = subprocess.run(
        [str(KAVG), "results", "kopt", "hand", "--storage", str(tmp_path), "--by", "time",
         "--network", network],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- issue #28:
# payload, fragments, overlap, adaptive periods, the DiLoCo scaling-law study's networks


@pytest.mark.parametrize(
    ("elements", "payload", "expected"),
    [
        (1000, "fp32", 4000),
        (1000, "bf16", 2000),
        (1000, "fp16", 2000),
        (1000, "fp8", 1000 + 4 * 4),  # ceil(1000 / 256) = 4 float32 scales
        (1000, "int8", 1000 + 4 * 4),
        (1000, "int4", 500 + 4 * 4),
        (1001, "int4", 501 + 4 * 4),  # half a byte rounds up
        (256, "int8", 256 + 4),  # one full block: one scale
        (257, "int8", 257 + 8),  # one element more: a second block
        (0, "int8", 0),
    ],
)
def test_payload_bytes_exact(elements: int, payload: str, expected: int) -> None:
    assert cm.payload_bytes(elements, payload) == expected
    assert cm.PAYLOAD_BLOCK == 256


def test_quantized_average_is_all_to_all_then_all_gather() -> None:
    link = cm.Link(1e-5, 1e9)
    P, q = 4, 1016.0
    all_to_all = (P - 1) * 1e-5 + (P - 1) / P * q / 1e9  # shard j of q/P bytes to learner j
    all_gather = (P - 1) * 1e-5 + (P - 1) / P * q / 1e9  # every summed shard back
    both = all_to_all + all_gather
    assert cm.quantized_average_time(P, q, link) == pytest.approx(both, rel=1e-12)
    # The ring all-reduce's form, with the quantized bytes for n.
    assert cm.quantized_average_time(P, q, link) == pytest.approx(cm.allreduce_time(P, q, link))
    assert cm.average_time(P, q, link, "int8") == cm.quantized_average_time(P, q, link)
    assert cm.average_time(P, q, link, "bf16") == cm.allreduce_time(P, q, link)
    assert cm.quantized_average_time(1, q, link) == 0.0


def test_exposed_time_is_what_the_delay_does_not_hide() -> None:
    assert cm.exposed_time(0.05, 3, 0.01) == pytest.approx(0.02)  # 0.05 - 3 x 0.01
    assert cm.exposed_time(0.02, 3, 0.01) == 0.0  # fits in the 3 steps: hidden
    assert cm.exposed_time(0.05, 0, math.nan) == 0.05  # no delay: all paid, step time unused
    assert math.isnan(cm.exposed_time(0.05, 2, math.nan))  # a delay needs the step time


def _one_trial(tid: str, rounds: float, sent: float, steps: int, P: int = 4, **cols) -> tuple:
    """A K-AVG trial (B = 1) of ``steps`` local steps and ``rounds`` averages, one epoch."""
    trial = {"trial_id": tid, "algorithm": "kavg", "model": "mlp", "dataset": "digits",
             "backend": "ray", "P": P, "K": 8, "batch_size": 1, "status": "completed", **cols}
    hist = {"trial_id": tid, "epoch": 1, "samples": steps * P, "rounds": rounds,
            "bytes_communicated": sent, "test_acc": 0.9, "compute_time_s": 1.0,
            "wall_time_s": 1.0}  # fmt: skip
    return trial, hist


def _predict(rows: list[tuple], net: cm.Network, **kw) -> pd.DataFrame:
    trials = pd.DataFrame([r[0] for r in rows])
    hist = pd.DataFrame([r[1] for r in rows])
    return cm.predict_trials(trials, hist, net, **kw).set_index("trial_id")


def test_fragments_each_pay_their_own_latency_and_a_fraction_of_the_bytes() -> None:
    n, P, alpha, beta = 1e8, 4, 1e-3, 1e9
    net = cm.Network("t", cm.Link(alpha, beta))
    # 800 local steps at K = 8: 100 whole-model averages, or with F = 4 fragments 400
    # fragment averages (one every K/F = 2 steps) of n/4 bytes each.
    whole = _one_trial("F1", 100, 100 * n, 800, fragments=1)
    frags = _one_trial("F4", 400, 400 * n / 4, 800, fragments=4)
    pred = _predict([whole, frags], net, step_time=0.0)
    lat, bw = 2 * (P - 1) * alpha, 2 * (P - 1) / P * n / beta
    assert pred.loc["F1", "predicted_comm_time_s"] == pytest.approx(100 * (lat + bw), rel=1e-12)
    assert pred.loc["F4", "predicted_comm_time_s"] == pytest.approx(
        400 * (lat + bw / 4), rel=1e-12
    )
    assert pred.loc["F4", "model_bytes"] == n / 4  # bytes per (fragment) average
    # Same bytes in all; F - 1 more latencies per whole-model round.
    extra = pred.loc["F4", "predicted_comm_time_s"] - pred.loc["F1", "predicted_comm_time_s"]
    assert extra == pytest.approx(100 * 3 * lat, rel=1e-9)


def test_a_trial_that_moved_no_bytes_is_sized_as_its_payload_and_fragments() -> None:
    elements = 10_000
    trial = _one_trial("q", 40, 0, 80, P=2, fragments=4, payload="int8")
    pred = _predict([trial], cm.Network("t", cm.Link(0.0, 1e9)), step_time=0.0,
                    sizer=lambda m, d: 4.0 * elements)  # fmt: skip
    q = (elements + 4 * math.ceil(elements / 256)) / 4  # int8 with its scales, 1/F of it
    assert pred.loc["q", "model_bytes"] == pytest.approx(q, rel=1e-15)
    # P = 2: all-to-all and all-gather each move (P-1)/P q = q/2.
    assert pred.loc["q", "predicted_comm_time_s"] == pytest.approx(40 * q / 1e9, rel=1e-12)
    bf16 = _predict([_one_trial("h", 10, 0, 80, P=2, payload="BF16")],
                    cm.Network("t", cm.Link(0.0, 1e9)), step_time=0.0,
                    sizer=lambda m, d: 4.0 * elements)  # fmt: skip
    assert bf16.loc["h", "model_bytes"] == 2 * elements


def test_measured_quantized_bytes_are_priced_as_they_are() -> None:
    # A quantized trial's history holds the payload it handed in (scales included).
    q = 1016.0
    trial = _one_trial("m", 10, 10 * q, 80, P=4, payload="fp8")
    pred = _predict([trial], cm.Network("t", cm.Link(1e-6, 1e9)), step_time=0.0)
    assert pred.loc["m", "model_bytes"] == q
    one = 2 * 3 * 1e-6 + 2 * 3 / 4 * q / 1e9
    assert pred.loc["m", "predicted_comm_time_s"] == pytest.approx(10 * one, rel=1e-12)


@pytest.mark.parametrize(
    ("fragment_bytes", "paid", "hidden"),
    [(2e7, 0.0, 0.02), (5e7, 0.02, 0.03)],  # 0.02 s fits in 3 steps; 0.05 s does not
)
def test_overlap_hides_up_to_tau_steps(fragment_bytes: float, paid: float, hidden: float) -> None:
    # P = 2, alpha = 0: a fragment average takes (P-1)/P * 2 * bytes / beta = bytes / 1e9 s.
    # tau = 3 steps of 0.01 s hide up to 0.03 s of each.
    trial = _one_trial("o", 50, 50 * fragment_bytes, 400, P=2, fragments=2, fragment_delay=3)
    pred = _predict([trial], cm.Network("t", cm.Link(0.0, 1e9)), step_time=0.01)
    assert pred.loc["o", "predicted_comm_time_s"] == pytest.approx(50 * paid, abs=1e-15)
    assert pred.loc["o", "predicted_hidden_time_s"] == pytest.approx(50 * hidden, rel=1e-12)
    assert pred.loc["o", "predicted_time_s"] == pytest.approx(400 * 0.01 + 50 * paid, rel=1e-12)
    # The measured step time works as well: compute_time_s / steps = 1 / 400.
    measured = _predict([trial], cm.Network("t", cm.Link(0.0, 1e9)))
    t = fragment_bytes / 1e9
    assert measured.loc["o", "predicted_comm_time_s"] == pytest.approx(
        50 * max(0.0, t - 3 / 400), rel=1e-12
    )


def test_absent_columns_and_their_defaults_price_as_today() -> None:
    trials, hist = _hand_sweep()
    net = cm.parse_network("alpha=1e-5,bandwidth=2")
    today = cm.predict_trials(trials, hist, net, target=0.9)
    cols = [c for c in cm.PREDICTION_COLUMNS if c != "network"]
    defaults = trials.assign(payload="fp32", fragments=1, fragment_delay=0, K_schedule="constant")
    nans = trials.assign(payload=None, fragments=np.nan, fragment_delay=np.nan)
    for frame in (defaults, nans):
        again = cm.predict_trials(frame, hist, net, target=0.9)
        pd.testing.assert_frame_equal(again[cols], today[cols])
    assert (today["predicted_hidden_time_s"] == 0.0).all()


def test_an_adaptive_schedule_is_priced_by_the_averages_it_took() -> None:
    # K_schedule: adacomm from K = 4: K grew, so the history holds fewer averages than
    # steps / K. The price follows the history's rounds, not steps / K.
    trials, hist = _hand_sweep()
    trials = trials[trials["K"] == 4].assign(K_schedule="adacomm")
    rounds = np.array([25, 35, 40])
    hist = hist[hist["trial_id"] == "K4-P4-s0"].assign(rounds=rounds, bytes_communicated=rounds * N)
    net = cm.parse_network("alpha=1e-5,bandwidth=2")
    pred = cm.predict_trials(trials, hist, net, step_time=0.01, target=0.9).iloc[0]
    per_avg = 2 * 3 * 1e-5 + 1.5 * N / 2e9
    assert pred["averages_to_target"] == 35  # 0.9 at epoch 2
    assert pred["predicted_time_to_target_s"] == pytest.approx(2.0 + 35 * per_avg)
    assert pred["predicted_time_s"] == pytest.approx(3.0 + 40 * per_avg)  # not 75 averages


@pytest.mark.parametrize(("payload", "fragments"), [("bf16x", 1), ("fp32", 0)])
def test_bad_streaming_columns_are_refused(payload: str, fragments: int) -> None:
    trial = _one_trial("b", 10, 0, 80, payload=payload, fragments=fragments)
    with pytest.raises(BadInputError):
        _predict([trial], cm.PRESETS["eth10g"], step_time=0.0, sizer=lambda m, d: 400.0)


def test_archetype_presets_of_the_scaling_law_study() -> None:
    # Charles et al. 2025 (arXiv 2503.09799), Appendix A.3.
    for name, gbit, latency in (("wan400g", 400, 1e-4), ("wan100g", 100, 1e-3),
                                ("wan10g", 10, 1e-2)):  # fmt: skip
        net = cm.parse_network(name)
        assert net.inter.beta == pytest.approx(gbit * 1e9 / 8, rel=1e-15)
        assert net.inter.alpha == pytest.approx(latency, rel=1e-12)
        assert "2503.09799" in net.source


# The DiLoCo scaling-law study's idealized wall-clock time (Charles et al. 2025, arXiv
# 2503.09799, Appendix A.2), as implemented here (its formulas as a third-party reproduction
# citing A.2 and A.3 gives them; the paper's own text was not retrievable): T steps on R
# chips, a model of N parameters sent in bf16 (N_b = 16 N bits), s the compute time of one
# step (6 N B / (R Q): B tokens a step, Q FLOP/s a chip), W bandwidth (bit/s), eps latency:
#   Data-Parallel:   T s + T [2 N_b / W (1 - 1/R) + eps]
#   DiLoCo, M = 1:   the same (one replica: its outer step needs no communication)
#   DiLoCo, M >= 2:  T s + T [2 N_b / W0 (1 - M/R) + eps0] + (T/H) [2 N_b / W1 (1 - 1/R) + eps1]
#     inner all-reduce among a datacenter's R/M chips (W0, eps0), outer all-reduce over all
#     R chips across datacenters (W1, eps1) every H steps.
# In kavg: P = R learners, payload bf16 (2 N bytes), Data-Parallel the K-AVG row with
# K = 1 (T averages over R), DiLoCo a Hier-AVG row with groups of S = R/M (T local averages
# on the intra link, T/H global ones over all R on the inter link). kavg's ring pays
# 2 (S-1) message latencies per all-reduce where the study pays one: its eps is kavg's
# alpha = eps / (2 (S-1)) on that link.
PAPER_N, PAPER_R, PAPER_T, PAPER_H, PAPER_S = 1e9, 16, 1000, 100, 0.5
ARCHETYPES = [(400e9, 1e-4), (100e9, 1e-3), (10e9, 1e-2)]  # (W bit/s, eps s)


def _paper_dp(W: float, eps: float) -> float:
    N_b, R, T, s = 16 * PAPER_N, PAPER_R, PAPER_T, PAPER_S
    return T * s + T * (2 * N_b / W * (1 - 1 / R) + eps)


def _paper_diloco(M: int, W0: float, eps0: float, W1: float, eps1: float) -> float:
    N_b, R, T, H, s = 16 * PAPER_N, PAPER_R, PAPER_T, PAPER_H, PAPER_S
    inner = T * (2 * N_b / W0 * (1 - M / R) + eps0)
    return T * s + inner + T / H * (2 * N_b / W1 * (1 - 1 / R) + eps1)


def _kavg_paper_row(tid: str, algo: str, S: int, averages: float, local: float) -> tuple:
    R, T = PAPER_R, PAPER_T
    trial = {"trial_id": tid, "algorithm": algo, "model": "lm", "dataset": "c4",
             "backend": "ray", "P": R, "K": 1, "S": S, "batch_size": 1, "payload": "bf16",
             "status": "completed"}  # fmt: skip
    hist = {"trial_id": tid, "epoch": 1, "samples": T * R, "rounds": averages,
            "global_reductions": averages, "local_reductions": local,
            "bytes_communicated": 0, "test_acc": 0.5, "compute_time_s": 1.0,
            "wall_time_s": 1.0}  # fmt: skip
    return trial, hist


def _paper_link(W: float, eps: float, group: int) -> cm.Link:
    return cm.Link(eps / (2 * (group - 1)), W / 8)


@pytest.mark.parametrize(("W", "eps"), ARCHETYPES)
def test_appendix_a_data_parallel_and_diloco_m1(W: float, eps: float) -> None:
    R, T = PAPER_R, PAPER_T
    net = cm.Network("paper", _paper_link(W, eps, R))
    dp = _kavg_paper_row("dp", "kavg", 1, T, 0)  # an average every step over all R
    m1 = _kavg_paper_row("m1", "hier_avg", R, 0, T)  # one group of R; no outer all-reduce
    pred = _predict([dp, m1], net, step_time=PAPER_S, sizer=lambda m, d: 4 * PAPER_N)
    assert pred.loc["dp", "model_bytes"] == 2 * PAPER_N  # bf16
    assert pred.loc["dp", "predicted_time_s"] == pytest.approx(_paper_dp(W, eps), rel=1e-12)
    assert pred.loc["m1", "predicted_time_s"] == pytest.approx(_paper_dp(W, eps), rel=1e-12)


@pytest.mark.parametrize(("W1", "eps1"), ARCHETYPES)
@pytest.mark.parametrize("M", [2, 4, 8])
def test_appendix_a_diloco_across_datacenters(M: int, W1: float, eps1: float) -> None:
    R, T, H = PAPER_R, PAPER_T, PAPER_H
    W0, eps0 = ARCHETYPES[0]  # within a datacenter: the fastest archetype
    S = R // M
    net = cm.Network("paper", _paper_link(W1, eps1, R), _paper_link(W0, eps0, S))
    row = _kavg_paper_row("d", "hier_avg", S, T / H, T)
    pred = _predict([row], net, step_time=PAPER_S, sizer=lambda m, d: 4 * PAPER_N)
    want = _paper_diloco(M, W0, eps0, W1, eps1)
    assert pred.loc["d", "predicted_time_s"] == pytest.approx(want, rel=1e-12)


def test_on_the_presets_the_ring_pays_latency_per_message() -> None:
    # On wan10g itself (alpha = eps = 10 ms a message), kavg's ring pays 2 latencies
    # an all-reduce where the study's model pays one.
    R, T = PAPER_R, PAPER_T
    pred = _predict([_kavg_paper_row("dp", "kavg", 1, T, 0)], cm.PRESETS["wan10g"],
                    step_time=PAPER_S, sizer=lambda m, d: 4 * PAPER_N)  # fmt: skip
    want = _paper_dp(10e9, 1e-2) + T * (2 * (R - 1) - 1) * 1e-2
    assert pred.loc["dp", "predicted_time_s"] == pytest.approx(want, rel=1e-12)


def _hand_sweep_in_fragments(F: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The hand-made sweep run in F fragments: F fragment averages of N / F bytes for each
    whole-model average; new trial ids."""
    trials, hist = _hand_sweep()
    trials = trials.assign(trial_id=trials["trial_id"] + f"-F{F}", fragments=F)
    hist = hist.assign(trial_id=hist["trial_id"] + f"-F{F}", rounds=hist["rounds"] * F)
    return trials, hist


def test_kopt_by_time_splits_by_fragments_and_payload() -> None:
    trials, hist = _hand_sweep()  # no fragments column: F = 1
    t2, h2 = _hand_sweep_in_fragments(2)
    both_t, both_h = pd.concat([trials, t2], ignore_index=True), pd.concat([hist, h2])
    net = cm.parse_network("alpha=0,bandwidth=1")
    pred = cm.predict_trials(both_t, both_h, net, step_time=0.01, target=0.9)
    table = cm.kopt_by_predicted_time(pred)
    assert list(table["fragments"]) == [1, 2]
    assert list(table["K_opt"]) == [16, 16]
    # alpha = 0: fragments move the same bytes, so the same time (3 s + 18 x 0.15 s).
    assert list(table["predicted_time_s"]) == pytest.approx([3 + 18 * 0.15] * 2)
    # Without a streaming column that varies, the table is today's.
    plain = cm.kopt_by_predicted_time(cm.predict_trials(trials, hist, net, step_time=0.01,
                                                        target=0.9))  # fmt: skip
    assert "fragments" not in plain.columns and len(plain) == 1
    # Payload splits too (absent = fp32).
    p8 = trials.assign(trial_id=trials["trial_id"] + "-i8", payload="int8")
    h8 = hist.assign(trial_id=hist["trial_id"] + "-i8")
    pred = cm.predict_trials(pd.concat([trials, p8], ignore_index=True), pd.concat([hist, h8]), net,
                             step_time=0.01, target=0.9)  # fmt: skip
    assert list(cm.kopt_by_predicted_time(pred)["payload"]) == ["fp32", "int8"]


def test_cli_kopt_on_an_archetype_ranks_streaming_trials_apart(tmp_path: Path) -> None:
    _store_hand_sweep(tmp_path)
    store = ResultsStore(tmp_path)
    t2, h2 = _hand_sweep_in_fragments(2)
    t2 = t2.assign(fragment_delay=1)
    for row in t2.to_dict("records"):
        store.upsert_trial("hand", row, h2[h2["trial_id"] == row["trial_id"]].to_dict("records"))
    args = ["results", "kopt", "hand", "--storage", str(tmp_path), "--by", "time",
            "--network", "wan10g", "--step-time", "0.01", "--format", "json"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [(r["fragments"], r["fragment_delay"]) for r in rows] == [(1, 0), (2, 1)]
    # wan10g: 10 ms latency; a whole-model average of 1e8 B over P = 4 takes 6 x 10 ms +
    # 1.5 x 1e8 / 1.25e9 = 0.18 s; K = 1 to the target: 100 steps, 100 averages.
    whole = 6 * 1e-2 + 1.5 * N / 1.25e9
    half = 6 * 1e-2 + 1.5 * N / 2 / 1.25e9  # a fragment: its own latency, half the bytes
    k16 = {1: 3.0 + 18 * whole, 2: 3.0 + 36 * max(0.0, half - 0.01)}
    for r in rows:
        assert r["K_opt"] == 16
        assert r["predicted_time_s"] == pytest.approx(k16[r["fragments"]], rel=1e-9)
    table = CliRunner().invoke(main, args[:-2])
    assert table.exit_code == 0 and "network assumed: wan10g" in table.stdout
