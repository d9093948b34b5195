"""Ray Train glue: one run of the epoch loop (kavg_ray.train) on Ray Train workers (V2).

Each learner writes its own checkpoint file into the epoch's checkpoint
directory (Ray gives all ranks the same directory name), so a restarted worker
group resumes every learner from its own state: local models and momentum differ
between averages.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from kavg_ray.config import RunConfig
from kavg_ray.launch.dashboard import record_epoch
from kavg_ray.launch.torch_backend import KavgTorchConfig
from kavg_ray.train import collectives, train
from kavg_ray.train.parameter_server import ParameterServer, initial_params

STATE_FILE = "learner-{rank}.pt"
# Beside the run's checkpoints: the fault of `failure.inject` has been injected already.
FAULT_MARKER = "fault-injected-rank{rank}-epoch{epoch}"


def _inject_fault(cfg: RunConfig, rank: int, epoch: int) -> None:
    """`failure.inject`: SIGKILL this learner at the end of the chosen epoch, once per run.

    The learner first waits until Ray Train has committed every earlier report, so the
    restart resumes from the epoch ``epoch - 1`` checkpoint (a report waits in the worker's
    queue until the controller polls it; a worker dying before that poll takes the
    previous epoch's checkpoint with it, and the run would restart from scratch). The
    marker is written (and closed) before the kill, in the run's Ray Train storage (the
    directory of its checkpoints), so the restarted worker group trains through that
    epoch again without dying.
    """
    inject = cfg.failure.inject
    if inject is None or inject.rank != rank or inject.epoch != epoch:
        return
    storage = ray.train.get_context().get_storage()
    fs = storage.storage_filesystem
    marker = Path(storage.experiment_fs_path, FAULT_MARKER.format(rank=rank, epoch=epoch))
    if fs.get_file_info(marker.as_posix()).type != pyarrow.fs.FileType.NotFound:
        return
    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=300
    )
    fs.create_dir(marker.parent.as_posix())
    with fs.open_output_stream(marker.as_posix()) as f:
        f.write(f"pid {os.getpid()}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_due(
    cfg: RunConfig, epoch: float, diverged: bool = False, step: int | None = None
) -> bool:
    """Whether the report of ``epoch`` carries a checkpoint (``failure.checkpoint_every_epochs``).

    The last epoch always does when checkpoints are on, and so does an epoch that
    diverged (the run stops there), so that a run whose driver dies after training has
    ended is replayed, not retrained. With a step budget (``workload.steps``) it counts
    evaluations: every N-th of them (``eval_every_steps`` apart) and the last.
    """
    every, wl = cfg.failure.checkpoint_every_epochs, cfg.workload
    if wl.steps is not None and step is not None:  # a step budget: every N-th evaluation
        evaluation = -(-step // (wl.eval_every_steps or wl.steps))
        return every > 0 and (diverged or evaluation % every == 0 or step >= wl.steps)
    return every > 0 and (diverged or epoch % every == 0 or epoch == wl.epochs)


def checkpoint_name(cfg: RunConfig, metrics: dict) -> str:
    """The folder of a report's checkpoint: ``epoch-000003``, or with a step budget (whose
    epochs are fractional) ``step-000000150``."""
    if cfg.workload.step_budget:
        return f"step-{int(metrics['step']):09d}"
    return f"epoch-{int(metrics['epoch']):06d}"


def load_learner_state(folder: Path, rank: int, device: torch.device) -> dict:
    """Learner ``rank``'s checkpoint, onto this worker's ``device``: after a restart Ray may
    place the rank on another GPU than the one that saved it (or where that index does
    not exist)."""
    return torch.load(folder / STATE_FILE.format(rank=rank), map_location=device,
                      weights_only=False)  # fmt: skip


def train_loop_per_worker(config: dict) -> None:
    """Entry point of every Ray Train worker."""
    cfg = RunConfig.model_validate(config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.resources.use_gpu else torch.device("cpu")

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_learner_state(Path(d), rank, device)

    def report(metrics: dict, state: dict | None) -> None:
        if state is not None:  # a trained epoch (None: a replay of finished ones)
            if rank == 0:
                record_epoch(cfg, metrics)  # dashboard metrics, every engine alike
            _inject_fault(cfg, rank, metrics["epoch"])
        if state is None or not checkpoint_due(
            cfg, metrics["epoch"], bool(metrics.get("diverged")), metrics.get("step")
        ):
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, os.path.join(d, STATE_FILE.format(rank=rank)))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(d),
                checkpoint_dir_name=checkpoint_name(cfg, metrics),
            )

    train(
        cfg, report, rank=rank, world_size=world, device=device, resume=resume,
        server=None if config.get("server") is None else BlockingActor(config["server"]),
        node_rank=ctx.get_node_rank(),
    )  # fmt: skip


class BlockingActor:
    """A Ray actor handle whose methods return their results: ``a.pull()`` is
    ``ray.get(handle.pull.remote())`` (how the torch-only engines call a server)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._handle, name)
        return lambda *args: ray.get(method.remote(*args))


def start_server(cfg: RunConfig) -> Any:
    """A ParameterServer Ray actor holding ``cfg``'s initial model (kill it when done).

    It asks for no CPU, so it fits beside the P learners, and opts out of the calling Tune
    trial's placement group.
    """
    actor_cls = ray.remote(ParameterServer).options(num_cpus=0, scheduling_strategy="DEFAULT")
    return actor_cls.remote(initial_params(cfg))


def make_trainer(
    cfg: RunConfig,
    storage_path: str,
    name: str,
    callbacks: list | None = None,
    server: object | None = None,
) -> TorchTrainer:
    """A TorchTrainer running `cfg` on P workers, NCCL on GPUs and gloo otherwise.

    ``server``: the ParameterServer actor handle (:func:`start_server`) of a Downpour or
    EAMSGD run.
    """
    res = cfg.resources
    per_worker = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    loop_config: dict = {"run": cfg.model_dump(mode="json")}
    if server is not None:
        loop_config["server"] = server
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        # The group's store and gloo listen on the node's Ray address only (section 6).
        torch_config=KavgTorchConfig(
            backend=collectives.backend(res.use_gpu), timeout_s=int(res.nccl_timeout_s)
        ),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=res.use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks or [],
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
