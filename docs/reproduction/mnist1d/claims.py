"""The numbers of docs/reproduction/README.md that `kavg results kopt` does not print.

    .venv/bin/python docs/reproduction/mnist1d/claims.py [STORAGE]

STORAGE (default: the folder of this script) holds one folder per sweep with its
trials.parquet and history.parquet, as `kavg sweep run --storage` writes them. Every
score is the one `kavg results kopt --score last:3` ranks by: the mean test accuracy of a
trial's last 3 evaluations, and chance (0.1) for a trial that did not complete (a
diverged seed counts against its K). Intervals are the 5 % and 95 % quantiles of 1,000
paired bootstrap resamples of the seeds (seed s gives every point of a sweep the same
initial model and data order), from kavg_ray.analysis.confidence, with rng seed 0.

Prints, for each sweep that is present:
- (a) the mean score per K and P of kopt_mlp_p2, kopt_mlp and kopt_mlp_lr (per lr);
- (b) at each P (kopt_mlp_p2 and kopt_mlp), the accuracy K = 128 loses to the best K
  (K_opt), with its interval;
- (d) at each P, the gap of K-AVG (at K = 1 and at K_opt) to sequential SGD (sgd_seq);
- (e) Hier-AVG minus K-AVG at the same global period (K2 = K), test accuracy and
  final training loss;
- (c) K-AVG, Downpour and EAMSGD on real processes: accuracy and wall time per P, and
  K-AVG minus each; EAMSGD at lr 0.03 (asgd_real_eamsgd) against that K-AVG; K-AVG
  against Downpour at lr 1.0 (asgd_real_lr1);
- (g) K_opt per P with lr tuned per K among 0.1, 0.3 and 1.0 (kopt_mlp and kopt_mlp_lr);
- the real-process spot check: kopt_mlp_real's histories against the simulated points of
  the same name (kopt_mlp, kopt_mlp_p2).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from kavg_ray.analysis.confidence import (
    credible_set,
    format_credible,
    paired_difference,
    resample_means,
    verdict,
    votes,
)

LAST = 3
CHANCE = 0.1
N_BOOT = 1000


def scores(storage: Path, sweep: str) -> pd.DataFrame | None:
    """One row per trial: its settings, ``score`` (last-3 mean, chance if not completed),
    ``train_loss`` (the last evaluation's) and ``wall_time_s``."""
    folder = storage / sweep
    if not (folder / "trials.parquet").exists():
        return None
    trials = pd.read_parquet(folder / "trials.parquet")
    hist = pd.read_parquet(folder / "history.parquet").sort_values(["trial_id", "epoch"])
    last = hist.groupby("trial_id").tail(LAST).groupby("trial_id")["test_acc"].mean()
    out = trials.set_index("trial_id")
    out["score"] = last.reindex(out.index)
    out.loc[out["status"] != "completed", "score"] = CHANCE
    out["score"] = out["score"].fillna(CHANCE)
    return out.reset_index()


def _matrix(df: pd.DataFrame, col: str, by: str) -> tuple[list, np.ndarray]:
    """Rows: seeds (sorted); columns: the values of ``by`` (sorted)."""
    piv = df.pivot_table(index="seed", columns=by, values=col, aggfunc="first").sort_index()
    return list(piv.columns), piv.to_numpy(dtype=float)


def _idx(n_rows: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, n_rows, size=(N_BOOT, n_rows))


def _diff(a: np.ndarray, b: np.ndarray) -> str:
    """``a - b`` by seed (pts), with its interval."""
    m = np.stack([a, b], axis=1)
    mean, lo, hi = paired_difference(m, 0, 1, _idx(len(m)))
    return f"{100 * mean:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def table(df: pd.DataFrame, name: str) -> None:
    """Mean score (and the std over seeds) per K (rows) and P (columns)."""
    mean = df.pivot_table(index="K", columns="P", values="score", aggfunc="mean")
    std = df.pivot_table(index="K", columns="P", values="score", aggfunc="std")
    cells = mean.map(lambda v: f"{v:.4f}") + " (" + std.map(lambda v: f"{v:.4f}") + ")"
    print(f"{name}: mean test accuracy, last 3 evaluations (std over seeds)")
    print(cells.to_string())


def claim_b(kopt: pd.DataFrame) -> None:
    print("(b) accuracy lost by K = 128 against K_opt (points, 90 % interval), per P")
    for P, g in kopt.groupby("P"):
        ks, m = _matrix(g, "score", "K")
        best = int(np.nanargmax(np.nanmean(m, axis=0)))
        print(
            f"  P={P:<3} K_opt={ks[best]:<4g} mean={np.nanmean(m[:, best]):.4f}  "
            f"K=128 mean={np.nanmean(m[:, -1]):.4f}  K128-K_opt {_diff(m[:, -1], m[:, best])}  "
            f"K128-K1 {_diff(m[:, -1], m[:, 0])}"
        )


def claim_d(kopt: pd.DataFrame, seq: pd.DataFrame) -> None:
    s = seq.sort_values("seed")["score"].to_numpy()
    print(f"(d) gap to sequential SGD (P = 1, mean {s.mean():.4f}), points, 90 % interval")
    for P, g in kopt.groupby("P"):
        ks, m = _matrix(g, "score", "K")
        best = int(np.nanargmax(np.nanmean(m, axis=0)))
        print(f"  P={P:<3} K=1: {_diff(m[:, 0], s)}   K_opt={ks[best]:g}: {_diff(m[:, best], s)}")


def claim_c_eamsgd(asgd: pd.DataFrame, eam: pd.DataFrame) -> None:
    print("(c) EAMSGD at lr 0.03, momentum 0.9 (asgd_real_eamsgd) against asgd_real's K-AVG")
    for P, g in eam.groupby("P"):
        e = g.sort_values("seed")
        k = asgd[(asgd["algorithm"] == "kavg") & (asgd["P"] == P)].sort_values("seed")
        print(
            f"  P={P}  eamsgd {e['score'].mean():.4f} ({e['score'].std():.4f}) "
            f"{e['wall_time_s'].mean():.1f}s  kavg {k['score'].mean():.4f}  "
            f"kavg-eamsgd {_diff(k['score'].to_numpy(), e['score'].to_numpy())}"
        )


def claim_c_lr1(lr1: pd.DataFrame) -> None:
    print("(c) K-AVG (K = 16) and Downpour at lr 1.0 (asgd_real_lr1)")
    for P, g in lr1.groupby("P"):
        by = {a: x.sort_values("seed") for a, x in g.groupby("algorithm")}
        k, d = by["kavg"], by["downpour"]
        bad = {a: int((x["status"] != "completed").sum()) for a, x in by.items()}
        print(
            f"  P={P}  kavg {k['score'].mean():.4f} ({k['score'].std():.4f}) "
            f"{k['wall_time_s'].mean():.1f}s  downpour {d['score'].mean():.4f} "
            f"({d['score'].std():.4f}) {d['wall_time_s'].mean():.1f}s  not completed {bad}  "
            f"kavg-downpour {_diff(k['score'].to_numpy(), d['score'].to_numpy())}"
        )


def claim_e(hier: pd.DataFrame) -> None:
    print("(e) Hier-AVG (S=4, K1=2) minus K-AVG at the same global period, points / loss")
    for P, g in hier.groupby("P"):
        kav = g[g["algorithm"] == "kavg"]
        for K2 in sorted(g.loc[g["algorithm"] == "hier_avg", "K2"].dropna().unique()):
            h = g[(g["algorithm"] == "hier_avg") & (g["K2"] == K2)].sort_values("seed")
            k = kav[kav["K"] == K2].sort_values("seed")
            k2 = kav[kav["K"] == 2].sort_values("seed")
            print(
                f"  P={P:<3} K2={int(K2):<3} hier {h['score'].mean():.4f}  kavg K={int(K2)} "
                f"{k['score'].mean():.4f}  "
                f"diff {_diff(h['score'].to_numpy(), k['score'].to_numpy())}"
                f"  | train loss hier {h['final_train_loss'].mean():.4f} kavg "
                f"{k['final_train_loss'].mean():.4f}  | kavg K=2 {k2['score'].mean():.4f}"
            )


def claim_c(asgd: pd.DataFrame) -> None:
    print("(c) real processes: mean score (std) and wall time per algorithm and P")
    for P, g in asgd.groupby("P"):
        line = [f"  P={P}"]
        by = {a: x.sort_values("seed") for a, x in g.groupby("algorithm")}
        for a in ("kavg", "downpour", "eamsgd"):
            x = by[a]
            n_bad = int((x["status"] != "completed").sum())
            line.append(
                f"{a} {x['score'].mean():.4f} ({x['score'].std():.4f}) "
                f"{x['wall_time_s'].mean():.1f}s" + (f" {n_bad} diverged" if n_bad else "")
            )
        for a in ("downpour", "eamsgd"):
            line.append(
                f"kavg-{a} {_diff(by['kavg']['score'].to_numpy(), by[a]['score'].to_numpy())}"
            )
        print("  ".join(line))


def claim_g(kopt: pd.DataFrame, lr: pd.DataFrame) -> None:
    both = pd.concat([kopt, lr], ignore_index=True)
    rates = ", ".join(f"{r:g}" for r in sorted(both["lr"].unique()))
    print(f"(g) K_opt with lr fixed (per lr) and with lr tuned per K among {rates}")
    for P, g in both.groupby("P"):
        mats, ks = {}, None
        for r, x in g.groupby("lr"):
            ks, mats[r] = _matrix(x, "score", "K")
        rates = sorted(mats)
        idx = _idx(len(next(iter(mats.values()))))
        means = np.stack([resample_means(mats[r], idx) for r in rates])  # (lr, boot, K)
        freq = votes(means.max(axis=0), 1.0).mean(axis=0)
        full = np.stack([np.nanmean(mats[r], axis=0) for r in rates])  # (lr, K)
        tuned, best_lr = full.max(axis=0), [rates[i] for i in full.argmax(axis=0)]
        kbest = int(np.argmax(tuned))
        cred, mass = credible_set(ks, freq)
        fixed = ", ".join(
            f"lr {r:g}: K_opt {ks[int(np.nanargmax(full[i]))]:g} ({full[i].max():.4f})"
            for i, r in enumerate(rates)
        )
        print(f"  P={P:<3} fixed: {fixed}")
        print(
            f"        tuned: K_opt {ks[kbest]:g} ({tuned[kbest]:.4f}, lr {best_lr[kbest]:g}), "
            f"freq_best {freq[kbest]:.2f}, credible set {format_credible(cred, mass)}, "
            f"{verdict(cred, ks, 5)}, freq_k1 {freq[0]:.2f}; K=1 tuned {tuned[0]:.4f} "
            f"(lr {best_lr[0]:g}); best lr per K: "
            + ", ".join(f"{k:g}:{r:g}" for k, r in zip(ks, best_lr, strict=True))
        )
        at_best = mats[best_lr[kbest]][:, kbest]
        at_k1 = mats[best_lr[0]][:, 0]
        print(f"        tuned K_opt minus tuned K=1 (each at its best lr): {_diff(at_best, at_k1)}")


def spot_check(storage: Path) -> None:
    """Real learners (kopt_mlp_real) against the simulated point of the same name."""
    real = storage / "kopt_mlp_real" / "history.parquet"
    if not real.exists():
        return
    r = pd.read_parquet(real)
    sims = [
        pd.read_parquet(storage / s / "history.parquet")
        for s in ("kopt_mlp", "kopt_mlp_p2")
        if (storage / s / "history.parquet").exists()
    ]
    sim = pd.concat(sims, ignore_index=True)
    print("spot check: real minus simulated, same trial, epochs 1 to 10")
    for tid, g in r.groupby("trial_id"):
        s = sim[sim["trial_id"] == f"{tid}-sim"].set_index("epoch")
        g = g.set_index("epoch")
        both = g.index.intersection(s.index)
        if both.empty:
            continue
        da = (g.loc[both, "test_acc"] - s.loc[both, "test_acc"]).abs().max()
        dl = (g.loc[both, "train_loss"] - s.loc[both, "train_loss"]).abs().max()
        last = both.max()
        print(
            f"  {tid:<10} epochs {len(both)}  max |test acc diff| {da:.4f}  max |train loss "
            f"diff| {dl:.2e}  epoch {last}: real {g.loc[last, 'test_acc']:.4f} "
            f"sim {s.loc[last, 'test_acc']:.4f}"
        )


def main(storage: Path) -> None:
    kopt = scores(storage, "kopt_mlp")
    seq = scores(storage, "sgd_seq")
    hier = scores(storage, "hier_vs_kavg_mnist1d")
    asgd = scores(storage, "asgd_real")
    lr = scores(storage, "kopt_mlp_lr")
    for name, df in (("kopt_mlp_p2", scores(storage, "kopt_mlp_p2")), ("kopt_mlp", kopt)):
        if df is not None:
            table(df, name)
    if lr is not None:
        for rate, df in lr.groupby("lr"):
            table(df, f"kopt_mlp_lr, lr {rate:g}")
    if kopt is not None:
        p2 = scores(storage, "kopt_mlp_p2")
        all_p = kopt if p2 is None else pd.concat([p2, kopt], ignore_index=True)
        claim_b(all_p)
        if seq is not None:
            claim_d(all_p, seq)
    if asgd is not None:
        claim_c(asgd)
        eam = scores(storage, "asgd_real_eamsgd")
        if eam is not None:
            claim_c_eamsgd(asgd, eam)
    lr1 = scores(storage, "asgd_real_lr1")
    if lr1 is not None:
        claim_c_lr1(lr1)
    if hier is not None:
        claim_e(hier)
    if kopt is not None and lr is not None:
        claim_g(kopt, lr)
    spot_check(storage)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
