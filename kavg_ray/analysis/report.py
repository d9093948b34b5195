"""One-page Markdown report of a sweep: spec, trials, K_opt tables and plots.

``write_report(sweep, storage, out_dir)`` writes ``<out_dir>/report.md`` and the PNG
plots of :func:`kavg_ray.analysis.plots.save_all` beside it (linked relatively, so the folder
can be moved or published as is).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from kavg_ray.analysis.plots import PLOT_FILES, save_all_detailed
from kavg_ray.analysis.results import (
    KOPT_COLUMNS,
    ResultsError,
    ResultsStore,
    _mean_std,
    attach_predictions,
    kopt_table,
    ranked_by,
)
from kavg_ray.analysis.schedules import SCHEDULE_COLUMNS

__all__ = ["REPORT_FILE", "TRIAL_REPORT_COLUMNS", "markdown_table", "write_report"]

REPORT_FILE = "report.md"

#: Columns of the trials table, in order; a column absent or empty in the sweep is left out.
TRIAL_REPORT_COLUMNS: list[str] = [
    "trial_id", "algorithm", "dataset", "model", "P", "K", "S", "K1", "K2", "seed", "status",
    "final_test_acc", "best_test_acc", "time_to_target_s", "wall_time_s", "comm_time_s",
    "rounds", "error",
]  # fmt: skip
_ALWAYS = {"trial_id", "P", "K", "seed", "status", "final_test_acc"}
_SORT_KEYS = ["algorithm", "dataset", "model", "P", "K", "S", "K1", "seed", "trial_id"]

_PLOT_CAPTIONS: dict[str, str] = {
    "accuracy_vs_k": "Final test accuracy vs averaging period K, one line per P "
    "(paper Figures 5, 6)",
    "accuracy_vs_epoch": "Test accuracy vs epoch, one line per K, one panel per P",
    "kopt_vs_p": "Measured (and predicted) K_opt vs P",
    "kopt_bootstrap": "How often each K is best over bootstrap resamples of the seeds",
    "speedup_vs_p": "Speedup vs P relative to P=1 at the same K (paper Figures 3, 4)",
    "gap_vs_sequential": "Accuracy gap to sequential SGD (P=1) vs P (paper Figure 7)",
}


def _cell(v: Any) -> str:
    """Markdown cell text: floats to 4 significant digits (as format_frame), NA empty."""
    if v is None or v is pd.NA:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.4g}"
    try:
        if pd.isna(v):
            return ""
    except (TypeError, ValueError):
        pass
    text = " ".join(str(v).split())
    return text.replace("\\", "\\\\").replace("|", "\\|")


def markdown_table(df: pd.DataFrame) -> str:
    """``df`` as a GitHub-flavoured Markdown table (no index); "(no rows)" if empty."""
    if df.empty:
        return "(no rows)\n"
    cols = [str(c) for c in df.columns]
    lines = [
        "| " + " | ".join(_cell(c) for c in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for row in df.itertuples(index=False, name=None):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _spec_block(store: ResultsStore, sweep: str) -> str:
    try:
        spec = store.read_spec(sweep)
    except ResultsError as exc:
        return f"_No spec stored: {exc}_\n"
    try:
        import yaml

        text = yaml.safe_dump(
            json.loads(json.dumps(spec, default=str)), sort_keys=False, default_flow_style=None
        )
        return f"```yaml\n{text.rstrip()}\n```\n"
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        return f"```json\n{json.dumps(spec, indent=2, default=str)}\n```\n"


def _trials_table(trials: pd.DataFrame) -> pd.DataFrame:
    cols = []
    for c in TRIAL_REPORT_COLUMNS:
        if c not in trials.columns:
            continue
        col = trials[c]
        empty = col.isna() | (col.astype(str) == "")
        if c in _ALWAYS or not empty.all():
            cols.append(c)
    keys = [k for k in _SORT_KEYS if k in cols]
    out = trials[cols]
    if keys and len(out):
        try:
            out = out.sort_values(keys, kind="stable", na_position="last")
        except TypeError:  # mixed types in a key column: keep the stored order
            pass
    return out


def _status_counts(trials: pd.DataFrame) -> str:
    if trials.empty or "status" not in trials.columns:
        return "0 trials"
    counts = trials["status"].fillna("?").value_counts()
    parts = ", ".join(f"{n} {s}" for s, n in counts.sort_index().items())
    return f"{len(trials)} trials ({parts})"


def _accuracy_pivot(trials: pd.DataFrame) -> pd.DataFrame | None:
    """Mean ± std of final test accuracy (completed trials), rows K, columns P."""
    need = {"P", "K", "status", "final_test_acc"}
    if not need <= set(trials.columns):
        return None
    df = trials[trials["status"] == "completed"].copy()
    for c in ("P", "K", "final_test_acc"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df = df.dropna(subset=["P", "K", "final_test_acc"])
    if df.empty:
        return None
    keys = [k for k in ("algorithm", "dataset", "model") if k in df.columns]
    if keys and df[keys].drop_duplicates().shape[0] > 1:
        return None  # several workloads: the K_opt table already separates them
    cells: dict[tuple[float, float], str] = {}
    for (k, p), g in df.groupby(["K", "P"], sort=True):
        vals = [float(v) for v in g["final_test_acc"]]
        mean, std = _mean_std(vals)
        cells[(k, p)] = f"{mean:.4f} ± {std:.4f} (n={len(vals)})"
    ks = sorted({k for k, _ in cells})
    ps = sorted({p for _, p in cells})
    rows = []
    for k in ks:
        row: dict[str, str] = {"K": f"{k:g}"}
        for p in ps:
            row[f"P={p:g}"] = cells.get((k, p), "")
        rows.append(row)
    return pd.DataFrame(rows)


def _strip_name(why: str, name: str) -> str:
    """'speedup_vs_p needs ...' -> 'needs ...' (the name is already in the list item)."""
    return why[len(name) :].lstrip(": ") if why.startswith(name) else why


def write_report(
    sweep: str,
    storage: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    predicted: dict[int, int] | None = None,
    network: tuple | None = None,
) -> Path:
    """Write ``<out_dir>/report.md`` (and the plots beside it) for ``sweep``; its path.

    Sections: sweep name and storage, the stored spec (YAML), mean accuracy per (K, P),
    K_opt by accuracy (and by time when some trial has ``time_to_target_s``), the plots,
    and the trials table. Raises :class:`~kavg_ray.analysis.results.ResultsError` for an unknown
    sweep.
    """
    store = ResultsStore(storage)
    trials = store.read_trials(sweep)  # ResultsError if the sweep does not exist
    if predicted is None:  # the probe's predictions (`theory: estimate`), per lr and P
        trials = attach_predictions(trials, store.read_theory(sweep))
    history = store.read_history(sweep)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    parts = _header_section(store, sweep, trials)
    parts += _accuracy_section(trials)
    parts += _kopt_sections(trials, history)
    if network is not None:
        parts += _network_section(sweep, storage, trials, out, network)
    parts += _plots_section(trials, history, out, predicted)
    parts += ["## Trials\n", markdown_table(_trials_table(trials))]

    path = out / REPORT_FILE
    text = "\n".join(p.rstrip("\n") + "\n" for p in parts)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _header_section(store: ResultsStore, sweep: str, trials: pd.DataFrame) -> list[str]:
    """The report's title, storage, trial counts, time of writing and stored spec."""
    now = _dt.datetime.now(tz=_dt.timezone.utc).isoformat(timespec="seconds")
    return [
        f"# Sweep report: {sweep}\n",
        f"- storage: `{store.sweep_dir(sweep)}`\n"
        f"- trials: {_status_counts(trials)}\n"
        f"- generated: {now}\n",
        "## Spec\n",
        _spec_block(store, sweep),
    ]


def _accuracy_section(trials: pd.DataFrame) -> list[str]:
    """Mean accuracy per (K, P); none for a sweep without accuracy."""
    pivot = _accuracy_pivot(trials)
    if pivot is None:
        return []
    return [
        "## Final test accuracy by K and P\n",
        "Mean ± sample std over seeds of completed trials (diverged and failed excluded).\n",
        markdown_table(pivot),
    ]


def _kopt_sections(trials: pd.DataFrame, history: pd.DataFrame | None = None) -> list[str]:
    """K_opt by the ranked metric, then by time to target when some trial reached it; each
    table followed by its verdicts in words."""
    by = ranked_by(trials)  # the final test loss for a sweep without accuracy
    best = "best mean final test accuracy" if by == "accuracy" else "lowest mean final test loss"
    table = kopt_table(trials, by=by, history=history)
    parts = [
        f"## K_opt by {by}\n",
        f"K with the {best} at the fixed epoch budget; "
        "`k_within_1std`: K whose mean is within one std of the best; `freq_best`: how "
        "often K_opt is best over paired bootstrap resamples of the seeds; "
        "`credible_set`: the fewest K best in at least 0.8 of them; `freq_k1`: how often "
        "K = 1 is best; `diff_vs_k1`: K_opt minus K = 1 on the same seeds (90% interval).\n",
        markdown_table(table),
        verdict_lines(table),
    ]
    if "time_to_target_s" in trials.columns:
        ttt = pd.to_numeric(trials["time_to_target_s"], errors="coerce")
        if ttt.notna().any():
            by_time = kopt_table(trials, by="time", history=history)
            parts += [
                "## K_opt by time to target\n",
                "K with the least mean wall-clock time to reach the target accuracy, as "
                "measured on the machine that ran the sweep (no network model assumed).\n",
                markdown_table(by_time),
                verdict_lines(by_time),
            ]
    return parts


def verdict_lines(table: pd.DataFrame) -> str:
    """One Markdown bullet per row of a kopt_table: its K_opt, verdict and evidence, and
    the line that sets its best K_schedule against its best fixed K, when it has one."""
    own = {*KOPT_COLUMNS, "predicted_kopt", *SCHEDULE_COLUMNS}
    keys = [c for c in table.columns if c not in own]
    lines = []
    for row in table.to_dict("records"):
        where = ", ".join(f"{k}={_cell(row[k])}" for k in keys if k not in
                          ("algorithm", "dataset", "model"))  # fmt: skip
        if pd.isna(row["K_opt"]):
            lines.append(f"- {where}: no K_opt ({row['note']})")
            continue
        text = (
            f"- {where}: K_opt = {_cell(row['K_opt'])}, **{row['verdict']}**: best in "
            f"{row['freq_best']:.0%} of the resamples; credible set {row['credible_set']}"
        )
        if not pd.isna(row["freq_k1"]):
            text += f"; K = 1 best in {row['freq_k1']:.0%}"
        text += f". {row['note']}" if row["note"] else ""
        line = row.get("schedule_line")  # a K_schedule set against the best fixed K
        lines.append(text + (f". Schedules: {line}" if isinstance(line, str) and line else ""))
    return "\n".join(lines) + "\n"


def _plots_section(
    trials: pd.DataFrame,
    history: pd.DataFrame,
    out: Path,
    predicted: dict[int, int] | None,
) -> list[str]:
    """Draws every plot the data allows into ``out``; links them and lists those not drawn."""
    written, skipped = save_all_detailed(trials, history, out, predicted)
    parts = ["## Plots\n"]
    names = {p.name: p for p in written}
    for key, fname in PLOT_FILES.items():
        if fname in names:
            parts.append(f"### {_PLOT_CAPTIONS[key]}\n\n![{key}]({fname})\n")
    if skipped:
        parts.append(
            "Not drawn:\n\n"
            + "".join(f"- {key}: {_strip_name(why, key)}\n" for key, why in skipped.items())
        )
    return parts


def _network_section(
    sweep: str, storage: Any, trials: pd.DataFrame, out: Path, network: tuple
) -> list[str]:
    """K_opt by predicted time on ``network`` = (costmodel.Network, step time, target,
    model sizer for trials that moved no bytes)."""
    from kavg_ray.analysis import costmodel
    from kavg_ray.analysis.plots import PREDICTED_TIME_FILE, PlotDataError, predicted_time_vs_k

    net, step_time, target, model_bytes = network
    pred = costmodel.predict_sweep(
        sweep, storage, net, trials=trials, step_time=step_time, target=target,
        model_bytes=model_bytes,
    )
    step = f"{step_time:g} s (given)" if step_time is not None else "measured per trial"
    parts = [
        "## K_opt by predicted time on a network\n",
        f"Network assumed: {net.describe()}. Step time: {step}. Target accuracy: "
        f"{pred['target_accuracy'].iloc[0] if len(pred) else '?'}. Model: "
        "kavg_ray.analysis.costmodel (no overlap, contention or stragglers).\n",
        markdown_table(costmodel.kopt_by_predicted_time(pred)),
    ]
    try:
        predicted_time_vs_k(pred, net.name).savefig(out / PREDICTED_TIME_FILE, format="png")
    except PlotDataError as exc:
        parts.append(f"Not drawn: {exc}\n")
    else:
        parts.append(f"![predicted_time_vs_k]({PREDICTED_TIME_FILE})\n")
    return parts
