"""The process-group engine: K-AVG and Hier-AVG over real torch.distributed learners.

One learner per process (gloo on CPUs, NCCL on GPUs). The learner takes SGD steps on its
own mini-batches (``epoch_indices(..., rank, world_size, ...)``) and its averager
(:mod:`kavg_ray.train.averaging`) replaces the model by the group's or the world's average on
its schedule. Evaluation uses the average of all learners (one extra all-reduce that is
not counted as the algorithm's communication), each learner scoring a strided slice of
the test set.
"""

from __future__ import annotations

import torch

from kavg_ray.config import RunConfig
from kavg_ray.train import collectives
from kavg_ray.train.averaging import HierAvgAverager, KAvgAverager
from kavg_ray.train.data import LearnerEpochs, steps_per_epoch
from kavg_ray.train.groups import gather_nodes
from kavg_ray.train.loop import EngineBase, empty_comm_metrics
from kavg_ray.train.periods import schedule_for
from kavg_ray.train.workload import (
    EvalSums,
    Recipe,
    Workload,
    build_optimizer,
    build_workload,
    evaluate_sums,
    seed_dropout,
    tokens_per_sample,
)


class ProcessGroupEngine(EngineBase):
    """This process's learner of a K-AVG or Hier-AVG run."""

    def __init__(
        self, cfg: RunConfig, rank: int, world_size: int, device: torch.device, node_rank: int = 0
    ) -> None:
        """``node_rank``: this learner's node (Hier-AVG's groups share a node)."""
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.workload: Workload = build_workload(cfg, device)
        model = self.workload.model
        outer = {
            "outer_lr": cfg.outer.lr, "outer_momentum": cfg.outer.momentum,
            "nesterov": cfg.outer.nesterov, "warmup_steps": cfg.warmup_steps,
        }  # fmt: skip
        if cfg.algorithm == "hier_avg":
            self.averager: KAvgAverager | HierAvgAverager = HierAvgAverager(
                model, cfg.K1, cfg.K2, cfg.S, **outer,
                node_of_rank=gather_nodes(node_rank, world_size, device),
                across_nodes=cfg.hier_groups == "any",
            )  # fmt: skip
        else:
            self.averager = KAvgAverager(
                model, cfg.K, **outer, fragments=cfg.fragments,
                fragment_delay=cfg.fragment_delay, fragment_alpha=cfg.fragment_alpha,
                payload=cfg.payload, payload_error_feedback=cfg.payload_error_feedback,
            )  # fmt: skip
        if world_size > 1:
            # Seeded init gives every learner the same start; the broadcast makes that hold
            # even where initialization is not bit-reproducible across processes.
            collectives.broadcast(self.averager.flat.buffer, self.device, src=0)
            self.averager.reset_anchor()
        self.optimizer = build_optimizer(cfg, model.parameters())
        self.recipe = Recipe(cfg, device)
        self.scaler = self.recipe.scaler()
        seed_dropout(cfg, rank)
        self.learners = world_size
        self.steps_per_epoch = steps_per_epoch(
            self.workload.data.n_train, self.recipe.step_batch, world_size
        )
        self.tokens_per_sample = tokens_per_sample(self.workload.data)
        if cfg.K_schedule != "constant":  # K that changes (kavg only: config refuses others)
            schedule = schedule_for(cfg, self.steps_per_epoch, self._reduce_loss)
            self.averager.use_schedule(schedule)  # type: ignore[union-attr]
        self.epochs = LearnerEpochs(
            self.workload.data, self.recipe.step_batch, rank, world_size, cfg.seed,
            cfg.workload.sampling, device,
        )  # fmt: skip

    def train_steps(
        self, epoch: int, first: int, end: int, lrs: list[float]
    ) -> tuple[float, float]:
        data, model = self.workload.data, self.workload.model
        opt, avg, criterion = self.optimizer, self.averager, self.workload.loss
        batches, gen = self.epochs.at(epoch, first)
        recipe = self.recipe
        losses = []  # summed once per call: a running sum costs a kernel per step
        for lr, (x, y) in zip(lrs, data.train_batches(batches[first:end], gen), strict=True):
            for group in opt.param_groups:
                group["lr"] = lr
            if recipe.plain:
                loss = criterion(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            else:
                loss = recipe.step(model, criterion, opt, x, y, self.scaler)
            if avg.schedule.wants_loss:
                avg.schedule.observe(loss, 1)
            avg.step()
            losses.append(loss.detach())
        return torch.stack(losses).sum().item(), float(end - first)

    def _reduce_loss(self, total: torch.Tensor, count: float) -> tuple[float, float]:
        """An adacomm interval's (loss sum, steps) of this learner summed over the run."""
        sums = torch.stack([total.to(self.device, torch.float64).reshape(()),
                            torch.tensor(float(count), dtype=torch.float64, device=self.device)])
        sums = self.all_reduce(sums)
        return sums[0].item(), sums[1].item()

    def evaluate(self) -> EvalSums:
        avg, data, model = self.averager, self.workload.data, self.workload.model
        idx = torch.arange(self.rank, data.n_test, self.world_size, device=self.device)
        with avg.global_average():
            finite = bool(torch.isfinite(avg.flat.buffer).all().item())
            sums = evaluate_sums(model, model, data, idx, self.workload.loss)
        sums.finite = finite
        return sums

    def comm_seconds(self) -> float:
        """The averages' seconds so far; on a GPU their CUDA events are read here, which the
        loop does after its end-of-epoch synchronisation (no wait)."""
        self.averager.resolve_times()
        return self.averager.stats.seconds

    def comm_metrics(self, compute_time_s: float) -> dict:
        avg = self.averager
        avg.settle_waits()
        levels = avg.comm_levels()
        out = {
            **empty_comm_metrics(),
            "rounds": levels["global"].count,
            "compute_time_s": compute_time_s,
            "comm_time_s": avg.stats.seconds,
            "wait_time_s": avg.stats.wait_seconds,
            "bytes_communicated": avg.stats.bytes,
            "K_in_force": avg.schedule.period_in_force,
        }
        for level, stats in levels.items():
            out[f"{level}_reductions"] = stats.count
            out[f"{level}_comm_time_s"] = stats.seconds
            out[f"{level}_bytes"] = stats.bytes
        if isinstance(avg, HierAvgAverager):
            out["local_on_node"] = float(avg.groups_on_node)
        return out

    def state_dict(self) -> dict:
        avg = self.averager
        stats = {level: s.totals() for level, s in avg.comm_levels().items()}
        return {
            "format": "process-group-1",
            "model": self.workload.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "averager": avg.state_dict(),
            "comm": stats,
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != "process-group-1":
            raise ValueError("resume state is not a process-group learner's checkpoint")
        self.workload.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.averager.load_state_dict(state["averager"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for level, stats in self.averager.comm_levels().items():
            vars(stats).update(state["comm"][level])
