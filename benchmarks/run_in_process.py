"""Run a simulated sweep spec's grid points one after another in this process, no Ray.

Writes the same results store as ``kavg sweep run`` (``trials.parquet``,
``history.parquet``, the spec), so ``kavg results kopt|plot|report`` read it. For studies
recorded under docs/ on a machine where Ray's start-up would cost more than the training.
Resumable: points with a finished row are skipped.

Usage: python benchmarks/run_in_process.py SPEC.yaml --storage DIR [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kavg_ray.analysis.results import ResultsStore  # noqa: E402
from kavg_ray.config import load_sweep, read_yaml  # noqa: E402
from kavg_ray.launch.sweep import HISTORY_KEYS, trial_row  # noqa: E402
from kavg_ray.train import train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--storage", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = load_sweep(args.spec)
    points = spec.points()
    if any(p.backend != "simulated" for p in points):
        ap.error("every point must have backend: simulated")
    sweep = points[0].name
    store = ResultsStore(args.storage)
    store.write_spec(sweep, read_yaml(args.spec))
    done = store.finished_trial_ids(sweep)
    for i, cfg in enumerate(points, 1):
        tid = cfg.trial_name()
        if tid in done:
            continue
        history: list[dict] = []
        t0 = time.perf_counter()
        train(cfg, lambda m, s, h=history: h.append(m))
        status = "diverged" if history[-1]["diverged"] else "completed"
        rows = [{"sweep": sweep, "trial_id": tid, **{k: h.get(k) for k in HISTORY_KEYS}}
                for h in history]  # fmt: skip
        store.upsert_trial(sweep, trial_row(sweep, tid, cfg, history, status), rows)
        print(f"[{i}/{len(points)}] {tid}: {status}, test_loss {history[-1]['test_loss']:.4f}, "
              f"test_acc {history[-1]['test_acc']:.4f} ({time.perf_counter() - t0:.1f} s)",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
