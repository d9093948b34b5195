"""Early stopping of K trials, replayed on a recorded coarse K grid with several epochs (no Ray).

Step 1, ``--record``: K in the powers of two 1..256 for the workloads and P of
``benchmarks/refine_search.py`` (same settings, ``--epochs`` epochs), every seed, with the
simulated backend; one row per run and epoch in ``--grid``.
Step 2 (always): ``kavg_ray.launch.search.EarlyStopRule`` (the rule inside
``EarlyStopScheduler``) sees each trial's reports, grouped by workload and P, in one of
two arrival orders:

- ``sequential``: one trial at a time (all its epochs, then the next trial; K ascending),
  as with ``max_concurrent_trials: 1``;
- ``lockstep``: every trial's epoch 1, then every trial's epoch 2, ... as when all run at
  once at equal speed.

A trial is compared with the best of its P at that epoch (``vs P``), or with the best
of its own seed (``vs seed``: same initial model and batch order, another K). A stopped
trial runs no later epoch. Printed per workload, P, order and comparison: trials stopped,
the share of the grid's epochs run, and K_opt from the completed trials (mean over their
seeds; a K whose every seed was stopped is out) against K_opt with no stopping, and
whether it lies in the unstopped grid's one-std set.

Usage: python benchmarks/early_stop.py [--grid FILE] [--record] [--jobs 2] [--seeds 0,1]
       [--epochs 4] [--margin-acc 0.05] [--margin-loss 0.002]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from refine_search import P_VALUES, WORKLOADS, grid_kopt, record_points  # noqa: E402

from kavg_ray.launch.search import EarlyStopRule, best_k, coarse_grid, k_scores  # noqa: E402

GRID_FILE = Path(__file__).with_name("early_stop_grid.csv.gz")


def arrivals(group: pd.DataFrame, order: str) -> list[tuple[str, dict]]:
    """(trial id, report) in arrival order; trial id = "K<k>-s<seed>"."""
    rows = group.sort_values(["K", "seed", "epoch"])
    if order == "lockstep":
        rows = group.sort_values(["epoch", "K", "seed"])
    return [(f"K{int(r.K)}-s{int(r.seed)}", r._asdict()) for r in rows.itertuples(index=False)]


def replay(
    group: pd.DataFrame, metric: str, mode: str, margin: float, order: str, by_seed: bool
) -> dict:
    """Feed ``group``'s reports to an EarlyStopRule; what ran, what was stopped, K_opt.

    ``by_seed``: a trial is compared with the trials of its own seed only (same initial
    model and batch order, other K), else with every trial of its P.
    """
    rule = EarlyStopRule(margin, metric=metric, mode=mode)
    epochs_run = 0
    for tid, report in arrivals(group, order):
        if tid in rule.stopped:
            continue  # stopped trials report nothing more
        epochs_run += 1
        rule.decide(tid, report["seed"] if by_seed else "P", report)
    last = group[group["epoch"] == group["epoch"].max()]

    def kopt(rows: pd.DataFrame) -> int | None:
        values: dict[int, list[float]] = {}
        for r in rows.itertuples(index=False):
            values.setdefault(int(r.K), []).append(float(getattr(r, metric)))
        return best_k(k_scores(values), mode)

    kept = last[[f"K{int(k)}-s{int(s)}" not in rule.stopped
                 for k, s in zip(last["K"], last["seed"], strict=True)]]  # fmt: skip
    k_all, k_kept = kopt(last), kopt(kept)
    return {
        "stopped": f"{len(rule.stopped)}/{len(last)}",
        "epochs_run": epochs_run / len(group),
        "K_opt_all": k_all,
        "K_opt_kept": k_kept,
        "kept_in_1std": k_kept in grid_kopt(last, metric, mode)[1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=Path, default=GRID_FILE)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--margin-acc", type=float, default=0.05)
    ap.add_argument("--margin-loss", type=float, default=0.002)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.record or not args.grid.exists():
        points = [(w, P, K, s, args.epochs) for w in WORKLOADS for P in P_VALUES
                  for K in coarse_grid(1, 256) for s in seeds]  # fmt: skip
        record_points(args.grid, args.jobs, points)
    df = pd.read_csv(args.grid)
    rows = []
    for (name, P), group in df.groupby(["workload", "P"], sort=True):
        _, metric, mode = WORKLOADS[name]
        margin = args.margin_acc if metric == "test_acc" else args.margin_loss
        for order in ("sequential", "lockstep"):
            for by_seed in (False, True):
                out = replay(group, metric, mode, margin, order, by_seed)
                rows.append({"workload": name, "P": P, "metric": metric, "margin": margin,
                             "order": order, "vs": "seed" if by_seed else "P", **out,
                             "same_K_opt": out["K_opt_all"] == out["K_opt_kept"]})  # fmt: skip
    table = pd.DataFrame(rows)
    print(f"coarse grid K = 1,2,4..256, seeds {seeds}, {int(df['epoch'].max())} epochs")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    for vs, t in table.groupby("vs", sort=False):
        print(f"compared with the best of its {vs}: same K_opt {int(t['same_K_opt'].sum())}"
              f"/{len(t)}, within the 1-std set {int(t['kept_in_1std'].sum())}/{len(t)}; "
              f"mean share of epochs run {t['epochs_run'].mean():.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
