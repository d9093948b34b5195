"""Tests for kavg_ray.analysis.plots and kavg_ray.analysis.report: the plotted data is read
back from the matplotlib objects and compared with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure

from kavg_ray.analysis import plots
from kavg_ray.analysis.report import markdown_table, write_report
from kavg_ray.analysis.results import ResultsStore, kopt_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")

# Hand-made sweep: P in {1, 4} x K in {1, 2, 4} x seeds {0, 1}; dyadic values so every
# mean, ratio and difference below is exact in binary floating point.
ACC = {  # (P, K) -> accuracies of seeds 0, 1
    (1, 1): (0.75, 0.8125),
    (1, 2): (0.75, 0.75),
    (1, 4): (0.6875, 0.75),
    (4, 1): (0.625, 0.6875),
    (4, 2): (0.75, 0.8125),
    (4, 4): (0.6875, 0.9375),  # seed 1 diverged: its 0.9375 must not count
}
WALL = {  # (P, K) -> wall times of seeds 0, 1
    (1, 1): (80.0, 80.0),
    (1, 2): (64.0, 64.0),
    (1, 4): (48.0, 48.0),
    (4, 1): (40.0, 40.0),
    (4, 2): (16.0, 16.0),
    (4, 4): (8.0, 1.0),  # the diverged seed's 1.0 must not count
}
DIVERGED = (4, 4, 1)  # (P, K, seed)
SPEC = {"name": "hand", "algorithm": "kavg", "grid": {"K": [1, 2, 4], "P": [1, 4]}}


def hand_trials() -> pd.DataFrame:
    rows = []
    for (p, k), accs in ACC.items():
        for seed, acc in enumerate(accs):
            rows.append(
                {
                    "trial_id": f"P{p}-K{k}-s{seed}",
                    "algorithm": "kavg",
                    "dataset": "digits",
                    "model": "mlp",
                    "P": p,
                    "K": k,
                    "seed": seed,
                    "status": "diverged" if (p, k, seed) == DIVERGED else "completed",
                    "final_test_acc": acc,
                    "time_to_target_s": NAN,
                    "wall_time_s": WALL[(p, k)][seed],
                }
            )
    return pd.DataFrame(rows)


def hand_history(trials: pd.DataFrame) -> pd.DataFrame:
    """Three epochs per trial; test_acc at epoch e = final * e / 4 (+ seed offset)."""
    rows = []
    for t in trials.itertuples():
        for e in (1, 2, 3):
            acc = t.final_test_acc * e / 4 + (0.0625 if t.seed == 1 else 0.0)
            rows.append({"trial_id": t.trial_id, "epoch": e, "test_acc": acc})
    return pd.DataFrame(rows)


def mean(xs) -> float:
    return math.fsum(xs) / len(xs)


def completed_acc(p, k) -> list[float]:
    return [a for s, a in enumerate(ACC[(p, k)]) if (p, k, s) != DIVERGED]


def completed_wall(p, k) -> list[float]:
    return [w for s, w in enumerate(WALL[(p, k)]) if (p, k, s) != DIVERGED]


def only_axes(fig: Figure):
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 1, axes
    return axes[0]


def errorbars(ax) -> dict[str, ErrorbarContainer]:
    return {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}


def lines_by_label(ax) -> dict[str, tuple[list[float], list[float]]]:
    out = {}
    for line in ax.get_lines():
        label = line.get_label()
        if not label.startswith("_"):
            out[label] = (
                [float(x) for x in line.get_xdata()],
                [float(y) for y in line.get_ydata()],
            )
    return out


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None
    return [t.get_text() for t in legend.get_texts()]


# --------------------------------------------------------------------------- accuracy vs K


def test_accuracy_vs_k_means_per_p_exact():
    ax = only_axes(plots.accuracy_vs_k(hand_trials()))
    bars = errorbars(ax)
    assert set(bars) == {"P=1", "P=4"}
    for p in (1, 4):
        xs = [float(x) for x in bars[f"P={p}"].lines[0].get_xdata()]
        ys = [float(y) for y in bars[f"P={p}"].lines[0].get_ydata()]
        assert xs == [1.0, 2.0, 4.0]
        assert ys == [mean(completed_acc(p, k)) for k in (1, 2, 4)]
    # The diverged seed's 0.9375 is excluded: P=4, K=4 is the lone completed 0.6875.
    assert bars["P=4"].lines[0].get_ydata()[2] == 0.6875


def test_accuracy_vs_k_error_bars_are_sample_std():
    ax = only_axes(plots.accuracy_vs_k(hand_trials()))
    cont = errorbars(ax)["P=1"]
    segs = cont.lines[2][0].get_segments()  # one vertical segment per point
    half = [float(s[1][1] - s[0][1]) / 2 for s in segs]
    expected = [float(np.std(completed_acc(1, k), ddof=1)) for k in (1, 2, 4)]
    assert half == pytest.approx(expected, abs=1e-12)
    assert half[1] == 0.0  # K=2: both seeds 0.75


def test_accuracy_vs_k_axes_legend_and_excluded_mark():
    ax = only_axes(plots.accuracy_vs_k(hand_trials()))
    assert ax.get_xscale() == "log"
    assert ax.xaxis.get_transform().base == 2
    texts = legend_texts(ax)
    assert "P=1" in texts and "P=4" in texts
    assert any("diverged" in t for t in texts)
    assert "final test accuracy" in ax.get_ylabel()
    assert "averaging period K" in ax.get_xlabel()
    # The diverged trial is drawn as an 'x' at its K, off the data (axes coordinates).
    xs = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(xs) == 1 and list(xs[0].get_xdata()) == [4.0]


def test_accuracy_vs_k_star_marks_kopt():
    ax = only_axes(plots.accuracy_vs_k(hand_trials()))
    stars = {
        (float(line.get_xdata()[0]), float(line.get_ydata()[0]))
        for line in ax.get_lines()
        if line.get_marker() == "*"
    }
    assert stars == {(1.0, 0.78125), (2.0, 0.78125)}  # P=1 best at K=1, P=4 at K=2


def test_accuracy_vs_k_one_subplot_per_workload():
    t = hand_trials()
    t2 = t.copy()
    t2["model"] = "cnn"
    t2["final_test_acc"] = t2["final_test_acc"] / 2
    fig = plots.accuracy_vs_k(pd.concat([t, t2], ignore_index=True))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["kavg · digits · cnn", "kavg · digits · mlp"]
    cnn_y = list(errorbars(axes[0])["P=1"].lines[0].get_ydata())
    assert cnn_y == [mean(completed_acc(1, k)) / 2 for k in (1, 2, 4)]


def _two_lrs() -> pd.DataFrame:
    """The hand sweep at lr 0.1, and again at lr 0.5 with accuracies halved."""
    a, b = hand_trials(), hand_trials()
    a["lr"], b["lr"] = 0.1, 0.5
    b["final_test_acc"] = b["final_test_acc"] / 2
    b["trial_id"] = "lr0.5-" + b["trial_id"]
    return pd.concat([a, b], ignore_index=True)


def test_a_swept_lr_is_its_own_subplot_not_extra_seeds():
    fig = plots.accuracy_vs_k(_two_lrs())
    axes = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in axes]
    assert titles == ["kavg · digits · mlp · lr=0.1", "kavg · digits · mlp · lr=0.5"]
    for ax, scale in zip(axes, (1, 2), strict=True):
        ys = list(errorbars(ax)["P=1"].lines[0].get_ydata())
        assert ys == [mean(completed_acc(1, k)) / scale for k in (1, 2, 4)]


def test_accuracy_vs_epoch_splits_by_lr():
    t = _two_lrs()
    h = hand_history(t)
    h["lr"] = 0.05  # the history's own lr column (the schedule) must not be the one used
    axes = [ax for ax in plots.accuracy_vs_epoch(h, t).axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [
        "kavg · digits · mlp · lr=0.1 · P=1", "kavg · digits · mlp · lr=0.1 · P=4",
        "kavg · digits · mlp · lr=0.5 · P=1", "kavg · digits · mlp · lr=0.5 · P=4",
    ]  # fmt: skip
    lr01, lr05 = lines_by_label(axes[1])["K=4"][1], lines_by_label(axes[3])["K=4"][1]
    assert lr01 == [0.6875 * e / 4 for e in (1, 2, 3)]
    assert lr05 == [0.6875 / 2 * e / 4 for e in (1, 2, 3)]


def test_kopt_vs_p_and_gap_split_by_lr():
    t = _two_lrs()
    t["predicted_kopt"] = np.where(t["lr"] == 0.1, 2, 1)  # one prediction per lr
    axes = [ax for ax in plots.kopt_vs_p(t).axes if ax.get_visible()]
    assert [lines_by_label(ax)["predicted K_opt"] for ax in axes] == [
        ([1.0, 4.0], [2.0, 2.0]), ([1.0, 4.0], [1.0, 1.0])
    ]  # fmt: skip
    assert [ax.get_title() for ax in axes] == [
        "kavg · digits · mlp · lr=0.1", "kavg · digits · mlp · lr=0.5"
    ]  # fmt: skip
    for ax in axes:
        (cont,) = errorbars(ax).values()
        assert [float(y) for y in cont.lines[0].get_ydata()] == [1.0, 2.0]
    gap_axes = [ax for ax in plots.gap_vs_sequential(t).axes if ax.get_visible()]
    # Each lr's P=4 is compared with the P=1 of that same lr.
    k2 = [lines_by_label(ax)["K=2"][1] for ax in gap_axes]
    assert k2 == [[0.78125 - 0.75], [(0.78125 - 0.75) / 2]]
    assert gap_axes[0].get_ylabel() == "test accuracy gap (P learners − P=1)"


def test_speedup_leaves_out_simulated_rows():
    real = hand_trials()
    real["backend"] = "ray"
    sim = hand_trials()
    sim["backend"] = "simulated"
    sim["wall_time_s"] = 1.0  # would make every speedup 1
    sim["trial_id"] = "sim-" + sim["trial_id"]
    ax = only_axes(plots.speedup_vs_p(pd.concat([real, sim], ignore_index=True)))
    assert lines_by_label(ax)["K=2"] == ([1.0, 4.0], [1.0, 4.0])
    with pytest.raises(ValueError, match="simulated trials have no meaningful wall time"):
        plots.speedup_vs_p(sim)


def test_accuracy_vs_k_without_completed_trials_raises():
    t = hand_trials()
    t["status"] = "failed"
    with pytest.raises(ValueError, match="no completed trial"):
        plots.accuracy_vs_k(t)


# --------------------------------------------------------------------------- accuracy vs epoch


def test_accuracy_vs_epoch_mean_over_seeds_per_k():
    t = hand_trials()
    fig = plots.accuracy_vs_epoch(hand_history(t), t)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [
        "kavg · digits · mlp · P=1",
        "kavg · digits · mlp · P=4",
    ]
    lines = lines_by_label(axes[1])
    assert set(lines) == {"K=1", "K=2", "K=4"}
    xs, ys = lines["K=2"]
    assert xs == [1.0, 2.0, 3.0]
    # seeds 0.75 and 0.8125 (+0.0625 for seed 1): mean of final*e/4 plus 0.03125
    assert ys == [mean([0.75 * e / 4, 0.8125 * e / 4 + 0.0625]) for e in (1, 2, 3)]
    # The diverged seed 1 of K=4 is left out: only seed 0's curve remains.
    assert lines["K=4"][1] == [0.6875 * e / 4 for e in (1, 2, 3)]


def test_accuracy_vs_epoch_p_filter():
    t = hand_trials()
    fig = plots.accuracy_vs_epoch(hand_history(t), t, P=4)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["kavg · digits · mlp · P=4"]
    with pytest.raises(ValueError, match="P in"):
        plots.accuracy_vs_epoch(hand_history(t), t, P=64)


# --------------------------------------------------------------------------- K_opt vs P


def test_kopt_vs_p_measured_points_equal_kopt_table():
    t = hand_trials()
    ax = only_axes(plots.kopt_vs_p(t, predicted={1: 1, 4: 4}))
    (cont,) = errorbars(ax).values()
    table = kopt_table(t, by="accuracy")
    assert [float(x) for x in cont.lines[0].get_xdata()] == [float(p) for p in table["P"]]
    assert [float(y) for y in cont.lines[0].get_ydata()] == [float(k) for k in table["K_opt"]]
    assert [float(y) for y in cont.lines[0].get_ydata()] == [1.0, 2.0]  # by hand
    pred = lines_by_label(ax)["predicted K_opt"]
    assert pred == ([1.0, 4.0], [1.0, 4.0])
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2


def test_kopt_vs_p_bar_spans_k_within_one_std():
    t = hand_trials()
    ax = only_axes(plots.kopt_vs_p(t))
    (cont,) = errorbars(ax).values()
    segs = cont.lines[2][0].get_segments()
    spans = [(float(s[0][1]), float(s[1][1])) for s in segs]
    # P=1: K=1 mean 0.78125, std 0.0442; K=2 (0.75) is within 1 std -> bar 1..2.
    # P=4: K=2 mean 0.78125, std 0.0442; K=1 0.65625, K=4 0.6875 are not -> 2..2.
    assert spans == [(1.0, 2.0), (2.0, 2.0)]
    assert "predicted K_opt" not in lines_by_label(ax)


# --------------------------------------------------------------------------- speedup


def test_speedup_vs_p_exact_values():
    ax = only_axes(plots.speedup_vs_p(hand_trials()))
    lines = lines_by_label(ax)
    assert lines["K=1"] == ([1.0, 4.0], [1.0, 2.0])  # 80 / 40
    assert lines["K=2"] == ([1.0, 4.0], [1.0, 4.0])  # 64 / 16
    assert lines["K=4"] == ([1.0, 4.0], [1.0, 6.0])  # 48 / 8 (diverged 1.0 excluded)
    assert lines["ideal (linear)"] == ([1.0, 4.0], [1.0, 4.0])
    assert "wall time (s)" in ax.figure.get_suptitle()
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2


def test_speedup_uses_time_to_target_when_present():
    t = hand_trials()
    t["time_to_target_s"] = t["wall_time_s"] / 2
    t.loc[(t["P"] == 4) & (t["K"] == 1), "time_to_target_s"] = 10.0  # 40/10 = 4
    ax = only_axes(plots.speedup_vs_p(t))
    assert lines_by_label(ax)["K=1"] == ([1.0, 4.0], [1.0, 4.0])
    assert "time to target (s)" in ax.figure.get_suptitle()
    # Explicit metric overrides auto.
    ax = only_axes(plots.speedup_vs_p(t, metric="wall_time_s"))
    assert lines_by_label(ax)["K=1"] == ([1.0, 4.0], [1.0, 2.0])


def test_speedup_baseline_pooled_when_p1_lacks_k():
    t = hand_trials()
    t = t[~((t["P"] == 1) & (t["K"] != 1))]  # sequential SGD run at K=1 only
    ax = only_axes(plots.speedup_vs_p(t))
    lines = lines_by_label(ax)
    assert lines["K=2"] == ([4.0], [80.0 / 16.0])
    assert "all P=1 trials" in ax.get_title()


def test_speedup_without_p1_raises_value_error():
    t = hand_trials()
    with pytest.raises(ValueError, match="P=1"):
        plots.speedup_vs_p(t[t["P"] != 1])


# --------------------------------------------------------------------------- gap


def test_gap_vs_sequential_exact_values():
    ax = only_axes(plots.gap_vs_sequential(hand_trials()))
    lines = lines_by_label(ax)
    assert lines["K=1"] == ([4.0], [0.65625 - 0.78125])
    assert lines["K=2"] == ([4.0], [0.78125 - 0.75])
    assert lines["K=4"] == ([4.0], [0.6875 - 0.71875])  # diverged 0.9375 excluded
    assert "sequential SGD" in legend_texts(ax)
    with pytest.raises(ValueError, match="P=1"):
        plots.gap_vs_sequential(hand_trials().query("P != 1"))


# --------------------------------------------------------------------------- save_all


def test_save_all_writes_valid_pngs(tmp_path):
    t = hand_trials()
    written = plots.save_all(t, hand_history(t), tmp_path / "plots", predicted={1: 1, 4: 2})
    assert [p.name for p in written] == [
        "accuracy_vs_k.png",
        "accuracy_vs_epoch.png",
        "kopt_vs_p.png",
        "kopt_bootstrap.png",
        "speedup_vs_p.png",
        "gap_vs_sequential.png",
    ]
    for path in written:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC, path
        assert len(data) > 10_000, (path, len(data))


def test_save_all_skips_plots_without_data(tmp_path):
    t = hand_trials().query("P != 1")
    written = plots.save_all(t, None, tmp_path)
    names = ["accuracy_vs_k.png", "kopt_vs_p.png", "kopt_bootstrap.png"]
    assert [p.name for p in written] == names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


# --------------------------------------------------------------------------- report


def _store_sweep(tmp_path, with_target: bool) -> tuple[str, pd.DataFrame]:
    store = ResultsStore(tmp_path / "store")
    t = hand_trials()
    if with_target:
        t["time_to_target_s"] = t["wall_time_s"] / 2
    hist = hand_history(t)
    store.write_spec("hand", SPEC)
    for row in t.to_dict("records"):
        h = hist[hist["trial_id"] == row["trial_id"]].to_dict("records")
        store.upsert_trial("hand", row, h)
    return str(tmp_path / "store"), store.read_trials("hand")


def _md_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in ``text`` as rows of cells (separator rows dropped)."""
    tables, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def test_report_contains_kopt_table_and_links_plots(tmp_path):
    storage, stored = _store_sweep(tmp_path, with_target=False)
    out = tmp_path / "report"
    path = write_report("hand", storage, out)
    assert path == out / "report.md"
    text = path.read_text()
    assert "# Sweep report: hand" in text
    assert "grid:" in text and "algorithm: kavg" in text  # the spec, as YAML
    history = ResultsStore(storage).read_history("hand")
    kopt = kopt_table(stored, by="accuracy", history=history)
    assert markdown_table(kopt) in text
    # Independently of markdown_table: the K_opt table parsed back has the right cells.
    (table,) = [
        tb
        for tb in _md_tables(text)
        if tb[0][:5] == ["algorithm", "dataset", "model", "P", "K_opt"]
    ]
    mean = table[0].index("mean")
    assert [(r[3], r[4], r[mean]) for r in table[1:]] == [("1", "1", "0.7812"),
                                                          ("4", "2", "0.7812")]
    # Each row's verdict in words under the table.
    assert f"- P=1: K_opt = 1, **{kopt['verdict'][0]}**: best in" in text
    assert "K_opt by time" not in text  # no trial has a time to target
    for name in (
        "accuracy_vs_k",
        "accuracy_vs_epoch",
        "kopt_vs_p",
        "speedup_vs_p",
        "gap_vs_sequential",
    ):
        assert f"]({name}.png)" in text
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    # The trials table lists every trial, the diverged one with its status.
    trial_rows = [r for tb in _md_tables(text) for r in tb if r[0].startswith("P")]
    assert len(trial_rows) == len(stored)
    assert any(r[0] == "P4-K4-s1" and "diverged" in r for r in trial_rows)


def test_report_adds_time_table_and_lists_skipped_plots(tmp_path):
    storage, stored = _store_sweep(tmp_path, with_target=True)
    path = write_report("hand", storage, tmp_path / "r")
    text = path.read_text()
    assert "K_opt by time" in text
    assert markdown_table(kopt_table(stored, by="time")) in text

    # A sweep without P=1: speedup and gap are skipped with a reason, not an error.
    store = ResultsStore(storage)
    t = hand_trials().query("P != 1")
    for row in t.to_dict("records"):
        store.upsert_trial("nop1", row)
    text = write_report("nop1", storage, tmp_path / "r2").read_text()
    assert "](accuracy_vs_k.png)" in text and "](speedup_vs_p.png)" not in text
    assert "speedup_vs_p: needs completed P=1 trials" in text
    assert "No spec stored" in text


def test_markdown_table_escapes_and_formats():
    df = pd.DataFrame({"a": [1, 2], "b": [0.123456, NAN], "c": ["x|y", "multi\nline"]})
    assert markdown_table(df) == (
        "| a | b | c |\n|---|---|---|\n| 1 | 0.1235 | x\\|y |\n| 2 |  | multi line |\n"
    )
    assert markdown_table(df.iloc[0:0]) == "(no rows)\n"
