"""K_opt with its uncertainty (docs/design.md sections 1 and 11).

Two questions a K sweep leaves open:

- *How sure is K_opt at one P?* :func:`bootstrap_kopt` resamples the seeds. For each
  group (the groups of :func:`kavg_ray.analysis.results.kopt_table`: algorithm, dataset, model, P,
  plus any setting that varies) it draws ``n_boot`` resamples. Seeds are paired across K
  (seed s gives every K the same initial model and data), so by default a resample draws
  the seeds jointly, with replacement, and every K takes the mean of its scores on the
  drawn seeds (:mod:`kavg_ray.analysis.confidence`, the bootstrap behind kopt_table's
  ``freq_best`` and verdict); ``paired=False`` draws each K's seeds on its own (as many
  as that K has). The K with the best mean (largest accuracy, least loss or time to
  target) wins the resample. Scores are kopt_table's (``score``; a diverged seed counts
  against its K). ``freq_best`` of a K is the share of resamples it wins. **Ties are
  split equally**: when m K share the best mean of a resample (equal up to a relative
  1e-12, as in ``kopt_table``), each gets 1/m of that resample's vote, so the frequencies
  of a group always sum to 1. With one seed per K the bootstrap is certain (frequency 1
  for K_opt, or split between tied K).
- *What K_opt to expect at a P not run?* :func:`fit_power_law` fits
  ``K_opt = a * P**b`` by least squares on ``ln K_opt`` against ``ln P`` over the P whose
  K_opt is defined (``kopt_table``), P >= 2 only: with one learner averaging is a no-op,
  every K trains the same model and K_opt(1) says nothing about K. :func:`kopt_curve`
  reports a, b, R^2 and the log2 residuals per P, and predictions at untried P (by
  default the powers of two missing between the smallest P fitted and four times the
  largest). The fit trusts a P's K_opt only when it is **settled**: kopt_table's verdict
  clear or narrow, and not at the edge of the K tried (the largest, or the smallest above
  1: the best K may lie beyond). With two or more settled P it is fitted on those alone and
  says which P it left out and why; with fewer it is fitted on every P and says that it
  rests on unsettled K_opt (:func:`fit_selection`).

Randomness is one ``numpy.random.default_rng(seed)`` per group, fresh for every group:
paired, one draw ``rng.integers(0, n_seeds, size=(n_boot, n_seeds))`` (row b: the seeds,
in ascending order of seed, of resample b); unpaired, for each K in ascending order
``rng.integers(0, n_K, size=(n_boot, n_K))``. Means are taken over sorted values, so the
same seeds give the same mean whatever their order.

This module imports neither torch nor ray.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kavg_ray.analysis import confidence
from kavg_ray.analysis.results import (
    ARGS_PREFIXES,
    DEFAULT_GROUP_KEYS,
    VARYING_GROUP_KEYS,
    _as_int_if_integral,
    _mean_std,
    format_frame,
    kopt_scores,
    kopt_table,
    pairing_units,
)
from kavg_ray.errors import BadInputError

__all__ = [
    "BOOTSTRAP_COLUMNS",
    "CURVE_COLUMNS",
    "FIT_COLUMNS",
    "PowerLawFit",
    "bootstrap_frequencies",
    "bootstrap_kopt",
    "fit_power_law",
    "format_uncertainty",
    "kopt_curve",
    "uncertainty_report",
]

#: Columns of :func:`bootstrap_kopt` after the group keys.
BOOTSTRAP_COLUMNS: list[str] = ["K", "n_seeds", "mean", "freq_best"]
#: Columns of the fit table of :func:`kopt_curve` after the workload keys.
FIT_COLUMNS: list[str] = [
    "a", "b", "r2", "n_points", "P_fitted", "P_unsettled", "max_abs_residual_log2", "note",
]  # fmt: skip
#: Columns of the curve table of :func:`kopt_curve` after the workload keys.
CURVE_COLUMNS: list[str] = [
    "P", "kind", "K_opt", "verdict", "fitted", "K_pred", "residual_log2", "note",
]  # fmt: skip
#: The verdicts (kopt_table's) whose K_opt the K_opt(P) fit trusts.
SETTLED_VERDICTS = ("clear", "narrow")

MAX_N_BOOT = 1_000_000
#: Fits use K_opt at P >= MIN_FIT_P (at P = 1 every K trains the same model).
MIN_FIT_P = 2


def _metric(by: str) -> tuple[str, float]:
    if by == "accuracy":
        return "final_test_acc", 1.0
    if by == "time":
        return "time_to_target_s", -1.0
    if by == "loss":
        return "final_test_loss", -1.0
    raise BadInputError(f"unknown by={by!r}; expected 'accuracy', 'time' or 'loss'")


def group_keys(trials: pd.DataFrame) -> list[str]:
    """The group keys of :func:`kavg_ray.analysis.results.kopt_table` for ``trials``."""
    keys = [k for k in DEFAULT_GROUP_KEYS if k in trials.columns]
    keys += [
        k for k in VARYING_GROUP_KEYS
        if k in trials.columns and trials[k].dropna().nunique() > 1
    ]  # fmt: skip
    keys += [
        k for k in trials.columns
        if k.startswith(ARGS_PREFIXES) and trials[k].dropna().nunique() > 1
    ]  # fmt: skip
    return keys


def bootstrap_frequencies(
    samples: Sequence[Sequence[float]],
    n_boot: int,
    rng: np.random.Generator,
    sign: float = 1.0,
) -> np.ndarray:
    """Share of ``n_boot`` resamples in which each candidate has the best mean.

    ``samples[j]`` holds candidate j's values (one per seed, at least one). In each
    resample every candidate's values are drawn with replacement; the largest
    ``sign * mean`` wins; tied candidates split the vote equally. Draws: for j in order,
    ``rng.integers(0, n_j, size=(n_boot, n_j))``.
    """
    if n_boot < 1 or n_boot > MAX_N_BOOT:
        raise BadInputError(f"n_boot must be between 1 and {MAX_N_BOOT}, got {n_boot}")
    if not samples or any(len(s) == 0 for s in samples):
        raise BadInputError("every candidate K needs at least one value")
    return confidence.unpaired_bootstrap(samples, n_boot, rng, sign)


def bootstrap_kopt(
    trials: pd.DataFrame,
    by: str = "accuracy",
    n_boot: int = 1000,
    seed: int = 0,
    *,
    score: str = "last",
    history: pd.DataFrame | None = None,
    paired: bool = True,
) -> pd.DataFrame:
    """How often each K is best per group, over ``n_boot`` resamples of the seeds.

    Uses the trials that count in ``kopt_table`` (``kopt_scores``: completed trials with a
    score, diverged seeds at chance accuracy or the worst loss). Columns: the group keys,
    K, n_seeds, mean (over the seeds), freq_best. A group without a usable trial has no
    rows. ``paired`` (default): the seeds are drawn jointly for every K.
    """
    sign = _metric(by)[1]
    if n_boot < 1 or n_boot > MAX_N_BOOT:
        raise BadInputError(f"n_boot must be between 1 and {MAX_N_BOOT}, got {n_boot}")
    keys = group_keys(trials)
    out_cols = keys + BOOTSTRAP_COLUMNS
    try:
        usable = kopt_scores(trials, by=by, score=score, history=history)
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    if usable.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in out_cols})
    groups = usable.groupby(keys, sort=True, dropna=False) if keys else [((), usable)]
    rows: list[dict] = []
    for key, g in groups:
        key_t = key if isinstance(key, tuple) else (key,)
        per_k = [(k, sorted(float(v) for v in vals)) for k, vals in
                 g["value"].groupby(g["K"], sort=True)]  # fmt: skip
        rng = np.random.default_rng(seed)
        if paired:
            _, matrix = confidence.paired_matrix(list(g["value"]), list(g["K"]), pairing_units(g))
            freq = confidence.paired_bootstrap(matrix, n_boot, rng, sign)[0]
        else:
            freq = bootstrap_frequencies([v for _, v in per_k], n_boot, rng, sign)
        for (k, vals), f in zip(per_k, freq, strict=True):
            row = dict(zip(keys, key_t, strict=True))
            row.update(K=k, n_seeds=len(vals), mean=_mean_std(vals)[0], freq_best=float(f))
            rows.append(row)
    out = pd.DataFrame(rows)[out_cols]
    out["K"] = _as_int_if_integral(out["K"])
    out["n_seeds"] = out["n_seeds"].astype("int64")
    return out


@dataclass(frozen=True)
class PowerLawFit:
    """``K = a * P**b``, fitted by least squares on ln K against ln P."""

    a: float
    b: float
    r2: float
    P: tuple[float, ...]
    K: tuple[float, ...]

    @property
    def n_points(self) -> int:
        return len(self.P)

    def predict(self, P: Iterable[float] | float) -> np.ndarray:
        """a * P**b at each P."""
        return self.a * np.power(np.asarray(P, dtype=float), self.b)

    def residuals_log2(self) -> np.ndarray:
        """log2(K measured) - log2(K fitted), per fitted point."""
        return np.log2(np.asarray(self.K)) - np.log2(self.predict(self.P))


def fit_power_law(P: Sequence[float], K: Sequence[float]) -> PowerLawFit:
    """Fit ``K = a * P**b``: ordinary least squares of ln K on ln P.

    R^2 is that of the log-log regression (1 - SS_res / SS_tot), and 1.0 when every K is
    equal (the flat fit is exact). Needs positive finite values and two distinct P.
    """
    p = np.asarray(P, dtype=float)
    k = np.asarray(K, dtype=float)
    if p.shape != k.shape or p.ndim != 1:
        raise BadInputError("P and K must be two lists of the same length")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(k)) and np.all(p > 0) and np.all(k > 0)):
        raise BadInputError("a power-law fit needs positive finite P and K")
    if len(np.unique(p)) < 2:
        raise BadInputError("a power-law fit needs K_opt at two or more distinct P")
    x, y = np.log(p), np.log(k)
    dx = x - x.mean()
    b = float((dx * (y - y.mean())).sum() / (dx * dx).sum())
    ln_a = float(y.mean() - b * x.mean())
    ss_res = float(((y - (ln_a + b * x)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 if ss_tot == 0.0 else 1.0 - ss_res / ss_tot
    return PowerLawFit(math.exp(ln_a), b, r2, tuple(p.tolist()), tuple(k.tolist()))


def default_predict_p(fitted_p: Iterable[float]) -> list[int]:
    """Powers of two not fitted, from the smallest fitted P to four times the largest."""
    ps = sorted(float(p) for p in fitted_p)
    out, q = [], 1
    while q <= 4 * ps[-1]:
        if q >= ps[0] and float(q) not in ps:
            out.append(q)
        q *= 2
    return out


def _curve_note(k_opt: float, tried: str) -> str:
    try:
        ks = [float(k) for k in str(tried).split(",") if k.strip()]
    except ValueError:
        return ""
    if len(ks) > 1 and k_opt == max(ks):
        return "at the largest K tried: K_opt may be larger"
    if len(ks) > 1 and k_opt == min(ks) and k_opt > 1:
        return "at the smallest K tried: K_opt may be smaller"
    return ""


def unsettled_reason(verdict: object, k_opt: float, tried: str) -> str:
    """Why a P's K_opt should not shape the K_opt(P) fit ("" when it is settled): its
    verdict (inconclusive, single seed) and K_opt at the edge of the K tried."""
    reasons = [] if str(verdict) in SETTLED_VERDICTS else [str(verdict or "no verdict")]
    edge = _curve_note(k_opt, tried)
    return "; ".join(reasons + ([edge] if edge else []))


def fit_selection(g: pd.DataFrame) -> tuple[pd.DataFrame, dict[float, str], bool]:
    """``(rows fitted, {P: why unsettled}, settled_only)`` of one workload's kopt_table rows
    (P >= MIN_FIT_P with a K_opt): the settled P when two or more are, else all of them."""
    rows = g[g["P"] >= MIN_FIT_P]
    verdicts = rows["verdict"] if "verdict" in rows.columns else [""] * len(rows)
    flags = {
        float(p): unsettled_reason(v, float(k), tried)
        for p, k, tried, v in zip(rows["P"], rows["K_opt"], rows["K_values_tried"], verdicts,
                                  strict=True)
    }  # fmt: skip
    flags = {p: why for p, why in flags.items() if why}
    settled = rows[[float(p) not in flags for p in rows["P"]]]
    if settled["P"].nunique() >= 2:
        return settled, flags, True
    return rows, flags, False


def _fit_note(fit: PowerLawFit | None, flags: dict[float, str], settled_only: bool) -> str:
    """The fit row's note: why there is no fit, the P it left out or the unsettled P it
    rests on, and a two-point fit's exactness."""
    if fit is None:
        return f"needs K_opt at two or more P >= {MIN_FIT_P}"
    notes = ["two P: the fit is exact, its R^2 says nothing"] if fit.n_points == 2 else []
    which = ", ".join(f"P={p:g} ({why})" for p, why in sorted(flags.items()))
    if flags and settled_only:
        notes.append(f"fitted on the settled P only; left out: {which}")
    elif flags:
        notes.append(f"rests on unsettled K_opt: {which}; a sketch, not a law")
    return "; ".join(notes)


def _workload_curve(g: pd.DataFrame, predict_p: Sequence[float] | None) -> tuple[dict, list[dict]]:
    """The fit row and the curve rows of one workload (rows of kopt_table, one per P)."""
    g = g.assign(P=pd.to_numeric(g["P"], errors="coerce").astype(float))
    g = g[g["K_opt"].notna() & g["P"].notna()].sort_values("P")
    fit_rows, flags, settled_only = fit_selection(g)
    fit_row: dict = {c: float("nan") for c in ("a", "b", "r2", "max_abs_residual_log2")}
    fit_row.update(n_points=len(fit_rows), P_fitted=",".join(f"{p:g}" for p in fit_rows["P"]),
                   P_unsettled=",".join(f"{p:g}" for p in sorted(flags)))  # fmt: skip
    fit = None
    if fit_rows["P"].nunique() >= 2:
        fit = fit_power_law(fit_rows["P"].tolist(), [float(k) for k in fit_rows["K_opt"]])
        resid = fit.residuals_log2()
        fit_row.update(a=fit.a, b=fit.b, r2=fit.r2, max_abs_residual_log2=float(abs(resid).max()))
    fit_row["note"] = _fit_note(fit, flags, settled_only)
    fitted_p = set(fit_rows["P"]) if fit is not None else set()
    curve = [_measured_row(row, fit, p in fitted_p, flags.get(p, ""))
             for p, row in zip(g["P"], g.to_dict("records"), strict=True)]  # fmt: skip
    if fit is not None:
        wanted = default_predict_p(fit.P) if predict_p is None else list(predict_p)
        for p in sorted({float(q) for q in wanted} - set(g["P"])):
            fitted = float(fit.predict(p))
            curve.append({
                "P": p, "kind": "predicted", "K_opt": float("nan"), "verdict": "",
                "fitted": fitted, "K_pred": max(1, round(fitted)),
                "residual_log2": float("nan"), "note": "",
            })  # fmt: skip
    return fit_row, curve


def _measured_row(row: dict, fit: PowerLawFit | None, used: bool, unsettled: str) -> dict:
    """The curve row of one measured P (``used``: in the fit; ``unsettled``: why its K_opt
    is not settled, or "")."""
    p, k = float(row["P"]), float(row["K_opt"])
    fitted = float(fit.predict(p)) if fit is not None else float("nan")
    if p < MIN_FIT_P:
        note = "not fitted (P = 1)"
    elif unsettled:
        note = f"{'flagged' if used else 'not fitted'}: {unsettled}"
    else:
        note = ""
    return {
        "P": p, "kind": "measured", "K_opt": k, "verdict": row.get("verdict", ""),
        "fitted": fitted, "K_pred": max(1, round(fitted)) if fit is not None else pd.NA,
        "residual_log2": math.log2(k / fitted) if used else float("nan"), "note": note,
    }  # fmt: skip


def kopt_curve(
    trials: pd.DataFrame, by: str = "accuracy", predict_p: Sequence[float] | None = None,
    *, score: str = "last", history: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """Fit ``K_opt(P) = a * P**b`` per workload; returns (fit table, curve table).

    K_opt per P is ``kopt_table(trials, by)``'s. Workloads are its groups without P. The
    fit table has a, b, r2, n_points, P_fitted, P_unsettled (the P whose K_opt is not
    settled: :func:`fit_selection`), max_abs_residual_log2 and a note (why a workload has
    no fit, the P it left out or the unsettled P it rests on). The curve table has one
    ``measured`` row per P with a K_opt (its verdict, fitted value, K_pred = the fit
    rounded to an integer >= 1, log2 residual of a fitted P, a note "not fitted: ..." or
    "flagged: ..." for an unsettled one) and one
    ``predicted`` row per P of ``predict_p`` not measured (default
    :func:`default_predict_p`).
    """
    if predict_p is not None and any(not (float(p) > 0) for p in predict_p):
        raise BadInputError("predictions need P > 0")
    try:
        table = kopt_table(trials, by=by, score=score, history=history)
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    keys = [k for k in group_keys(trials) if k != "P"]
    if table.empty:
        empty = {c: pd.Series(dtype=object) for c in keys + FIT_COLUMNS}
        empty_curve = {c: pd.Series(dtype=object) for c in keys + CURVE_COLUMNS}
        return pd.DataFrame(empty), pd.DataFrame(empty_curve)
    groups = table.groupby(keys, sort=True, dropna=False) if keys else [((), table)]
    fit_rows, curve_rows = [], []
    for key, g in groups:
        key_t = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        fit_row, curve = _workload_curve(g, predict_p)
        fit_rows.append({**key_t, **fit_row})
        curve_rows += [{**key_t, **row} for row in curve]
    fits = pd.DataFrame(fit_rows, columns=keys + FIT_COLUMNS)
    curves = pd.DataFrame(curve_rows, columns=keys + CURVE_COLUMNS)
    for col in ("P", "K_opt", "K_pred"):
        curves[col] = _as_int_if_integral(curves[col])
    fits["n_points"] = fits["n_points"].astype("int64")
    return fits, curves


def uncertainty_report(
    trials: pd.DataFrame,
    by: str = "accuracy",
    n_boot: int = 1000,
    seed: int = 0,
    predict_p: Sequence[float] | None = None,
    *,
    score: str = "last",
    history: pd.DataFrame | None = None,
) -> dict[str, pd.DataFrame]:
    """{"bootstrap": bootstrap_kopt(...), "fit": ..., "curve": ...} of ``trials``."""
    boot = bootstrap_kopt(trials, by=by, n_boot=n_boot, seed=seed, score=score, history=history)
    fits, curves = kopt_curve(trials, by=by, predict_p=predict_p, score=score, history=history)
    return {"bootstrap": boot, "fit": fits, "curve": curves}


def format_uncertainty(frames: dict[str, pd.DataFrame], fmt: str, n_boot: int, seed: int) -> str:
    """Render :func:`uncertainty_report` as "table", "csv" or "json".

    table and csv: the three tables in order, each after a title line (csv: starting with
    '#'), separated by a blank line. json: one object ``{"n_boot", "seed", "bootstrap",
    "fit", "curve"}`` whose tables are lists of records.
    """
    import json

    titles = {
        "bootstrap": f"bootstrap: how often each K is best over {n_boot} resamples "
        f"of the seeds, drawn jointly for every K (seed {seed}; ties split equally)",
        "fit": "fit: K_opt(P) = a * P^b, least squares on log K against log P (P >= 2)",
        "curve": "curve: K_opt measured and fitted per P, predicted at P not run",
    }
    if fmt == "json":
        doc: dict = {"n_boot": n_boot, "seed": seed}
        for name, df in frames.items():
            doc[name] = json.loads(format_frame(df, "json"))
        return json.dumps(doc) + "\n"
    if fmt not in ("table", "csv"):
        raise BadInputError(f"unknown format {fmt!r}; expected 'table', 'csv' or 'json'")
    prefix = "# " if fmt == "csv" else ""
    parts = [f"{prefix}{titles[name]}\n" + format_frame(df, fmt) for name, df in frames.items()]
    return "\n".join(parts)
