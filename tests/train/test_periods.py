"""Adaptive averaging periods (``K_schedule``): the stagewise and adacomm K sequences and the
averages that follow from them, exact against hand-computed values; the simulated and real
P = 2 engines on them; resume; the per-epoch record; the config refusals."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from kavg_ray import cli
from kavg_ray.config import RunConfig
from kavg_ray.train.averaging import AveragingSchedule, KAvgAverager
from kavg_ray.train.periods import AdaptiveSchedule, adacomm_period, schedule_for

from ..distributed import run_distributed
from .test_stacked import _max_diff, _real_runs, _simulate

P = 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def _drive(schedule: AveragingSchedule, steps: int, losses: dict[int, float] | None = None):
    """Advance ``schedule`` over steps 1..steps (each step's loss: the mean of two learners,
    0.5 below and above it); returns the steps that ended with an average and the K in
    force after each step."""
    synced, periods = [], []
    for t in range(1, steps + 1):
        if schedule.wants_loss:
            mean = losses[t]
            schedule.observe(torch.tensor((mean - 0.5) + (mean + 0.5)), P)
        if schedule.advance(t) == "global":
            synced.append(t)
        periods.append(schedule.period_in_force)
    return synced, periods


# ------------------------------------------------------------------- the sequences, exact


def _halving_rates(drops: tuple[int, ...]):
    """lr of 0-based step s: 1 halved at each 0-based step in ``drops``."""
    return lambda s: 0.5 ** sum(s >= d for d in drops)


def test_stagewise_sequence_and_averages_are_exact() -> None:
    # Rates drop before 0-based steps 5 and 11 (1-based steps 6 and 12), so K grows at the
    # end of steps 5 and 11. K0 = 2, factor 3, K_max 10.
    sched = AdaptiveSchedule("stagewise", 2, _halving_rates((5, 11)), factor=3, K_max=10)
    synced, periods = _drive(sched, 30)
    # Steps 2, 4 with K = 2; at step 5 the next K is 6, and step 6 (6 - 4 = 2) opens it;
    # then 12 (K = 6); at step 11 the next K is min(10, 18) = 10, which step 12 opens;
    # then 22, then 32 (beyond 30).
    assert synced == [2, 4, 6, 12, 22]
    assert periods == [2] * 5 + [6] * 6 + [10] * 19


def test_stagewise_change_waits_for_the_next_average() -> None:
    # The drop at the end of step 3 falls inside the first period (K0 = 4, steps 1 to 4):
    # K = 8 opens at step 4.
    sched = AdaptiveSchedule("stagewise", 4, _halving_rates((3,)), factor=2)
    synced, periods = _drive(sched, 20)
    assert synced == [4, 12, 20]
    assert periods == [4] * 3 + [8] * 17


ADACOMM_LOSSES = {1: 2.0, 2: 2.0, 3: 0.5, 4: 0.5, 5: 1.0, 6: 1.0, 7: 1.0, 8: 1.0,
                  9: 0.125, 10: 0.125, 11: 2.0, 12: 2.0, 13: 8.0, 14: 8.0}  # fmt: skip


def test_adacomm_sequence_and_averages_are_exact() -> None:
    # K0 = 4, I = 2, rate 0.5 until 0-based step 6, then 0.25. The interval means (each the
    # mean of two learners and two steps) are 2, 0.5, 1, 1, 0.125, 2, 8; the first is the
    # reference (lr 0.5, F 2). K = ceil(4 sqrt(0.5 F / (lr 2))):
    #   step 4: F 0.5, lr 0.5 -> ceil(4 sqrt(1/4)) = 2
    #   step 6: F 1, lr 0.5 -> ceil(4 sqrt(1/2)) = ceil(2.83) = 3
    #   step 8: F 1, lr 0.25 -> ceil(4 sqrt(1)) = 4
    #   step 10: F 0.125, lr 0.25 -> ceil(4 sqrt(1/8)) = ceil(1.41) = 2
    #   step 12: F 2, lr 0.25 -> ceil(4 sqrt(2)) = ceil(5.66) = 6
    #   step 14: F 8, lr 0.25 -> ceil(4 sqrt(8)) = ceil(11.3) = 12, clipped to K_max 7
    rates = lambda s: 0.5 if s < 6 else 0.25  # noqa: E731
    sched = AdaptiveSchedule("adacomm", 4, rates, interval=2, K_min=1, K_max=7)
    synced, periods = _drive(sched, 14, ADACOMM_LOSSES)
    # Averages: 4 (K0; opens the 2 computed at 4), 6 (opens 3), 9 (opens 4, computed at 8),
    # 13 (opens 6, computed at 12; the 2 of step 10 was replaced before it took effect).
    assert synced == [4, 6, 9, 13]
    assert periods == [4] * 3 + [2] * 2 + [3] * 3 + [4] * 4 + [6] * 2
    assert sched.next_period == 7 and sched.reference == (0.5, 2.0)


def test_adacomm_follows_the_paper_not_paddle() -> None:
    """K0 scales the root (the paper's rule); Paddle's code takes the root of ratio * K0."""
    # ratio 1/4, K0 = 4: ours ceil(4 * 0.5) = 2; Paddle's would be ceil(sqrt(1)) = 1.
    assert adacomm_period(4, 1.0, 2.0, 1.0, 0.5, 1, None) == 2
    assert adacomm_period(16, 1.0, 1.0, 1.0, 1.0, 1, None) == 16  # Paddle: 4
    assert adacomm_period(4, 1.0, 1.0, 1.0, 0.01, 3, None) == 3  # ceil(0.4) = 1 -> K_min
    assert adacomm_period(4, 0.1, 1.0, 0.1, 1e6, 1, 64) == 64


def test_adacomm_keeps_K_on_a_non_finite_loss() -> None:
    sched = AdaptiveSchedule("adacomm", 3, lambda s: 1.0, interval=2)
    losses = {1: 1.0, 2: 1.0, 3: math.nan, 4: 1.0, 5: 0.25, 6: 0.25}
    synced, periods = _drive(sched, 6, losses)
    # Step 4's mean is NaN: K stays 3; step 6: ceil(3 sqrt(1/4)) = 2, opened by the next
    # average (step 6 is one: 6 - 3 = 3).
    assert synced == [3, 6] and periods == [3] * 5 + [2]


def test_warmup_then_adaptive_periods() -> None:
    sched = AdaptiveSchedule("stagewise", 2, _halving_rates((6,)), warmup_steps=3, factor=2)
    synced, _ = _drive(sched, 16)
    # Every warm-up step averages; periods start at 3: 5, 7 (next K 4 from the drop at the
    # end of step 6, opened by step 7), 11, 15.
    assert synced == [1, 2, 3, 5, 7, 11, 15]


def test_constant_schedule_is_the_fixed_period() -> None:
    fixed = AveragingSchedule(3, warmup_steps=2)
    synced, periods = _drive(fixed, 12)
    assert synced == [1, 2, 5, 8, 11] and set(periods) == {3}


def test_resume_mid_interval_follows_the_same_sequence() -> None:
    rates = lambda s: 0.5 if s < 6 else 0.25  # noqa: E731
    make = lambda: AdaptiveSchedule("adacomm", 4, rates, interval=2, K_max=7)  # noqa: E731
    full = _drive(make(), 14, ADACOMM_LOSSES)
    first = make()
    head = _drive(first, 7, ADACOMM_LOSSES)  # step 7: inside an interval and a period
    state = json.loads(json.dumps(first.state_dict()))  # plain values only
    resumed = make()
    resumed.load_state_dict(state)
    synced, periods = [], []
    for t in range(8, 15):
        resumed.observe(torch.tensor(2 * ADACOMM_LOSSES[t]), P)
        if resumed.advance(t) == "global":
            synced.append(t)
        periods.append(resumed.period_in_force)
    assert head[0] + synced == full[0] and head[1] + periods == full[1]


# --------------------------------------------------------------------- the real averager


def test_kavg_averager_follows_the_schedule_and_checkpoints_it() -> None:
    """One learner (no process group): the steps that average, and a restored averager
    that goes on with the same K."""
    torch.manual_seed(0)
    avg = KAvgAverager(nn.Linear(3, 2), 2)
    avg.use_schedule(AdaptiveSchedule("stagewise", 2, _halving_rates((5, 11)), factor=3,
                                      K_max=10))  # fmt: skip
    fired = [t for t in range(1, 13) if avg.step()]
    assert fired == [2, 4, 6, 12] and avg.in_sync
    state = avg.state_dict()
    assert state["K_schedule"]["period"] == 10
    again = KAvgAverager(nn.Linear(3, 2), 2)
    again.use_schedule(AdaptiveSchedule("stagewise", 2, _halving_rates((5, 11)), factor=3,
                                        K_max=10))  # fmt: skip
    again.load_state_dict(state)
    assert [t for t in range(13, 33) if again.step()] == [22, 32]
    with pytest.raises(ValueError, match="no K_schedule state"):
        again.load_state_dict({"step_count": 3})


# ----------------------------------------------------------- engines: simulated and real


def _cfg(**overrides) -> RunConfig:
    doc = {
        "workload": {"dataset": "digits", "model": "mlp", "epochs": 4, "batch_size": 16,
                     "lr": {"initial": 0.1, "halve_every_epochs": 1}},
        "K": 2, "P": P, "seed": 7, "backend": "simulated",
    }  # fmt: skip
    doc.update(overrides)
    return RunConfig.model_validate(doc)


def test_stagewise_record_per_epoch() -> None:
    """Digits at P = 2, B = 16: 44 steps an epoch, the rate halving after each. K = 2
    averages at 2..44 (22); the drop at 44 opens K = 4 there: 48..88 (11); K = 8 opens at
    88: 96..128 (5); the drop at 132 falls inside a period, so K = 16 opens at 136: 136,
    152, 168 (3)."""
    metrics, _ = _simulate(_cfg(K_schedule="stagewise"))
    assert [m["K_in_force"] for m in metrics] == [4, 8, 8, 16]
    assert [m["averages_taken"] for m in metrics] == [22, 11, 5, 3]
    assert [m["rounds"] for m in metrics] == [22, 33, 38, 41]
    fixed, _ = _simulate(_cfg())
    assert [m["K_in_force"] for m in fixed] == [2] * 4
    assert [m["averages_taken"] for m in fixed] == [22] * 4


def test_adacomm_simulated_equals_its_schedule_fed_the_same_losses(monkeypatch) -> None:
    """The engine's K sequence is the schedule's on the engine's own per-step losses: the
    averages are recorded by wrapping advance, and an independent schedule fed the
    recorded losses gives the same steps."""
    cfg = _cfg(K_schedule="adacomm", K_interval=10, K_max=9, workload={
        **_cfg().workload.model_dump(), "epochs": 3})  # fmt: skip
    seen: list[tuple[float, int]] = []
    real_observe = AdaptiveSchedule.observe

    def observe(self, loss_sum, count):
        seen.append((float(loss_sum), count))
        real_observe(self, loss_sum, count)

    monkeypatch.setattr(AdaptiveSchedule, "observe", observe)
    metrics, _ = _simulate(cfg)
    monkeypatch.setattr(AdaptiveSchedule, "observe", real_observe)
    ref = schedule_for(cfg, 44)
    synced, periods = [], []
    for t, (loss, count) in enumerate(seen, start=1):
        ref.observe(torch.tensor(loss, dtype=torch.float64), count)
        if ref.advance(t) == "global":
            synced.append(t)
        periods.append(ref.period_in_force)
    assert len(seen) == 132 and all(c == P for _, c in seen)
    assert [periods[43], periods[87], periods[131]] == [m["K_in_force"] for m in metrics]
    rounds = [sum(t <= e for t in synced) for e in (44, 88, 132)]
    assert rounds == [m["rounds"] for m in metrics]
    assert len(set(periods)) > 1  # K moved


def test_simulated_resume_mid_period_gives_the_same_K_sequence() -> None:
    cfg = _cfg(K_schedule="adacomm", K_interval=10, K_max=9)
    full_m, full_s = _simulate(cfg)
    # Epoch 2 ends at step 88: inside an interval (88 = 8 * 10 + 8). (A run's reported
    # states share its live tensors, so the checkpoint comes from a run that stops there.)
    two = cfg.model_copy(update={"workload": cfg.workload.model_copy(update={"epochs": 2})})
    _, part_s = _simulate(two)
    assert part_s[-1]["engine"]["K_schedule"]["count"] == 8 * P  # a partial interval
    res_m, res_s = _simulate(cfg, resume=part_s[-1])
    assert [m["epoch"] for m in res_m] == [3, 4]
    for ours, theirs in zip(res_m, full_m[2:], strict=True):
        for key in ("K_in_force", "averages_taken", "rounds", "train_loss", "test_loss"):
            assert ours[key] == theirs[key], key
    full = full_s[-1]["engine"]
    assert _max_diff(res_s[-1], [{**full["params"], **full["buffers"]}]) == 0
    assert res_s[-1]["engine"]["K_schedule"] == full["K_schedule"]


def test_packed_point_with_a_schedule_equals_it_alone() -> None:
    from kavg_ray.train.packed import run_pack

    cfgs = [_cfg(K_schedule="adacomm", K_interval=10, K_max=9), _cfg(K=3),
            _cfg(K_schedule="stagewise")]  # fmt: skip
    got: dict[int, list] = {0: [], 1: [], 2: []}
    run_pack(cfgs, lambda i, m, done: got[i].append(m))
    for i, cfg in enumerate(cfgs):
        alone, _ = _simulate(cfg)
        for ours, theirs in zip(got[i], alone, strict=True):
            for key in ("K_in_force", "averages_taken", "rounds"):
                assert ours[key] == theirs[key], (i, key)
            assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5)


def test_real_gloo_P2_equals_simulated_with_schedules(tmp_path) -> None:
    """Two spawned gloo learners (adacomm reduces its loss over them; stagewise) follow the
    simulated engine's K sequence, averages, losses and final models."""
    cfgs = {
        "adacomm": _cfg(K_schedule="adacomm", K_interval=10, K_max=9, backend="ray",
                        workload={**_cfg().workload.model_dump(), "epochs": 3}),
        "stagewise": _cfg(K_schedule="stagewise", backend="ray",
                          workload={**_cfg().workload.model_dump(), "epochs": 3}),
    }  # fmt: skip
    docs = {k: (c.model_dump(mode="json"), False, False) for k, c in cfgs.items()}
    run_distributed(_real_runs, P, str(tmp_path), docs)
    real = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(P)]
    for key, cfg in cfgs.items():
        sim_m, sim_s = _simulate(cfg.model_copy(update={"backend": "simulated"}))
        assert _max_diff(sim_s[-1], [r[key]["model"] for r in real]) <= 1e-5, key
        for ours, theirs in zip(sim_m, real[0][key]["metrics"], strict=True):
            for k in ("K_in_force", "averages_taken", "rounds", "samples"):
                assert ours[k] == theirs[k], (key, k)
            assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5), key
        assert len({m["K_in_force"] for m in sim_m}) > 1, key


# ---------------------------------------------------------------------------- refusals

REFUSALS = [
    ({"K_schedule": "adacomm", "K_factor": 3},
     "K_factor given, but K_schedule adacomm takes K_min, K_max, K_interval"),
    ({"K_max": 8}, "K_max given, but K_schedule constant takes none of them"),
    ({"K_schedule": "stagewise", "K_interval": 5},
     "K_interval given, but K_schedule stagewise takes K_factor, K_max"),
    ({"K_schedule": "adacomm", "K_min": 8}, "K=4 (the first period) must lie in [K_min, K_max]"),
    ({"K_schedule": "adacomm", "K_min": 3, "K_max": 2}, "K_min=3 is above K_max=2"),
    ({"K_schedule": "stagewise", "workload": {"dataset": "digits", "model": "mlp",
                                              "lr": {"initial": 0.1}}},
     "needs the step lr schedule (workload.lr.halve_every_epochs), not constant"),
    ({"K_schedule": "adacomm", "algorithm": "hier_avg", "K": None, "S": 1, "K1": 1, "K2": 2},
     "K_schedule adacomm is built for kavg, not hier_avg"),
    ({"K_schedule": "adacomm", "fragments": 2}, "need K_schedule constant, not adacomm"),
    ({"K_schedule": "weekly"}, "K_schedule: Input should be 'constant', 'stagewise' or"),
    ({"K_schedule": "stagewise", "K_factor": 1}, "K_factor: Input should be greater than"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "fragment"), REFUSALS)
def test_bad_schedules_are_refused_with_one_line_and_exit_2(tmp_path, changes, fragment):
    doc = {
        "workload": {"dataset": "digits", "model": "mlp",
                     "lr": {"initial": 0.1, "halve_every_epochs": 1}},
        "K": 4, "P": 2,
    }  # fmt: skip
    doc.update(changes)
    doc = {k: v for k, v in doc.items() if v is not None}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(cli.main, ["train", "bad.yaml"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert fragment in lines[0], lines[0]


def test_schedules_are_grid_keys_and_name_their_trials() -> None:
    from kavg_ray.config import parse_sweep

    spec = parse_sweep({
        "name": "s", "workload": {"dataset": "digits", "model": "mlp",
                                  "lr": {"initial": 0.1, "halve_every_epochs": 1}},
        "grid": {"K": [4], "P": [2], "K_schedule": ["constant", "stagewise"]},
    })  # fmt: skip
    names = [c.trial_name() for c in spec.points()]
    assert names == ["K4-P2-s0-K_scheduleconstant", "K4-P2-s0-K_schedulestagewise"]
