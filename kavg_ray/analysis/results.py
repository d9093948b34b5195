"""Results store and K_opt analysis (docs/design.md sections 1, 3 and 5).

Per sweep, under ``<storage>/<sweep>/``:

- ``trials.parquet``: one row per trial (``TRIAL_COLUMNS`` first, extra columns kept);
- ``history.parquet``: one row per trial per report (``HISTORY_COLUMNS`` first);
- ``spec.json``: the sweep spec, so a sweep can be resumed and audited.

Every file is rewritten atomically (temporary file in the same directory, fsync,
``os.replace``), and read-modify-write cycles hold an exclusive ``flock`` on
``<sweep>/.lock`` so concurrent trial reporters (threads or processes) never lose rows.

``storage`` may also be an ``s3://`` or ``gs://`` URI (:mod:`kavg_ray.analysis.storage`):
each file is then one object, replaced by one write, and the lock is a local file under
:func:`~kavg_ray.analysis.storage.local_dir` (writers on one machine exclude each other).

This module imports neither torch nor ray: the CLI's ``results`` commands must stay fast.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kavg_ray.analysis import confidence, schedules
from kavg_ray.analysis.storage import RemotePath, local_dir, storage_root
from kavg_ray.errors import ResultsError
from kavg_ray.metrics import EPOCH_KEYS

__all__ = [
    "HISTORY_COLUMNS",
    "KOPT_COLUMNS",
    "TRIAL_COLUMNS",
    "FINISHED_STATUSES",
    "ResultsError",
    "ResultsStore",
    "default_storage",
    "format_frame",
    "kopt_table",
    "load_history",
    "load_trials",
    "validate_name",
]

TRIAL_COLUMNS: list[str] = [
    "sweep",
    "trial_id",
    "algorithm",
    "model",
    "dataset",
    "backend",
    "P",
    "K",
    "S",
    "K1",
    "K2",
    "seed",
    "lr",
    "batch_size",
    "epochs",
    "momentum",
    "optimizer",
    "outer_lr",
    "outer_momentum",
    "outer_nesterov",
    "warmup_steps",
    "status",
    "final_test_acc",
    "final_test_loss",
    "final_train_loss",
    "best_test_acc",
    "time_to_target_s",
    "wall_time_s",
    "compute_time_s",
    "comm_time_s",
    "wait_time_s",
    "bytes_communicated",
    "rounds",
    "samples",
    "error",
    "error_file",
    "restarts",
    "restart_time_s",
]

HISTORY_COLUMNS: list[str] = ["sweep", "trial_id", *EPOCH_KEYS]

#: Statuses that --resume does not rerun (a failed trial is rerun). A ``stopped`` trial
#: (early stopping, ``search.early_stop``) ended on purpose and never counts as K_opt.
FINISHED_STATUSES: frozenset[str] = frozenset({"completed", "diverged", "stopped"})

#: Default grouping of kopt_table: one K_opt per workload and learner count.
DEFAULT_GROUP_KEYS: tuple[str, ...] = ("algorithm", "dataset", "model", "P")
# What kopt_table ranks by, and the trials column it ranks.
RANK_METRICS = {"accuracy": "final_test_acc", "time": "time_to_target_s", "loss": "final_test_loss"}
RANK_LABELS = {"accuracy": "final test accuracy", "time": "time to target (s)",
               "loss": "final test loss"}  # fmt: skip
# Trial columns of factory arguments (kavg_ray.launch.sweep.trial_row): model_args.width ...
ARGS_PREFIXES = ("model_args.", "dataset_args.")


def ranked_by(trials_df: pd.DataFrame) -> str:
    """What K_opt is ranked by when nothing says: accuracy, or the final test loss for a
    sweep whose trials report no accuracy (a regression task)."""
    if "final_test_acc" in trials_df.columns:
        if pd.to_numeric(trials_df["final_test_acc"], errors="coerce").notna().any():
            return "accuracy"
    return "loss" if "final_test_loss" in trials_df.columns else "accuracy"
VARYING_GROUP_KEYS: tuple[str, ...] = (
    "backend", "lr", "batch_size", "epochs", "momentum", "optimizer", "outer_lr",
    "outer_momentum", "outer_nesterov", "warmup_steps", "S", "K1", "lr_schedule",
    "lr_warmup_steps", "min_lr", "grad_clip", "grad_accum", "precision", "tf32", "steps",
    "payload", "payload_error_feedback", "fragments", "fragment_delay", "fragment_alpha",
)  # fmt: skip

#: kopt_table columns after the group keys (``predicted_kopt`` is appended when present).
KOPT_COLUMNS: list[str] = [
    "K_opt",
    "verdict",
    "freq_best",
    "credible_set",
    "freq_k1",
    "diff_vs_k1",
    "diff_vs_k1_lo",
    "diff_vs_k1_hi",
    "mean",
    "std",
    "n_seeds",
    "k_within_1std",
    "n_excluded",
    "K_values_tried",
    "note",
]
#: What a seed that diverged scores by accuracy: a guess, per built-in data set (another
#: data set's diverged seed scores 0).
CHANCE_ACCURACY: dict[str, float] = {
    "digits": 0.1, "mnist": 0.1, "fashion_mnist": 0.1, "cifar10": 0.1, "mnist1d": 0.1,
    "cifar100": 0.01,
}  # fmt: skip
#: ``--score``: the final evaluation, the mean of the last N, or the best of the run.
SCORE_RE = re.compile(r"^(?:last|best|last:([1-9][0-9]{0,5}))$")

SWEEP_LIST_COLUMNS: list[str] = [
    "sweep",
    "trials",
    "completed",
    "diverged",
    "failed",
    "updated",
    "error",
]

TRIALS_FILE = "trials.parquet"
HISTORY_FILE = "history.parquet"
SPEC_FILE = "spec.json"
THEORY_FILE = "theory.json"
PROGRESS_FILE = "progress.json"
LOCK_FILE = ".lock"

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_MAX_NAME_LEN = 128
# Means closer than this (relative) count as tied: averaging the same accuracies in a
# different order can differ in the last bit, and that must not decide K_opt.
_TIE_RTOL = confidence.TIE_RTOL




def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def validate_name(name: str, what: str = "sweep name") -> str:
    """Return ``name`` if it is a safe single path component, else raise ValueError.

    Allowed: letters, digits, '.', '_', '-'; at most 128 characters; not '.' or '..'.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > _MAX_NAME_LEN:
        raise ValueError(f"{what} {name!r} is longer than {_MAX_NAME_LEN} characters")
    if name in (".", "..") or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid {what} {name!r}: use only letters, digits, '.', '_' and '-' "
            "(and not '.' or '..')"
        )
    return name


def default_storage() -> str:
    """The results root: ``$KAVG_STORAGE`` if set and non-empty, else ``./kavg_results``."""
    return os.environ.get("KAVG_STORAGE") or "./kavg_results"


# --------------------------------------------------------------------------- file helpers


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform/filesystem allows it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path | RemotePath, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync it, then ``os.replace`` it onto ``path``.

    The temporary file lives in the same directory so the rename cannot cross
    filesystems; readers see either the old or the new file, never a partial one. In an
    object store the temporary file is local and goes up in one write (atomic there).
    """
    if isinstance(path, RemotePath):
        with tempfile.TemporaryDirectory(prefix="kavg-") as folder:
            tmp = os.path.join(folder, path.name)
            write(tmp)
            path.upload(tmp)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _with_columns(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Put ``columns`` first (adding missing ones as NA) and keep extra columns after."""
    missing = [c for c in columns if c not in df.columns]
    for col in missing:
        df[col] = pd.Series([None] * len(df), index=df.index, dtype=object)
    extras = [c for c in df.columns if c not in columns]
    return df[columns + extras]


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


def _arrow_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Stringify object columns that Arrow cannot type (e.g. ints mixed with strings).

    One odd value reported by a trial must not make the whole sweep unwritable.
    """
    out = df
    for col in df.columns:
        if df[col].dtype != object:
            continue
        try:
            pa.array(df[col], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            if out is df:
                out = df.copy()
            out[col] = df[col].map(lambda v: None if _is_missing(v) else str(v))
    return out


def _is_missing(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # lists/arrays: not a scalar missing value
        return False


def _write_parquet(path: Path | RemotePath, df: pd.DataFrame) -> None:
    safe = _arrow_safe(df)
    table = pa.Table.from_pandas(safe, preserve_index=False, nthreads=1)
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp))


class ResultsStore:
    """Parquet-backed store of trial rows, per-report history and sweep specs."""

    def __init__(self, storage: str | os.PathLike[str] | None = None) -> None:
        self.storage = str(storage) if storage is not None else default_storage()
        # A local Path, or a RemotePath for s3:// and gs:// (BadInputError for a URI
        # kavg cannot serve: never a local folder named "foo:").
        self.root: Path | RemotePath = storage_root(self.storage)

    def __repr__(self) -> str:
        return f"ResultsStore({self.storage!r})"

    # ------------------------------------------------------------------ paths and locks

    @property
    def remote(self) -> bool:
        """Whether the store is an object store (``s3://``, ``gs://``)."""
        return isinstance(self.root, RemotePath)

    def sweep_dir(self, sweep: str) -> Path | RemotePath:
        """The directory of ``sweep`` (validated name; not created)."""
        return self.root / validate_name(sweep)

    def local_dir(self, sweep: str) -> Path:
        """Where this machine keeps what belongs to ``sweep`` but not in the store (the
        lock, Ray's logs): the sweep's own folder for local storage; for an object store,
        :func:`kavg_ray.analysis.storage.local_dir` (not created)."""
        d = self.sweep_dir(sweep)
        return local_dir(d) if isinstance(d, RemotePath) else d

    def check_writable(self) -> None:
        """Before a run: an object store's bucket exists (BadInputError, exit 2, if not;
        StorageError, exit 1, if unreachable). A folder is checked by the CLI
        (``kavg_ray.launch.address.check_storage``) and made when first written."""
        if isinstance(self.root, RemotePath):
            self.root.check_bucket()

    def remove_tree(self, sweep: str, *parts: str) -> None:
        """Delete ``<sweep>/<parts...>`` and everything under it (nothing if absent)."""
        path = self.sweep_dir(sweep).joinpath(*parts)
        if isinstance(path, RemotePath):
            path.remove_tree()
        else:
            shutil.rmtree(path.resolve(), ignore_errors=True)

    def _existing_sweep_dir(self, sweep: str) -> Path | RemotePath:
        d = self.sweep_dir(sweep)
        if not d.is_dir():
            raise ResultsError(f"unknown sweep {sweep!r} under {self.storage}")
        return d

    @contextlib.contextmanager
    def _locked(self, sweep: str) -> Iterator[Path]:
        """Create the sweep directory and hold an exclusive lock on it.

        ``flock`` locks belong to the open file description, so separate opens in two
        threads of one process exclude each other just like two processes do.
        """
        d = self.sweep_dir(sweep)
        lock_dir = self.local_dir(sweep)  # d itself unless the store is an object store
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / LOCK_FILE, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield d
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ spec

    def write_spec(self, sweep: str, spec: dict[str, Any]) -> Path:
        """Store the sweep spec as ``spec.json`` (atomically); returns its path."""
        return self._write_json(sweep, SPEC_FILE, spec)

    def read_spec(self, sweep: str) -> dict[str, Any]:
        """The stored spec of ``sweep``; ResultsError if the sweep or its spec is missing."""
        spec = self._read_json(sweep, SPEC_FILE)
        if spec is None:
            path = self.sweep_dir(sweep) / SPEC_FILE
            raise ResultsError(f"sweep {sweep!r} has no spec: {path} does not exist")
        return spec

    def write_theory(self, sweep: str, theory: dict[str, Any]) -> Path:
        """Store the sweep's theory estimates and predicted K_opt as ``theory.json``."""
        return self._write_json(sweep, THEORY_FILE, theory)

    def read_theory(self, sweep: str) -> dict[str, Any] | None:
        """The sweep's ``theory.json``, or None when the sweep did not estimate."""
        return self._read_json(sweep, THEORY_FILE)

    def write_progress(self, sweep: str, progress: dict[str, Any]) -> Path:
        """Store a running sweep's per-trial progress as ``progress.json`` (atomically)."""
        return self._write_json(sweep, PROGRESS_FILE, progress)

    def read_progress(self, sweep: str) -> dict[str, Any] | None:
        """The sweep's ``progress.json``, or None when no run of it has reported yet."""
        return self._read_json(sweep, PROGRESS_FILE)

    def _write_json(self, sweep: str, name: str, doc: dict[str, Any]) -> Path:
        # default=str: YAML can yield dates and similar scalars; a readable string is
        # better than refusing to record the document at all.
        text = json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n"

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)

        with self._locked(sweep) as d:
            path = d / name
            _atomic_write(path, write)
        return path

    def _read_json(self, sweep: str, name: str) -> dict[str, Any] | None:
        path = self._existing_sweep_dir(sweep) / name
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ResultsError(f"cannot read {path}: {_one_line(exc)}") from exc
        if not isinstance(doc, dict):
            raise ResultsError(f"cannot read {path}: expected a JSON object")
        return doc

    # ------------------------------------------------------------------ tables

    def _read_parquet(self, path: Path | RemotePath, columns: list[str]) -> pd.DataFrame:
        if not path.is_file():
            return _empty(columns)
        try:
            # One open, one read: a writer may rename a new file over this path at any
            # moment, and a reader that opened it twice (footer, then pages) could mix
            # the two versions.
            data = path.read_bytes()
            # No Arrow thread: a pool thread still starting or busy when the interpreter
            # exits made `kavg results show` abort ("terminate called without an active
            # exception", exit 134) about once in 60 runs beside a writing sweep.
            # (pq.read_table goes through the dataset scanner, which starts one.)
            parquet = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False)
            df = parquet.read(use_threads=False).to_pandas(use_threads=False)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise ResultsError(f"cannot read {path}: {_one_line(exc)}") from exc
        return _with_columns(df, columns)

    def read_trials(self, sweep: str) -> pd.DataFrame:
        """All trial rows of ``sweep`` (empty frame with TRIAL_COLUMNS if none yet)."""
        d = self._existing_sweep_dir(sweep)
        return self._read_parquet(d / TRIALS_FILE, TRIAL_COLUMNS)

    def read_history(self, sweep: str) -> pd.DataFrame:
        """All history rows of ``sweep`` (empty frame with HISTORY_COLUMNS if none yet)."""
        d = self._existing_sweep_dir(sweep)
        return self._read_parquet(d / HISTORY_FILE, HISTORY_COLUMNS)

    def upsert_trial(
        self,
        sweep: str,
        trial_row: dict[str, Any],
        history_rows: Iterable[dict[str, Any]] = (),
    ) -> None:
        """Insert or replace the trial with ``trial_row['trial_id']`` and its history.

        ``sweep`` and ``trial_id`` are filled in on every row. History is written before
        trials: a crash in between leaves a trial unlisted (so --resume reruns it) rather
        than listed as finished without its history.
        """
        trial_id = trial_row.get("trial_id")
        if trial_id is None or str(trial_id) == "":
            raise ValueError("trial_row needs a non-empty 'trial_id'")
        trial_id = str(trial_id)
        row = {**trial_row, "sweep": sweep, "trial_id": trial_id}
        hist = [{**h, "sweep": sweep, "trial_id": trial_id} for h in history_rows]

        with self._locked(sweep) as d:
            trials_path, history_path = d / TRIALS_FILE, d / HISTORY_FILE
            # Reading through _read_parquet raises on a corrupt file, so we never
            # silently overwrite (and lose) other trials' results.
            old_t = self._read_parquet(trials_path, TRIAL_COLUMNS)
            old_h = self._read_parquet(history_path, HISTORY_COLUMNS)

            new_h = _concat(old_h[old_h["trial_id"].astype(str) != trial_id], hist)
            new_t = _concat(old_t[old_t["trial_id"].astype(str) != trial_id], [row])
            _write_parquet(history_path, _with_columns(new_h, HISTORY_COLUMNS))
            _write_parquet(trials_path, _with_columns(new_t, TRIAL_COLUMNS))

    def finished_trial_ids(self, sweep: str) -> set[str]:
        """Trial ids whose status is completed, diverged or stopped (failed ones are rerun)."""
        df = self.read_trials(sweep)
        done = df[df["status"].isin(FINISHED_STATUSES)]
        return {str(t) for t in done["trial_id"]}

    def list_sweeps(self) -> pd.DataFrame:
        """One row per sweep: counts by status, last update (ISO, UTC) and any read error.

        A sweep whose files cannot be read is listed with ``error`` set (counts NA)
        instead of raising, so the other sweeps stay listable.
        """
        rows: list[dict[str, Any]] = []
        if self.root.is_dir():
            for d in sorted(self.root.iterdir(), key=lambda p: p.name):
                files = [d / f for f in (TRIALS_FILE, HISTORY_FILE, SPEC_FILE)]
                if not d.is_dir() or not any(f.is_file() for f in files):
                    continue  # not a sweep (e.g. other tools' directories)
                try:
                    validate_name(d.name)
                except ValueError:
                    continue
                mtimes = [f.stat().st_mtime for f in files if f.is_file()]
                updated = _dt.datetime.fromtimestamp(max(mtimes), tz=_dt.timezone.utc)
                row: dict[str, Any] = {
                    "sweep": d.name,
                    "updated": updated.isoformat(timespec="seconds"),
                    "error": "",
                }
                try:
                    status = self.read_trials(d.name)["status"]
                except ResultsError as exc:
                    row.update(trials=pd.NA, completed=pd.NA, diverged=pd.NA, failed=pd.NA)
                    row["error"] = str(exc)
                else:
                    row.update(
                        trials=len(status),
                        completed=int((status == "completed").sum()),
                        diverged=int((status == "diverged").sum()),
                        failed=int((status == "failed").sum()),
                    )
                rows.append(row)
        if not rows:
            return _empty(SWEEP_LIST_COLUMNS)
        out = pd.DataFrame(rows)[SWEEP_LIST_COLUMNS]
        for col in ("trials", "completed", "diverged", "failed"):
            out[col] = out[col].astype("Int64")
        return out


def _concat(old: pd.DataFrame, new_rows: list[dict[str, Any]]) -> pd.DataFrame:
    parts = [df for df in (old, pd.DataFrame(new_rows)) if len(df)]
    if not parts:
        return old.iloc[0:0]
    if len(parts) == 1:
        return parts[0].reset_index(drop=True)
    return pd.concat(parts, ignore_index=True)


def load_trials(sweep: str, storage: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """Trial rows of ``sweep`` under ``storage`` (default: :func:`default_storage`)."""
    return ResultsStore(storage).read_trials(sweep)


def load_history(sweep: str, storage: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """History rows of ``sweep`` under ``storage`` (default: :func:`default_storage`)."""
    return ResultsStore(storage).read_history(sweep)


def attach_predictions(trials: pd.DataFrame, theory: dict[str, Any] | None) -> pd.DataFrame:
    """``trials`` with ``predicted_kopt`` from a sweep's theory.json (``theory: estimate``).

    A prediction belongs to the K-AVG rows with its P and with the dataset, model, lr and
    batch size it names (older theory.json files name only lr and batch size), so a
    sweep over lr gets one prediction per lr. Other algorithms get none: the bound is
    K-AVG's. Without predictions the frame is returned unchanged.
    """
    preds = (theory or {}).get("predictions") or []
    if not preds or trials.empty or "P" not in trials.columns:
        return trials
    pred = pd.DataFrame(preds)
    keys = [
        k for k in ("dataset", "model", "lr", "batch_size", "P")
        if k in pred.columns and k in trials.columns
    ]  # fmt: skip
    pred = pred[keys + ["predicted_kopt"]].drop_duplicates(keys, keep="last")

    def comparable(df: pd.DataFrame) -> pd.DataFrame:
        # parquet and JSON may disagree on int against float: compare numbers as floats.
        return pd.DataFrame({
            k: pd.to_numeric(df[k], errors="coerce").astype(float)
            if k in ("lr", "batch_size", "P") else df[k].astype(str)
            for k in keys
        })  # fmt: skip

    right = comparable(pred).assign(predicted_kopt=pred["predicted_kopt"].to_numpy())
    merged = comparable(trials).merge(right, on=keys, how="left")
    out = trials.drop(columns=["predicted_kopt"], errors="ignore").copy()
    out["predicted_kopt"] = pd.array(merged["predicted_kopt"].to_numpy(), dtype="Float64")
    if "algorithm" in out.columns:
        out.loc[out["algorithm"] != "kavg", "predicted_kopt"] = pd.NA
    out["predicted_kopt"] = out["predicted_kopt"].round().astype("Int64")
    return out


# --------------------------------------------------------------------------- K_opt


def _k_label(k: Any) -> str:
    if isinstance(k, (float, np.floating)) and float(k).is_integer():
        return str(int(k))
    return str(k)


def _k_join(ks: Iterable[Any]) -> str:
    return ",".join(_k_label(k) for k in ks)


def _as_int_if_integral(col: pd.Series) -> pd.Series:
    """Nullable Int64 when every K is integral (K read back as float if some are NaN)."""
    try:
        if all(pd.isna(v) or float(v).is_integer() for v in col):
            return pd.Series(
                [pd.NA if pd.isna(v) else int(v) for v in col], index=col.index, dtype="Int64"
            )
    except (TypeError, ValueError):
        pass  # non-numeric K values: leave them as they are
    return col


def _mean_std(values: list[float]) -> tuple[float, float]:
    # Sorted sum: the same seeds give the same mean regardless of row order.
    vals = sorted(values)
    mean = math.fsum(vals) / len(vals)
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return mean, std


def _tied(a: float, b: float) -> bool:
    return abs(a - b) <= _TIE_RTOL * max(1.0, abs(a), abs(b))


def kopt_table(
    trials_df: pd.DataFrame,
    by: str = "accuracy",
    group_by: str | list[str] | None = None,
    *,
    score: str = "last",
    history: pd.DataFrame | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    flag_wait: bool = True,
) -> pd.DataFrame:
    """The best averaging period K per group (default: per algorithm, dataset, model, P),
    and how sure it is (docs/design.md section 11, "How sure is K_opt").

    by="accuracy": per K, mean and sample std (ddof=1; 0 with one seed) of each trial's
    score (``score``: ``last``, the final evaluation ``final_test_acc``; ``last:N``, the
    mean of its last N evaluations; ``best``, ``best_test_acc``; the last two from
    ``history`` where the trials lack them); K_opt has the largest mean. by="loss": as by
    accuracy, over the test loss (``final_test_loss``; ``best``: the least); K_opt has the
    smallest mean. A seed that **diverged** counts against its K, not dropped: at chance
    accuracy (:data:`CHANCE_ACCURACY`; 0 for other data sets) or at the group's worst
    loss. by="time": per K, mean and std of ``time_to_target_s`` over completed trials that
    reached the target (NaN = not reached); a K no seed reached is not a candidate; K_opt
    has the smallest mean; only ``score="last"``. Failed, stopped (and, by time,
    diverged) trials and trials without K or a score never win and are not averaged; they
    are counted in ``n_excluded``. Ties (equal up to rounding) go to the smallest K.

    Columns: the group keys, then K_opt (NA if no candidate; ``note`` says why);
    verdict, freq_best, credible_set, freq_k1 and the paired difference of K_opt against
    K = 1 (diff_vs_k1, with its 90% bootstrap interval diff_vs_k1_lo, diff_vs_k1_hi) from
    ``n_boot`` paired resamples of the seeds (``numpy.random.default_rng(seed)`` per group:
    the same table on every run; :mod:`kavg_ray.analysis.confidence`); mean, std and
    n_seeds of the best K, k_within_1std (comma-joined K whose mean is within one std of
    the best, best included), n_excluded, K_values_tried (every K in the group,
    comma-joined), note (diverged seeds, a K_opt at the edge of the K range, a time
    ranking within the wait for the last learner, and for an inconclusive or single-seed
    row what would settle it); plus ``predicted_kopt`` (first non-null per group) when
    the input has it. ``flag_wait=False`` leaves out the wait check (predicted times).
    """
    _check_kopt_input(trials_df, by, score, n_boot)
    keys = _kopt_group_keys(trials_df, group_by)
    has_pred = "predicted_kopt" in trials_df.columns
    out_cols = keys + KOPT_COLUMNS + (["predicted_kopt"] if has_pred else [])
    if trials_df.empty:
        return _empty(out_cols)
    ctx = _KoptContext(
        by, _score_values(trials_df, by, score, history), _history_by_trial(history),
        int(n_boot), int(seed), flag_wait,
    )  # fmt: skip
    # A K_schedule's trials are candidates of their own, set against the best fixed K
    # (analysis/schedules.py); K_opt ranks the fixed K.
    labels = schedules.candidate_labels(trials_df)
    fixed = trials_df[labels.isna()]
    rows = _kopt_rows(fixed, keys, ctx, has_pred)
    table = _typed_kopt_frame(pd.DataFrame(rows, columns=out_cols)[out_cols])
    return _with_schedules(table, trials_df, keys, labels, ctx)


def _with_schedules(
    table: pd.DataFrame, trials_df: pd.DataFrame, keys: list[str], labels: pd.Series,
    ctx: _KoptContext,
) -> pd.DataFrame:  # fmt: skip
    """``table`` with the columns that set each group's best K_schedule against its best
    fixed K (:func:`kavg_ray.analysis.schedules.comparison_columns`), when there are any."""
    if not labels.notna().any():
        return table
    extra = schedules.comparison_columns(
        trials_df, keys, labels,
        lambda g: group_values(g, ctx.values.loc[g.index], ctx.by)[:2], ctx.sign,
        ctx.n_boot, ctx.seed,
    )  # fmt: skip
    return pd.concat([table.reset_index(drop=True), extra], axis=1)


def _check_kopt_input(trials_df: pd.DataFrame, by: str, score: str, n_boot: int) -> None:
    """ValueError for a ranking kopt_table cannot make: an unknown ``by``, ``n_boot`` out of
    range, or a column the ranking needs missing."""
    if by not in RANK_METRICS:
        raise ValueError(f"unknown by={by!r}; expected 'accuracy', 'time' or 'loss'")
    if not 1 <= int(n_boot) <= 1_000_000:
        raise ValueError(f"n_boot must be between 1 and 1000000, got {n_boot}")
    needs = [RANK_METRICS[by]] if parse_score(score, by) == ("last", 1) else []
    required = [c for c in ("K", "status", *needs) if c not in trials_df.columns]
    if required:
        raise ValueError(f"trials frame lacks column(s) {required} needed for by={by!r}")


def _kopt_rows(
    trials_df: pd.DataFrame, keys: list[str], ctx: _KoptContext, has_pred: bool
) -> list[dict[str, Any]]:
    """One row per group of ``keys``: the keys, the group's K_opt columns and (with
    ``has_pred``) its first predicted K_opt."""
    groups: Iterable[tuple[Any, pd.DataFrame]] = (
        trials_df.groupby(keys, sort=True, dropna=False) if keys else [((), trials_df)]
    )
    rows: list[dict[str, Any]] = []
    for key, g in groups:
        key_t = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(keys, key_t, strict=True))
        row.update(_kopt_group_row(g, ctx))
        if has_pred:
            pred = g["predicted_kopt"].dropna()
            row["predicted_kopt"] = pred.iloc[0] if len(pred) else pd.NA
        rows.append(row)
    return rows


def _kopt_group_keys(trials_df: pd.DataFrame, group_by: str | list[str] | None) -> list[str]:
    """The columns kopt_table groups by: ``group_by`` (checked), else the default keys."""
    if group_by is not None:
        keys = [group_by] if isinstance(group_by, str) else list(group_by)
        absent = [k for k in keys if k not in trials_df.columns]
        if absent:
            raise ValueError(f"group_by columns not in the trials frame: {absent}")
        return keys
    keys = [k for k in DEFAULT_GROUP_KEYS if k in trials_df.columns]
    # A sweep over lr, batch size, backend or Hier-AVG's S and K1 asks for K_opt
    # per setting: those columns join the key when they vary.
    keys += [
        k
        for k in VARYING_GROUP_KEYS
        if k in trials_df.columns and trials_df[k].dropna().nunique() > 1
    ]
    # ... and so do swept factory arguments (model_args.width: [128, 256]).
    keys += [
        k
        for k in trials_df.columns
        if k.startswith(ARGS_PREFIXES) and trials_df[k].dropna().nunique() > 1
    ]
    return keys


def parse_score(score: str, by: str = "accuracy") -> tuple[str, int]:
    """``--score`` as (kind, N): ``last`` (1), ``last:N`` (N), ``best`` (0). By time only
    ``last`` (the time to the target is one number per trial)."""
    m = SCORE_RE.match(str(score))
    if m is None:
        raise ValueError(f"unknown score {score!r}; expected 'last', 'last:N' (N >= 1) or 'best'")
    kind, n = ("best", 0) if score == "best" else ("last", int(m.group(1) or 1))
    if by == "time" and (kind, n) != ("last", 1):
        raise ValueError(f"score {score!r} ranks accuracy or loss; by time it is 'last'")
    return kind, n


class _KoptContext:
    """What every group of one kopt_table call shares."""

    def __init__(
        self, by: str, values: pd.Series, history: dict[Any, pd.DataFrame] | None,
        n_boot: int, seed: int, flag_wait: bool,
    ) -> None:  # fmt: skip
        self.by, self.values, self.history = by, values, history
        self.n_boot, self.seed, self.flag_wait = n_boot, seed, flag_wait
        self.sign = 1.0 if by == "accuracy" else -1.0  # maximise accuracy, minimise the rest


def _history_key(df: pd.DataFrame) -> list[str]:
    return ["sweep", "trial_id"] if "sweep" in df.columns else ["trial_id"]


def _history_by_trial(history: pd.DataFrame | None) -> dict[Any, pd.DataFrame] | None:
    """``{trial key: its history rows by epoch}`` (key: (sweep, trial_id) or trial_id)."""
    if history is None or history.empty or "trial_id" not in history.columns:
        return None
    key = _history_key(history)
    hist = history.sort_values([*key, "epoch"], kind="stable")
    return {k: g for k, g in hist.groupby(key if len(key) > 1 else key[0], sort=False)}


def _trial_key(row: pd.Series, history: dict[Any, pd.DataFrame]) -> Any:
    first = next(iter(history), None)
    if isinstance(first, tuple) and "sweep" in row.index:
        return (row["sweep"], row["trial_id"])
    return row.get("trial_id")


def _score_values(
    trials: pd.DataFrame, by: str, score: str, history: pd.DataFrame | None
) -> pd.Series:
    """Each trial's score (float, aligned to ``trials``): the column ``by`` ranks for
    ``last``, else from ``best_test_acc`` or the history (NaN for a trial without one)."""
    kind, n = parse_score(score, by)
    metric = RANK_METRICS[by]
    if (kind, n) == ("last", 1):
        return pd.to_numeric(trials[metric], errors="coerce").astype(float)
    if kind == "best" and by == "accuracy" and "best_test_acc" in trials.columns:
        return pd.to_numeric(trials["best_test_acc"], errors="coerce").astype(float)
    per_trial = _history_by_trial(history)
    if per_trial is None or "trial_id" not in trials.columns:
        raise ValueError(f"score {score!r} needs the sweep's history (per-epoch evaluations)")
    col = "test_acc" if by == "accuracy" else "test_loss"
    out = []
    for _, row in trials.iterrows():
        h = per_trial.get(_trial_key(row, per_trial))
        vals = [] if h is None else [float(v) for v in pd.to_numeric(h[col], errors="coerce")]
        vals = [v for v in vals if math.isfinite(v)] if kind == "best" else vals[-n:]
        if not vals or not all(math.isfinite(v) for v in vals):
            out.append(float("nan"))
        elif kind == "best":
            out.append(max(vals) if by == "accuracy" else min(vals))
        else:
            out.append(math.fsum(sorted(vals)) / len(vals))
    return pd.Series(out, index=trials.index, dtype=float)


def group_values(g: pd.DataFrame, values: pd.Series, by: str) -> tuple[pd.Series, pd.Series, str]:
    """``(values, usable, note)`` of one kopt_table group: its scores with each diverged
    seed counted against its K (at chance accuracy, or the group's worst loss), the mask of
    the trials that count, and a note naming the diverged seeds. By time nothing changes:
    a diverged trial never reached the target."""
    completed = (g["status"] == "completed") & g["K"].notna()
    values = values.astype(float).copy()
    if by == "time":  # NaN time: target never reached, neither averaged nor excluded
        return values, completed & values.notna(), ""
    usable = completed & np.isfinite(values)
    diverged = (g["status"] == "diverged") & g["K"].notna()
    if not diverged.any():
        return values, usable, ""
    if by == "accuracy":
        dataset = g["dataset"].iloc[0] if "dataset" in g.columns else None
        fill = CHANCE_ACCURACY.get(str(dataset), 0.0)
        how = f"at chance accuracy {fill:g}" if str(dataset) in CHANCE_ACCURACY else "at 0"
    else:
        finite = values[usable]
        fill = float(finite.max()) if len(finite) else float("nan")
        how = f"at the worst loss {fill:.4g}"
    if not math.isfinite(fill):
        return values, usable, "diverged seeds not counted: no finite loss to count them at"
    values[diverged] = fill
    per_k = g.loc[diverged, "K"].value_counts()
    seeds = g.loc[(diverged | completed), "K"].value_counts()
    which = ", ".join(f"K={_k_label(k)} {int(per_k[k])} of {int(seeds[k])}" for k in
                      sorted(per_k.index))  # fmt: skip
    return values, usable | diverged, f"diverged ({which}), counted {how}"


def kopt_scores(
    trials_df: pd.DataFrame,
    by: str = "accuracy",
    score: str = "last",
    history: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The trials that count toward kopt_table's K_opt (default groups), each with its
    score in column ``value``: diverged seeds counted against their K, groups without a
    completed trial left out (as kopt_table leaves their K_opt NA)."""
    if by not in RANK_METRICS:
        raise ValueError(f"unknown by={by!r}; expected 'accuracy', 'time' or 'loss'")
    needs = [RANK_METRICS[by]] if parse_score(score, by) == ("last", 1) else []
    absent = [c for c in ("K", "status", *needs) if c not in trials_df.columns]
    if absent:
        raise ValueError(f"trials frame lacks column(s) {absent} needed for by={by!r}")
    if trials_df.empty:
        return trials_df.assign(value=pd.Series(dtype=float))
    values = _score_values(trials_df, by, score, history)
    keys = _kopt_group_keys(trials_df, None)
    groups = trials_df.groupby(keys, sort=True, dropna=False) if keys else [((), trials_df)]
    parts = []
    for _, g in groups:
        v, usable, _ = group_values(g, values.loc[g.index], by)
        if (usable & (g["status"] == "completed")).any():
            parts.append(g.loc[usable].assign(value=v[usable]))
    if not parts:
        return trials_df.iloc[:0].assign(value=pd.Series(dtype=float))
    return pd.concat(parts)


def pairing_units(g: pd.DataFrame) -> list[tuple[Any, int]]:
    """The pairing unit of each of ``g``'s rows: (seed, n) for the n-th row of that seed and
    K (0 unless a K repeats a seed); without a seed column every row is its own unit."""
    if "seed" not in g.columns:
        return [(i, 0) for i in range(len(g))]
    seeds = [float("inf") if _is_missing(s) else s for s in g["seed"]]
    reps = pd.Series(seeds, index=g.index).groupby([seeds, list(g["K"])]).cumcount()
    return list(zip(seeds, (int(r) for r in reps), strict=True))


def _kopt_group_row(g: pd.DataFrame, ctx: _KoptContext) -> dict[str, Any]:
    """One group's kopt_table columns after its keys (``predicted_kopt`` aside)."""
    ks_all = g["K"].dropna()
    values, usable, diverged_note = group_values(g, ctx.values.loc[g.index], ctx.by)
    stats = _stats_per_k(values[usable], g.loc[usable, "K"])
    row: dict[str, Any] = {
        "n_excluded": int((~usable).sum()) - _not_reached(g, values, ctx.by),
        "K_values_tried": _k_join(sorted(ks_all.unique())),
        "note": "",
        "verdict": "", "freq_best": float("nan"), "credible_set": "", "freq_k1": float("nan"),
        "diff_vs_k1": float("nan"), "diff_vs_k1_lo": float("nan"),
        "diff_vs_k1_hi": float("nan"),
    }  # fmt: skip
    if not (usable & (g["status"] == "completed")).any():  # nothing, or only diverged seeds
        row.update(
            K_opt=pd.NA,
            mean=float("nan"),
            std=float("nan"),
            n_seeds=0,
            k_within_1std="",
            n_excluded=int(len(g)) - _not_reached(g, values, ctx.by),
            note="no completed trial" if ctx.by != "time" else "no trial reached the target",
        )
        return row
    best_k = _best_k(stats, ctx.sign)
    best_mean, best_std, n = stats[best_k]
    row.update(
        K_opt=best_k,
        mean=best_mean,
        std=best_std,
        n_seeds=n,
        k_within_1std=_k_join(_ks_within_one_std(stats, best_k, ctx.sign)),
    )
    notes = [diverged_note] if diverged_note else []
    row.update(_confidence(g.loc[usable], values[usable], best_k, stats, sorted(ks_all.unique()),
                           ctx, notes))  # fmt: skip
    row["note"] = "; ".join(notes)
    return row


def _not_reached(g: pd.DataFrame, values: pd.Series, by: str) -> int:
    """By time: the completed trials that never reached the target (not excluded)."""
    if by != "time":
        return 0
    return int(((g["status"] == "completed") & g["K"].notna() & values.isna()).sum())


def _confidence(
    g: pd.DataFrame, values: pd.Series, best_k: Any, stats: dict[Any, tuple[float, float, int]],
    tried: list[Any], ctx: _KoptContext, notes: list[str],
) -> dict[str, Any]:  # fmt: skip
    """The paired bootstrap's columns of one group (usable rows ``g``, scores ``values``),
    and its notes appended to ``notes``."""
    ks, matrix = confidence.paired_matrix(list(values), list(g["K"]), pairing_units(g))
    rng = np.random.default_rng(ctx.seed)
    freq, idx, _ = confidence.paired_bootstrap(matrix, ctx.n_boot, rng, ctx.sign)
    j_best = ks.index(best_k)
    cset, mass = confidence.credible_set(ks, freq)
    out: dict[str, Any] = {
        "freq_best": float(freq[j_best]),
        "credible_set": confidence.format_credible(cset, mass),
    }
    if 1 in ks:
        out["freq_k1"] = float(freq[ks.index(1)])
        d, lo, hi = confidence.paired_difference(matrix, j_best, ks.index(1), idx)
        out.update(diff_vs_k1=d, diff_vs_k1_lo=lo, diff_vs_k1_hi=hi)
    verdict = confidence.verdict(cset, ks, stats[best_k][2])
    edge = _edge(best_k, tried)
    if edge:
        notes.append(f"K_opt is the {edge} K tried: the best K may be {_EDGE_BEYOND[edge]}")
    within_wait = ctx.by == "time" and ctx.flag_wait and _within_wait(g, best_k, stats, ctx)
    if within_wait:
        notes.append(within_wait)
        verdict = "inconclusive" if verdict in ("clear", "narrow") else verdict
    if verdict in ("inconclusive", "single seed"):
        improving = ctx.by != "time" and _still_improving(g, cset, stats[best_k][1], ctx)
        notes.append("to settle: " + _settle(verdict, edge, improving, bool(within_wait),
                                             stats[best_k][2]))  # fmt: skip
    out["verdict"] = verdict
    return out


_EDGE_BEYOND = {"largest": "larger", "smallest": "smaller"}


def _edge(best_k: Any, tried: list[Any]) -> str:
    """"largest" or "smallest" when K_opt is at that end of the K tried (K = 1 is no edge:
    no K is smaller)."""
    if len(tried) < 2:
        return ""
    if best_k == max(tried):
        return "largest"
    if best_k == min(tried) and best_k > 1:
        return "smallest"
    return ""


def _settle(verdict: str, edge: str, improving: bool, within_wait: bool, n_seeds: int) -> str:
    """What would settle an inconclusive or single-seed row."""
    seeds = f"more seeds ({n_seeds} now)"
    options = [seeds] if verdict == "single seed" else []
    if edge:
        options.append(f"a K range that brackets the best (K beyond the {edge} K tried)")
    if improving:
        options.append("a longer budget (the leading K still improved over the last epochs)")
    if within_wait:
        options.append("times without the wait (--network, or an idle machine)")
    if seeds not in options:
        options.append(seeds)
    return "; or ".join(options)


def _still_improving(
    g: pd.DataFrame, cset: list[Any], std: float, ctx: _KoptContext
) -> bool:
    """Whether the credible set's trials still improved over the last fifth of their
    epochs (last evaluation against the one max(1, E // 5) epochs before) by more than half
    K_opt's seed std, on average. False without the history."""
    if ctx.history is None:
        return False
    col = "test_acc" if ctx.by == "accuracy" else "test_loss"
    gains = []
    for _, row in g[g["K"].isin(cset) & (g["status"] == "completed")].iterrows():
        h = ctx.history.get(_trial_key(row, ctx.history))
        vals = [] if h is None else list(pd.to_numeric(h[col], errors="coerce"))
        if len(vals) >= 2:
            back = max(1, len(vals) // 5)
            gains.append(ctx.sign * (float(vals[-1]) - float(vals[-1 - back])))
    gains = [x for x in gains if math.isfinite(x)]
    return bool(gains) and math.fsum(gains) / len(gains) > max(std / 2, 0.0)


def _within_wait(
    g: pd.DataFrame, best_k: Any, stats: dict[Any, tuple[float, float, int]], ctx: _KoptContext
) -> str:
    """By time: a note when the mean wait for the last learner (to the target: from the
    history's ``wait_time_s`` at the target epoch, else the trial's ``wait_time_s``) of
    K_opt's and the runner-up's trials is as large as the gap between their mean times."""
    if len(stats) < 2 or "wait_time_s" not in g.columns:
        return ""
    others = [k for k in stats if k != best_k]
    runner = min(others, key=lambda k: (ctx.sign * -stats[k][0], k))
    gap = abs(stats[runner][0] - stats[best_k][0])
    waits = [_wait_to_target(row, ctx.history) for _, row in
             g[g["K"].isin([best_k, runner])].iterrows()]  # fmt: skip
    waits = [w for w in waits if math.isfinite(w)]
    if not waits:
        return ""
    wait = math.fsum(waits) / len(waits)
    if wait <= 0 or wait < gap:
        return ""
    return (
        f"within the wait: the wait for the last learner (mean {wait:.3g} s) is as large as "
        f"the gap between K={_k_label(best_k)} and K={_k_label(runner)} ({gap:.3g} s)"
    )


def _wait_to_target(row: pd.Series, history: dict[Any, pd.DataFrame] | None) -> float:
    ttt = pd.to_numeric(pd.Series([row.get("time_to_target_s")]), errors="coerce").iloc[0]
    h = None if history is None else history.get(_trial_key(row, history))
    if h is not None and "wait_time_s" in h.columns and math.isfinite(ttt):
        wall = pd.to_numeric(h["wall_time_s"], errors="coerce")
        at = h[wall >= ttt * (1 - 1e-9)]
        if len(at):
            return float(pd.to_numeric(at["wait_time_s"], errors="coerce").iloc[0])
    return float(pd.to_numeric(pd.Series([row.get("wait_time_s")]), errors="coerce").iloc[0])


def _stats_per_k(values: pd.Series, ks: pd.Series) -> dict[Any, tuple[float, float, int]]:
    """``{K: (mean, std, n)}`` of ``values`` grouped by ``ks``, in ascending K."""
    stats: dict[Any, tuple[float, float, int]] = {}
    for k, vals in values.groupby(ks, sort=True):
        mean, std = _mean_std([float(v) for v in vals])
        stats[k] = (mean, std, len(vals))
    return stats


def _best_k(stats: dict[Any, tuple[float, float, int]], sign: float) -> Any:
    """The K of ``stats`` with the best mean (largest ``sign * mean``); ties to the smallest K."""
    best_k = None
    for k in sorted(stats):  # ascending, so a tie keeps the smallest K
        if best_k is None:
            best_k = k
            continue
        m, bm = stats[k][0], stats[best_k][0]
        if sign * m > sign * bm and not _tied(m, bm):
            best_k = k
    return best_k


def _ks_within_one_std(
    stats: dict[Any, tuple[float, float, int]], best_k: Any, sign: float
) -> list[Any]:
    """The K of ``stats`` whose mean is within one std of ``best_k``'s (``best_k`` included)."""
    best_mean, best_std, _ = stats[best_k]
    bound = best_mean - sign * best_std
    return [
        k
        for k in sorted(stats)
        if sign * stats[k][0] >= sign * bound or _tied(stats[k][0], bound)
    ]


def _typed_kopt_frame(out: pd.DataFrame) -> pd.DataFrame:
    """``out`` with kopt_table's column types: K_opt as ints when integral, int64 counts,
    float mean and std."""
    out["K_opt"] = _as_int_if_integral(out["K_opt"])
    for col in ("n_seeds", "n_excluded"):
        out[col] = out[col].astype("int64")
    for col in ("mean", "std", "freq_best", "freq_k1", "diff_vs_k1", "diff_vs_k1_lo",
                "diff_vs_k1_hi"):  # fmt: skip
        out[col] = out[col].astype(float)
    return out


# --------------------------------------------------------------------------- output

SHORT_ERROR_CHARS = 60


def show_columns(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The ``columns`` of ``df`` that say something, for the trials table: a column with
    no value is left out, ``restarts`` and ``restart_time_s`` when no trial restarted, and
    ``error`` when no trial failed (else shortened to SHORT_ERROR_CHARS)."""
    def says_something(col: str) -> bool:
        values = df[col].dropna()
        if col in ("restarts", "restart_time_s"):
            return bool((pd.to_numeric(values, errors="coerce") > 0).any())
        if col == "error":
            return bool((values.astype(str).str.strip() != "").any())
        return len(values) > 0

    out = df[[c for c in columns if c in df.columns and says_something(c)]].copy()
    if "error" in out.columns:
        out["error"] = [
            "" if _is_missing(e) else str(e) if len(str(e)) <= SHORT_ERROR_CHARS
            else str(e)[: SHORT_ERROR_CHARS - 3] + "..."
            for e in out["error"]
        ]  # fmt: skip
    return out



def format_frame(df: pd.DataFrame, fmt: str) -> str:
    """Render ``df`` as "table" (aligned text, floats to 4 significant digits), "csv" or
    "json" (list of records; NaN/NA become null)."""
    if fmt == "table":
        if df.empty:
            return "(no rows)\n" if len(df.columns) == 0 else "  ".join(df.columns) + "\n"
        return df.to_string(index=False, float_format=lambda x: f"{x:.4g}") + "\n"
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return df.to_json(orient="records", date_format="iso", double_precision=15) + "\n"
    raise ValueError(f"unknown format {fmt!r}; expected 'table', 'csv' or 'json'")
