"""The simulated backend: all P learners of one run in one process, on one device.

The P models are stacked along a leading learner axis: every parameter and floating-point
buffer of learner r is row r of one ``(P, N)`` tensor (the named tensors are views into it).
Each step draws learner r's mini-batch exactly as the process-group engine
(:mod:`kavg_ray.train.process_group`) on rank r does (``epoch_indices(..., rank=r,
world_size=P, ...)``, ``augment_generator(seed, epoch, r)``), runs the P forward/backward
passes as one batched call (``torch.func.vmap`` over ``functional_call``, gradients with
``torch.func.grad``), and applies SGD with momentum and weight decay to the stacked tensors
with the arithmetic of ``torch.optim.SGD``. A K-AVG average is a mean over the learner axis;
a Hier-AVG local average is a mean over each slice of S consecutive learners. So a simulated
run follows the distributed run's trajectory (up to floating-point rounding of the batched
kernels) and reports the same metrics, with ``comm_time_s`` and ``bytes_communicated`` 0:
nothing is communicated.

BatchNorm: the running statistics are stacked buffers too. Passed to ``functional_call``
under ``vmap``, BatchNorm's in-place update of ``running_mean``/``running_var`` (and
``num_batches_tracked``) writes each learner's row with its own batch statistics, as in the
real loop; the floating buffers are averaged with the parameters.

Dropout (``nin``): every learner draws its own masks (``vmap(randomness="different")``), but
not the same masks as the distributed run, whose learners seed torch per rank.

The engine refuses before allocating anything when the estimated footprint of the
stacked learners does not fit in the device's available memory.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from kavg_ray.config import RunConfig
from kavg_ray.train.averaging import AveragingSchedule
from kavg_ray.train.data import Dataset, augment_generator, epoch_indices, steps_per_epoch
from kavg_ray.train.fragments import FragmentSchedule, fragment_bounds
from kavg_ray.train.loop import EngineBase, empty_comm_metrics
from kavg_ray.train.outer import (
    OuterOptimizer,
    compressed_step,
    compressed_update,
    outer_step,
    outer_step_slice,
)
from kavg_ray.train.payload import Payload
from kavg_ray.train.periods import schedule_for
from kavg_ray.train.workload import (
    EVAL_BATCH,
    Data,
    EvalSums,
    ModelBuilder,
    Recipe,
    Workload,
    build_workload,
    clip_rows,
    evaluate_sums,
    load_data,
    loss_fn,
    model_builder,
    seed_dropout,
    tokens_per_sample,
)

GIB = 1024**3
STATE_FORMAT = "stacked-1"


# --------------------------------------------------------------------------------------------
# Memory


_IMAGE_SETS = {
    "digits": ((1, 8, 8), 10, 1797 * 64 * 4),
    "cifar10": ((3, 32, 32), 10, 60_000 * 3 * 32 * 32),
    "cifar100": ((3, 32, 32), 100, 60_000 * 3 * 32 * 32),
    "mnist": ((1, 28, 28), 10, 70_000 * 28 * 28),
    "fashion_mnist": ((1, 28, 28), 10, 70_000 * 28 * 28),
}


def input_spec(cfg: RunConfig) -> tuple[tuple[int, ...], int, int]:
    """(input shape, number of outputs, approximate data-set bytes); the image and
    synthetic sets without loading them."""
    return _input_spec(cfg)[:3]


def config_model_bytes(cfg: RunConfig) -> int:
    """Bytes one average moves for ``cfg``'s model (parameters and floating buffers, as
    built): the model built on torch's meta device for the data set's input shape (text
    and factory sets are loaded on the CPU to find it), ``model_args`` honoured."""
    shape, classes, _, _ = _input_spec(cfg)
    with torch.device("meta"):
        model = model_builder(cfg)(shape, classes)
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _input_spec(cfg: RunConfig) -> tuple[tuple[int, ...], int, int, torch.dtype]:
    """input_spec and the dtype of an input. Text and factory data sets are loaded (on the
    CPU) to find them; one too large to hold in memory is refused here."""
    wl = cfg.workload
    if wl.dataset in _IMAGE_SETS:
        return (*_IMAGE_SETS[wl.dataset], torch.float32)
    if wl.dataset != "synthetic":
        data = load_data(cfg)
        if not isinstance(data, Dataset):
            raise ValueError(
                f"the simulated backend holds the data set in memory; {wl.dataset} is about "
                f"{data.nbytes / 2**20:.0f} MB, over workload.in_memory_mb "
                f"({wl.in_memory_mb:g}): raise in_memory_mb or use backend ray"
            )
        tensors = (data.train_x, data.train_y, data.test_x, data.test_y)
        nbytes = sum(t.element_size() * t.numel() for t in tensors)
        return data.input_shape, data.num_classes, nbytes, data.train_x.dtype
    opts = {"task": "classification", "n_train": 2048, "n_test": 512, "dim": 20, "num_classes": 4}
    opts.update(wl.synthetic or {})
    n, dim = int(opts["n_train"]) + int(opts["n_test"]), int(opts["dim"])
    outputs = int(opts["num_classes"]) if opts["task"] == "classification" else 1
    return (dim,), outputs, n * (dim + 1) * 4, torch.float32


def _activation_elements(
    build: ModelBuilder, input_shape: tuple[int, ...], classes: int, dtype: torch.dtype
) -> int:
    """Output elements of every leaf module for one sample: a forward on the meta device,
    or on the CPU for a model that the meta device cannot run."""
    try:
        with torch.device("meta"):
            return _leaf_outputs(build(input_shape, classes), input_shape, dtype)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return _leaf_outputs(build(input_shape, classes), input_shape, dtype)


def _leaf_outputs(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    total = 0

    def hook(_mod: nn.Module, _inp: object, out: object) -> None:
        nonlocal total
        if isinstance(out, Tensor):
            total += out.numel()

    if dtype.is_floating_point:  # features in the dtype the model is built in
        dtype = torch.get_default_dtype()
    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1, *input_shape), dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return total


def estimate_memory_bytes(
    cfg: RunConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    data_bytes: int = 0,
    *,
    build: ModelBuilder | None = None,
    input_dtype: torch.dtype = torch.float32,
) -> int:
    """Estimated peak bytes of a simulated run of ``cfg`` (nothing is allocated to find it).

    Per learner: parameters and floating buffers, gradients, momentum (when momentum > 0)
    or AdamW's two moments and denominator, the weight-decayed gradient copy (SGD with
    weight_decay > 0) and twice the outputs of every layer for one mini-batch (kept for the
    backward pass, plus their gradients); plus one averaged model for evaluation, the outer
    optimizer's anchor and momentum when there is one, and the data set.
    """
    per_learner, evaluation, outer = memory_parts(
        cfg, input_shape, num_classes, build=build, input_dtype=input_dtype
    )
    return int(cfg.P * per_learner + evaluation + outer + data_bytes)


def memory_parts(
    cfg: RunConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    build: ModelBuilder | None = None,
    input_dtype: torch.dtype = torch.float32,
) -> tuple[int, int, int]:
    """The terms of :func:`estimate_memory_bytes`: bytes per learner, of the evaluation
    (one at a time, also in a pack) and of the outer optimizer's state."""
    wl = cfg.workload
    build = build or model_builder(cfg)
    with torch.device("meta"):
        model = build(input_shape, num_classes)
    n_param = sum(p.numel() for p in model.parameters())
    n_fbuf = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    elem = 4  # float32
    per_learner = (n_param + n_fbuf) * elem + n_param * elem  # state + gradients
    if wl.optimizer == "adamw":
        per_learner += 3 * n_param * elem  # two moments and the denominator
    elif wl.momentum > 0:
        per_learner += n_param * elem
    if wl.weight_decay > 0 and wl.optimizer == "sgd":
        per_learner += n_param * elem
    acts = _activation_elements(build, input_shape, num_classes, input_dtype)
    per_learner += 3 * acts * wl.batch_size * elem
    per_learner += wl.batch_size * math.prod(input_shape) * elem
    evaluation = (n_param + n_fbuf) * elem + acts * min(EVAL_BATCH, 10_000) * elem
    outer = 0 if cfg.outer.plain else 2 * n_param * elem  # anchor and momentum
    if cfg.payload != "fp32":  # the base, the learners' changes and their mean (and residuals)
        outer += (3 + cfg.P * (1 + cfg.payload_error_feedback)) * (n_param + n_fbuf) * elem
    if cfg.streaming:  # a fragment's sum in flight (bounded by the whole model)
        outer += (n_param + n_fbuf) * elem
    return per_learner, evaluation, outer


def available_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` or the host's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62  # unknown: do not refuse


def device_total_bytes(device: torch.device) -> int:
    """The whole memory of GPU ``device``."""
    return int(torch.cuda.get_device_properties(device).total_memory)


def check_planned_gpu(cfg: RunConfig, device: torch.device) -> None:
    """On the worker, before training: refuse (ValueError) a GPU smaller than the
    ``resources.gpu_memory_gb`` the driver planned the trial for (docs/design.md 11)."""
    declared = cfg.resources.gpu_memory_gb
    if device.type != "cuda" or declared is None:
        return
    total = device_total_bytes(device)
    if total < declared * GIB:
        raise ValueError(
            f"resources.gpu_memory_gb is {declared:g} but this trial's GPU ({device}) has "
            f"{total / GIB:.1f} GiB: the sweep was planned for a larger GPU; set "
            f"resources.gpu_memory_gb to at most {math.floor(total / GIB * 10) / 10:g}"
        )


def check_memory(cfg: RunConfig, device: torch.device, *, build: ModelBuilder | None = None) -> int:
    """Raise ValueError when the simulated run will not fit in memory; returns the estimate."""
    check_planned_gpu(cfg, device)
    input_shape, classes, data_bytes, dtype = _input_spec(cfg)
    need = estimate_memory_bytes(
        cfg, input_shape, classes, data_bytes, build=build, input_dtype=dtype
    )
    have = available_memory_bytes(device)
    if need > have:
        raise ValueError(
            f"simulated P={cfg.P} {cfg.workload.model} needs ~{need / GIB:.1f} GiB; the device "
            f"({device}) has {have / GIB:.1f} GiB available. Lower P or batch_size, or run "
            "with backend: ray"
        )
    return need


# --------------------------------------------------------------------------------------------
# Stacked learners


class StackedLearners:
    """P copies of one model, stacked: row r of :attr:`flat` is learner r's model.

    :attr:`params` and :attr:`float_buffers` map names to ``(P, *shape)`` views into
    :attr:`flat`; :attr:`int_buffers` (``num_batches_tracked``) are separate stacked tensors.
    """

    def __init__(self, model: nn.Module, P: int, out: Tensor | None = None) -> None:
        """``out``: a ``(P, N)`` tensor to hold :attr:`flat` (rows of a packed run's larger
        stack, :mod:`kavg_ray.train.packed`); default: a new one."""
        self.model = model
        self.P = P
        named_params = [(n, p.detach()) for n, p in model.named_parameters()]
        named_bufs = list(model.named_buffers())
        fbufs = [(n, b) for n, b in named_bufs if b.is_floating_point()]
        ibufs = [(n, b) for n, b in named_bufs if not b.is_floating_point()]
        tensors = named_params + fbufs
        if not tensors:
            raise ValueError("the model has no parameters or floating-point buffers")
        dtypes = {t.dtype for _, t in tensors}
        if len(dtypes) != 1:
            raise ValueError(f"parameters and floating buffers must share one dtype: {dtypes}")
        total = sum(t.numel() for _, t in tensors)
        device = tensors[0][1].device
        if out is None:
            out = torch.empty((P, total), dtype=tensors[0][1].dtype, device=device)
        elif tuple(out.shape) != (P, total) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous ({P}, {total}) tensor")
        self.flat = out
        views: dict[str, Tensor] = {}
        offset = 0
        for name, t in tensors:
            view = self.flat[:, offset : offset + t.numel()].view(P, *t.shape)
            view.copy_(t.unsqueeze(0).expand_as(view))
            views[name] = view
            offset += t.numel()
        self.params = {n: views[n] for n, _ in named_params}
        self.float_buffers = {n: views[n] for n, _ in fbufs}
        self.int_buffers = {
            n: b.detach().unsqueeze(0).repeat(P, *([1] * b.dim())) for n, b in ibufs
        }
        self.momentum: list[Tensor] | None = None
        # AdamW's moments (torch.optim.AdamW's state, stacked) and its step count.
        self.adam: dict[str, list[Tensor]] | None = None
        self.adam_steps = 0
        self.n_params = sum(v[0].numel() for v in self.params.values())

    @property
    def buffers(self) -> dict[str, Tensor]:
        return {**self.float_buffers, **self.int_buffers}

    def working_buffers(self) -> dict[str, Tensor]:
        """The buffers to hand to one batched step: contiguous copies of the floating ones.

        BatchNorm updates its running statistics in place; under ``vmap`` that reaches the
        stacked tensor only when it is contiguous, which the views into :attr:`flat` are not.
        Call :meth:`store_buffers` with them after the step.
        """
        work = {
            n: v.clone(memory_format=torch.contiguous_format) for n, v in self.float_buffers.items()
        }
        return {**work, **self.int_buffers}

    def store_buffers(self, work: dict[str, Tensor]) -> None:
        if self.float_buffers:
            torch._foreach_copy_(
                list(self.float_buffers.values()), [work[n] for n in self.float_buffers]
            )

    def average(self, group_size: int | None = None) -> None:
        """Replace every learner by the mean of its group of S consecutive learners (all: None)."""
        P, flat = self.P, self.flat
        S = P if group_size is None else group_size
        if S == 1:
            return
        grouped = flat.view(P // S, S, flat.shape[1])
        mean = grouped.sum(1, keepdim=True).div_(S)
        grouped.copy_(mean.expand_as(grouped))

    def averaged(self, in_sync: bool) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """The mean model's (params, buffers) and its flat vector; learner 0's when in sync."""
        row = self.flat[0] if in_sync or self.P == 1 else self.flat.sum(0).div_(self.P)
        params, buffers = {}, {}
        offset = 0
        for target, source in ((params, self.params), (buffers, self.float_buffers)):
            for name, view in source.items():
                n = view[0].numel()
                target[name] = row[offset : offset + n].view(view.shape[1:])
                offset += n
        for name, b in self.int_buffers.items():
            buffers[name] = b[0]
        return params, buffers, row

    def sgd_step(self, grads: dict[str, Tensor], lr: float, momentum: float, wd: float) -> None:
        """torch.optim.SGD's update (dampening 0, no Nesterov) on the stacked tensors."""
        params = list(self.params.values())
        g = [grads[n] for n in self.params]
        with torch.no_grad():
            if wd != 0:
                g = torch._foreach_add(g, params, alpha=wd)
            if momentum != 0:
                if self.momentum is None:
                    self.momentum = [t.detach().clone() for t in g]
                else:
                    torch._foreach_mul_(self.momentum, momentum)
                    torch._foreach_add_(self.momentum, g)
                g = self.momentum
            torch._foreach_add_(params, g, alpha=-lr)

    def adamw_step(
        self, grads: dict[str, Tensor], lr: float, betas: tuple[float, float], eps: float,
        wd: float,
    ) -> None:  # fmt: skip
        """torch.optim.AdamW's update (no amsgrad) on the stacked tensors."""
        params = list(self.params.values())
        g = [grads[n] for n in self.params]
        beta1, beta2 = betas
        with torch.no_grad():
            if self.adam is None:
                self.adam = {k: [torch.zeros_like(p) for p in params] for k in ("avg", "sq")}
            avg, sq = self.adam["avg"], self.adam["sq"]
            self.adam_steps += 1
            if wd != 0:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(avg, g, 1 - beta1)
            torch._foreach_mul_(sq, beta2)
            torch._foreach_addcmul_(sq, g, g, value=1 - beta2)
            step_size = lr / (1 - beta1**self.adam_steps)
            denom = torch._foreach_sqrt(sq)
            torch._foreach_div_(denom, (1 - beta2**self.adam_steps) ** 0.5)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, avg, denom, value=-step_size)

    def state_dict(self) -> dict:
        momentum = adam = None
        if self.momentum is not None:
            momentum = dict(zip(self.params, self.momentum, strict=True))
        if self.adam is not None:
            adam = {k: dict(zip(self.params, v, strict=True)) for k, v in self.adam.items()}
        return {
            "params": dict(self.params), "buffers": self.buffers, "momentum": momentum,
            "adam": adam, "adam_steps": self.adam_steps,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            pairs = ((state["params"], self.params), (state["buffers"], self.buffers))
            for source, target in pairs:
                if set(source) != set(target):
                    raise ValueError("the checkpoint's tensors do not match this model")
                for name, t in target.items():
                    if tuple(source[name].shape) != tuple(t.shape):
                        raise ValueError(
                            f"checkpoint tensor {name} has shape {tuple(source[name].shape)}, "
                            f"expected {tuple(t.shape)} (a different P or model?)"
                        )
                    t.copy_(source[name])
            mom = state.get("momentum")
            self.momentum = None
            if mom is not None:
                self.momentum = [mom[n].detach().to(self.flat.device).clone() for n in self.params]
            adam = state.get("adam")
            self.adam = None
            if adam is not None:
                device = self.flat.device
                self.adam = {
                    k: [v[n].detach().to(device).clone() for n in self.params]
                    for k, v in adam.items()
                }
            self.adam_steps = int(state.get("adam_steps", 0))


# --------------------------------------------------------------------------------------------
# The engine


def _workload(
    cfg: RunConfig, device: torch.device, build: ModelBuilder | None, data: Data | None
) -> Workload:
    """build_workload, or with ``data`` already loaded (on ``device``): the model seeded and
    built as build_workload does."""
    if data is None:
        return build_workload(cfg, device, build=build)
    torch.manual_seed(cfg.seed)
    model = (build or model_builder(cfg))(data.input_shape, data.num_classes).to(device)
    return Workload(data, model, loss_fn(data, cfg.workload.loss), device)


def _train_batch(data: Dataset, idx: Tensor, gens: list[torch.Generator] | None) -> Tensor:
    """Learners' prepared (and augmented) batches: (P, B, *input_shape)."""
    P, B = idx.shape
    x = data.prepare(data.train_x[idx.reshape(-1)])
    if gens is not None and data.augment is not None:
        x = torch.cat([data.augment(x[r * B : (r + 1) * B], gens[r]) for r in range(P)])
    return x.view(P, B, *x.shape[1:])


class StackedEngine(EngineBase):
    """All P learners of a K-AVG or Hier-AVG run, stacked in this process.

    A packed run (:mod:`kavg_ray.train.packed`) builds one engine per grid point with
    ``data`` (the data set, on ``device``, shared by the points), ``out`` (the point's rows
    of the pack's stack) and ``check_memory=False`` (the pack checks its own total), and
    calls :meth:`epoch_batches` and :meth:`apply_step` itself: the same code as a run alone.
    """

    def __init__(
        self, cfg: RunConfig, device: torch.device, *, build: ModelBuilder | None = None,
        data: Data | None = None, out: Tensor | None = None, check: bool = True,
    ) -> None:  # fmt: skip
        if cfg.algorithm not in ("kavg", "hier_avg"):
            raise ValueError(f"the simulated backend runs kavg and hier_avg, not {cfg.algorithm}")
        hier = cfg.algorithm == "hier_avg"
        if hier and (cfg.P % cfg.S or cfg.K2 % cfg.K1):
            raise ValueError(
                f"Hier-AVG needs S | P and K1 | K2, got S={cfg.S} K1={cfg.K1} K2={cfg.K2}"
            )
        if check:
            check_memory(cfg, device, build=build)
        self.cfg, self.device, self.learners = cfg, device, cfg.P
        self.workload = _workload(cfg, device, build, data)
        self.model = self.workload.model.train()
        # The learners' models live in `stacked`; the module is only the skeleton.
        self.stacked = StackedLearners(self.model, cfg.P, out)
        seed_dropout(cfg, 0)  # rank 0's seed; vmap draws different masks per learner
        self.schedule = AveragingSchedule(
            cfg.K2 if hier else cfg.K, cfg.K1 if hier else None, cfg.warmup_steps
        )
        self.group_size = cfg.S if hier else None
        self.outer = OuterOptimizer(cfg.outer.lr, cfg.outer.momentum, cfg.outer.nesterov)
        # The anchor (the model after the last global average) and the outer momentum: one
        # copy for all learners, as every real learner holds the same one.
        n = self.stacked.n_params
        self.anchor = None if self.outer.plain else self.stacked.flat[0, :n].clone()
        self.outer_momentum: Tensor | None = None
        # A compressed payload (kavg_ray.train.payload): every learner's error-feedback
        # residual, and the model after the last global average, one copy for all learners
        # (the anchor is then a view into it), as in the real averager.
        self.payload: Payload | None = None
        self.base: Tensor | None = None
        if cfg.payload != "fp32":
            flat = self.stacked.flat
            self.payload = Payload(cfg.payload, cfg.payload_error_feedback, flat.shape[1],
                                   rows=cfg.P, device=device)  # fmt: skip
            self.base = flat[0].clone()
            self.anchor = None if self.outer.plain else self.base[:n]
        # Streaming fragments (kavg): the fragment averages replace the schedule's.
        self.streaming = StackedFragments(self, cfg) if cfg.streaming else None
        self.step_count = self.local_count = self.global_count = 0
        self.recipe = recipe = Recipe(cfg, device)
        self.steps_per_epoch = steps_per_epoch(
            self.workload.data.n_train, recipe.step_batch, cfg.P
        )
        self.tokens_per_sample = tokens_per_sample(self.workload.data)
        if cfg.K_schedule != "constant":  # K that changes: the loss is summed here
            self.schedule = schedule_for(cfg, self.steps_per_epoch)
        self._plan: tuple[int, Tensor, list[torch.Generator] | None] | None = None
        model, criterion = self.model, self.workload.loss

        def loss_of(params: dict, buffers: dict, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            loss = criterion(functional_call(model, (params, buffers), (x,)), y)
            # A micro-batch's share of the step's mean loss, as the process group divides it.
            return (loss / recipe.accum if recipe.accum > 1 else loss), loss.detach()

        self._grad_step = vmap(grad(loss_of, has_aux=True), randomness="different")

    def epoch_batches(self, epoch: int) -> tuple[Tensor, list[torch.Generator] | None]:
        """The epoch's mini-batch indices, ``(steps, P, grad_accum B)``, and the augmentation
        streams."""
        cfg, wl, P, data = self.cfg, self.cfg.workload, self.cfg.P, self.workload.data
        B = self.recipe.step_batch
        batches = torch.stack(
            [epoch_indices(data.n_train, B, r, P, epoch, cfg.seed, wl.sampling) for r in range(P)],
            dim=1,
        ).to(self.device)
        gens = [augment_generator(cfg.seed, epoch, r) for r in range(P)] if data.augment else None
        return batches, gens

    def epoch_plan(self, epoch: int, first: int) -> tuple[Tensor, list[torch.Generator] | None]:
        """:meth:`epoch_batches`, kept while consecutive calls continue the epoch; starting
        inside an epoch not begun here, the earlier steps' augmentation is drawn first."""
        if self._plan is None or self._plan[0] != epoch or first == 0:
            batches, gens = self.epoch_batches(epoch)
            if first and gens is not None:
                for idx in batches[:first]:
                    _train_batch(self.workload.data, idx, gens)
            self._plan = (epoch, batches, gens)
        return self._plan[1], self._plan[2]

    def train_steps(
        self, epoch: int, first: int, end: int, lrs: list[float]
    ) -> tuple[float, float]:
        learners, data = self.stacked, self.workload.data
        batches, gens = self.epoch_plan(epoch, first)
        loss_sum = torch.zeros(self.cfg.P, device=self.device)
        for lr, idx in zip(lrs, batches[first:end], strict=True):
            x = _train_batch(data, idx, gens)
            grads, losses = self.gradients(learners, x, data.train_y[idx])
            self.apply_step(grads, lr, losses)
            loss_sum += losses
        return loss_sum.double().sum().item(), float((end - first) * self.cfg.P)

    def gradients(
        self, learners: StackedLearners, x: Tensor, y: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The gradients and losses of ``learners`` (this run's, or a pack's stack) on one
        step's batches ``(rows, grad_accum B, ...)``: one batched forward and backward per
        micro-batch, summed, under the recipe's autocast, clipped per learner."""
        recipe = self.recipe
        grads: dict[str, Tensor] = {}
        losses = torch.zeros(())
        for n, (xm, ym) in enumerate(recipe.micro_batches(x, y, dim=1)):
            buffers = learners.working_buffers()
            with recipe.autocast():
                g, loss = self._grad_step(learners.params, buffers, xm, ym)
            learners.store_buffers(buffers)
            if n == 0:
                grads, losses = g, loss
            else:
                torch._foreach_add_(list(grads.values()), [g[k] for k in grads])
                losses = losses + loss
        if recipe.accum > 1:
            losses = losses / recipe.accum
        if recipe.clip is not None:
            clip_rows(list(grads.values()), recipe.clip)
        return grads, losses

    def apply_step(
        self, grads: dict[str, Tensor], lr: float, losses: Tensor | None = None
    ) -> None:
        """After the learners' gradients: the optimizer step, then averaging if it is due
        (``losses``: the learners' losses of the step, which an adacomm K_schedule needs)."""
        wl, learners = self.cfg.workload, self.stacked
        if wl.optimizer == "adamw":
            learners.adamw_step(grads, lr, wl.betas, wl.eps, wl.weight_decay)
        else:
            learners.sgd_step(grads, lr, wl.momentum, wl.weight_decay)
        self.step_count += 1
        if self.streaming is not None:  # each applied fragment average is a round
            self.global_count += self.streaming.after_step(self.step_count)
            return
        if self.schedule.wants_loss:
            if losses is None:
                raise ValueError("K_schedule adacomm needs the step's losses")
            self.schedule.observe(losses.double().sum(), self.cfg.P)
        action = self.schedule.advance(self.step_count)
        if action == "global":
            self._average_global()
            self.global_count += 1
        elif action == "local":
            learners.average(self.group_size)
            self.local_count += 1

    def evaluate(self) -> EvalSums:
        data = self.workload.data
        if self.streaming is not None:
            in_sync = self.streaming.in_sync(self.step_count)
        else:
            in_sync = self.schedule.in_sync(self.step_count)
        params, buffers, row = self.stacked.averaged(in_sync)
        finite = bool(torch.isfinite(row).all().item())
        idx = torch.arange(data.n_test, device=self.device)
        sums = evaluate_sums(
            lambda x: functional_call(self.model, (params, buffers), (x,)), self.model, data, idx,
            self.workload.loss,
        )  # fmt: skip
        sums.finite = finite
        return sums

    def _average_global(self) -> None:
        """A global average: the mean over the learner axis, then the outer step; with a
        compressed payload, the process-group averager's scheme on the P rows
        (:meth:`~kavg_ray.train.payload.Payload.simulated_average`, bit for bit)."""
        flat = self.stacked.flat
        if self.payload is None or self.cfg.P == 1:
            self.stacked.average()
            self._apply_outer()
            if self.base is not None:
                self.base.copy_(flat[0])
            return
        mean = self.payload.simulated_average(self.base.unsqueeze(0) - flat)
        self.outer_momentum = compressed_update(
            self.outer, self.base, self.stacked.n_params, mean, self.outer_momentum
        )
        flat.copy_(self.base.expand_as(flat))

    def _apply_outer(self) -> None:
        """After a global average: one outer step on the anchor; every learner = anchor."""
        if self.anchor is None:
            return
        params = self.stacked.flat[:, : self.stacked.n_params]
        # The learners are equal after the average: step on learner 0's row, copy it on.
        self.outer_momentum = outer_step(self.outer, self.anchor, params[0], self.outer_momentum)
        params[1:].copy_(params[0].expand_as(params[1:]))

    def comm_seconds(self) -> float:
        return 0.0

    def comm_metrics(self, compute_time_s: float) -> dict:
        out = {
            **empty_comm_metrics(),
            "rounds": self.global_count,
            "compute_time_s": compute_time_s,
            "comm_time_s": 0.0,
            "bytes_communicated": 0,
            "global_reductions": self.global_count,
            "K_in_force": self.schedule.period_in_force,
        }
        if self.group_size is not None:  # stacked groups: all on this one device
            out["local_reductions"] = self.local_count
            out["local_on_node"] = 1.0
        return out

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            **self.stacked.state_dict(),
            "counts": [self.step_count, self.local_count, self.global_count],
            "anchor": None if self.anchor is None else self.anchor.clone(),
            "outer_momentum": None if self.outer_momentum is None else self.outer_momentum.clone(),
            **({} if self.payload is None else
               {"payload": {"base": self.base.clone(), **self.payload.state_dict()}}),  # fmt: skip
            **({"K_schedule": self.schedule.state_dict()}
               if hasattr(self.schedule, "state_dict") else {}),  # fmt: skip
            **({} if self.streaming is None else {"fragments": self.streaming.state_dict()}),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError("resume state is not a simulated-backend checkpoint")
        self.stacked.load_state_dict(state)
        self.step_count, self.local_count, self.global_count = map(int, state["counts"])
        if hasattr(self.schedule, "load_state_dict"):
            if "K_schedule" not in state:
                raise ValueError("the checkpoint has no K_schedule state (a fixed-K run?)")
            self.schedule.load_state_dict(state["K_schedule"], self.device)
        if self.anchor is not None:
            self.anchor.copy_(state["anchor"])
            mom = state["outer_momentum"]
            self.outer_momentum = None if mom is None else mom.to(self.device).clone()
        if self.payload is not None:
            if "payload" not in state:
                raise ValueError("the checkpoint has no compressed-payload state")
            self.base.copy_(state["payload"]["base"])  # the anchor is a view into it
            self.payload.load_state_dict(state["payload"])
        if self.streaming is not None:
            if "fragments" not in state:
                raise ValueError("the checkpoint has no fragment state (fragments: 1 run?)")
            self.streaming.load_state_dict(state["fragments"], self.step_count)


class StackedFragments:
    """Streaming fragments on the stacked learners: the schedule of
    :class:`~kavg_ray.train.fragments.StreamingFragments` and its arithmetic, with the sum
    over the learner axis for the all-reduce (docs/design.md section 9).

    A launch keeps the sum of the learners' fragment slices as they are; the apply, tau
    steps later, divides it by P, takes the fragment's outer step (anchor slice and
    momentum of its own) where there is an outer optimizer, and sets every learner's slice
    to ``lerp(global, own, alpha)``. F = 1, tau = 0, alpha = 0 is the engine's global
    average, element for element.

    With a compressed payload (P > 1) the launch takes the learners' compressed mean
    change of the fragment, :meth:`Payload.simulated_average` of ``base_f - x_f`` on the
    fragment's columns (its residuals' columns too); the apply moves ``base_f`` by it
    (:func:`~kavg_ray.train.outer.compressed_step`), as the real learners do.
    """

    def __init__(self, engine: StackedEngine, cfg: RunConfig) -> None:
        self.engine = engine  # its stacked rows are read at each use (a pack rebinds them)
        self.schedule = FragmentSchedule(cfg.K, cfg.fragments, cfg.fragment_delay)
        self.alpha = cfg.fragment_alpha
        st = engine.stacked
        sizes = [v[0].numel() for v in st.params.values()]
        self.bounds = fragment_bounds(sizes, cfg.fragments, st.flat.shape[1])
        self.started = [False] * cfg.fragments
        # (fragment, the learners' sum; or, compressed, their mean change)
        self.pending: tuple[int, Tensor] | None = None
        self.compressed = engine.payload is not None and cfg.P > 1

    def after_step(self, step: int) -> bool:
        """Launch and apply what follows step ``step``; whether an average was applied."""
        launch, apply = self.schedule.launches(step), self.schedule.applies(step)
        if launch is not None:
            a, b = self.bounds[launch]
            eng, rows = self.engine, self.engine.stacked.flat[:, a:b]
            if self.compressed:
                change = eng.base[a:b].unsqueeze(0) - rows
                self.pending = (launch, eng.payload.simulated_average(change, a))
            else:
                self.pending = (launch, rows.sum(0))
        if apply is not None:
            if self.pending is None or self.pending[0] != apply:
                raise RuntimeError(f"fragment {apply}'s average was not launched")
            if self.compressed:
                self._apply_compressed(apply, self.pending[1])
            else:
                self._apply(apply, self.pending[1])
            self.pending = None
        return apply is not None

    def _apply_compressed(self, fragment: int, mean: Tensor) -> None:
        """``base_f`` moved by the compressed mean change, every row lerped onto it."""
        eng, (a, b) = self.engine, self.bounds[fragment]
        cut, mu = min(b, eng.stacked.n_params) - a, eng.outer.momentum
        mom, first = None, False
        if not eng.outer.plain and mu != 0:
            if eng.outer_momentum is None:
                eng.outer_momentum = torch.zeros_like(eng.anchor)
            mom, first = eng.outer_momentum[a : a + cut], not self.started[fragment]
            self.started[fragment] = True
        base, rows = eng.base[a:b], eng.stacked.flat[:, a:b]
        compressed_step(eng.outer, base, cut, mean, mom, first)
        if self.alpha:
            rows.copy_(torch.lerp(base.expand_as(rows), rows, self.alpha))
        else:
            rows.copy_(base.expand_as(rows))

    def _apply(self, fragment: int, total: Tensor) -> None:
        eng, (a, b) = self.engine, self.bounds[fragment]
        mean = total.div_(eng.cfg.P)
        cut = min(b, eng.stacked.n_params) - a
        if eng.anchor is not None and cut > 0:
            mu = eng.outer.momentum
            if mu != 0 and eng.outer_momentum is None:
                eng.outer_momentum = torch.zeros_like(eng.anchor)
            mom = None if mu == 0 else eng.outer_momentum[a : a + cut]
            first = mu != 0 and not self.started[fragment]
            outer_step_slice(eng.outer, eng.anchor[a : a + cut], mean[:cut], mom, first)
            self.started[fragment] = True
        if eng.base is not None:  # a compressed payload at P = 1: nothing travelled
            eng.base[a:b].copy_(mean)
        rows = eng.stacked.flat[:, a:b]
        if self.alpha:
            rows.copy_(torch.lerp(mean.expand_as(rows), rows, self.alpha))
        else:
            rows.copy_(mean.expand_as(rows))

    def in_sync(self, step: int) -> bool:
        """All learners equal after step ``step``: one fragment, alpha 0, just applied."""
        return (
            self.schedule.fragments == 1 and self.alpha == 0
            and self.schedule.applies(step) is not None
        )  # fmt: skip

    def state_dict(self) -> dict:
        pending = None
        if self.pending is not None:
            pending = {"fragment": self.pending[0], "sum": self.pending[1].clone()}
        return {"started": list(self.started), "pending": pending}

    def load_state_dict(self, state: dict, step: int) -> None:
        raw = state["pending"]
        self.started = self.schedule.check_checkpoint(
            list(state["started"]), None if raw is None else raw["fragment"], step
        )
        self.pending = None
        if raw is not None:
            self.pending = (raw["fragment"], raw["sum"].to(self.engine.device).clone())
