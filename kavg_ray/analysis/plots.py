"""Figures of a sweep, after section 4 of the K-AVG paper (docs/design.md sections 1 and 5).

Every function takes the frames returned by :func:`kavg_ray.analysis.results.load_trials` /
:func:`~kavg_ray.analysis.results.load_history` and returns a :class:`matplotlib.figure.Figure`
built without pyplot (no global state, Agg canvas), so tests can read the plotted data
back from the matplotlib objects. One subplot per workload (algorithm, dataset, model).

- :func:`accuracy_vs_k`: final test accuracy against K, one line per P (Figures 5, 6);
- :func:`accuracy_vs_epoch`: test accuracy against epoch, one line per K, one subplot per P;
- :func:`kopt_vs_p`: measured (and predicted) K_opt against P, with the fitted K_opt(P);
- :func:`kopt_bootstrap`: how often each K is best over bootstrap resamples of the seeds;
- :func:`speedup_vs_p`: time at P=1 / time at P, one line per K (Figures 3, 4);
- :func:`gap_vs_sequential`: K-AVG accuracy minus sequential SGD's (P=1), one line per K
  (Figure 7);
- :func:`save_all`: every plot the data allows, as PNG files.

Means and standard deviations over seeds are computed exactly as
:func:`kavg_ray.analysis.results.kopt_table` computes them (sorted sum; sample std, 0 for one seed),
and only trials with status "completed" are averaged. A function whose data is absent
raises :class:`PlotDataError` (a ValueError) with a one-line reason.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from kavg_ray.analysis.results import (
    ARGS_PREFIXES,
    RANK_LABELS,
    RANK_METRICS,
    VARYING_GROUP_KEYS,
    _mean_std,
    kopt_table,
    ranked_by,
)
from kavg_ray.analysis.schedules import candidate_labels
from kavg_ray.errors import PlotDataError

__all__ = [
    "PLOT_FILES",
    "PlotDataError",
    "accuracy_vs_epoch",
    "accuracy_vs_k",
    "gap_vs_sequential",
    "kopt_bootstrap",
    "kopt_vs_p",
    "save_all",
    "save_all_detailed",
    "speedup_vs_p",
]

#: File name of each plot written by :func:`save_all`, in writing order.
PLOT_FILES: dict[str, str] = {
    "accuracy_vs_k": "accuracy_vs_k.png",
    "accuracy_vs_epoch": "accuracy_vs_epoch.png",
    "kopt_vs_p": "kopt_vs_p.png",
    "kopt_bootstrap": "kopt_bootstrap.png",
    "kopt_vs_outer_lr": "kopt_vs_outer_lr.png",
    "speedup_vs_p": "speedup_vs_p.png",
    "gap_vs_sequential": "gap_vs_sequential.png",
}

DPI = 120
_WORKLOAD_KEYS = ("algorithm", "dataset", "model")
# Hier-AVG knobs: when they vary inside a workload, lines are split by them too.
_EXTRA_LINE_KEYS = ("S", "K1")
_SUBPLOT_W, _SUBPLOT_H = 6.4, 4.6
_MAX_COLS = 3




# --------------------------------------------------------------------------- helpers


def _fmt_num(v: Any) -> str:
    """1 for 1.0, 0.5 for 0.5, 'NA' for missing."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return "NA"
    if f.is_integer():
        return str(int(f))
    return f"{f:.3g}"


def _numeric(df: pd.DataFrame, cols: Iterable[str]) -> pd.DataFrame:
    out = df.reset_index(drop=True)  # positional masks below need a unique index
    for col in cols:
        if col in out.columns:
            out[col] = pd.to_numeric(out[col], errors="coerce").astype(float)
    return out


def _require(df: pd.DataFrame, cols: Iterable[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise PlotDataError(f"{what} needs column(s) {missing} in the trials frame")


def _completed(df: pd.DataFrame, metric: str) -> pd.Series:
    """Rows usable for averaging: completed, with K, P and a finite metric value; a
    K_schedule's trials are not their K0's (the K_opt table sets them against it)."""
    status = df["status"] if "status" in df.columns else pd.Series("", index=df.index)
    return (
        (status == "completed")
        & df["K"].notna()
        & df["P"].notna()
        & np.isfinite(df[metric].to_numpy(dtype=float))
        & candidate_labels(df).isna().to_numpy()
    )


def _facets(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) per workload (algorithm, dataset, model), sorted.

    A setting that varies in the frame (lr, batch size, backend... as in
    :data:`~kavg_ray.analysis.results.VARYING_GROUP_KEYS`, except the Hier-AVG knobs drawn as
    lines) splits the workload further: two learning rates are two experiments, never
    seeds of one.
    """
    varying = [
        k
        for k in (*VARYING_GROUP_KEYS, *(c for c in df.columns if c.startswith(ARGS_PREFIXES)))
        if k not in _EXTRA_LINE_KEYS and k in df.columns and df[k].dropna().nunique() > 1
    ]
    keys = [k for k in _WORKLOAD_KEYS if k in df.columns] + varying
    if not keys:
        return [("", df)]
    out = []
    for key, g in df.groupby(keys, sort=True, dropna=False):
        parts = key if isinstance(key, tuple) else (key,)
        names = [
            (f"{k}=" if k in varying else "") + (_fmt_num(p) if p == p else "?")
            for k, p in zip(keys, parts, strict=True)
        ]
        out.append((" · ".join(names), g))
    return out


def _line_keys(df: pd.DataFrame, primary: str) -> list[str]:
    extra = [c for c in _EXTRA_LINE_KEYS if c in df.columns and df[c].dropna().nunique() > 1]
    return [primary, *extra]


def _line_groups(df: pd.DataFrame, primary: str) -> list[tuple[str, float, pd.DataFrame]]:
    """(label, primary value, rows) per line, sorted by the primary key."""
    keys = _line_keys(df, primary)
    out = []
    for key, g in df.groupby(keys, sort=True, dropna=True):
        parts = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{k}={_fmt_num(v)}" for k, v in zip(keys, parts, strict=True))
        out.append((label, float(parts[0]), g))
    return out


def _stats(values: pd.Series, by: pd.Series) -> pd.DataFrame:
    """mean, std (ddof=1, 0 for one value) and n of ``values`` per value of ``by``."""
    rows = []
    for x, vals in values.groupby(by, sort=True):
        mean, std = _mean_std([float(v) for v in vals])
        rows.append({"x": float(x), "mean": mean, "std": std, "n": len(vals)})
    return pd.DataFrame(rows, columns=["x", "mean", "std", "n"])


def _colors(n: int, cmap_name: str = "viridis") -> list[Any]:
    """n distinguishable colours along a sequential map (ordered values, e.g. P or K)."""
    from matplotlib import colormaps

    cmap: Colormap = colormaps[cmap_name]
    if n == 1:
        return [cmap(0.35)]
    return [cmap(0.82 * i / (n - 1)) for i in range(n)]


def _new_figure(n: int, *, sharey: bool = False) -> tuple[Figure, list[Axes]]:
    ncols = min(math.ceil(math.sqrt(n)), _MAX_COLS)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(_SUBPLOT_W * ncols, _SUBPLOT_H * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _log2_axis(ax: Axes, which: str, ticks: Iterable[float]) -> None:
    """Log base-2 axis with a tick (plain number) at each value in ``ticks``."""
    vals = sorted({float(t) for t in ticks if t == t and float(t) > 0})
    axis = ax.xaxis if which == "x" else ax.yaxis
    if which == "x":
        ax.set_xscale("log", base=2)
    else:
        ax.set_yscale("log", base=2)
    if vals:
        axis.set_major_locator(FixedLocator(vals))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: _fmt_num(v)))
    axis.set_minor_locator(NullLocator())
    lo, hi = (vals[0], vals[-1]) if vals else (1.0, 2.0)
    if lo == hi:
        lo, hi = lo / 2, hi * 2
    pad = (hi / lo) ** 0.06
    (ax.set_xlim if which == "x" else ax.set_ylim)(lo / pad, hi * pad)


def _legend(ax: Axes, title: str | None = None, handles: list[Any] | None = None) -> None:
    kwargs: dict[str, Any] = {"title": title, "fontsize": "small", "title_fontsize": "small"}
    if handles is not None:
        kwargs["handles"] = handles
    n = len(handles) if handles is not None else len(ax.get_legend_handles_labels()[0])
    if n > 6:  # many lines: keep the data visible, legend outside on the right
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), **kwargs)
    else:
        ax.legend(loc="best", **kwargs)


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)


def _p_filter(P: int | Iterable[int] | None) -> set[float] | None:
    if P is None:
        return None
    vals = [P] if isinstance(P, (int, float, np.integer, np.floating)) else list(P)
    return {float(p) for p in vals}


# --------------------------------------------------------------------------- accuracy vs K


def accuracy_vs_k(
    trials: pd.DataFrame, *, show_excluded: bool = True, by: str | None = None
) -> Figure:
    """Final test accuracy against the averaging period K, one line per P (Figures 5, 6);
    the final test loss (lower is better) with ``by="loss"``, the default for a sweep
    without accuracy (:func:`~kavg_ray.analysis.results.ranked_by`).

    Points: mean of ``final_test_acc`` over the completed trials (seeds) at each K; error
    bars: sample std (0 with one seed). A star marks the K with the best mean (K_opt by
    accuracy). Diverged and failed trials are left out of the means; with
    ``show_excluded`` each is drawn as an 'x' at the bottom of the axes at its K.
    x: log2 K. One subplot per (algorithm, dataset, model).
    """
    by = by or ranked_by(trials)
    metric, metric_label = RANK_METRICS[by], RANK_LABELS[by]
    _require(trials, ("P", "K", metric), "accuracy_vs_k")
    df = _numeric(trials, ("P", "K", metric, *_EXTRA_LINE_KEYS))
    ok = _completed(df, metric)
    if not ok.any():
        raise PlotDataError(f"no completed trial with a {metric_label} to plot")
    facets = [(t, g) for t, g in _facets(df) if ok[g.index].any()]
    fig, axes = _new_figure(len(facets))
    title_text = f"{metric_label.capitalize()} vs averaging period K (mean ± std over seeds)"
    fig.suptitle(title_text, fontsize="large")
    for ax, (title, g) in zip(axes, facets, strict=True):
        handles = _draw_metric_vs_k_lines(ax, g, ok, metric, by, show_excluded)
        _style(ax, title, "averaging period K (log2)", metric_label)
        _log2_axis(ax, "x", g["K"].dropna())
        _legend(ax, "learners", handles)
    return fig


def _draw_metric_vs_k_lines(
    ax: Axes, g: pd.DataFrame, ok: pd.Series, metric: str, by: str, show_excluded: bool
) -> list[Any]:
    """One accuracy_vs_k panel's lines (one per P) and 'x' marks; returns the legend handles.

    ``ok`` marks the rows of ``g`` averaged (completed, finite metric); the others with a K
    are drawn as excluded when ``show_excluded``.
    """
    lines = _line_groups(g, "P")
    colors = _colors(len(lines), "plasma")
    handles: list[Any] = []
    excluded: list[tuple[np.ndarray, Any]] = []
    for (label, _p, lg), color in zip(lines, colors, strict=True):
        good = lg[ok[lg.index]]
        if len(good):
            handles.append(_draw_mean_std_vs_k(ax, good, metric, by, color, label))
        bad = lg[~ok[lg.index] & lg["K"].notna()]
        if show_excluded and len(bad):
            excluded.append((bad["K"].to_numpy(dtype=float), color))
    if excluded:
        _draw_excluded_strip(ax, excluded)
    handles.append(
        Line2D(
            [],
            [],
            marker="*",
            markersize=12,
            color="gray",
            markeredgecolor="black",
            linestyle="none",
            label="best K (K_opt)",
        )
    )
    if excluded:
        handles.append(
            Line2D(
                [],
                [],
                marker="x",
                markeredgewidth=2,
                color="gray",
                linestyle="none",
                label="diverged / failed (excluded)",
            )
        )
    return handles


def _draw_mean_std_vs_k(
    ax: Axes, good: pd.DataFrame, metric: str, by: str, color: Any, label: str
) -> Any:
    """One line of ``metric``'s mean ± std over seeds against K, with a star at the best K;
    returns the line's errorbar container (its legend handle)."""
    st = _stats(good[metric], good["K"])
    cont = ax.errorbar(
        st["x"],
        st["mean"],
        yerr=st["std"],
        marker="o",
        capsize=3,
        color=color,
        label=label,
        linewidth=1.6,
    )
    best = st.loc[st["mean"].idxmax() if by == "accuracy" else st["mean"].idxmin()]
    ax.plot(
        [best["x"]],
        [best["mean"]],
        marker="*",
        markersize=15,
        color=color,
        markeredgecolor="black",
        linestyle="none",
        label="_nolegend_",
        zorder=5,
    )
    return cont


def _draw_excluded_strip(ax: Axes, excluded: list[tuple[np.ndarray, Any]]) -> None:
    """An 'x' at each ``(K values, colour)`` of ``excluded``, in a strip below the data."""
    # A strip below the data for the 'x' marks, so they never hide a point.
    ax.autoscale_view()
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo - 0.15 * (hi - lo), hi)
    for ks, color in excluded:
        ax.plot(
            ks,
            np.full(len(ks), 0.05),
            transform=ax.get_xaxis_transform(),
            marker="x",
            markersize=9,
            markeredgewidth=2,
            linestyle="none",
            color=color,
            label="_nolegend_",
        )


# --------------------------------------------------------------------------- accuracy vs epoch


def _join_history(history: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    _require(trials, ("trial_id", "P", "K"), "accuracy_vs_epoch")
    for col in ("trial_id", "epoch", "test_acc"):
        if col not in history.columns:
            raise PlotDataError(f"accuracy_vs_epoch needs column {col!r} in the history frame")
    keys = ["trial_id"]
    if "sweep" in history.columns and "sweep" in trials.columns:
        if history["sweep"].notna().all() and trials["sweep"].notna().all():
            keys = ["sweep", "trial_id"]
    t_cols = [
        c
        for c in dict.fromkeys(
            (*_WORKLOAD_KEYS, "P", "K", *_EXTRA_LINE_KEYS, *VARYING_GROUP_KEYS, "seed", "status")
        )
        if c in trials.columns
    ]  # the trial's settings (history's own lr is the schedule's value at each epoch)
    t = trials[keys + t_cols].copy()
    h = history[keys + ["epoch", "test_acc"]].copy()
    for df in (t, h):
        for k in keys:
            df[k] = df[k].astype(str)
    return h.merge(t, on=keys, how="inner")


def accuracy_vs_epoch(
    history: pd.DataFrame,
    trials: pd.DataFrame,
    P: int | Iterable[int] | None = None,
    *,
    completed_only: bool = True,
) -> Figure:
    """Test accuracy against epoch, one line per K, one subplot per (workload, P).

    Each line is the mean of ``test_acc`` over the seeds at each reported epoch (history
    rows joined to trials by ``trial_id``). ``P`` restricts the plot to one or several P.
    With ``completed_only`` (default) diverged and failed trials are left out.
    """
    df = _numeric(
        _join_history(history, trials), ("P", "K", "epoch", "test_acc", *_EXTRA_LINE_KEYS)
    )
    if completed_only and "status" in df.columns:
        df = df[df["status"] == "completed"]
    wanted = _p_filter(P)
    if wanted is not None:
        df = df[df["P"].isin(wanted)]
    df = df[df["K"].notna() & df["P"].notna() & df["epoch"].notna() & df["test_acc"].notna()]
    if df.empty:
        which = "" if wanted is None else f" for P in {sorted(_fmt_num(p) for p in wanted)}"
        raise PlotDataError(f"no history of a completed trial{which} to plot")

    panels: list[tuple[str, pd.DataFrame]] = []
    for title, g in _facets(df):
        for p, pg in g.groupby("P", sort=True):
            panels.append((f"{title} · P={_fmt_num(p)}" if title else f"P={_fmt_num(p)}", pg))
    fig, axes = _new_figure(len(panels), sharey=True)
    fig.suptitle("Test accuracy vs epoch (mean over seeds), one line per K", fontsize="large")
    for ax, (title, g) in zip(axes, panels, strict=True):
        lines = _line_groups(g, "K")
        for (label, _k, lg), color in zip(lines, _colors(len(lines)), strict=True):
            st = _stats(lg["test_acc"], lg["epoch"])
            ax.plot(st["x"], st["mean"], marker="o", markersize=3, color=color, label=label)
        _style(ax, title, "epoch", "test accuracy")
        ax.yaxis.set_tick_params(labelleft=True)
        ax.legend(
            title="averaging period", fontsize="small", title_fontsize="small", loc="lower right"
        )
    return fig


# --------------------------------------------------------------------------- K_opt vs P


def _within_range(text: Any, kopt: float) -> tuple[float, float]:
    try:
        ks = [float(k) for k in str(text).split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks:
        return kopt, kopt
    return min(ks + [kopt]), max(ks + [kopt])


def kopt_vs_p(
    trials: pd.DataFrame, predicted: Mapping[int, int] | None = None, by: str | None = None
) -> Figure:
    """Measured K_opt (by accuracy, or ``by`` loss: :func:`~kavg_ray.analysis.results.kopt_table`;
    default :func:`~kavg_ray.analysis.results.ranked_by`) against P.

    The bar at each point spans the K whose mean accuracy is within one std of the best
    (``k_within_1std``); beside each point, its verdict and how often it is best over the
    paired bootstrap (``clear 0.91``, kopt_table's ``verdict`` and ``freq_best``).
    ``predicted`` (P -> K) is drawn as a dashed line; without it the trials'
    ``predicted_kopt`` column is used when present. Both axes log2.
    """
    by = by or ranked_by(trials)
    _require(trials, ("P", "K", "status", RANK_METRICS[by]), "kopt_vs_p")
    table = kopt_table(trials, by=by)
    table = table[table["K_opt"].notna()]
    if table.empty:
        raise PlotDataError("no completed trial: K_opt is undefined for every P")
    table = _numeric(table, ("P", "K_opt", "predicted_kopt"))
    facets = _facets(table)
    fig, axes = _new_figure(len(facets))
    fig.suptitle(f"Best averaging period K_opt (by {RANK_LABELS[by]}) vs P", fontsize="large")
    for ax, (title, g) in zip(axes, facets, strict=True):
        g = g.sort_values("P")
        x, y, ranges = _draw_measured_kopt(ax, g)
        _draw_kopt_fit(ax, g)
        yticks: list[float] = list(y) + [v for r in ranges for v in r]
        xticks: list[float] = list(x)
        pred = _predicted_kopt_points(g, predicted)
        if pred:
            px = sorted(pred)
            ax.plot(
                px,
                [pred[p] for p in px],
                marker="s",
                markersize=12,
                markerfacecolor="none",
                markeredgewidth=2,
                linestyle="--",
                color="tab:orange",
                label="predicted K_opt",
                zorder=4,
            )
            xticks += px
            yticks += list(pred.values())
        _style(ax, title, "number of learners P (log2)", "K_opt, averaging period K (log2)")
        _log2_axis(ax, "x", xticks)
        _log2_axis(ax, "y", yticks)
        _legend(ax)
    return fig


def _draw_measured_kopt(ax: Axes, g: pd.DataFrame) -> tuple[Any, Any, list]:
    """K_opt against P with a bar over the K within one std; returns (P, K_opt, ranges)."""
    x = g["P"].to_numpy(dtype=float)
    y = g["K_opt"].to_numpy(dtype=float)
    ranges = [_within_range(t, k) for t, k in zip(g["k_within_1std"], y, strict=True)]
    lo = np.array([k - r[0] for k, r in zip(y, ranges, strict=True)])
    hi = np.array([r[1] - k for k, r in zip(y, ranges, strict=True)])
    ax.errorbar(
        x, y, yerr=[lo, hi], marker="o", markersize=8, capsize=5, linewidth=1.8,
        color="tab:blue", label="measured K_opt (bar: K within 1 std)",
    )  # fmt: skip
    if "verdict" in g.columns:  # how sure each point is
        for px, py, verdict, freq in zip(x, y, g["verdict"], g["freq_best"], strict=True):
            label = verdict if pd.isna(freq) else f"{verdict} {float(freq):.2f}"
            ax.annotate(label, (px, py), xytext=(6, 6), textcoords="offset points",
                        fontsize="small", color="tab:blue")  # fmt: skip
    return x, y, ranges


def _predicted_kopt_points(
    g: pd.DataFrame, predicted: Mapping[int, int] | None
) -> dict[float, float]:
    """P -> predicted K_opt for one kopt_vs_p panel: ``predicted`` when given, else the
    non-null ``predicted_kopt`` of the panel's rows (empty when neither)."""
    if predicted:
        return {float(p): float(k) for p, k in predicted.items()}
    if "predicted_kopt" in g.columns:
        return {
            float(p): float(k) for p, k in zip(g["P"], g["predicted_kopt"], strict=True) if k == k
        }
    return {}


def kopt_vs_outer_lr(trials: pd.DataFrame) -> Figure:
    """K_opt (by accuracy) against the outer learning rate, one line per P (and outer
    momentum when it varies). Needs a sweep over ``outer_lr``; K axis log2."""
    _require(trials, ("P", "K", "status", "final_test_acc", "outer_lr"), "kopt_vs_outer_lr")
    if trials["outer_lr"].dropna().nunique() < 2:
        raise PlotDataError("kopt_vs_outer_lr needs a sweep over outer_lr")
    table = kopt_table(trials, by="accuracy")
    table = _numeric(table[table["K_opt"].notna()], ("P", "K_opt", "outer_lr"))
    if table.empty:
        raise PlotDataError("no completed trial: K_opt is undefined for every P")
    keys = [k for k in _WORKLOAD_KEYS if k in table.columns]
    groups = list(table.groupby(keys, sort=True)) if keys else [("", table)]
    fig, axes = _new_figure(len(groups))
    fig.suptitle("K_opt (by final test accuracy) vs the outer learning rate", fontsize="large")
    for ax, (key, g) in zip(axes, groups, strict=True):
        title = " · ".join(map(str, key if isinstance(key, tuple) else (key,)))
        lines = ["P"] + [c for c in ("outer_momentum",) if c in g and g[c].nunique() > 1]
        yticks: list[float] = []
        for color, (line, rows) in zip(
            _colors(g.groupby(lines).ngroups), g.groupby(lines, sort=True), strict=True
        ):
            parts = line if isinstance(line, tuple) else (line,)
            rows = rows.sort_values("outer_lr")
            label = ", ".join(f"{k}={_fmt_num(v)}" for k, v in zip(lines, parts, strict=True))
            ax.plot(rows["outer_lr"], rows["K_opt"], marker="o", color=color, label=label)
            yticks += list(rows["K_opt"])
        _style(ax, title, "outer learning rate", "K_opt (log2)")
        _log2_axis(ax, "y", yticks)
        _legend(ax)
    return fig


# --------------------------------------------------------------------------- P=1 baselines


def _time_metric(df: pd.DataFrame, metric: str) -> str:
    if metric != "auto":
        if metric not in df.columns:
            raise PlotDataError(f"speedup needs column {metric!r} in the trials frame")
        return metric
    if "time_to_target_s" in df.columns:
        ttt = pd.to_numeric(df["time_to_target_s"], errors="coerce")
        done = df["status"] == "completed" if "status" in df.columns else True
        if np.isfinite(ttt[done].to_numpy(dtype=float)).any():
            return "time_to_target_s"
    if "wall_time_s" not in df.columns:
        raise PlotDataError("speedup needs column 'wall_time_s' in the trials frame")
    return "wall_time_s"


def _vs_baseline(
    trials: pd.DataFrame, metric: str, combine: Callable[[float, float], float], what: str
) -> list[tuple[str, dict[str, dict[float, float]], str]]:
    """Per workload: {K label: {P: combine(mean at P=1, mean at P)}} and a baseline note.

    The baseline of K is the mean over completed P=1 trials with the same K; if P=1 was
    not run at that K, the mean over all completed P=1 trials of the workload (K does not
    change sequential SGD: one learner averages with itself).
    """
    _require(trials, ("P", "K", metric), what)
    df = _numeric(trials, ("P", "K", metric, *_EXTRA_LINE_KEYS))
    ok = _completed(df, metric)
    df = df[ok]
    if df.empty:
        raise PlotDataError(f"{what}: no completed trial with a finite {metric}")
    if not (df["P"] == 1).any():
        ps = ", ".join(_fmt_num(p) for p in sorted(df["P"].unique()))
        raise PlotDataError(
            f"{what} needs completed P=1 trials (the sequential SGD baseline); "
            f"this sweep has P = {ps}"
        )
    out = []
    for title, g in _facets(df):
        base = g[g["P"] == 1]
        if base.empty:
            continue
        pooled, _ = _mean_std([float(v) for v in base[metric]])
        base_k = {
            float(k): _mean_std([float(v) for v in vs])[0]
            for k, vs in base[metric].groupby(base["K"])
        }
        curves: dict[str, dict[float, float]] = {}
        used_pooled = False
        for label, k, lg in _line_groups(g, "K"):
            if k in base_k:
                b = base_k[k]
            else:
                b, used_pooled = pooled, True
            st = _stats(lg[metric], lg["P"])
            curves[label] = {p: combine(b, m) for p, m in zip(st["x"], st["mean"], strict=True)}
        note = "baseline: P=1 at the same K" + (
            " (all P=1 trials where P=1 lacks that K)" if used_pooled else ""
        )
        out.append((title, curves, note))
    return out


# --------------------------------------------------------------------------- speedup vs P


def speedup_vs_p(trials: pd.DataFrame, metric: str = "auto") -> Figure:
    """Speedup against P relative to P=1 at the same K (Figures 3, 4), one line per K.

    speedup(P, K) = mean time(P=1, K) / mean time(P, K) over completed trials, where time
    is ``time_to_target_s`` if any completed trial reached the target (``metric="auto"``)
    and ``wall_time_s`` otherwise (or the column named by ``metric``). When P=1 was not
    run at some K, the mean over all P=1 trials is that K's baseline. Dashed: ideal
    linear speedup. Simulated-backend rows are left out (their P learners share one
    process). PlotDataError (a ValueError) if there are no P=1 trials.
    """
    if "backend" in trials.columns:
        # Simulated learners share one process: their wall time says nothing of speedup.
        simulated = trials["backend"] == "simulated"
        if simulated.all():
            raise PlotDataError("speedup_vs_p: simulated trials have no meaningful wall time")
        trials = trials[~simulated]
    metric = _time_metric(trials, metric)
    facets = _vs_baseline(trials, metric, lambda b, m: b / m, "speedup_vs_p")
    unit = "time to target (s)" if metric == "time_to_target_s" else "wall time (s)"
    if metric not in ("time_to_target_s", "wall_time_s"):
        unit = metric
    fig, axes = _new_figure(len(facets))
    fig.suptitle(f"Speedup vs P: {unit} at P=1 / {unit} at P, same K", fontsize="large")
    for ax, (title, curves, note) in zip(axes, facets, strict=True):
        ps: list[float] = sorted({p for c in curves.values() for p in c})
        ys: list[float] = []
        for (label, c), color in zip(curves.items(), _colors(len(curves)), strict=True):
            px = sorted(c)
            ax.plot(px, [c[p] for p in px], marker="o", color=color, label=label)
            ys += [c[p] for p in px]
        ax.plot(ps, ps, linestyle="--", color="gray", label="ideal (linear)", zorder=0)
        _style(
            ax,
            f"{title}\n{note}" if title else note,
            "number of learners P (log2)",
            "speedup over P=1 (×, log2)",
        )
        _log2_axis(ax, "x", ps)
        _log2_axis(ax, "y", _pow2_ticks(ys + ps))
        _legend(ax, "averaging period")
    return fig


def _pow2_ticks(values: Iterable[float]) -> list[float]:
    vals = [v for v in values if v == v and v > 0 and math.isfinite(v)]
    if not vals:
        return [1.0]
    lo = math.floor(math.log2(min(vals)))
    hi = math.ceil(math.log2(max(vals)))
    return [2.0**e for e in range(lo, hi + 1)]


# --------------------------------------------------------------------------- gap vs SGD


def gap_vs_sequential(trials: pd.DataFrame) -> Figure:
    """Accuracy gap of P learners to sequential SGD against P, one line per K (Figure 7).

    gap(P, K) = mean final_test_acc(P, K) - mean final_test_acc(P=1, K), completed trials
    only, plotted for P > 1 (when P=1 was not run at some K, the mean over all P=1 trials
    is that K's baseline). Positive: K-AVG beats sequential SGD. PlotDataError (a
    ValueError) if there are no P=1 trials.
    """
    facets = _vs_baseline(trials, "final_test_acc", lambda b, m: m - b, "gap_vs_sequential")
    facets = [
        (t, {lab: {p: v for p, v in c.items() if p != 1} for lab, c in curves.items()}, n)
        for t, curves, n in facets
    ]
    facets = [(t, {lab: c for lab, c in cs.items() if c}, n) for t, cs, n in facets]
    facets = [f for f in facets if f[1]]
    if not facets:
        raise PlotDataError("gap_vs_sequential needs completed trials with P > 1 beside P=1")
    fig, axes = _new_figure(len(facets))
    fig.suptitle("Accuracy gap to sequential SGD (P=1) vs P", fontsize="large")
    for ax, (title, curves, note) in zip(axes, facets, strict=True):
        ps: list[float] = sorted({p for c in curves.values() for p in c})
        for (label, c), color in zip(curves.items(), _colors(len(curves)), strict=True):
            px = sorted(c)
            ax.plot(px, [c[p] for p in px], marker="o", color=color, label=label)
        ax.axhline(0.0, color="black", linewidth=1, linestyle="--", label="sequential SGD")
        _style(
            ax,
            f"{title}\n{note}" if title else note,
            "number of learners P (log2)",
            "test accuracy gap (P learners − P=1)",
        )
        _log2_axis(ax, "x", ps)
        _legend(ax, "averaging period")
    return fig


# --------------------------------------------------------------------------- save


def save_all_detailed(
    trials: pd.DataFrame,
    history: pd.DataFrame | None,
    out_dir: str | os.PathLike[str],
    predicted: Mapping[int, int] | None = None,
    dpi: int = DPI,
) -> tuple[list[Path], dict[str, str]]:
    """Like :func:`save_all`, also returning {plot name: why it was skipped}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers: dict[str, Callable[[], Figure]] = {
        "accuracy_vs_k": lambda: accuracy_vs_k(trials),
        "accuracy_vs_epoch": lambda: _epoch_or_skip(history, trials),
        "kopt_vs_p": lambda: kopt_vs_p(trials, predicted),
        "kopt_bootstrap": lambda: kopt_bootstrap(trials),
        "kopt_vs_outer_lr": lambda: kopt_vs_outer_lr(trials),
        "speedup_vs_p": lambda: speedup_vs_p(trials),
        "gap_vs_sequential": lambda: gap_vs_sequential(trials),
    }
    written: list[Path] = []
    skipped: dict[str, str] = {}
    for name, make in makers.items():
        try:
            fig = make()
        except PlotDataError as exc:
            skipped[name] = str(exc)
            continue
        path = out / PLOT_FILES[name]
        fig.savefig(path, dpi=dpi, format="png")
        written.append(path)
    return written, skipped


def _epoch_or_skip(history: pd.DataFrame | None, trials: pd.DataFrame) -> Figure:
    if history is None or history.empty:
        raise PlotDataError("no history rows")
    return accuracy_vs_epoch(history, trials)


def save_all(
    trials: pd.DataFrame,
    history: pd.DataFrame | None,
    out_dir: str | os.PathLike[str],
    predicted: Mapping[int, int] | None = None,
) -> list[Path]:
    """Write every plot the data allows as PNG under ``out_dir`` (created if needed).

    File names: see :data:`PLOT_FILES`. A plot whose data is absent (no completed trial,
    no history, no P=1 baseline...) is skipped, not an error. Returns the paths written.
    """
    return save_all_detailed(trials, history, out_dir, predicted)[0]


# --------------------------------------------------------------------------- predicted time

PREDICTED_TIME_FILE = "predicted_time_vs_k.png"


def predicted_time_vs_k(predicted: pd.DataFrame, network: str = "") -> Figure:
    """Predicted time to target on a network against K, one line per P (log2 K, log time).

    ``predicted``: the frame of :func:`kavg_ray.analysis.costmodel.predict_trials`. Points: mean of
    ``predicted_time_to_target_s`` over completed trials that reached the target; a star
    marks the K with the least mean (K_opt by time on that network).
    """
    metric = "predicted_time_to_target_s"
    _require(predicted, ("P", "K", metric), "predicted_time_vs_k")
    df = _numeric(predicted, ("P", "K", metric, *_EXTRA_LINE_KEYS))
    ok = _completed(df, metric)
    if not ok.any():
        raise PlotDataError("predicted_time_vs_k: no completed trial reached the target")
    facets = [(t, g) for t, g in _facets(df) if ok[g.index].any()]
    fig, axes = _new_figure(len(facets))
    fig.suptitle(f"Predicted time to target vs K on {network or 'the network'}", fontsize="large")
    for ax, (title, g) in zip(axes, facets, strict=True):
        lines = _line_groups(g[ok[g.index]], "P")
        for (label, _p, lg), color in zip(lines, _colors(len(lines), "plasma"), strict=True):
            st = _stats(lg[metric], lg["K"])
            ax.plot(st["x"], st["mean"], marker="o", color=color, label=label)
            best = st.loc[st["mean"].idxmin()]
            ax.plot(
                [best["x"]], [best["mean"]], marker="*", markersize=15, color=color,
                markeredgecolor="black", linestyle="none", label="_nolegend_", zorder=5,
            )  # fmt: skip
        ax.set_yscale("log")
        _style(ax, title, "averaging period K (log2)", "predicted time to target (s, log)")
        _log2_axis(ax, "x", g["K"].dropna())
        _legend(ax, "learners (star: K_opt)")
    return fig


# --------------------------------------------------------------------------- K_opt uncertainty


def kopt_bootstrap(trials: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> Figure:
    """How often each K is best over bootstrap resamples of the seeds, bars per P.

    Frequencies of :func:`kavg_ray.analysis.uncertainty.bootstrap_kopt` (by final accuracy; ties
    split equally). Needs some K with two or more seeds: with one seed per K the
    bootstrap says nothing the K_opt table does not.
    """
    from kavg_ray.analysis.uncertainty import bootstrap_kopt

    _require(trials, ("P", "K", "status", "final_test_acc"), "kopt_bootstrap")
    boot = bootstrap_kopt(trials, by="accuracy", n_boot=n_boot, seed=seed)
    if boot.empty:
        raise PlotDataError("no completed trial: K_opt is undefined for every P")
    if (boot["n_seeds"] < 2).all():
        raise PlotDataError("one seed per K: a bootstrap over seeds needs several seeds")
    boot = _numeric(boot, ("P", "K", "freq_best"))
    facets = _facets(boot)
    fig, axes = _new_figure(len(facets))
    fig.suptitle(
        f"How often each K is best over {n_boot} bootstrap resamples of the seeds",
        fontsize="large",
    )
    for ax, (title, g) in zip(axes, facets, strict=True):
        ks = sorted(g["K"].unique())
        lines = _line_groups(g, "P")
        width = 0.8 / len(lines)
        for i, ((label, _p, gp), color) in enumerate(
            zip(lines, _colors(len(lines)), strict=True)
        ):
            offset = (i - (len(lines) - 1) / 2) * width
            x = [ks.index(k) + offset for k in gp["K"]]
            ax.bar(x, gp["freq_best"], width=width, color=color, label=label)
        ax.set_xticks(range(len(ks)), [_fmt_num(k) for k in ks])
        ax.set_ylim(0.0, 1.05)
        _style(ax, title, "averaging period K", "share of resamples where K is best")
        _legend(ax, "learners")
    return fig


def _draw_kopt_fit(ax: Axes, g: pd.DataFrame) -> None:
    """Draw K_opt = a * P^b fitted over P >= 2 (:func:`kavg_ray.analysis.uncertainty.fit_power_law`)
    across the measured P range, when two or more distinct P (one K_opt each) allow it: on
    the P whose K_opt is settled when two or more are, else on all of them, labelled as
    resting on unsettled K_opt (:func:`kavg_ray.analysis.uncertainty.fit_selection`)."""
    from kavg_ray.analysis.uncertainty import fit_power_law, fit_selection

    rows, flags, settled_only = fit_selection(g[g["K_opt"] > 0])
    pts = [(float(p), float(k)) for p, k in zip(rows["P"], rows["K_opt"], strict=True)]
    ps = [p for p, _ in pts]
    if len(set(ps)) < 2 or len(set(ps)) != len(ps):
        return
    fit = fit_power_law(ps, [k for _, k in pts])
    which = ", ".join(f"{p:g}" for p in sorted(flags))
    caveat = (f"; P {which} left out" if settled_only else
              f"; on unsettled K_opt at P {which}") if flags else ""  # fmt: skip
    xs = np.geomspace(min(ps), max(ps), 64)
    ax.plot(
        xs,
        fit.predict(xs),
        linestyle=":",
        linewidth=1.8,
        color="tab:green",
        label=f"fit K = {fit.a:.3g}·P^{fit.b:.3g} (R² = {fit.r2:.3f}){caveat}",
    )
