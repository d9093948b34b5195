"""The learner's training loop: K local SGD steps, an average, repeat.

`run_training` is plain torch.distributed: Ray Train calls it from
`kavg_ray.ray_train`, and `torchrun -m kavg_ray.worker CONFIG.yaml` calls it
directly. It reports once per epoch through a callback that receives the
metrics and this learner's checkpoint state.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kavg_ray.averaging import HierAvgAverager, KAvgAverager
from kavg_ray.config import RunConfig
from kavg_ray.data import Dataset, augment_generator, epoch_indices, load_dataset, steps_per_epoch
from kavg_ray.models import build_model

# report(metrics, state): state is this learner's checkpoint, or None when there is
# nothing new to save.
ReportFn = Callable[[dict, dict | None], None]
EVAL_BATCH = 1024


@dataclass
class Learner:
    """One learner's model, optimizer and averager, ready to train."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    averager: KAvgAverager | HierAvgAverager
    data: Dataset
    device: torch.device
    rank: int
    world_size: int
    counters: dict = field(default_factory=dict)


def build_learner(cfg: RunConfig, rank: int, world_size: int, device: torch.device) -> Learner:
    """Model, data, SGD and averager for one learner; every learner starts from one model."""
    wl = cfg.workload
    data = load_dataset(
        wl.dataset,
        data_dir=wl.data_dir,
        download=wl.download,
        seed=cfg.seed,
        synthetic=wl.synthetic,
    )
    # Seeded init gives every learner the same start; the broadcast below makes
    # that hold even where initialization is not bit-reproducible across processes.
    torch.manual_seed(cfg.seed)
    model = build_model(wl.model, data.input_shape, data.num_classes).to(device)
    if cfg.algorithm == "hier_avg":
        averager = HierAvgAverager(model, cfg.K1, cfg.K2, cfg.S)
    else:
        averager = KAvgAverager(model, cfg.K)
    if world_size > 1:
        dist.broadcast(averager.flat.buffer, src=0)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=wl.lr.initial, momentum=wl.momentum, weight_decay=wl.weight_decay
    )
    for name in ("train_x", "train_y", "test_x", "test_y"):
        setattr(data, name, getattr(data, name).to(device))
    torch.manual_seed(cfg.seed * 1_000_003 + rank)  # dropout differs per learner
    return Learner(model, optimizer, averager, data, device, rank, world_size)


def loss_fn(data: Dataset) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy for classification, half the squared error for least squares."""
    if data.task == "regression":
        return lambda out, y: 0.5 * F.mse_loss(out, y)
    return F.cross_entropy


def evaluate(learner: Learner) -> tuple[float, float, float]:
    """Sum of test loss, correct predictions and count over this learner's test slice."""
    data, model = learner.data, learner.model
    criterion = loss_fn(data)
    idx = torch.arange(learner.rank, len(data.test_y), learner.world_size, device=learner.device)
    loss_sum = correct = 0.0
    model.eval()
    with torch.no_grad():
        for chunk in idx.split(EVAL_BATCH):
            x, y = data.prepare(data.test_x[chunk]), data.test_y[chunk]
            out = model(x)
            loss_sum += criterion(out, y).item() * len(chunk)
            if data.task == "classification":
                correct += (out.argmax(1) == y).sum().item()
    model.train()
    return loss_sum, correct, float(len(idx))


def run_training(
    cfg: RunConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    report: ReportFn,
    resume: dict | None = None,
) -> dict:
    """Train one learner for the configured epochs; returns the last epoch's metrics."""
    learner = build_learner(cfg, rank, world_size, device)
    model, opt, avg, data = learner.model, learner.optimizer, learner.averager, learner.data
    criterion = loss_fn(data)
    wl = cfg.workload
    steps = steps_per_epoch(data.n_train, wl.batch_size, world_size)
    c = {"epoch": 0, "samples": 0, "compute_time_s": 0.0, "wall_time_s": 0.0}
    history: list[dict] = []
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        avg.load_state_dict(resume["averager"])
        torch.set_rng_state(resume["rng"])
        c = dict(resume["counters"])
        _restore_stats(avg, resume["comm"])
        history = list(resume["history"])
    # A resumed run hands the epochs before its checkpoint to its first report, so
    # whoever collects the reports ends with every epoch exactly once.
    replay = list(history)
    finished = replay_finished_run(report, replay, c["epoch"] >= wl.epochs)
    if finished is not None:
        return finished
    metrics: dict = {}
    start = time.perf_counter() - c["wall_time_s"]

    for epoch in range(c["epoch"], wl.epochs):
        lr = wl.lr.at_epoch(epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        batches = epoch_indices(
            data.n_train, wl.batch_size, rank, world_size, epoch, cfg.seed, wl.sampling
        ).to(device)
        gen = augment_generator(cfg.seed, epoch, rank)
        comm_before = avg.stats.seconds
        losses = []  # summed once per epoch: a running sum costs a kernel per step
        t0 = time.perf_counter()
        for idx in batches:
            x = data.prepare(data.train_x[idx])
            if data.augment is not None:
                x = data.augment(x, gen)
            loss = criterion(model(x), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            avg.step()
            losses.append(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        c["compute_time_s"] += time.perf_counter() - t0 - (avg.stats.seconds - comm_before)
        c["samples"] += steps * wl.batch_size * world_size
        c["epoch"] = epoch + 1

        with avg.global_average():
            finite = float(torch.isfinite(avg.flat.buffer).all().item())
            test_loss, correct, count = evaluate(learner)
        totals = torch.tensor(
            [
                torch.stack(losses).sum().item(),
                float(steps),
                test_loss,
                correct,
                count,
                1.0 - finite,
            ],
            dtype=torch.float64,
        )
        if world_size > 1:
            dist.all_reduce(totals)
        train_loss = totals[0].item() / totals[1].item()
        diverged = bool(totals[5].item() > 0) or not math.isfinite(train_loss)
        c["wall_time_s"] = time.perf_counter() - start
        metrics = {
            "epoch": c["epoch"],
            "samples": c["samples"],
            "rounds": avg.stats.count if cfg.algorithm == "kavg" else avg.global_stats.count,
            "train_loss": train_loss,
            "test_loss": totals[2].item() / totals[4].item(),
            "test_acc": (
                totals[3].item() / totals[4].item() if data.task == "classification" else math.nan
            ),
            "lr": lr,
            "compute_time_s": c["compute_time_s"],
            "comm_time_s": avg.stats.seconds,
            "bytes_communicated": avg.stats.bytes,
            "wall_time_s": c["wall_time_s"],
            "diverged": diverged,
            **_hier_metrics(avg),
        }
        if rank == 0:
            from kavg_ray.metrics import record_epoch

            record_epoch(cfg, metrics)  # dashboard metrics; a no-op unless Ray runs here
        history.append(metrics)
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "averager": avg.state_dict(),
            "rng": torch.get_rng_state(),
            "counters": dict(c),
            "comm": _save_stats(avg),
            "history": list(history),
        }
        replay = report_epoch(report, metrics, state, replay)
        if diverged:
            break
    return metrics


def replay_finished_run(report: ReportFn, history: list[dict], done: bool) -> dict | None:
    """A resumed run that had already ended reports its last epoch once, carrying the rest.

    Returns that last epoch's metrics, or None when there is training left to do.
    """
    if history and (done or history[-1].get("diverged")):
        report({**history[-1], "history_before": history[:-1]}, None)
        return history[-1]
    return None


def report_epoch(report: ReportFn, metrics: dict, state: dict, replay: list[dict]) -> list[dict]:
    """Report one epoch; the first report after a resume carries the epochs before it.

    Returns the replay still pending (always empty afterwards), so whoever collects the
    reports ends with every epoch exactly once.
    """
    report({**metrics, "history_before": replay} if replay else metrics, state)
    return []


def _hier_metrics(avg: KAvgAverager | HierAvgAverager) -> dict:
    if not isinstance(avg, HierAvgAverager):
        return {}
    return {
        "local_reductions": avg.local_stats.count,
        "global_reductions": avg.global_stats.count,
        "local_comm_time_s": avg.local_stats.seconds,
        "global_comm_time_s": avg.global_stats.seconds,
        "local_bytes": avg.local_stats.bytes,
        "global_bytes": avg.global_stats.bytes,
    }


def _save_stats(avg: KAvgAverager | HierAvgAverager) -> dict:
    if isinstance(avg, HierAvgAverager):
        return {"local": vars(avg.local_stats).copy(), "global": vars(avg.global_stats).copy()}
    return {"global": vars(avg.stats).copy()}


def _restore_stats(avg: KAvgAverager | HierAvgAverager, saved: dict) -> None:
    if isinstance(avg, HierAvgAverager):
        vars(avg.local_stats).update(saved["local"])
        vars(avg.global_stats).update(saved["global"])
    else:
        vars(avg.stats).update(saved["global"])


def format_progress(cfg: RunConfig, m: dict) -> str:
    """One progress line per epoch."""
    return (
        f"epoch {m['epoch']}/{cfg.workload.epochs}  test_acc {m['test_acc']:.4f}  "
        f"test_loss {m['test_loss']:.4f}  train_loss {m['train_loss']:.4f}  lr {m['lr']:g}  "
        f"rounds {m['rounds']}  comm {m['comm_time_s']:.2f}s  wall {m['wall_time_s']:.1f}s"
        + ("  DIVERGED" if m.get("diverged") else "")
    )


def main(argv: list[str] | None = None) -> int:
    """`torchrun --nproc-per-node P -m kavg_ray.worker CONFIG.yaml`: one run without Ray."""
    from kavg_ray.config import ConfigError, load_run

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: torchrun --nproc-per-node P -m kavg_ray.worker CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        cfg = load_run(argv[0])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    use_cuda = cfg.resources.use_gpu and torch.cuda.is_available()
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if world != cfg.P:
        print(f"error: config asks for P={cfg.P} but {world} processes run", file=sys.stderr)
        return 2
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    def report(metrics: dict, state: dict) -> None:
        if rank == 0:
            print(format_progress(cfg, metrics), flush=True)

    run_training(cfg, rank, world, device, report)
    if dist.is_initialized():
        dist.barrier()  # leave together: gloo aborts a peer whose connections vanish
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
