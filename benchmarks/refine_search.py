"""The refining K search beside the full K grid, on one recorded full grid (no Ray).

Step 1, ``--record``: every K in 1..K_MAX, for each workload, P and seed, trained with the
simulated backend (``run_simulated``: all P learners in this process) in ``--jobs``
processes of one thread each; one row per run and epoch is written to ``--grid``.
Step 2 (always): both strategies are replayed on those rows.

- full grid: K_opt = the K with the best mean over seeds (accuracy: largest; least
  squares: smallest test loss; ties to the smallest K), and the set of K whose mean is
  within one standard deviation (ddof=1) of the best, as ``kavg results kopt`` reports.
- refine: ``kavg_ray.launch.search.RefineSearcher`` (the Tune searcher itself, driven by a
  loop that answers each suggestion with the recorded result: no Ray is started) from the
  powers of two in 1..K_MAX; its K_opt is the best mean over the K it tried.

Printed per workload and P: both K_opt, whether refine's is the grid's or in its one-std
set, ``gap`` (how much worse the mean metric at refine's K_opt is than at the grid's) and
``rank`` (1 = the grid's best of its K values), and refine's share of the grid's trials and
of its compute (sum of the runs' ``compute_time_s``).

Usage: python benchmarks/refine_search.py [--grid FILE] [--record] [--jobs 2]
       [--seeds 0,1] [--k-max 256]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kavg_ray.analysis.results import _mean_std, _tied  # noqa: E402
from kavg_ray.launch.search import RefineSearcher, best_k, coarse_grid, k_scores  # noqa: E402

GRID_FILE = Path(__file__).with_name("refine_search_grid.csv.gz")
P_VALUES = (2, 4)
EPOCHS = 1
BATCH = 8
# name -> (workload section, metric, mode)
WORKLOADS: dict[str, tuple[dict, str, str]] = {
    "digits-mlp": ({"dataset": "digits", "model": "mlp", "lr": {"initial": 0.1}},
                   "test_acc", "max"),
    "synthetic-cls-mlp": ({"dataset": "synthetic", "model": "mlp", "lr": {"initial": 0.1},
                           "synthetic": {"task": "classification", "cluster_std": 3.0}},
                          "test_acc", "max"),
    "synthetic-lsq-linear": ({"dataset": "synthetic", "model": "linear", "lr": {"initial": 0.05},
                              "synthetic": {"task": "least_squares"}},
                             "test_loss", "min"),
}  # fmt: skip


def _run_simulated():  # noqa: ANN202
    """``run_simulated(cfg, device, report)`` wherever this checkout keeps it."""
    try:
        from kavg_ray.simulated import run_simulated
    except ImportError:
        try:
            from kavg_ray.train import run_simulated
        except ImportError:
            from kavg_ray.train.run import train

            def run_simulated(cfg, device, report):  # noqa: ANN001, ANN202
                cfg = cfg.model_copy(update={"backend": "simulated"})
                return train(cfg, report, device=device)

    return run_simulated


def run_point(point: tuple) -> list[dict]:
    """One training run of (workload, P, K, seed[, epochs]); one row per epoch."""
    import torch

    from kavg_ray.config import RunConfig

    name, P, K, seed = point[:4]
    epochs = point[4] if len(point) > 4 else EPOCHS
    workload = {**WORKLOADS[name][0], "epochs": epochs, "batch_size": BATCH}
    doc = {"name": "bench", "workload": workload, "K": K, "P": P, "seed": seed,
           "backend": "simulated"}  # fmt: skip
    rows: list[dict] = []

    def report(metrics: dict, _state: object) -> None:
        keep = ("epoch", "test_acc", "test_loss", "train_loss", "compute_time_s")
        rows.append({"workload": name, "P": P, "K": K, "seed": seed,
                     **{k: metrics.get(k) for k in keep}})  # fmt: skip

    _run_simulated()(RunConfig.model_validate(doc), torch.device("cpu"), report)
    return rows


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def record(path: Path, jobs: int, seeds: list[int], k_max: int) -> None:
    points = [(w, P, K, s) for w in WORKLOADS for P in P_VALUES
              for K in range(1, k_max + 1) for s in seeds]  # fmt: skip
    record_points(path, jobs, points)


def record_points(path: Path, jobs: int, points: list[tuple]) -> None:
    """Run ``points`` (see :func:`run_point`) in ``jobs`` processes; write the rows to ``path``."""
    rows: list[dict] = []
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(jobs, initializer=_one_thread) as pool:
        chunk = max(1, min(16, len(points) // (4 * jobs)))
        for i, out in enumerate(pool.imap_unordered(run_point, points, chunksize=chunk), 1):
            rows += out
            if i % 200 == 0:
                print(f"  {i}/{len(points)} runs, {time.perf_counter() - start:.0f} s", flush=True)
    df = pd.DataFrame(rows).sort_values(["workload", "P", "K", "seed", "epoch"])
    df.to_csv(path, index=False)
    print(f"recorded {len(points)} runs in {time.perf_counter() - start:.0f} s -> {path}")


def grid_kopt(final: pd.DataFrame, metric: str, mode: str) -> tuple[int, list[int]]:
    """K_opt over all K and the K within one std of it (results.kopt_table's rule)."""
    sign = 1.0 if mode == "max" else -1.0
    stats = {int(k): _mean_std([float(v) for v in g[metric]]) for k, g in final.groupby("K")}
    kopt = best_k({k: m for k, (m, _) in stats.items()}, mode)
    bound = stats[kopt][0] - sign * stats[kopt][1]
    within = [k for k, (m, _) in sorted(stats.items())
              if sign * m >= sign * bound or _tied(m, bound)]  # fmt: skip
    return kopt, within


def replay_refine(final: pd.DataFrame, metric: str, mode: str, seeds: list[int], k_max: int):
    """Drive RefineSearcher with recorded results: (K_opt, K tried, runs, compute s)."""
    lookup = {(int(r.K), int(r.seed)): r for r in final.itertuples()}
    coords = [{"K": k, "seed": s} for k in coarse_grid(1, k_max) for s in seeds]
    searcher = RefineSearcher(coords, metric=metric, mode=mode)
    runs, compute, values, n = 0, 0.0, {}, 0
    while True:
        cfg = searcher.suggest(f"t{n}")
        if cfg == searcher.FINISHED:
            break
        row = lookup[(cfg["K"], cfg["seed"])]
        value = getattr(row, metric)
        searcher.on_trial_complete(f"t{n}", {metric: value})
        values.setdefault(cfg["K"], []).append(value if math.isfinite(value) else None)
        runs, compute, n = runs + 1, compute + float(row.compute_time_s), n + 1
    return best_k(k_scores(values), mode), searcher.proposed()[0], runs, compute


def _ranges(ks: list[int]) -> str:
    """1,2,3,5 -> 1-3,5."""
    out, start = [], ks[0]
    for a, b in zip(ks, ks[1:] + [None], strict=True):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def compare(df: pd.DataFrame, seeds: list[int], k_max: int) -> pd.DataFrame:
    last = df[df["epoch"] == df["epoch"].max()]
    rows = []
    for (name, P), final in last.groupby(["workload", "P"], sort=True):
        _, metric, mode = WORKLOADS[name]
        kopt, within = grid_kopt(final, metric, mode)
        r_kopt, tried, runs, compute = replay_refine(final, metric, mode, seeds, k_max)
        verdict = "same" if r_kopt == kopt else ("in 1-std set" if r_kopt in within else "no")
        means = final.groupby("K")[metric].mean()
        sign = 1.0 if mode == "max" else -1.0
        rows.append({
            "workload": name, "P": P, "metric": metric, "grid_K_opt": kopt,
            "grid_within_1std": _ranges(within), "refine_K_opt": r_kopt, "match": verdict,
            "gap": abs(means[kopt] - means[r_kopt]),
            "rank": int((sign * means > sign * means[r_kopt]).sum()) + 1,
            "refine_K_tried": len(tried), "trials": f"{runs}/{len(final)}",
            "trial_ratio": runs / len(final),
            "compute_ratio": compute / float(final["compute_time_s"].sum()),
        })  # fmt: skip
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=Path, default=GRID_FILE, help="recorded full grid (csv)")
    ap.add_argument("--record", action="store_true", help="(re)run the full grid first")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--k-max", type=int, default=256)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.record or not args.grid.exists():
        record(args.grid, args.jobs, seeds, args.k_max)
    df = pd.read_csv(args.grid)
    out = compare(df[df["K"] <= args.k_max], seeds, args.k_max)
    print(f"full grid: K = 1..{args.k_max}, seeds {seeds}, {EPOCHS} epochs, batch {BATCH}")
    print(out.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    tot = df[(df["epoch"] == df["epoch"].max()) & (df["K"] <= args.k_max)]
    agree = int((out["match"] != "no").sum())
    print(f"K_opt agrees (same or within the grid's 1-std set): {agree}/{len(out)}; "
          f"mean trial ratio {out['trial_ratio'].mean():.3f}, "
          f"mean compute ratio {out['compute_ratio'].mean():.3f} "
          f"(grid compute {tot['compute_time_s'].sum():.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
