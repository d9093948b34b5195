"""The outer optimizer and the warm-up (DiLoCo, SlowMo, post-local SGD; docs/design.md section 9).

Real averages are checked in spawned gloo processes against an independent reference: an
anchor model stepped by ``torch.optim.SGD`` with the gradient ``anchor - mean of the
learners``, the mean computed here from every rank's gathered parameters.
"""

from __future__ import annotations

import copy
import itertools

import pandas as pd
import pytest
import torch
import torch.distributed as dist
from torch import nn

from kavg_ray.config import ConfigError, RunConfig, parse_run
from kavg_ray.train import outer as outer_module
from kavg_ray.train import train
from kavg_ray.train.averaging import AveragingSchedule, HierAvgAverager, KAvgAverager
from kavg_ray.train.loop import run_epochs
from kavg_ray.train.outer import pieces
from kavg_ray.train.stacked import StackedEngine

from .distributed import run_distributed

CPU = torch.device("cpu")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _local_step(model: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    """One optimizer step on this rank's batch of ``step``."""
    x, y = _batch(rank, step)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _gathered(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """``t`` of every rank, in rank order."""
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return out


def _outer_matches_reference(
    rank: int, world: int, outer: dict, warmup: int, block: int | None = None
) -> None:
    if block is not None:  # small blocks: the 83 parameters travel in several pieces
        outer_module.OUTER_BLOCK = block
    K, steps = 3, 22
    model = _model()
    reference = copy.deepcopy(model)  # the anchor, stepped by torch's own SGD
    ref_opt = torch.optim.SGD(
        reference.parameters(), lr=outer["outer_lr"], momentum=outer["outer_momentum"],
        nesterov=outer["nesterov"],
    )  # fmt: skip
    avg = KAvgAverager(model, K, warmup_steps=warmup, **outer)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    averages = 0
    for step in range(1, steps + 1):
        _local_step(model, opt, rank, step)
        mine = _flat_params(model)
        gathered = _gathered(mine, world)
        averaged = avg.step()
        assert averaged == (step <= warmup or (step - warmup) % K == 0)
        if not averaged:
            continue
        averages += 1
        mean = torch.stack(gathered).mean(0)
        offset = 0
        for p in reference.parameters():
            n = p.numel()
            p.grad = p.detach() - mean[offset : offset + n].view_as(p)
            offset += n
        ref_opt.step()
        torch.testing.assert_close(_flat_params(model), _flat_params(reference), rtol=0, atol=1e-6)
    assert averages >= 6


OUTERS = {
    "diloco": {"outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True},
    "slowmo": {"outer_lr": 1.0, "outer_momentum": 0.5, "nesterov": False},
    "lr-only": {"outer_lr": 1.3, "outer_momentum": 0.0, "nesterov": False},
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(OUTERS))
def test_outer_step_equals_torch_sgd_on_the_anchor(world: int, name: str) -> None:
    run_distributed(_outer_matches_reference, world, OUTERS[name], 2 if name == "slowmo" else 0)


@pytest.mark.parametrize("world", [2, 3])
def test_outer_average_in_pieces_equals_torch_sgd_on_the_anchor(world: int) -> None:
    """Blocks of 8 elements: the parameters go in 8 asynchronous pieces, each stepped as
    it arrives (sizes 10 or 11, so pieces straddle blocks and tensors)."""
    run_distributed(_outer_matches_reference, world, OUTERS["diloco"], 0, 8)


def test_pieces_cover_the_buffer_exactly() -> None:
    B = outer_module.OUTER_BLOCK
    assert pieces(83, 83) == [(0, 83)]  # a small model: one piece
    assert pieces(83, 90) == [(0, 83), (83, 90)]  # the floating buffers: a piece of their own
    assert pieces(3 * B, 3 * B) == [(0, B), (B, 2 * B), (2 * B, 3 * B)]
    n = 20 * B + 5
    assert pieces(n, n + 4) == [(n * i // 8, n * (i + 1) // 8) for i in range(8)] + [(n, n + 4)]


def _buffers_stay_plain_under_the_outer_step(rank: int, world: int) -> None:
    outer_module.OUTER_BLOCK = 4  # several pieces, then BatchNorm's running stats as the last
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    avg = KAvgAverager(model, 2, outer_lr=0.7, outer_momentum=0.9, nesterov=True)
    assert len(pieces(avg.n_params, avg.flat.buffer.numel())) == 9
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 7):
        _local_step(model, opt, rank, step)
        stats = torch.cat([model[1].running_mean, model[1].running_var])
        gathered = _gathered(stats, world)
        if avg.step():
            mean = torch.stack(gathered).mean(0)
            now = torch.cat([model[1].running_mean, model[1].running_var])
            torch.testing.assert_close(now, mean, rtol=0, atol=1e-6)
            mine = _flat_params(model)
            others = _gathered(mine, world)
            assert all(torch.equal(o, mine) for o in others)  # one anchor on every learner
    assert avg.stats.count == 3 and avg.stats.bytes == 3 * avg.flat.nbytes


def test_floating_buffers_are_averaged_plainly_beside_the_outer_step() -> None:
    run_distributed(_buffers_stay_plain_under_the_outer_step, 2)


def _defaults_are_one_plain_average(rank: int, world: int) -> None:
    model = _model()
    avg = KAvgAverager(model, 2, outer_lr=1.0, outer_momentum=0.0)
    assert avg.anchor is None and avg.outer_momentum is None  # no copy of the model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 9):
        _local_step(model, opt, rank, step)
        expected = avg.flat.buffer.clone()
        dist.all_reduce(expected)
        expected.div_(world)
        if avg.step():
            assert torch.equal(avg.flat.buffer, expected)  # bit for bit, the whole buffer
    assert avg.stats.count == 4


def test_defaults_are_todays_kavg_bit_for_bit() -> None:
    run_distributed(_defaults_are_one_plain_average, 2)


def _hier_outer_at_global_averages(rank: int, world: int) -> None:
    model = _model()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    avg = HierAvgAverager(model, 2, 4, 2, outer_lr=0.7, outer_momentum=0.9, nesterov=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 13):
        _local_step(model, opt, rank, step)
        mine = _flat_params(model)
        gathered = _gathered(mine, world)
        action = avg.step()
        if action == "local":  # plain: the mean of this rank's group of two
            group = rank // 2 * 2
            want = (gathered[group] + gathered[group + 1]) / 2
            torch.testing.assert_close(_flat_params(model), want, rtol=0, atol=1e-6)
        elif action == "global":
            mean = torch.stack(gathered).mean(0)
            offset = 0
            for p in reference.parameters():
                p.grad = p.detach() - mean[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            ref_opt.step()
            torch.testing.assert_close(
                _flat_params(model), _flat_params(reference), rtol=0, atol=1e-6
            )


def test_hier_avg_applies_the_outer_step_at_global_averages_only() -> None:
    run_distributed(_hier_outer_at_global_averages, 4)


@pytest.mark.parametrize(
    ("warmup", "K", "averaging_steps"),
    [
        (0, 3, [3, 6, 9, 12]),
        (2, 3, [1, 2, 5, 8, 11]),
        (4, 4, [1, 2, 3, 4, 8, 12]),
        (5, 1, list(range(1, 13))),
        (12, 5, list(range(1, 13))),
        (1, 6, [1, 7]),
    ],
)
def test_warmup_schedule(warmup: int, K: int, averaging_steps: list[int]) -> None:
    schedule = AveragingSchedule(K, warmup_steps=warmup)
    assert [s for s in range(1, 13) if schedule.action(s) == "global"] == averaging_steps
    avg = KAvgAverager(_model(), K, warmup_steps=warmup)  # one process: counts only
    assert [s for s in range(1, 13) if avg.step()] == averaging_steps


def test_warmup_schedule_of_hier_avg() -> None:
    schedule = AveragingSchedule(4, 2, warmup_steps=2)
    actions = {s: schedule.action(s) for s in range(1, 13)}
    assert [s for s, a in actions.items() if a == "global"] == [1, 2, 6, 10]
    assert [s for s, a in actions.items() if a == "local"] == [4, 8, 12]


WORKLOAD = {"dataset": "digits", "model": "mlp", "epochs": 2, "batch_size": 16,
            "lr": {"initial": 0.1}, "momentum": 0.5}  # fmt: skip
DILOCO = {"lr": 0.7, "momentum": 0.9, "nesterov": True}


@pytest.mark.parametrize("backend", ["simulated", "ray"])
def test_resume_in_the_middle_of_a_round_equals_an_uninterrupted_run(backend: str) -> None:
    """K = 5 does not divide an epoch's 44 (P = 1) or 22 (P = 2) steps: the checkpoint after
    epoch 1 falls inside a round, with the anchor and outer momentum mid-flight."""
    P = 2 if backend == "simulated" else 1
    doc = {"workload": WORKLOAD, "K": 5, "P": P, "backend": backend, "outer": DILOCO,
           "warmup_steps": 3, "seed": 4}  # fmt: skip
    cfg = RunConfig.model_validate(doc)
    full: list = []  # states copied as reported: the stacked engine's are live views
    train(cfg, lambda m, s: full.append((m, copy.deepcopy(s))))
    resumed: list = []
    train(cfg, lambda m, s: resumed.append((m, copy.deepcopy(s))), resume=full[0][1])
    assert [m["epoch"] for m, _ in resumed] == [2]
    assert resumed[-1][0]["test_acc"] == full[-1][0]["test_acc"]
    assert resumed[-1][0]["train_loss"] == full[-1][0]["train_loss"]
    a, b = full[-1][1]["engine"], resumed[-1][1]["engine"]
    if backend == "simulated":
        assert torch.equal(a["anchor"], b["anchor"])
        assert torch.equal(a["outer_momentum"], b["outer_momentum"])
    else:
        assert torch.equal(a["averager"]["anchor"], b["averager"]["anchor"])
        for name, value in a["model"].items():
            assert torch.equal(b["model"][name], value), name


def _simulate(cfg: RunConfig) -> tuple[list, list]:
    metrics, states = [], []
    run_epochs(cfg, StackedEngine(cfg, CPU),
               lambda m, s: (metrics.append(m), states.append(s)))  # fmt: skip
    return metrics, states


def _real(rank: int, world: int, out: str, docs: dict) -> None:
    results = {}
    for key, doc in docs.items():
        reports: list = []
        train(RunConfig.model_validate(doc), lambda m, s, r=reports: r.append((m, s)),
              rank=rank, world_size=world)  # fmt: skip
        model = reports[-1][1]["engine"]["model"]
        results[key] = {"metrics": [m for m, _ in reports], "model": model}
    torch.save(results, f"{out}/rank{rank}.pt")


def test_simulated_follows_real_learners_with_outer_optimizer_and_adamw(tmp_path) -> None:
    adamw = {**WORKLOAD, "optimizer": "adamw", "lr": {"initial": 0.003}, "weight_decay": 0.01}
    docs = {
        "diloco": {"workload": adamw, "K": 4, "P": 2, "outer": DILOCO, "seed": 2},
        "warmup-sgd": {"workload": WORKLOAD, "K": 6, "P": 2, "warmup_steps": 5, "seed": 2,
                       "outer": {"lr": 0.8, "momentum": 0.3}},
    }  # fmt: skip
    run_distributed(_real, 2, str(tmp_path), docs)
    real = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for key, doc in docs.items():
        metrics, states = _simulate(RunConfig.model_validate({**doc, "backend": "simulated"}))
        params = states[-1]["engine"]["params"]
        for rank in range(2):
            for name, value in real[rank][key]["model"].items():
                diff = (params[name][rank] - value).abs().max().item()
                assert diff <= 1e-5, (key, rank, name, diff)
        for ours, theirs in zip(metrics, real[0][key]["metrics"], strict=True):
            assert ours["rounds"] == theirs["rounds"]
            for k in ("train_loss", "test_loss", "test_acc"):
                assert ours[k] == pytest.approx(theirs[k], abs=1e-5), (key, k)


def test_outer_optimizer_changes_the_run() -> None:
    base = {"workload": WORKLOAD, "K": 4, "P": 2, "backend": "simulated", "seed": 1}
    plain, _ = _simulate(RunConfig.model_validate(base))
    diloco, _ = _simulate(RunConfig.model_validate({**base, "outer": DILOCO}))
    assert plain[-1]["test_loss"] != diloco[-1]["test_loss"]
    assert plain[-1]["rounds"] == diloco[-1]["rounds"] == 2 * (1437 // 32) // 4


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"K": 4, "outer": {"lr": 0}}, "outer.lr: Input should be greater than 0"),
        ({"K": 4, "outer": {"momentum": 1.0}}, "outer.momentum: Input should be less than 1"),
        ({"K": 4, "outer": {"momentum": -0.1}}, "outer.momentum: Input should be greater"),
        ({"K": 4, "outer": {"nesterov": True}}, "outer.nesterov needs outer.momentum > 0"),
        ({"K": 4, "warmup_steps": -1}, "warmup_steps: Input should be greater than or equal"),
        ({"K": 4, "outer": {"step": 1}}, "outer.step: unknown key"),
        ({"algorithm": "downpour", "fetch_period": 1, "push_period": 1, "outer": {"lr": 0.7}},
         "algorithm downpour has no averaging step"),
        ({"algorithm": "eamsgd", "tau": 1, "beta": 0.5, "warmup_steps": 4},
         "algorithm eamsgd has no averaging step"),
        ({"algorithm": "downpour", "fetch_period": 1, "push_period": 1,
          "workload": {"optimizer": "adamw"}}, "optimizer must be sgd"),
        ({"K": 4, "workload": {"optimizer": "adam"}}, "workload.optimizer: Input should be"),
        ({"K": 4, "workload": {"betas": [0.9, 1.0]}}, "workload.betas must each be in [0, 1)"),
    ],
)  # fmt: skip
def test_outer_settings_are_validated(doc: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run(doc)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_grid_over_outer_settings_names_each_point() -> None:
    from kavg_ray.config import parse_sweep

    spec = parse_sweep({
        "name": "g", "workload": WORKLOAD, "backend": "simulated",
        "grid": {"K": [1, 4], "P": [2], "outer_lr": [0.5, 0.7], "outer_momentum": [0.9],
                 "warmup_steps": [0, 8], "optimizer": ["sgd", "adamw"]},
    })  # fmt: skip
    points = spec.points()
    assert len(points) == 16
    names = {p.trial_name() for p in points}
    assert len(names) == 16
    assert "K4-P2-s0-outer_lr0.7-outer_momentum0.9-warmup_steps8-optimizeradamw-sim" in names
    p = next(p for p in points if p.outer.lr == 0.5 and p.warmup_steps == 8)
    assert p.outer.momentum == 0.9 and p.warmup_steps == 8


def _outer_sweep_rows() -> pd.DataFrame:
    rows = []
    for P, K, outer_lr, seed in itertools.product([2, 4], [1, 4, 16], [0.5, 1.0], [0, 1]):
        best = {(2, 0.5): 1, (2, 1.0): 4, (4, 0.5): 4, (4, 1.0): 16}[(P, outer_lr)]
        acc = 0.9 - (0.05 if K != best else 0.0) + 0.001 * seed
        rows.append({"algorithm": "kavg", "dataset": "digits", "model": "mlp", "P": P, "K": K,
                     "seed": seed, "lr": 0.1, "batch_size": 16, "epochs": 2,
                     "outer_lr": outer_lr, "outer_momentum": 0.9, "status": "completed",
                     "final_test_acc": acc})  # fmt: skip
    return pd.DataFrame(rows)


def test_kopt_table_and_plot_split_by_the_outer_lr() -> None:
    from kavg_ray.analysis.plots import kopt_vs_outer_lr
    from kavg_ray.analysis.results import kopt_table

    table = kopt_table(_outer_sweep_rows())
    got = {(r.P, r.outer_lr): r.K_opt for r in table.itertuples()}
    assert got == {(2, 0.5): 1, (2, 1.0): 4, (4, 0.5): 4, (4, 1.0): 16}
    fig = kopt_vs_outer_lr(_outer_sweep_rows())
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()))
             for ln in fig.axes[0].get_lines() if ln.get_label().startswith("P=")}  # fmt: skip
    assert lines == {"P=2": ([0.5, 1.0], [1, 4]), "P=4": ([0.5, 1.0], [4, 16])}


def test_variants_of_outer_settings_get_their_own_names() -> None:
    from kavg_ray.config import parse_sweep

    doc = {"name": "v", "workload": WORKLOAD, "backend": "simulated",
           "grid": {"K": [4], "P": [2]}}  # fmt: skip
    alone = parse_sweep(doc).points()
    assert [p.trial_name() for p in alone] == ["K4-P2-s0-sim"]  # names unchanged otherwise
    both = parse_sweep({**doc, "variants": [{}, {"outer": DILOCO}]}).points()
    assert [p.trial_name() for p in both] == [
        "K4-P2-s0-outer_lr1.0-outer_momentum0.0-outer_nesterovFalse-sim",
        "K4-P2-s0-outer_lr0.7-outer_momentum0.9-outer_nesterovTrue-sim",
    ]
