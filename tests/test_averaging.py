"""KAvgAverager and HierAvgAverager: schedules with exact values, and equivalence."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

from kavg_ray.train.averaging import HierAvgAverager, KAvgAverager

from .distributed import run_distributed


def _vector_model(values: list[float]) -> nn.Module:
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor(values, dtype=torch.float64))
    return model


# ---------------------------------------------------------------- K-AVG schedule


def _kavg_schedule(rank: int, world: int, period: int) -> None:
    """Each step adds (rank + 1) * step to the parameter; check every step's value."""
    model = _vector_model([float(rank), 10.0 * rank])
    avg = KAvgAverager(model, period=period)
    # The exact values every rank should hold, simulated for all ranks at once.
    sim = [[float(r), 10.0 * r] for r in range(world)]
    fired = []
    for step in range(1, 3 * period + 2):
        with torch.no_grad():
            model.w.add_((rank + 1) * step)
        for r in range(world):
            sim[r] = [v + (r + 1) * step for v in sim[r]]
        fired.append(avg.step())
        if step % period == 0:
            mean = [sum(sim[r][i] for r in range(world)) / world for i in range(2)]
            sim = [list(mean) for _ in range(world)]
        assert model.w.tolist() == sim[rank], (step, model.w.tolist(), sim[rank])
    assert fired == [s % period == 0 for s in range(1, 3 * period + 2)]
    assert avg.stats.count == 3
    assert avg.stats.bytes == 3 * 2 * 8


@pytest.mark.parametrize("world", [2, 4])
def test_kavg_schedule_exact(world: int) -> None:
    run_distributed(_kavg_schedule, world, 3)


def test_kavg_schedule_values_by_hand() -> None:
    """P = 2, K = 2, written out: averaging after steps 2 and 4 only."""
    run_distributed(_kavg_by_hand, 2)


def _kavg_by_hand(rank: int, world: int) -> None:
    model = _vector_model([float(rank)])  # rank 0: 0, rank 1: 1
    avg = KAvgAverager(model, period=2)
    values = []
    for _ in range(4):
        with torch.no_grad():
            model.w.add_(rank + 1)
        avg.step()
        values.append(model.w.item())
    # rank 0: 1, 2 -> avg(2, 5) = 3.5, 4.5, 5.5 -> avg(5.5, 7.5) = 6.5
    # rank 1: 3, 5 -> 3.5, 5.5, 7.5 -> 6.5
    assert values == ([1.0, 3.5, 4.5, 6.5] if rank == 0 else [3.0, 3.5, 5.5, 6.5])


# ------------------------------------------------- equivalence with torch's averager


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _equivalence(rank: int, world: int, period: int) -> None:
    ours, ref = _mlp(0), _mlp(0)
    avg = KAvgAverager(ours, period=period)
    ref_avg = PeriodicModelAverager(period=period, warmup_steps=period - 1)
    opt = torch.optim.SGD(ours.parameters(), lr=0.2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(100 + rank)  # each learner its own batches
    for _ in range(20):
        x = torch.randn(16, 8, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
        avg.step()
        ref_avg.average_parameters(ref.parameters())
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # The learners really diverge between averages (so the test can see a wrong schedule).
    if period > 1:
        assert avg.step_count % period != 0
        gathered = [torch.empty_like(avg.flat.buffer) for _ in range(world)]
        dist.all_gather(gathered, avg.flat.buffer)
        assert not torch.equal(gathered[0], gathered[1])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("period", [1, 3])
def test_equivalent_to_torch_periodic_averager(world: int, period: int) -> None:
    run_distributed(_equivalence, world, period)


# ---------------------------------------------------------------- BatchNorm buffers


def _batchnorm(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    avg = KAvgAverager(model, period=2)
    bn = model[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(4):
        x = torch.randn(32, 4, generator=gen) * (rank + 1) + rank  # rank-specific statistics
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pre = torch.cat([bn.running_mean, bn.running_var]).clone()
        gathered = [torch.empty_like(pre) for _ in range(world)]
        dist.all_gather(gathered, pre)
        averaged = avg.step()
        post = torch.cat([bn.running_mean, bn.running_var])
        if averaged:
            torch.testing.assert_close(post, torch.stack(gathered).mean(0), rtol=0, atol=1e-6)
        else:
            assert torch.equal(post, pre)
            assert not torch.equal(gathered[0], gathered[1])
    assert int(bn.num_batches_tracked) == 4


def test_batchnorm_buffers_are_averaged() -> None:
    run_distributed(_batchnorm, 2)


# ---------------------------------------------------------------- single process


def test_single_learner_equals_plain_sgd() -> None:
    """P = 1: K-AVG is sequential SGD, bit for bit, for any K."""
    ours, ref = _mlp(1), _mlp(1)
    avg = KAvgAverager(ours, period=3)
    opt = torch.optim.SGD(ours.parameters(), lr=0.3, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        x, y = torch.randn(8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
        avg.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    assert avg.stats.count == 6 and avg.stats.bytes == 0


def test_parameters_are_views_into_one_buffer() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    avg = KAvgAverager(model, period=2)
    buf = avg.flat.buffer
    n = sum(p.numel() for p in model.parameters()) + 8  # + running mean and var
    assert buf.numel() == n
    with torch.no_grad():
        buf.fill_(7.0)
    assert all(bool((p == 7).all()) for p in model.parameters())
    assert bool((model[1].running_var == 7).all())
    assert avg.flat.is_intact()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"period": 0}, "period"),
        ({"period": 1.5}, "period"),
        ({"period": True}, "period"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KAvgAverager(_mlp(0), **kwargs)


def test_mixed_dtypes_refused() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="one dtype"):
        KAvgAverager(model, period=2)


# ---------------------------------------------------------------- Hier-AVG


def _hier_schedule(rank: int, world: int) -> None:
    """P = 4, S = 2, K1 = 2, K2 = 6: local means after 2, 4, 8, 10; global after 6, 12."""
    model = _vector_model([float(rank)])
    avg = HierAvgAverager(model, local_period=2, global_period=6, group_size=2)
    sim = [float(r) for r in range(world)]
    kinds = []
    for step in range(1, 13):
        with torch.no_grad():
            model.w.add_((rank + 1) * step)
        sim = [v + (r + 1) * step for r, v in enumerate(sim)]
        kinds.append(avg.step())
        if step % 6 == 0:
            sim = [sum(sim) / world] * world
        elif step % 2 == 0:
            sim = [(sim[r - r % 2] + sim[r - r % 2 + 1]) / 2 for r in range(world)]
        assert model.w.item() == sim[rank], (step, model.w.item(), sim[rank])
    assert kinds == [None, "local", None, "local", None, "global"] * 2
    assert (avg.local_stats.count, avg.global_stats.count) == (4, 2)
    assert avg.local_stats.bytes == 4 * 8 and avg.global_stats.bytes == 2 * 8


def test_hier_avg_schedule_exact() -> None:
    run_distributed(_hier_schedule, 4)


def test_hier_avg_bad_arguments() -> None:
    with pytest.raises(ValueError, match="multiple"):
        HierAvgAverager(_mlp(0), local_period=4, global_period=6, group_size=1)
    with pytest.raises(ValueError, match="divide"):
        HierAvgAverager(_mlp(0), local_period=2, global_period=4, group_size=2)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    x = torch.randn(16, 8, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _hier_reductions(rank: int, world: int) -> None:
    """S = 1 is K-AVG with K = K2; S = P is K-AVG with K = K1; K1 = K2 is K-AVG with K = K1."""
    cases = [((2, 6, 1), 6), ((2, 6, world), 2), ((3, 3, 2), 3)]
    for (k1, k2, s), k in cases:
        hier, ref = _mlp(0), _mlp(0)
        h_avg = HierAvgAverager(hier, local_period=k1, global_period=k2, group_size=s)
        k_avg = KAvgAverager(ref, period=k)
        h_opt = torch.optim.SGD(hier.parameters(), lr=0.2)
        k_opt = torch.optim.SGD(ref.parameters(), lr=0.2)
        gen_h = torch.Generator().manual_seed(50 + rank)
        gen_k = torch.Generator().manual_seed(50 + rank)
        for _ in range(20):
            _train_step(hier, h_opt, gen_h)
            _train_step(ref, k_opt, gen_k)
            h_avg.step()
            k_avg.step()
            for a, b in zip(hier.parameters(), ref.parameters(), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_hier_avg_reduces_to_kavg() -> None:
    run_distributed(_hier_reductions, 4)


def _hier_batchnorm(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    avg = HierAvgAverager(model, local_period=2, global_period=6, group_size=2)
    bn = model[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    for step in range(1, 13):
        x = torch.randn(32, 4, generator=gen) * (rank + 1) + rank
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        pre = torch.cat([bn.running_mean, bn.running_var]).clone()
        gathered = [torch.empty_like(pre) for _ in range(world)]
        dist.all_gather(gathered, pre)
        avg.step()
        post = torch.cat([bn.running_mean, bn.running_var])
        first = rank - rank % 2
        if step % 6 == 0:
            expected = torch.stack(gathered).mean(0)
        elif step % 2 == 0:
            expected = (gathered[first] + gathered[first + 1]) / 2
        else:
            expected = pre
        torch.testing.assert_close(post, expected, rtol=0, atol=1e-6)


def test_hier_avg_batchnorm_buffers_follow_schedule() -> None:
    run_distributed(_hier_batchnorm, 4)


# ---------------------------------------------------------------- waits for the last learner


LATE_S = 0.1  # the late learner's pause before each step


def _kavg_waits(rank: int, world: int) -> None:
    """The last rank pauses before every step: the others wait about that long at each of
    the 4 averages; the late one, whose time is the shortest, waits exactly 0."""
    import time

    model = _vector_model([float(rank)])
    avg = KAvgAverager(model, period=1)
    late = rank == world - 1
    for _ in range(4):
        if late:
            time.sleep(LATE_S)
        avg.step()
    assert avg.stats.wait_seconds == 0.0 and len(avg.stats.unsettled) == 4
    avg.settle_waits()
    waited, total = avg.stats.wait_seconds, avg.stats.seconds
    assert avg.stats.unsettled == [] and waited <= total
    if late:
        assert waited == 0.0, waited
    else:
        assert 3.5 * LATE_S < waited < 6 * LATE_S, waited
        assert total - waited < 1.5 * LATE_S, (total, waited)  # the transfers alone
    avg.settle_waits()  # nothing new: no change
    assert avg.stats.wait_seconds == waited


@pytest.mark.parametrize("world", [2, 3])
def test_kavg_wait_for_the_last_learner(world: int) -> None:
    run_distributed(_kavg_waits, world)


def _hier_waits(rank: int, world: int) -> None:
    """P = 4, S = 2, K1 = 1, K2 = 2, rank 1 late before every step: its partner (rank 0)
    waits one pause at each of the 2 local and 2 global averages; the other group (ranks
    2, 3), which never waits locally, meets rank 1 two pauses late at each global one."""
    import time

    model = _vector_model([float(rank)])
    avg = HierAvgAverager(model, local_period=1, global_period=2, group_size=2)
    for _ in range(4):
        if rank == 1:
            time.sleep(LATE_S)
        avg.step()
    avg.settle_waits()
    local, glob = avg.local_stats.wait_seconds, avg.global_stats.wait_seconds
    assert (avg.local_stats.count, avg.global_stats.count) == (2, 2)
    if rank == 1:
        assert (local, glob) == (0.0, 0.0)
    elif rank == 0:
        assert 1.5 * LATE_S < local < 3 * LATE_S, local
        assert 1.5 * LATE_S < glob < 3 * LATE_S, glob
    else:
        assert local < 0.5 * LATE_S, local
        assert 3.5 * LATE_S < glob < 5.5 * LATE_S, glob
    assert avg.stats.wait_seconds == local + glob


def test_hier_avg_wait_inside_each_group() -> None:
    run_distributed(_hier_waits, 4)
