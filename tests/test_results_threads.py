"""Reading and writing the results store starts no Arrow thread, and `kavg results show`
exits cleanly while a sweep rewrites the store.

With Arrow's thread pools in use (pandas.read_parquet, DataFrame.to_parquet), a pool
thread still starting or busy at interpreter exit aborted `kavg results show` with
"terminate called without an active exception" (exit 134) in about 1 of 60 runs beside
a writing sweep. The store now reads and writes on the calling thread only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from kavg_ray.analysis.results import ResultsStore


def _threads() -> set[str]:
    """The native threads of this process, by id (Arrow's pool threads included)."""
    return set(os.listdir("/proc/self/task"))


def _row(i: int) -> dict:
    return {"trial_id": f"K{i % 8 + 1}-P2-s0", "algorithm": "kavg", "model": "mlp",
            "dataset": "digits", "P": 2, "K": i % 8 + 1, "seed": 0, "status": "completed",
            "final_test_acc": 0.9 + (i % 5) / 100, "wall_time_s": 1.0, "error": ""}  # fmt: skip


def _history(i: int) -> list[dict]:
    return [{"epoch": e, "test_acc": 0.5 + e / 100, "wall_time_s": float(e)} for e in range(8)]


def test_the_store_starts_no_thread(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.upsert_trial("s", _row(0), _history(0))  # imports and first use out of the way
    store.read_trials("s")
    before = _threads()
    for i in range(1, 40):
        store.upsert_trial("s", _row(i), _history(i))
        assert len(store.read_trials("s")) == min(i + 1, 8)
        assert len(store.read_history("s")) == 8 * min(i + 1, 8)
    assert _threads() - before == set()


def test_show_exits_cleanly_while_the_store_is_rewritten(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    for i in range(8):
        store.upsert_trial("s", _row(i), _history(i))
    stop = threading.Event()

    def rewrite() -> None:
        i = 8
        while not stop.is_set():
            store.upsert_trial("s", _row(i), _history(i))
            i += 1

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        codes = []
        for _ in range(12):
            out = subprocess.run(
                [sys.executable, "-m", "kavg_ray.cli", "results", "show", "s", "--storage",
                 str(tmp_path)], capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            codes.append(out.returncode)
            assert out.returncode == 0, (out.returncode, out.stderr[-500:])
            assert len(out.stdout.splitlines()) == 9  # header and 8 trials
    finally:
        stop.set()
        writer.join()
    assert codes == [0] * 12
