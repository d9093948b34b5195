"""The training recipe of issue #26 (docs/design.md section 1, "Learning rate", "Training
recipe", "Budget"): learning-rate schedules per optimizer step, gradient clipping and
accumulation, precision, step budgets, throughput; the same on every engine and on resume."""

from __future__ import annotations

import copy
import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from kavg_ray.config import LRConfig, RunConfig, parse_run
from kavg_ray.errors import ConfigError
from kavg_ray.launch.sweep import trial_row
from kavg_ray.train import train
from kavg_ray.train.data import epoch_indices
from kavg_ray.train.loop import Budget, run_epochs
from kavg_ray.train.parameter_server import ParameterServer, initial_params
from kavg_ray.train.run import build_engine
from kavg_ray.train.workload import build_workload, clip_rows

from ..distributed import run_distributed

CPU = torch.device("cpu")
DIGITS = {"dataset": "digits", "model": "mlp", "epochs": 2, "batch_size": 64,
          "lr": {"initial": 0.1}}  # fmt: skip
ENGINES = {
    "process-group": {"K": 4, "P": 1},
    "stacked": {"K": 4, "P": 2, "backend": "simulated"},
    "parameter-server": {"algorithm": "downpour", "fetch_period": 2, "push_period": 2},
}
COSINE = {"initial": 0.2, "schedule": "cosine", "warmup_steps": 5, "min_lr": 0.01}


def _cfg(doc: dict, **workload) -> RunConfig:
    return RunConfig.model_validate({"workload": {**DIGITS, **workload}, "seed": 1, **doc})


def _run(cfg: RunConfig, resume: dict | None = None, engine=None) -> list[tuple[dict, dict]]:
    server = None
    if cfg.algorithm in ("downpour", "eamsgd"):
        server = ParameterServer(initial_params(cfg))
    reports: list = []
    if engine is not None:
        run_epochs(cfg, engine, lambda m, s: reports.append((m, copy.deepcopy(s))), resume)
    else:
        train(cfg, lambda m, s: reports.append((m, copy.deepcopy(s))), server=server,
              resume=resume)  # fmt: skip
    return reports


# --- 1. learning-rate schedules ---------------------------------------------------------


def test_schedule_values_at_given_steps() -> None:
    total, spe = 25, 10
    cos = LRConfig(**COSINE)
    # Warm-up: (s + 1) / W of the peak; then the cosine from 0.2 down to min_lr over 20 steps.
    assert [cos.at_step(s, total, spe) for s in range(5)] == [0.2 * (s + 1) / 5 for s in range(5)]
    assert cos.at_step(5, total, spe) == 0.2
    assert cos.at_step(15, total, spe) == pytest.approx(0.105, rel=1e-15)  # halfway
    assert cos.at_step(25, total, spe) == pytest.approx(0.01, rel=1e-15)
    assert cos.at_step(24, total, spe) == 0.01 + 0.19 * 0.5 * (1 + math.cos(math.pi * 19 / 20))
    lin = LRConfig(initial=0.1, schedule="linear", warmup_steps=2)
    assert [lin.at_step(s, 12, spe) for s in (0, 1, 2, 7, 12)] == [
        0.1 * 1 / 2, 0.1 * 2 / 2, 0.1, 0.1 - 0.1 * 0.5, 0.0,
    ]  # fmt: skip
    step = LRConfig(initial=0.8, halve_every_epochs=2, warmup_steps=4)
    assert [step.at_step(s, 100, spe) for s in (0, 3, 4, 19, 20, 39, 40)] == [
        0.8 / 4, 0.8, 0.8, 0.8, 0.4, 0.4, 0.2,
    ]  # fmt: skip
    const = LRConfig(initial=0.3, warmup_steps=3)
    want = [0.3 * 1 / 3, 0.3 * 2 / 3, 0.3, 0.3, 0.3]
    assert [const.at_step(s, 10, spe) for s in range(5)] == want
    # The schedule the existing keys meant: the same floats, step by step.
    old = LRConfig(initial=0.1, halve_every_epochs=1)
    assert old.kind == "step" and LRConfig(initial=0.1).kind == "constant"
    assert [old.at_step(s, 30, spe) for s in range(30)] == [
        old.at_epoch(s // spe) for s in range(30)
    ]


@pytest.mark.parametrize(
    ("lr", "message"),
    [
        ({"initial": 0.1, "schedule": "step"}, "schedule step needs halve_every_epochs"),
        ({"initial": 0.1, "schedule": "cosine", "halve_every_epochs": 2},
         "halve_every_epochs belongs to schedule step, not cosine"),
        ({"initial": 0.1, "min_lr": 0.01}, "min_lr belongs to schedules cosine and linear"),
        ({"initial": 0.1, "schedule": "cosine", "min_lr": 0.2}, "min_lr 0.2 is above initial"),
        ({"initial": 0.1, "schedule": "exp"}, "lr.schedule: Input should be"),
        ({"initial": 0.1, "warmup_steps": -1}, "lr.warmup_steps: Input should be greater"),
    ],
)  # fmt: skip
def test_bad_schedules_are_refused_in_one_line(lr: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        parse_run({"workload": {"lr": lr}, "K": 1})
    assert "\n" not in str(err.value)


def test_budget_pieces_and_rates_are_a_function_of_the_step() -> None:
    cfg = _cfg({"K": 1}, lr=COSINE, epochs=3)
    budget = Budget(cfg, 7)
    assert (
        budget.total == 21 and budget.next_evaluation(0) == 7 and budget.next_evaluation(20) == 21
    )
    assert budget.pieces(5, 16) == [(0, 5, 7), (1, 0, 7), (2, 0, 2)]
    whole = [r for e, a, b in budget.pieces(0, 21) for r in budget.rates(e, a, b)]
    split = [
        r for e, a, b in budget.pieces(0, 9) + budget.pieces(9, 21) for r in budget.rates(e, a, b)
    ]
    assert whole == split == [cfg.workload.lr.at_step(s, 21, 7) for s in range(21)]


def _recording(engine) -> list[float]:
    """The rate of every optimizer step the engine takes."""
    seen: list[float] = []
    inner = engine.train_steps

    def train_steps(epoch, first, end, lrs):
        assert len(lrs) == end - first
        seen.extend(lrs)
        return inner(epoch, first, end, lrs)

    engine.train_steps = train_steps
    return seen


@pytest.mark.parametrize("name", list(ENGINES))
def test_each_step_gets_its_rate_on_every_engine_and_on_resume(name: str) -> None:
    cfg = _cfg(ENGINES[name], lr=COSINE)
    server = None
    if cfg.algorithm == "downpour":
        server = ParameterServer(initial_params(cfg))
    engine = build_engine(cfg, 0, 1, CPU, server)
    rates = _recording(engine)
    full = _run(cfg, engine=engine)
    spe = engine.steps_per_epoch
    assert rates == [cfg.workload.lr.at_step(s, 2 * spe, spe) for s in range(2 * spe)]
    assert [m["lr"] for m, _ in full] == [rates[spe - 1], rates[-1]]
    # Resumed after epoch 1: the second epoch's rates again, and (one learner per process,
    # no server arrival order) the same run.
    if server is not None:
        server = ParameterServer(initial_params(cfg))
    again = build_engine(cfg, 0, 1, CPU, server)
    resumed_rates = _recording(again)
    rest = _run(cfg, resume=full[0][1], engine=again)
    assert resumed_rates == rates[spe:]
    assert rest[-1][0]["test_loss"] == full[-1][0]["test_loss"]
    assert rest[-1][0]["train_loss"] == full[-1][0]["train_loss"]


# --- 2. gradient clipping and accumulation ----------------------------------------------

RECIPE = {"grad_clip": 0.5, "grad_accum": 3, "batch_size": 16, "momentum": 0.9, "epochs": 1,
          "lr": {"initial": 0.2, "schedule": "linear", "warmup_steps": 3}}  # fmt: skip


def _by_hand(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """One learner's epoch (P = 1: averages change nothing) as a plain torch loop."""
    wl = cfg.workload
    work = build_workload(cfg, CPU)
    model, data = work.model, work.data
    opt = torch.optim.SGD(model.parameters(), lr=wl.lr.initial, momentum=wl.momentum)
    B, N = wl.batch_size, wl.grad_accum
    steps = epoch_indices(data.n_train, B * N, 0, 1, 0, cfg.seed)
    for s, idx in enumerate(steps):
        for g in opt.param_groups:
            g["lr"] = wl.lr.at_step(s, len(steps), len(steps))
        opt.zero_grad()
        for micro in idx.split(B):
            loss = F.cross_entropy(model(data.train_x[micro]), data.train_y[micro]) / N
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), wl.grad_clip)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_clipping_and_accumulation_equal_a_hand_written_loop() -> None:
    cfg = _cfg({"K": 1, "P": 1}, **RECIPE)
    ((metrics, state),) = _run(cfg)
    want = _by_hand(cfg)
    got = state["engine"]["model"]
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    # samples count every micro-batch: steps x grad_accum x B
    assert metrics["samples"] == (1437 // 48) * 48 and metrics["step"] == 1437 // 48


def test_stacked_learners_are_clipped_each_by_its_own_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, 5, generator=gen), torch.randn(3, 7, generator=gen)]
    grads[0][1] *= 1e-3  # learner 1 is under the norm: untouched
    grads[1][1] *= 1e-3
    want = []
    for r in range(3):
        row = [g[r].clone() for g in grads]
        torch.nn.utils.clip_grad_norm_(row, 1.0)  # plain tensors: clip their .grad
        want.append(row)
    rows = [g.clone() for g in grads]
    params = [[torch.nn.Parameter(g[r].clone()) for g in grads] for r in range(3)]
    for r, ps in enumerate(params):
        for p, g in zip(ps, grads, strict=True):
            p.grad = g[r].clone()
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
    clip_rows(rows, 1.0)
    for r in range(3):
        for t, p in zip(rows, params[r], strict=True):
            torch.testing.assert_close(t[r], p.grad, rtol=0, atol=1e-7)
    assert torch.equal(rows[0][1], grads[0][1]) and torch.equal(rows[1][1], grads[1][1])


def _real_recipe(rank: int, world: int, doc: dict, out: str) -> None:
    cfg = RunConfig.model_validate(doc)
    states: list = []
    train(cfg, lambda m, s: states.append(s), rank=rank, world_size=world)
    torch.save(states[-1]["engine"]["model"], os.path.join(out, f"rank{rank}.pt"))


def test_real_p2_gloo_equals_simulated_with_the_recipe() -> None:
    doc = {"workload": {**DIGITS, **RECIPE}, "seed": 3, "K": 2, "P": 2}
    with tempfile.TemporaryDirectory() as out:
        run_distributed(_real_recipe, 2, doc, out)
        real = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    ((_m, state),) = _run(RunConfig.model_validate({**doc, "backend": "simulated"}))
    sim = state["engine"]["params"]
    for r in range(2):
        for name, t in sim.items():
            torch.testing.assert_close(real[r][name], t[r], rtol=0, atol=1e-6)
    # and one stacked learner is the hand-written loop
    one_learner = {**doc, "K": 1, "P": 1}
    ((_m, state1),) = _run(RunConfig.model_validate({**one_learner, "backend": "simulated"}))
    one = _by_hand(RunConfig.model_validate(one_learner))
    for name, t in state1["engine"]["params"].items():
        torch.testing.assert_close(t[0], one[name], rtol=0, atol=1e-6)


# --- 3. precision -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ENGINES))
def test_bf16_on_cpu_learns_keeps_fp32_parameters_and_says_so(name: str) -> None:
    cfg = _cfg(ENGINES[name], precision="bf16", epochs=3, grad_clip=1.0)
    reports = _run(cfg)
    losses = [m["train_loss"] for m, _ in reports]
    tests = [m["test_loss"] for m, _ in reports]
    assert losses == sorted(losses, reverse=True) and tests == sorted(tests, reverse=True)
    assert reports[-1][0]["test_acc"] > 0.6, reports[-1][0]["test_acc"]
    # autocast was on: fp32 takes other steps
    fp32 = _run(_cfg(ENGINES[name], epochs=1, grad_clip=1.0))
    assert fp32[0][0]["train_loss"] != losses[0]
    engine_state = reports[-1][1]["engine"]
    tensors = (
        engine_state.get("model") or engine_state.get("params") or {"local": engine_state["local"]}
    )
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    row = trial_row("s", "t", cfg, [m for m, _ in reports], "completed")
    assert row["precision"] == "bf16" and row["grad_clip"] == 1.0


def test_fp16_runs_on_the_process_group_engine_with_a_scaler() -> None:
    cfg = _cfg({"K": 2, "P": 1}, precision="fp16", epochs=2)
    reports = _run(cfg)
    assert reports[-1][0]["train_loss"] < reports[0][0]["train_loss"]
    assert reports[-1][1]["engine"]["scaler"]["scale"] > 0


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"backend": "simulated", "workload": {"precision": "fp16"}},
         "fp16 needs a gradient scaler, which only the process-group engine"),
        ({"algorithm": "downpour", "workload": {"precision": "fp16"}},
         "fp16 needs a gradient scaler"),
        ({"workload": {"tf32": True}}, "workload.tf32 is for CUDA"),
        ({"workload": {"precision": "fp8"}}, "workload.precision: Input should be"),
        ({"workload": {"grad_clip": 0}}, "workload.grad_clip: Input should be greater than 0"),
        ({"workload": {"grad_accum": 0}}, "workload.grad_accum: Input should be greater"),
    ],
)  # fmt: skip
def test_recipe_keys_an_engine_cannot_honour_are_refused(doc: dict, message: str) -> None:
    doc = {"K": 1, **doc} if doc.get("algorithm") is None else doc
    with pytest.raises(ConfigError, match=message) as err:
        parse_run(doc)
    assert "\n" not in str(err.value)


# --- 4. step budgets --------------------------------------------------------------------

LM = {
    "dataset": "text", "model": "gpt", "batch_size": 8, "steps": 9, "eval_every_steps": 4,
    "dataset_args": {"chars": 20_000, "seq_len": 32},
    "model_args": {"dim": 32, "layers": 1, "heads": 2},
    "lr": {"initial": 0.3, "schedule": "cosine", "warmup_steps": 3, "min_lr": 0.03},
    "momentum": 0.9, "precision": "bf16", "grad_clip": 1.0,
}  # fmt: skip
LM_ENGINES = {
    "process-group": {"K": 2, "P": 1},
    "stacked": {"K": 2, "P": 2, "backend": "simulated"},
    "parameter-server": {"algorithm": "downpour", "fetch_period": 2, "push_period": 1},
}


@pytest.mark.parametrize("name", list(LM_ENGINES))
def test_a_step_budget_shorter_than_an_epoch_evaluates_checkpoints_and_resumes(name: str) -> None:
    from kavg_ray.launch.ray_train import checkpoint_due

    cfg = RunConfig.model_validate({"workload": LM, "seed": 0, **LM_ENGINES[name]})
    full = _run(cfg)
    spe = 562 // (8 * cfg.P)  # (18,000 - 1) // 32 training sequences
    assert spe > 9
    assert [m["step"] for m, _ in full] == [4, 8, 9]
    assert [m["epoch"] for m, _ in full] == [4 / spe, 8 / spe, 9 / spe]
    assert [m["samples"] for m, _ in full] == [s * 8 * cfg.P for s in (4, 8, 9)]
    assert [m["tokens"] for m, _ in full] == [s * 8 * cfg.P * 32 for s in (4, 8, 9)]
    assert all(s is not None and m["samples_per_s"] > 0 for m, s in full)
    assert full[-1][0]["tokens_per_s"] == pytest.approx(32 * full[-1][0]["samples_per_s"])
    assert full[0][0]["lr"] == cfg.workload.lr.at_step(3, 9, spe)
    assert [checkpoint_due(cfg, m["epoch"], False, m["step"]) for m, _ in full] == [True] * 3
    # Resumed from the step-4 checkpoint (inside epoch 1): the rest of the run, the same.
    rest = _run(cfg, resume=full[0][1])
    assert [m["step"] for m, _ in rest] == [8, 9]
    for (a, _), (b, _) in zip(rest, full[1:], strict=True):
        assert (a["train_loss"], a["test_loss"], a["test_acc"]) == (
            b["train_loss"], b["test_loss"], b["test_acc"],
        )  # fmt: skip
    row = trial_row("s", "t", cfg, [m for m, _ in full], "completed")
    assert row["steps"] == 9 and row["step"] == 9 and row["tokens"] == full[-1][0]["tokens"]
    from kavg_ray.launch.sweep import _status

    assert _status(cfg, [m for m, _ in full]) == "completed"
    assert _status(cfg, [m for m, _ in full[:2]]) == "failed"


def test_step_budget_keys_are_checked_in_one_line() -> None:
    for doc, message in (
        ({"epochs": 2, "steps": 5}, "give epochs or steps, not both"),
        ({"eval_every_steps": 5}, "eval_every_steps needs a step budget"),
        ({"steps": 0}, "workload.steps: Input should be greater than or equal to 1"),
    ):
        with pytest.raises(ConfigError, match=message) as err:
            parse_run({"workload": doc, "K": 1})
        assert "\n" not in str(err.value)
    assert parse_run({"workload": {"steps": 5}, "K": 1}).workload.step_budget


def test_the_recipe_keys_are_grid_keys_and_trial_columns() -> None:
    from kavg_ray.config import parse_sweep

    spec = parse_sweep({
        "workload": {"steps": 20, "lr": {"initial": 0.1, "warmup_steps": 2}},
        "backend": "simulated", "P": 2,
        "grid": {"K": [1, 4], "precision": ["fp32", "bf16"], "grad_clip": [0.5, 1.0],
                 "grad_accum": [1, 2], "lr_schedule": ["constant", "cosine"]},
    })  # fmt: skip
    points = spec.points()
    assert len({p.trial_name() for p in points}) == len(points) == 32
    last = points[-1]
    tail = "-precisionbf16-grad_clip1.0-grad_accum2-lr_schedulecosine-sim"
    assert last.trial_name() == "K4-P2-s0" + tail
    wl = last.workload
    assert (wl.precision, wl.grad_clip, wl.grad_accum, wl.lr.kind) == ("bf16", 1.0, 2, "cosine")
    row = trial_row("s", "t", last, [], "failed")
    assert {k: row[k] for k in ("precision", "grad_clip", "grad_accum", "lr_schedule",
                                "lr_warmup_steps", "steps")} == {
        "precision": "bf16", "grad_clip": 1.0, "grad_accum": 2, "lr_schedule": "cosine",
        "lr_warmup_steps": 2, "steps": 20,
    }  # fmt: skip


# --- 5. an optimizer of one's own -------------------------------------------------------


def heavy_ball(params, lr):
    """An optimizer factory: SGD with momentum 0.5."""
    return torch.optim.SGD(params, lr=lr, momentum=0.5)


def not_an_optimizer(params, lr):
    return [params, lr]


def broken(params, lr):
    raise RuntimeError("no such optimizer here")


def test_an_optimizer_factory_by_import_path_runs_on_the_process_group_engine() -> None:
    from kavg_ray.train.workload import check_workload

    doc = {"K": 2, "P": 1}
    mine = _cfg(doc, optimizer="tests.train.test_recipe:heavy_ball", lr=COSINE)
    check_workload(mine)
    built_in = _cfg(doc, momentum=0.5, lr=COSINE)
    a, b = _run(mine), _run(built_in)
    assert [m["test_loss"] for m, _ in a] == [m["test_loss"] for m, _ in b]
    assert trial_row("s", "t", mine, [m for m, _ in a], "completed")["optimizer"] == (
        "tests.train.test_recipe:heavy_ball"
    )
    torch_own = _cfg(doc, optimizer="torch.optim:RMSprop", lr={"initial": 0.001})
    check_workload(torch_own)
    assert _run(torch_own)[-1][0]["train_loss"] < 2.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.train.nowhere:make", "cannot import tests.train.nowhere"),
        ("tests.train.test_recipe:absent", "has no attribute 'absent'"),
        ("tests.train.test_recipe:COSINE", "is not callable"),
        ("tests.train.test_recipe:not_an_optimizer", "returned a list of 2, expected a torch"),
        ("tests.train.test_recipe:broken", "the factory raised RuntimeError: no such optimizer"),
    ],
)
def test_bad_optimizer_factories_are_refused_before_launch(spec: str, message: str) -> None:
    from kavg_ray.train.workload import check_workload

    with pytest.raises(ConfigError, match=message) as err:
        check_workload(_cfg({"K": 1}, optimizer=spec))
    assert str(err.value).startswith(f"workload.optimizer '{spec}': ")
    assert "\n" not in str(err.value)


def test_engines_without_an_optimizer_factory_refuse_it_in_one_line() -> None:
    with pytest.raises(ConfigError, match="implements sgd and adamw only: use backend ray") as err:
        parse_run({"workload": {"optimizer": "torch.optim:RMSprop"}, "K": 1,
                   "backend": "simulated"})  # fmt: skip
    assert "\n" not in str(err.value)
    # The parameter server runs a factory (tests/train/test_parameter_server.py), not adamw.
    with pytest.raises(ConfigError, match="runs SGD locally: optimizer must be sgd or a factory"):
        parse_run({"workload": {"optimizer": "adamw"}, "algorithm": "downpour"})
    with pytest.raises(ConfigError, match="a factory 'module.path:function'"):
        parse_run({"workload": {"optimizer": "lamb"}, "K": 1})
