"""Training without Ray: workloads, the one epoch loop and an engine per backend.

Nothing under ``kavg_ray.train`` imports ray: the same code runs inside Ray Train workers
(:mod:`kavg_ray.launch.ray_train`) and under plain ``torchrun``
(``torchrun --nproc-per-node P -m kavg_ray.train CONFIG.yaml``).

- :mod:`~kavg_ray.train.workload`: data, seeded model, loss, evaluation sums;
- :mod:`~kavg_ray.train.loop`: :func:`run_epochs`, the recorder of counters, metrics,
  checkpoints and the replay protocol;
- engines: :mod:`~kavg_ray.train.process_group` (K-AVG, Hier-AVG over torch.distributed),
  :mod:`~kavg_ray.train.stacked` (all P learners in one process: ``backend: simulated``),
  :mod:`~kavg_ray.train.parameter_server` (Downpour, EAMSGD);
- :mod:`~kavg_ray.train.run`: :func:`train`, which picks the engine from the algorithm table.
"""

from kavg_ray.train.run import build_engine, train

__all__ = ["build_engine", "train"]
