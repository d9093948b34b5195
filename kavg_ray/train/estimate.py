"""Empirical estimates of the constants of Theorem 3.1 (L, M, F(w~_1) - F*) for one workload.

The bound (3.2) and the K_opt prediction (3.44)-(3.46) need the smoothness constant ``L``
(Assumption 1), the stochastic-gradient variance bound ``M`` (Assumption 4) and the initial
gap ``F(w~_1) - F*`` (Assumption 2).  None is known for a neural network, so
:func:`estimate_constants` measures them along a short single-learner SGD probe that follows
the worker exactly (same seeded model init, learning rate, momentum, batch size and batch
schedule with ``P = 1``), at ``points`` evenly spaced points of that trajectory:

* ``M``: at each point, the sample variance of the *single-sample* gradients
  ``grad f(w; xi_i)`` over a random subset of the training set (per-sample gradients with
  ``torch.func.vmap(grad(...))``); the estimate is the largest value over the points.
  Assumption 4 bounds the variance of one sample's gradient; a mini-batch of B divides it by B,
  which (3.2) does explicitly.
* ``L``: the largest secant ``||grad F(w_a) - grad F(w_b)|| / ||w_a - w_b||`` between
  consecutive points, where ``grad F`` is the full-batch gradient over the training set (or a
  fixed subset of it).  A secant can only under-estimate the Lipschitz constant, and along a
  trajectory it sees an average curvature rather than the largest one, so by default it is
  sharpened with a few Hessian power iterations at each point (``||H v||`` for a unit ``v``,
  also a lower bound of ``||H||_2 <= L``); ``L`` is the larger of the two.
  ``power_iters=0`` gives the pure secant estimate.
* ``F_gap = F(w_1) - F*``: ``F(w_1)`` is the full training loss at the initial point.
  ``F*`` (Assumption 2) is 0 for cross-entropy (a valid lower bound) and, for the synthetic
  least-squares task with the bias-free ``linear`` model, the empirical optimum
  ``least_squares_constants(ds)["F_star"]``; a ``F_star`` argument overrides both.

All gradient probes run with the model in eval mode: BatchNorm then uses its running
statistics and dropout is off, so the loss of one sample is a function of that sample alone
(needed for per-sample gradients, and it makes ``F`` a fixed function for the secants).  The
probe ignores data augmentation and weight decay: the constants are those of the data loss
on the un-augmented training set.

:func:`predict_for_config` turns an :class:`Estimates` into the K_opt prediction of
Theorem 3.4 for a list of learner counts ``P``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from kavg_ray.analysis import theory
from kavg_ray.config import RunConfig
from kavg_ray.train.data import (
    Dataset,
    augment_generator,
    epoch_indices,
    least_squares_constants,
)
from kavg_ray.train.workload import build_workload, load_data, loss_fn, seed_dropout

__all__ = [
    "Estimates",
    "estimate_constants",
    "full_gradient",
    "full_loss",
    "hessian_norm",
    "per_sample_gradient_variance",
    "predict_for_config",
    "probe_trajectory",
]

# Samples per forward/backward chunk: bounds the memory of full-batch and per-sample passes.
CHUNK = 256
PER_SAMPLE_CHUNK = 64
# Generator salts, so the probe's sampling never touches the global RNG (which drives dropout
# in the SGD trajectory, as in the worker).
_SUBSET_SALT = 0x5EED_5AB5
_POWER_SALT = 0x0D15_EA5E


@dataclass
class Estimates:
    """Constants of Theorem 3.1 measured on one workload (see the module docstring).

    ``L`` (Assumption 1), ``M`` (Assumption 4), ``F_gap = F0 - F_star`` (Assumption 2,
    clipped at 0) with ``F0`` the full training loss at the initial point.  ``points`` is the
    number of trajectory points probed, ``probe_steps`` the SGD steps of the probe.
    """

    L: float
    M: float
    F_gap: float
    F0: float
    F_star: float
    L_method: str
    M_method: str
    points: int
    probe_steps: int
    F_star_method: str = ""
    n_train: int | None = None
    L_secant: float | None = None
    L_hessian: float | None = None
    M_per_point: list[float] = field(default_factory=list)
    steps_at_points: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


# --------------------------------------------------------------------------- trajectory


def _point_steps(probe_steps: int, points: int) -> list[int]:
    if points < 2:
        raise ValueError(f"points must be >= 2 (a secant needs two points), got {points}")
    if probe_steps < points - 1:
        raise ValueError(
            f"probe_steps must be >= points - 1 so the points are distinct, got "
            f"probe_steps={probe_steps}, points={points}"
        )
    return [round(i * probe_steps / (points - 1)) for i in range(points)]


def _probe_setup(
    cfg: RunConfig, device: torch.device
) -> tuple[Dataset, nn.Module, Callable[..., Tensor], torch.optim.Optimizer]:
    """The probe's data (in memory), seeded model in train mode, loss and SGD optimizer."""
    wl = cfg.workload
    work = build_workload(cfg, device)
    if not isinstance(work.data, Dataset):
        raise ValueError(
            f"the theory probe needs the data set in memory; {wl.dataset} is read through a "
            f"DataLoader (over workload.in_memory_mb = {wl.in_memory_mb:g})"
        )
    optimizer = torch.optim.SGD(
        work.model.parameters(), lr=wl.lr.initial, momentum=wl.momentum,
        weight_decay=wl.weight_decay,
    )  # fmt: skip
    seed_dropout(cfg, 0)  # the engines' dropout seed for rank 0
    work.model.train()
    return work.data, work.model, work.loss, optimizer


def probe_trajectory(
    cfg: RunConfig,
    *,
    probe_steps: int = 50,
    points: int = 5,
    device: str | torch.device = "cpu",
) -> tuple[Dataset, nn.Module, list[int], list[dict[str, Tensor]]]:
    """Run the single-learner SGD probe and snapshot the model at evenly spaced steps.

    Follows the worker with ``P = 1``: ``torch.manual_seed(cfg.seed)`` then ``build_model``,
    SGD with the config's learning-rate schedule, momentum and weight decay, the batches of
    ``epoch_indices(..., rank=0, world_size=1, ...)`` (shard or iid as configured) and the
    training augmentation.  Returns ``(data, model, steps, states)``: ``states[i]`` is a copy
    of the model's ``state_dict()`` after ``steps[i]`` optimizer steps (``steps[0] = 0``, the
    initial point ``w_1``); ``data`` is on ``device``.
    """
    steps_wanted = _point_steps(probe_steps, points)
    device = torch.device(device)
    wl = cfg.workload
    data, model, criterion, optimizer = _probe_setup(cfg, device)

    def snapshot() -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    states: list[dict[str, Tensor]] = []
    step, epoch = 0, 0
    while True:
        batches = epoch_indices(data.n_train, wl.batch_size, 0, 1, epoch, cfg.seed, wl.sampling)
        gen = augment_generator(cfg.seed, epoch, 0)
        for group in optimizer.param_groups:
            group["lr"] = wl.lr.at_epoch(epoch)
        for idx in batches.to(device):
            if step in steps_wanted[len(states) :]:
                states.append(snapshot())
            if len(states) == len(steps_wanted):
                return data, model, steps_wanted, states
            x = data.prepare(data.train_x[idx])
            if data.augment is not None:
                x = data.augment(x, gen)
            loss = criterion(model(x), data.train_y[idx])
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"the probe diverged at step {step} (loss {loss.item()}); lower the "
                    "learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        epoch += 1


# --------------------------------------------------------------------------- measurements


def _params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).double()


def full_loss(model: nn.Module, data: Dataset, idx: Tensor | None = None) -> float:
    """``F(w)``: mean training loss over ``idx`` (default: the whole training set)."""
    criterion = loss_fn(data)
    idx = torch.arange(data.n_train, device=data.train_x.device) if idx is None else idx
    total = 0.0
    with torch.no_grad():
        for chunk in idx.split(CHUNK):
            out = model(data.prepare(data.train_x[chunk]))
            total += criterion(out, data.train_y[chunk]).item() * len(chunk)
    return total / len(idx)


def full_gradient(model: nn.Module, data: Dataset, idx: Tensor) -> Tensor:
    """``grad F(w)`` over the samples ``idx`` as a flat float64 vector (chunked)."""
    criterion = loss_fn(data)
    params = _params(model)
    acc = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=idx.device)
    for chunk in idx.split(CHUNK):
        loss = criterion(model(data.prepare(data.train_x[chunk])), data.train_y[chunk])
        # Weight each chunk's mean by its share so the sum is the mean over all of idx.
        grads = torch.autograd.grad(loss * (len(chunk) / len(idx)), params)
        acc += _flat(list(grads))
    return acc


def hessian_norm(
    model: nn.Module, data: Dataset, idx: Tensor, iters: int, generator: torch.Generator
) -> float:
    """Power-iteration estimate of ``||H||_2`` of ``F`` over ``idx``: ``||H v||`` at the last
    unit iterate ``v`` (a lower bound of ``||H||_2``, hence of ``L`` in Assumption 1).

    Hessian-vector products by double backward, chunked like :func:`full_gradient`.
    """
    criterion = loss_fn(data)
    params = _params(model)
    sizes = [p.numel() for p in params]
    v = torch.randn(sum(sizes), generator=generator, dtype=torch.float64).to(idx.device)
    v /= v.norm()
    value = 0.0
    for _ in range(iters):
        vs = [t.view_as(p).to(p.dtype) for t, p in zip(v.split(sizes), params, strict=True)]
        hv = torch.zeros_like(v)
        for chunk in idx.split(CHUNK):
            loss = criterion(model(data.prepare(data.train_x[chunk])), data.train_y[chunk])
            grads = torch.autograd.grad(loss * (len(chunk) / len(idx)), params, create_graph=True)
            dot = sum((g * u).sum() for g, u in zip(grads, vs, strict=True))
            # allow_unused: a parameter whose gradient does not depend on the parameters
            # (e.g. a final bias) has a zero Hessian block.
            hvs = torch.autograd.grad(dot, params, allow_unused=True)
            hv += _flat(
                [torch.zeros_like(p) if h is None else h for h, p in zip(hvs, params, strict=True)]
            )
        value = float(hv.norm())
        if value == 0.0 or not math.isfinite(value):
            break
        v = hv / value
    return value


def per_sample_gradient_variance(model: nn.Module, data: Dataset, idx: Tensor) -> float:
    """Variance of the single-sample gradient (Assumption 4) estimated from the samples ``idx``.

    ``E ||g_i - mean g||^2`` over the training set, estimated without bias from a subset drawn
    without replacement: ``sum_i ||g_i - g_bar||^2 / (m - 1) * (n - 1) / n`` for ``m = len(idx)``
    of ``n`` samples; with ``idx`` the whole training set this is exactly the population
    variance ``mean_i ||g_i||^2 - ||mean_i g_i||^2``.  Per-sample gradients come from
    ``torch.func.vmap(grad(...))``; the model must be in eval mode if it has BatchNorm.
    """
    m, n = len(idx), data.n_train
    if m < 2:
        raise ValueError(f"need at least 2 samples for a variance, got {m}")
    criterion = loss_fn(data)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return criterion(out, y.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    total = None
    sq = 0.0
    for chunk in idx.split(PER_SAMPLE_CHUNK):
        g = per_sample(params, data.prepare(data.train_x[chunk]), data.train_y[chunk])
        flat = torch.cat([t.reshape(len(chunk), -1) for t in g.values()], dim=1).double()
        # One pass in float64: the sum and the sum of squares, so memory stays at one chunk.
        s = flat.sum(0)
        total = s if total is None else total + s
        sq += float((flat * flat).sum())
    assert total is not None
    spread = sq - float(total @ total) / m  # sum_i ||g_i - g_bar||^2
    return max(spread, 0.0) / (m - 1) * (n - 1) / n


# --------------------------------------------------------------------------- the estimator


def _default_f_star(cfg: RunConfig, data: Dataset) -> tuple[float, str]:
    if data.task == "regression" and cfg.workload.model == "linear":
        return float(least_squares_constants(data)["F_star"]), "least-squares optimum"
    return 0.0, "0 (loss >= 0)"


def _measure_snapshots(
    cfg: RunConfig,
    model: nn.Module,
    data: Dataset,
    states: list[dict[str, Tensor]],
    m: int,
    full_batch: int | None,
    power_iters: int,
) -> tuple[_PointMeasures, int]:
    """The measures at every snapshot, with the seed's sample subset and power-iteration
    start; also the number of samples in the full-batch gradient."""
    gen = torch.Generator().manual_seed((cfg.seed + _SUBSET_SALT) % 2**63)
    full_idx = _full_batch_indices(data.n_train, full_batch, gen, data.train_x.device)
    power_gen = torch.Generator().manual_seed((cfg.seed + _POWER_SALT) % 2**63)
    probe = _measure_points(model, data, states, full_idx, m, gen, power_iters, power_gen)
    return probe, len(full_idx)


def estimate_constants(
    cfg: RunConfig,
    *,
    probe_steps: int = 50,
    points: int = 5,
    samples_per_point: int = 256,
    F_star: float | None = None,
    device: str | torch.device = "cpu",
    full_batch: int | None = 8192,
    power_iters: int = 10,
) -> Estimates:
    """Estimate ``L`` (Assumption 1), ``M`` (Assumption 4) and ``F_gap`` (for (3.2)).

    Runs :func:`probe_trajectory` and at each of its ``points`` snapshots measures, in eval
    mode: the single-sample gradient variance on ``samples_per_point`` random training samples
    (all of them if that is at least ``n_train``), the full-batch gradient over the training set
    (or a fixed random subset of ``full_batch`` samples when it is larger) and, if
    ``power_iters > 0``, ``||H v||`` after that many Hessian power iterations.

    ``M`` = max over points of the variance; ``L`` = max(largest secant of the full gradient
    between consecutive points, largest Hessian power-iteration value); ``F_gap`` =
    ``max(F(w_1) - F_star, 0)`` with ``F(w_1)`` the loss over the whole training set at the
    initial point and ``F_star`` by default 0, or the least-squares optimum for the synthetic
    least-squares task with the ``linear`` model.
    """
    _check_estimate_options(samples_per_point, power_iters, full_batch)
    data, model, steps, states = probe_trajectory(
        cfg, probe_steps=probe_steps, points=points, device=device
    )
    n = data.n_train
    m = min(samples_per_point, n)
    probe, n_full = _measure_snapshots(cfg, model, data, states, m, full_batch, power_iters)
    L, L_secant, L_hessian = _lipschitz_estimate(probe)

    F_star, f_star_how = _default_f_star(cfg, data) if F_star is None else (F_star, "given")
    F_star = float(F_star)
    F0, variances = probe.F0, probe.variances
    values = [L, *variances, F0]
    if not all(math.isfinite(v) for v in values):
        raise RuntimeError(f"non-finite estimate (L={L}, M={variances}, F0={F0})")

    L_method, M_method = _estimate_methods(n_full, n, m, power_iters)
    return Estimates(
        L=L,
        M=max(variances),
        F_gap=max(F0 - F_star, 0.0),
        F0=F0,
        F_star=F_star,
        F_star_method=f_star_how,
        L_method=L_method,
        M_method=M_method,
        points=len(states),
        probe_steps=probe_steps,
        n_train=n,
        L_secant=L_secant,
        L_hessian=L_hessian,
        M_per_point=variances,
        steps_at_points=steps,
    )


def _check_estimate_options(
    samples_per_point: int, power_iters: int, full_batch: int | None
) -> None:
    if samples_per_point < 2:
        raise ValueError(f"samples_per_point must be >= 2, got {samples_per_point}")
    if power_iters < 0:
        raise ValueError(f"power_iters must be >= 0, got {power_iters}")
    if full_batch is not None and full_batch < 1:
        raise ValueError(f"full_batch must be >= 1 or None, got {full_batch}")


def _full_batch_indices(
    n: int, full_batch: int | None, gen: torch.Generator, dev: torch.device
) -> Tensor:
    """The training samples of every full-batch loss and gradient of the probe."""
    if full_batch is None or full_batch >= n:
        return torch.arange(n, device=dev)
    # One fixed subset for every point: secants must compare the same function F.
    return torch.randperm(n, generator=gen)[:full_batch].to(dev)


@dataclass
class _PointMeasures:
    """What estimate_constants measures at the probe's points, in the points' order."""

    F0: float = math.nan  # full training loss at the first point
    flats: list[Tensor] = field(default_factory=list)  # flattened parameters
    grads: list[Tensor] = field(default_factory=list)  # full-batch gradients
    variances: list[float] = field(default_factory=list)  # single-sample gradient variances
    hessians: list[float] = field(default_factory=list)  # ||H v|| (empty without power_iters)


def _measure_points(
    model: nn.Module,
    data: Dataset,
    states: list[dict[str, Tensor]],
    full_idx: Tensor,
    m: int,
    gen: torch.Generator,
    power_iters: int,
    power_gen: torch.Generator,
) -> _PointMeasures:
    """Loads each of ``states`` into ``model`` (eval mode) and measures it; ``m`` samples
    (drawn from ``gen`` unless they are all of them) give each point's variance."""
    n = data.n_train
    dev = data.train_x.device
    model.eval()
    out = _PointMeasures()
    for i, state in enumerate(states):
        model.load_state_dict(state)
        if i == 0:
            out.F0 = full_loss(model, data)
        out.flats.append(_flat([p.detach() for p in _params(model)]))
        out.grads.append(full_gradient(model, data, full_idx))
        sub = torch.arange(n) if m >= n else torch.randperm(n, generator=gen)[:m]
        out.variances.append(per_sample_gradient_variance(model, data, sub.to(dev)))
        if power_iters:
            out.hessians.append(hessian_norm(model, data, full_idx, power_iters, power_gen))
    return out


def _lipschitz_estimate(probe: _PointMeasures) -> tuple[float, float | None, float | None]:
    """``(L, L_secant, L_hessian)``: L is the larger of the largest secant of the full-batch
    gradient between consecutive points and the largest Hessian power-iteration value."""
    flats, grads = probe.flats, probe.grads
    secants = []
    for a in range(len(flats) - 1):
        dw = float((flats[a + 1] - flats[a]).norm())
        if dw > 0.0:
            secants.append(float((grads[a + 1] - grads[a]).norm()) / dw)
    L_secant = max(secants) if secants else None
    L_hessian = max(probe.hessians) if probe.hessians else None
    candidates = [v for v in (L_secant, L_hessian) if v is not None]
    if not candidates:
        raise RuntimeError("the probe did not move the model; cannot estimate L by secants")
    return max(candidates), L_secant, L_hessian


def _estimate_methods(n_full: int, n: int, m: int, power_iters: int) -> tuple[str, str]:
    """``(L_method, M_method)``: how L and M were measured, for :class:`Estimates`."""
    full_desc = f"{n_full} of {n} samples"
    L_method = f"max secant of full-batch gradients ({full_desc}) over consecutive points"
    if power_iters:
        L_method += f", and Hessian power iteration ({power_iters} iters)"
    sub_desc = "all" if m >= n else f"{m} random"
    M_method = (
        f"variance of per-sample gradients (torch.func vmap(grad), {sub_desc} of {n} samples, "
        f"eval mode), max over points"
    )
    return L_method, M_method


# --------------------------------------------------------------------------- prediction


def _n_train(cfg: RunConfig, est: Estimates) -> int:
    if est.n_train is not None:
        return int(est.n_train)
    return load_data(cfg).n_train


def _kopt_under_conditions(args: tuple, k_max: int) -> tuple[int, bool, str]:
    """K_opt of (3.46) over the K meeting (3.1) and K <= step budget, or, when none does,
    B(K) minimised without them: (K_opt, whether the conditions hold, a note)."""
    L, gamma, step_budget, delta = args[1], args[3], args[6], args[7]
    try:
        kopt = theory.predict_kopt(*args, k_max=k_max)
        k_ok = max(
            k for k in range(1, k_max + 1)
            if k <= step_budget and theory.stepsize_ok(L, gamma, k, delta)
        )  # fmt: skip
    except ValueError as exc:
        kopt = theory.predict_kopt(*args, k_max=k_max, enforce_conditions=False)
        return kopt, False, f"B(K) minimised without Theorem 3.1's conditions: {exc}"
    return kopt, True, f"(3.1) and K <= step budget hold for K <= {k_ok}"


def predict_for_config(
    cfg: RunConfig,
    est: Estimates,
    P_values: list[int],
    *,
    delta: float = 0.5,
    k_max: int = 1024,
) -> list[dict[str, Any]]:
    """Predicted K_opt (3.46) per P from the estimated constants (Theorem 3.4).

    For each P: ``gamma = lr.initial``, ``B`` = per-learner batch size, ``step_budget`` = local
    steps per learner over the epoch budget (``steps_from_samples(epochs * n_train, B, P)``, the
    paper's S). K_opt is ``theory.predict_kopt`` over the K that satisfy (3.1) and
    ``K <= step_budget``; when no K does (common
    for neural networks, whose L makes ``L gamma`` large) it falls back to minimising B(K) of
    (3.44) over all ``1..k_max`` and the row says ``conditions_hold=False`` with the reason.

    Each row: ``P``, ``predicted_kopt`` (int), ``conditions_hold``, ``note``, ``curve``
    (``[[K, B(K)], ...]`` for K = 1, 2, 4, ... <= k_max), ``kopt_greater_than_one`` ((3.47),
    with the same conditions as ``predicted_kopt``), ``step_budget``, ``gamma``, ``B``.
    """
    wl = cfg.workload
    gamma, B = float(wl.lr.initial), int(wl.batch_size)
    n_train = _n_train(cfg, est)
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"k_max must be an integer >= 1, got {k_max!r}")
    ks = [2**i for i in range(k_max.bit_length())]  # 1, 2, 4, ... <= k_max
    rows: list[dict[str, Any]] = []
    for P in P_values:
        step_budget = theory.steps_from_samples(wl.epochs * n_train, B, P)
        args = (est.F_gap, est.L, est.M, gamma, B, P, step_budget, delta)
        kopt, hold, note = _kopt_under_conditions(args, k_max)
        notes = [note]
        if wl.momentum > 0 or wl.weight_decay > 0:
            notes.append("Theorem 3.1 is for plain SGD: momentum and weight decay are not modelled")
        if wl.lr.halve_every_epochs is not None:
            notes.append("gamma = lr.initial (the halving schedule is not modelled)")
        alpha, beta, eta = theory.bound_coefficients(*args)
        curve = theory.bound_curve(ks, alpha, beta, eta, delta)
        rows.append(
            {
                "P": int(P),
                "predicted_kopt": int(kopt),
                "conditions_hold": hold,
                "note": "; ".join(notes),
                "curve": [[k, v] for k, v in zip(ks, curve, strict=True)],
                "kopt_greater_than_one": theory.kopt_greater_than_one(
                    *args, enforce_conditions=hold
                ),
                "step_budget": step_budget,
                "gamma": gamma,
                "B": B,
            }
        )
    return rows
