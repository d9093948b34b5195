"""Tables and plots of docs/communication.md from the stored sweeps (issue #28, item 5).

    .venv/bin/python docs/communication/analyze.py --storage /tmp/comm --out docs/communication

For each sweep present: every point's mean final score over seeds (test loss for the
language model, test accuracy for MNIST-1D), the bytes one learner sent (the averages it
took times the bytes of one average: the cost model's size of the model as its payload, in
its fragments; the simulated engine moves no bytes itself) and its predicted time on the
DiLoCo scaling-law study's three networks (kavg_ray.analysis.costmodel.predict_sweep at
one step time per workload: the median the cost model measures on its fragments sweep).
Writes <sweep>_points.csv, prints Markdown tables of the fronts, and draws
front_<workload>.png.

The CLI cannot size the character-level GPT (kavg_ray.train.models.model_bytes knows no
`text` dataset and no model_args), so this script passes its own sizer: the GPT of the
spec's model_args on the corpus's 50 characters, float32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from kavg_ray.analysis import costmodel as cm
from kavg_ray.analysis.results import ResultsStore

NETWORKS = ("wan400g", "wan100g", "wan10g")
SWEEPS = {
    "lm": ("lm_fragments", "lm_payload", "lm_schedule"),
    "mnist1d": ("mnist1d_fragments", "mnist1d_payload", "mnist1d_schedule"),
}
VOCAB = 50  # distinct characters of kavg_ray.train.data.generate_corpus


def sizer_for(spec: dict):
    args = (spec.get("workload") or {}).get("model_args") or {}
    seq = ((spec.get("workload") or {}).get("dataset_args") or {}).get("seq_len", 64)

    def sizer(model: str, dataset: str, synthetic=None) -> float:
        if dataset == "text" and model == "gpt":
            from kavg_ray.train.models import GPT

            m = GPT(VOCAB, seq, **args)
            return 4 * sum(p.numel() for p in m.parameters())
        from kavg_ray.train.models import model_bytes

        return model_bytes(model, dataset, synthetic)

    return sizer


def label(row: pd.Series) -> str:
    sched = row.get("K_schedule")
    if isinstance(sched, str) and sched != "constant":
        return sched
    parts = []
    F, tau = int(row.get("fragments", 1) or 1), int(row.get("fragment_delay", 0) or 0)
    if F > 1 or tau > 0:
        parts.append(f"F{F} tau{tau}")
    pay = row.get("payload") or "fp32"
    if pay != "fp32" or row.get("payload_error_feedback"):
        parts.append(pay + ("+EF" if bool(row.get("payload_error_feedback")) else ""))
    return " ".join(parts) or "fp32 F1 tau0"


def measured_step_time(sweep: str, storage: str) -> float:
    """The median step time the cost model measures for ``sweep`` (its packs' compute time
    per learner and point)."""
    spec = ResultsStore(storage).read_spec(sweep)
    p = cm.predict_sweep(
        sweep, storage, cm.parse_network(NETWORKS[0]), require_target=False,
        model_bytes=sizer_for(spec),
    )
    return float(p["step_time_s"].median())


def points(sweep: str, storage: str, step_time: float | None = None) -> pd.DataFrame:
    store = ResultsStore(storage)
    spec = store.read_spec(sweep)
    sizer = sizer_for(spec)
    rows = None
    for net in NETWORKS:
        p = cm.predict_sweep(
            sweep, storage, cm.parse_network(net), require_target=False, model_bytes=sizer,
            step_time=step_time,
        )
        if rows is None:
            rows = p.copy()
            rows["bytes_sent"] = rows["rounds"] * rows["model_bytes"]
        rows[f"time_{net}_s"] = p["predicted_time_s"].to_numpy()
    rows = rows[rows["status"] == "completed"].copy()
    rows["variant"] = rows.apply(label, axis=1)
    if sweep.endswith("schedule"):
        rows["variant"] = rows["variant"].replace("fp32 F1 tau0", "fixed K")
    score = "final_test_loss" if spec["workload"]["dataset"] == "text" else "final_test_acc"
    rows["score"] = rows[score]
    keys = ["P", "variant", "K"]
    agg = rows.groupby(keys).agg(
        score=("score", "mean"),
        score_std=("score", "std"),
        seeds=("seed", "nunique"),
        averages=("rounds", "mean"),
        bytes_sent=("bytes_sent", "mean"),
        step_time_s=("step_time_s", "mean"),
        **{f"time_{n}_s": (f"time_{n}_s", "mean") for n in NETWORKS},
    )
    agg = agg.reset_index()
    agg.insert(0, "sweep", sweep)
    agg.attrs["lower_is_better"] = score == "final_test_loss"
    return agg


def front(df: pd.DataFrame, cost: str, lower: bool) -> pd.DataFrame:
    """The points no other point beats on both cost and score."""
    d = df.sort_values([cost, "score"], ascending=[True, lower])
    best, keep = None, []
    for _, r in d.iterrows():
        s = r["score"]
        if best is None or (s < best if lower else s > best):
            keep.append(r)
            best = s
    return pd.DataFrame(keep)


def fmt_bytes(b: float) -> str:
    if b >= 1e9:
        return f"{b / 1e9:.2f} GB"
    return f"{b / 1e6:.2f} MB" if b >= 1e6 else f"{b / 1e3:.0f} kB"


def markdown(df: pd.DataFrame, cost: str, lower: bool) -> str:
    f = front(df, cost, lower)
    out = [f"| variant | K | score (std) | averages | bytes sent | {cost} |", "| --- " * 6 + "|"]
    for _, r in f.iterrows():
        c = fmt_bytes(r[cost]) if cost == "bytes_sent" else f"{r[cost]:.3f}"
        out.append(
            f"| {r['variant']} | {int(r['K'])} | {r['score']:.3f} ({r['score_std']:.3f}) | "
            f"{r['averages']:.0f} | {fmt_bytes(r['bytes_sent'])} | {c} |"
        )
    return "\n".join(out)


def compact(df: pd.DataFrame, lower: bool, what: str) -> str:
    """One row per cost: the front, cheapest first, as `variant K (score; cost)`."""
    out = [f"| cost | front, cheapest first: variant K ({what}; cost) |", "| --- | --- |"]
    for cost in ["bytes_sent"] + [f"time_{n}_s" for n in NETWORKS]:
        f = front(df, cost, lower)
        cells = []
        for _, r in f.iterrows():
            c = fmt_bytes(r[cost]) if cost == "bytes_sent" else f"{r[cost]:.3f} s"
            cells.append(f"{r['variant']} K{int(r['K'])} ({r['score']:.3f}; {c})")
        name = "bytes" if cost == "bytes_sent" else cost[5:-2]
        out.append(f"| {name} | " + ", ".join(cells) + " |")
    return "\n".join(out)


def plot(df: pd.DataFrame, lower: bool, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = ["bytes_sent"] + [f"time_{n}_s" for n in NETWORKS]
    names = ["bytes one learner sent"] + [f"predicted time on {n} (s)" for n in NETWORKS]
    Ps = sorted(df["P"].unique())
    fig, axes = plt.subplots(len(Ps), 4, figsize=(18, 4.2 * len(Ps)), squeeze=False)
    variants = sorted(df["variant"].unique())
    cmap = plt.get_cmap("tab20")
    for i, P in enumerate(Ps):
        d = df[df["P"] == P]
        for j, (cost, name) in enumerate(zip(costs, names, strict=True)):
            ax = axes[i][j]
            for k, v in enumerate(variants):
                e = d[d["variant"] == v].sort_values("K")
                if e.empty:
                    continue
                ax.plot(e[cost], e["score"], "o-", ms=3, lw=0.8, color=cmap(k % 20), label=v)
            f = front(d, cost, lower)
            ax.plot(f[cost], f["score"], "k--", lw=1.2, label="front")
            if cost == "bytes_sent" or d[cost].max() > 10 * d[cost].min():
                ax.set_xscale("log")
            lo, hi = d["score"].min(), d["score"].max()
            span = hi - lo
            # the worst points (K far from K_opt) are cut off, so that the front shows
            if lower:
                ax.set_ylim(lo - 0.05 * span, lo + 0.45 * span)
            else:
                ax.set_ylim(hi - 0.45 * span, hi + 0.05 * span)
            ax.set_xlabel(name)
            ax.set_ylabel(("test loss" if lower else "test accuracy") + f" (P = {P})")
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=6, ncol=2)
    fig.suptitle(title + "; the y axis is cut to the better half of the range")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def per_average(P: int = 4) -> None:
    """One average's predicted time per payload on the three networks: the cost model's
    arithmetic only (no run), for this study's language model and for 10^9 parameters."""
    print(f"\n### One average over P = {P} (cost model only)\n")
    print("| model | payload | bytes handed in | " + " | ".join(NETWORKS) + " |")
    print("| --- " * (3 + len(NETWORKS)) + "|")
    for name, elements in (("gpt, 16,992 parameters", 16992), ("10^9 parameters", 10**9)):
        for pay in ("fp32", "bf16", "fp8", "int8", "int4"):
            q = cm.payload_bytes(elements, pay)
            ts = [cm.average_time(P, q, cm.parse_network(n).inter, pay) for n in NETWORKS]
            cells = " | ".join(f"{t * 1e3:.3f} ms" for t in ts)
            print(f"| {name} | {pay} | {fmt_bytes(q)} | {cells} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storage", default="/tmp/comm")
    ap.add_argument("--out", default="docs/communication")
    args = ap.parse_args()
    out = Path(args.out)
    per_average()
    for workload, sweeps in SWEEPS.items():
        frames = []
        # one step time per workload (the fragments sweep's median, measured here), so
        # that the points of its sweeps differ in time by their communication only: a
        # pack's step time depends on how many points it stacks
        step_time = None
        if (Path(args.storage) / sweeps[0] / "trials.parquet").exists():
            step_time = measured_step_time(sweeps[0], args.storage)
            print(f"\n{workload}: step time {step_time * 1e3:.4f} ms (median of {sweeps[0]})")
        for s in sweeps:
            if not (Path(args.storage) / s / "trials.parquet").exists():
                print(f"## {s}: not run")
                continue
            agg = points(s, args.storage, step_time)
            lower = agg.attrs["lower_is_better"]
            agg.to_csv(out / f"{s}_points.csv", index=False, float_format="%.6g")
            frames.append(agg)
            for P in sorted(agg["P"].unique()):
                print(f"\n### {s} P={P}: fronts\n")
                print(compact(agg[agg["P"] == P], lower, "loss" if lower else "accuracy"))
        # fragments and payloads share the workload (schedules halve the lr: apart)
        same = [f for f in frames if not f["sweep"].iloc[0].endswith("schedule")]
        if same:
            df = pd.concat(same)
            # F1 tau0 and fp32 are the same configuration, run in both sweeps: keep one
            df = df[~((df["sweep"].str.endswith("payload")) & (df["variant"] == "fp32 F1 tau0"))]
            lower = bool(frames[0].attrs["lower_is_better"])
            what = "loss" if lower else "accuracy"
            for P in sorted(df["P"].unique()):
                print(f"\n### {workload} P={P}: fronts over fragments and payloads\n")
                print(compact(df[df["P"] == P], lower, what))
            plot(df, lower, f"{workload}: final score against bytes and predicted time "
                 "(fragments and payloads; mean of 3 seeds)", out / f"front_{workload}.png")


if __name__ == "__main__":
    main()
