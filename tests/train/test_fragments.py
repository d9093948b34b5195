"""Streaming fragments (``fragments``, ``fragment_delay``, ``fragment_alpha``): the schedule
against torchft's DiLoCo loop, the real averager against an independent sequential
reference and against today's whole-model average, the simulated engine against the real
one, resume with an average in flight, config refusals and the trial rows' columns."""

from __future__ import annotations

import copy
import os

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from torch import nn

from kavg_ray import cli
from kavg_ray.analysis import costmodel
from kavg_ray.config import ConfigError, RunConfig, parse_run
from kavg_ray.launch.sweep import trial_row
from kavg_ray.train.averaging import AveragingSchedule, KAvgAverager
from kavg_ray.train.fragments import FragmentSchedule, fragment_bounds
from kavg_ray.train.loop import run_epochs
from kavg_ray.train.stacked import StackedEngine, StackedFragments

from ..distributed import run_distributed
from .test_process_group import _config
from .test_stacked import _max_diff, _real_runs

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


# ------------------------------------------------------------------------------- schedule


def torchft_order(K: int, F: int, tau: int, steps: int) -> tuple[dict, dict]:
    """torchft DiLoCo's step post-hook, re-enacted: a local step counter that restarts after
    each sync, a prepare at ``H - tau``, a sync at ``H``, and the fragment picked by the
    number of syncs committed so far (the manager's step) modulo F."""
    H, local, committed = K // F, 0, 0
    launched, applied = {}, {}
    for step in range(1, steps + 1):
        local += 1
        if local == H - tau:
            launched[step] = committed % F
        if local == H:
            applied[step] = committed % F
            local, committed = 0, committed + 1
    return launched, applied


def _table(schedule: FragmentSchedule, steps: int) -> tuple[dict, dict]:
    launched = {s: schedule.launches(s) for s in range(1, steps + 1)}
    applied = {s: schedule.applies(s) for s in range(1, steps + 1)}
    return ({s: f for s, f in launched.items() if f is not None},
            {s: f for s, f in applied.items() if f is not None})  # fmt: skip


def test_the_schedule_written_out() -> None:
    # K = 8, F = 4, tau = 1: H = 2; fragment (n - 1) mod 4 applied after step 2n,
    # launched after step 2n - 1.
    launched, applied = _table(FragmentSchedule(8, 4, 1), 12)
    assert applied == {2: 0, 4: 1, 6: 2, 8: 3, 10: 0, 12: 1}
    assert launched == {1: 0, 3: 1, 5: 2, 7: 3, 9: 0, 11: 1}
    # K = 6, F = 2, tau = 2: H = 3.
    launched, applied = _table(FragmentSchedule(6, 2, 2), 12)
    assert applied == {3: 0, 6: 1, 9: 0, 12: 1}
    assert launched == {1: 0, 4: 1, 7: 0, 10: 1}
    sched = FragmentSchedule(6, 2, 2)
    assert [sched.in_flight(s) for s in range(0, 8)] == [None, 0, 0, None, 1, 1, None, 0]


@pytest.mark.parametrize(("K", "F", "tau"), [(8, 4, 1), (6, 2, 2), (12, 3, 0), (12, 3, 3),
                                             (5, 1, 4), (16, 16, 0), (9, 1, 0)])  # fmt: skip
def test_the_schedule_is_torchfts(K: int, F: int, tau: int) -> None:
    assert _table(FragmentSchedule(K, F, tau), 5 * K) == torchft_order(K, F, tau, 5 * K)


def test_one_fragment_without_delay_is_todays_schedule() -> None:
    for K in (1, 3, 7):
        sched, today = FragmentSchedule(K), AveragingSchedule(K)
        for s in range(1, 40):
            assert (sched.applies(s) == 0) == (today.action(s) == "global")
            assert sched.launches(s) == sched.applies(s)
            assert sched.in_flight(s) is None


@pytest.mark.parametrize(("K", "F", "tau", "message"), [
    (6, 4, 0, "F=4 must divide K=6"),
    (8, 4, 2, "fragment_delay=2 must be below K/F=2"),
])  # fmt: skip
def test_the_schedule_refuses(K: int, F: int, tau: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FragmentSchedule(K, F, tau)


def test_fragment_bounds() -> None:
    sizes = [10, 10, 1, 30, 5, 4]  # cuts 0 10 20 21 51 56 60
    assert fragment_bounds(sizes, 1, 70) == [(0, 70)]
    assert fragment_bounds(sizes, 3, 70) == [(0, 20), (20, 51), (51, 70)]  # near 20 and 40
    assert fragment_bounds(sizes, 2, 60) == [(0, 21), (21, 60)]  # near 30: 21 (9) beats 51 (21)
    assert fragment_bounds([4, 4], 2, 8) == [(0, 4), (4, 8)]
    assert fragment_bounds([1, 2, 1], 2, 4) == [(0, 1), (1, 4)]  # a tie (1 and 3): the lower
    assert fragment_bounds(sizes, 6, 60) == [(0, 10), (10, 20), (20, 21), (21, 51), (51, 56),
                                             (56, 60)]  # fmt: skip
    # Room is left for later fragments: a huge first parameter does not take them all.
    assert fragment_bounds([100, 1, 1], 3, 102) == [(0, 100), (100, 101), (101, 102)]
    with pytest.raises(ValueError, match="only 6 parameter tensors"):
        fragment_bounds(sizes, 7, 60)


# ------------------------------------------------------ the real averager, P = 2 (gloo)


def _model() -> nn.Module:
    """48 + 8 | 8 + 8 | 24 + 3 parameters and 16 floating buffers (BatchNorm)."""
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


# Which parameters each fragment holds (fragment_bounds on the model above, n = 99);
# the floating buffers travel with the last fragment.
FRAGMENTS = {
    1: [["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]],
    2: [["0.weight"], ["0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]],
    3: [["0.weight"], ["0.bias", "1.weight"], ["1.bias", "3.weight", "3.bias"]],
}
BUFFERS = ["1.running_mean", "1.running_var"]
CASES = {
    "F2-tau1-plain": dict(K=4, F=2, tau=1, alpha=0.0, outer=None),
    "F3-tau1-nesterov-alpha": dict(K=6, F=3, tau=1, alpha=0.25,
                                   outer=dict(lr=0.7, momentum=0.9, nesterov=True)),
    "F1-tau2-momentum": dict(K=3, F=1, tau=2, alpha=0.0, outer=dict(lr=0.5, momentum=0.8)),
    "F3-tau0-sgd": dict(K=6, F=3, tau=0, alpha=0.5, outer=dict(lr=1.3, momentum=0.0)),
}
STEPS, CUT = 17, 7  # CUT: a checkpoint with a fragment average in flight (tau > 0)


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def _sgd_step(model: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    x, y = _batch(rank, step)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def reference(case: dict, P: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """P learners in one process, with plain tensors: each fragment's launched copies are
    kept, and their mean is applied ``tau`` steps later, by torch.optim.SGD on the
    fragment's own anchor when there is an outer optimizer, then mixed by alpha."""
    torch.manual_seed(0)
    learners = [_model() for _ in range(P)]
    for m in learners[1:]:
        m.load_state_dict(learners[0].state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in learners]
    K, Fr, tau, alpha, outer = (case[k] for k in ("K", "F", "tau", "alpha", "outer"))
    frags = [list(names) for names in FRAGMENTS[Fr]]
    frags[-1] += BUFFERS
    state = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in learners]
    anchors, outer_opts = {}, []
    if outer:
        for names in FRAGMENTS[Fr]:
            group = [state[0][n].detach().clone().requires_grad_(True) for n in names]
            anchors.update(zip(names, group, strict=True))
            outer_opts.append(torch.optim.SGD(group, **outer))
    launched, applied = torchft_order(K, Fr, tau, steps)
    pending = None
    for step in range(1, steps + 1):
        for r in range(P):
            _sgd_step(learners[r], opts[r], r, step)
        if step in launched:
            pending = [{n: s[n].detach().clone() for n in frags[launched[step]]} for s in state]
        if step in applied:
            f = applied[step]
            new = {n: torch.stack([c[n] for c in pending]).mean(0) for n in frags[f]}
            if outer:
                for n in FRAGMENTS[Fr][f]:
                    anchors[n].grad = anchors[n].detach() - new[n]
                outer_opts[f].step()
                new.update({n: anchors[n].detach() for n in FRAGMENTS[Fr][f]})
            with torch.no_grad():
                for s in state:
                    for n in frags[f]:
                        s[n].copy_(torch.lerp(new[n], s[n], alpha))
    return [{n: t.detach().clone() for n, t in s.items()} for s in state]


def _averager(case: dict, model: nn.Module) -> KAvgAverager:
    outer = case["outer"] or {}
    kw = {"outer_lr": outer.get("lr", 1.0), "outer_momentum": outer.get("momentum", 0.0),
          "nesterov": outer.get("nesterov", False)}  # fmt: skip
    return KAvgAverager(model, case["K"], fragments=case["F"], fragment_delay=case["tau"],
                        fragment_alpha=case["alpha"], **kw)  # fmt: skip


def _learner(case: dict, rank: int, first: int, last: int, resume: dict | None = None):
    torch.manual_seed(0)
    model = _model()
    avg = _averager(case, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
        avg.load_state_dict(resume["avg"])
    for step in range(first, last + 1):
        _sgd_step(model, opt, rank, step)
        avg.step()
    return model, avg, opt


def _fragment_ranks(rank: int, world: int, out_dir: str) -> None:
    torch.set_default_dtype(torch.float64)
    results = {}
    for name, case in CASES.items():
        model, avg, _ = _learner(case, rank, 1, STEPS)
        results[name] = {
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "count": avg.stats.count, "bytes": avg.stats.bytes,
            "bounds": avg.streaming.bounds,
        }  # fmt: skip
        # Resume after step CUT (an average in flight when tau > 0) equals the whole run.
        part, part_avg, opt = _learner(case, rank, 1, CUT)
        ckpt = copy.deepcopy({"model": part.state_dict(), "opt": opt.state_dict(),
                              "avg": part_avg.state_dict()})  # fmt: skip
        assert (ckpt["avg"]["fragments"]["pending"] is not None) == (case["tau"] > 0), name
        resumed, _, _ = _learner(case, rank, CUT + 1, STEPS, ckpt)
        for k, v in resumed.state_dict().items():
            assert torch.equal(v, results[name]["state"][k]), (name, k)
        dist.barrier()
    results["today"] = _todays_average_equals_one_fragment(rank)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _todays_average_equals_one_fragment(rank: int) -> int:
    """F = 1, tau = 0, alpha = 0 through the fragment code equals today's whole-model
    average bit for bit, plain and with an outer optimizer; returns the steps compared."""
    compared = 0
    for outer in ({}, {"outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True}):
        torch.manual_seed(0)
        models = [_model(), None]
        models[1] = copy.deepcopy(models[0])
        today = KAvgAverager(models[0], 3, **outer)
        streamed = KAvgAverager(models[1], 3, **outer)
        streamed.stream(1, 0, 0.0)
        opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
        for step in range(1, 14):
            for m, opt, avg in zip(models, opts, (today, streamed), strict=True):
                _sgd_step(m, opt, rank, step)
                avg.step()
            assert torch.equal(today.flat.buffer, streamed.flat.buffer), (outer, step)
            assert today.in_sync == streamed.in_sync
            compared += 1
        assert (today.stats.count, today.stats.bytes) == (streamed.stats.count,
                                                           streamed.stats.bytes)  # fmt: skip
        assert today.stats.count == 4
    return compared


def test_real_p2_equals_the_sequential_reference_and_todays_average(tmp_path) -> None:
    run_distributed(_fragment_ranks, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["today"] == ranks[1]["today"] == 26
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        refs = {name: reference(case, 2, STEPS) for name, case in CASES.items()}
    finally:
        torch.set_default_dtype(before)
    for name, case in CASES.items():
        for r in range(2):
            got = ranks[r][name]
            for key, want in refs[name][r].items():
                assert torch.allclose(got["state"][key], want, rtol=0, atol=1e-12), (name, r, key)
            # rounds: fragment averages applied; bytes: each applied fragment's bytes.
            _, applied = torchft_order(case["K"], case["F"], case["tau"], STEPS)
            bounds = got["bounds"]
            assert got["count"] == len(applied)
            assert got["bytes"] == sum(8 * (bounds[f][1] - bounds[f][0]) for f in applied.values())
        # The fragments hold the parameters FRAGMENTS names (and the buffers go last).
        sizes = [p.numel() for p in _model().parameters()]
        assert ranks[0][name]["bounds"] == fragment_bounds(sizes, case["F"], 99 + 16)
    # The learners differ after the local step that follows the last apply (step 16).
    assert not torch.equal(ranks[0]["F2-tau1-plain"]["state"]["3.weight"],
                           ranks[1]["F2-tau1-plain"]["state"]["3.weight"])  # fmt: skip


def test_fragments_of_the_test_model() -> None:
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    cuts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    for fragments, groups in FRAGMENTS.items():
        bounds = fragment_bounds(sizes, fragments, 99 + 16)
        got = [[n for n, a in zip(names, cuts, strict=False) if lo <= a < hi] for lo, hi in bounds]
        assert got == groups


# --------------------------------------------------------- the simulated engine


def _simulate(cfg: RunConfig, resume=None, stream_one: bool = False) -> tuple[list, list]:
    metrics, states = [], []
    engine = StackedEngine(cfg, CPU)
    if stream_one:
        engine.streaming = StackedFragments(engine, cfg)
    run_epochs(cfg, engine, lambda m, s: (metrics.append(m), states.append(copy.deepcopy(s))),
               resume)  # fmt: skip
    return metrics, states


def test_simulated_one_fragment_is_todays_average() -> None:
    for outer in ({}, {"lr": 0.7, "momentum": 0.9, "nesterov": True}):
        cfg = _config(P=3, K=5, outer=outer, workload={**_config().workload.model_dump(),
                                                         "momentum": 0.9})  # fmt: skip
        today_m, today_s = _simulate(cfg)
        ours_m, ours_s = _simulate(cfg, stream_one=True)
        a, b = today_s[-1]["engine"], ours_s[-1]["engine"]
        for name, t in a["params"].items():
            assert torch.equal(t, b["params"][name]), (outer, name)
        assert [m["rounds"] for m in today_m] == [m["rounds"] for m in ours_m] == [5, 11]
        assert [m["test_loss"] for m in today_m] == [m["test_loss"] for m in ours_m]


REAL_CASES = {
    "F2-tau1": {"P": 2, "K": 4, "fragments": 2, "fragment_delay": 1},
    "F4-tau1-outer": {"P": 2, "K": 8, "fragments": 4, "fragment_delay": 1, "fragment_alpha": 0.25,
                      "outer": {"lr": 0.7, "momentum": 0.9, "nesterov": True}},
}  # fmt: skip


def test_simulated_equals_real_p2(tmp_path) -> None:
    cfgs = {name: _config(**doc) for name, doc in REAL_CASES.items()}
    docs = {name: (cfg.model_dump(mode="json"), False, False) for name, cfg in cfgs.items()}
    run_distributed(_real_runs, 2, str(tmp_path), docs)
    real = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, cfg in cfgs.items():
        sim_m, sim_s = _simulate(cfg)
        assert _max_diff(sim_s[-1], [r[name]["model"] for r in real]) <= 1e-5, name
        steps = 44 * 2  # 44 steps an epoch
        H = cfg.K // cfg.fragments
        _, applied = torchft_order(cfg.K, cfg.fragments, cfg.fragment_delay, steps)
        bounds = fragment_bounds([8192, 128, 1280, 10], cfg.fragments, 9610)
        for ours, theirs in zip(sim_m, real[0][name]["metrics"], strict=True):
            assert ours["rounds"] == theirs["rounds"] == 44 * ours["epoch"] // H, name
            for key in ("train_loss", "test_loss", "test_acc"):
                assert ours[key] == pytest.approx(theirs[key], abs=1e-5), (name, key)
        last = real[0][name]["metrics"][-1]
        assert last["bytes_communicated"] == sum(
            4 * (bounds[f][1] - bounds[f][0]) for f in applied.values()
        ), name


def steps_workload() -> dict:
    """_config's workload with momentum, as 30 steps evaluated after steps 15 and 30."""
    workload = {**_config().workload.model_dump(), "momentum": 0.9}
    workload.pop("epochs")
    workload.update(steps=30, eval_every_steps=15)
    return workload


def resumed_after_step_15(cfg: RunConfig) -> tuple[dict, dict, list, list, dict]:
    """A simulated run of ``cfg`` (a steps_workload with K = 6, F = 3, tau = 1) and its
    resume from the checkpoint after step 15, with fragment 1's average in flight: both
    end with the same parameters. Returns both final engine states, both metric lists and
    the checkpoint."""
    full_m, full_s = _simulate(cfg)
    mid = full_s[0]
    assert mid["engine"]["fragments"]["pending"]["fragment"] == 1  # 8th average, after step 15
    res_m, res_s = _simulate(cfg, resume=mid)
    a, b = full_s[-1]["engine"], res_s[-1]["engine"]
    for name, t in a["params"].items():
        assert torch.equal(t, b["params"][name]), name
    return a, b, full_m, res_m, mid


def test_simulated_resume_with_an_average_in_flight() -> None:
    cfg = _config(P=2, K=6, fragments=3, fragment_delay=1, outer={"lr": 0.7, "momentum": 0.5},
                  workload=steps_workload())  # fmt: skip
    a, b, full_m, res_m, mid = resumed_after_step_15(cfg)
    assert torch.equal(a["outer_momentum"], b["outer_momentum"])
    assert res_m[-1]["rounds"] == full_m[-1]["rounds"] == 15
    # A checkpoint whose in-flight average the schedule does not expect is refused.
    bad = copy.deepcopy(mid)
    bad["engine"]["fragments"]["pending"] = None
    with pytest.raises(ValueError, match="in flight"):
        _simulate(cfg, resume=bad)


# --------------------------------------------------------------- config and rows


@pytest.mark.parametrize(("doc", "message"), [
    ({"K": 6, "fragments": 4}, "fragments F=4 must divide K=6"),
    ({"K": 8, "fragments": 4, "fragment_delay": 2}, "fragment_delay=2 must be below K/F=2"),
    ({"K": 8, "fragments": 2, "warmup_steps": 4}, "take no warmup_steps"),
    ({"algorithm": "hier_avg", "S": 1, "K1": 2, "K2": 4, "fragments": 2},
     "streaming Hier-AVG is not built"),
    ({"algorithm": "downpour", "fragment_delay": 1}, "not downpour's: it has no averaging step"),
    ({"K": 4, "fragment_alpha": 1.5}, "fragment_alpha: Input should be less than or equal to 1"),
    ({"K": 4, "fragments": 0}, "fragments: Input should be greater than or equal to 1"),
])  # fmt: skip
def test_config_refusals(doc: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_run({"backend": "ray", **doc})


def test_config_refuses_what_fragments_are_not_built_with() -> None:
    fields = RunConfig.model_fields
    if "K_schedule" in fields:
        with pytest.raises(ConfigError, match="need K_schedule constant"):
            parse_run({"K": 4, "fragments": 2, "K_schedule": "stagewise"})
    # Compressed fragments are built (tests/train/test_fragment_payload.py).
    cfg = parse_run({"K": 4, "fragments": 2, "fragment_delay": 1, "payload": "int8"})
    assert (cfg.fragments, cfg.payload) == (2, "int8")


def test_defaults_and_grid(tmp_path, monkeypatch) -> None:
    cfg = parse_run({"K": 4})
    assert (cfg.fragments, cfg.fragment_delay, cfg.fragment_alpha) == (1, 0, 0.0)
    assert not cfg.streaming
    from kavg_ray.config import parse_sweep

    spec = parse_sweep({"backend": "simulated", "P": 2,
                        "grid": {"K": [4], "fragments": [1, 2], "fragment_delay": [0, 1]}})
    names = [p.trial_name() for p in spec.points()]
    assert names == ["K4-P2-s0-fragments1-fragment_delay0-sim",
                     "K4-P2-s0-fragments1-fragment_delay1-sim",
                     "K4-P2-s0-fragments2-fragment_delay0-sim",
                     "K4-P2-s0-fragments2-fragment_delay1-sim"]  # fmt: skip
    # A bad point exits 2 with one line, before anything starts.
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "frag", "grid": {"K": [4], "fragments": [3]}}))
    res = CliRunner().invoke(cli.main, ["sweep", "run", str(path)])
    assert res.exit_code == 2
    assert "fragments F=3 must divide K=4" in res.output


def test_rows_carry_the_columns_the_cost_model_splits_by() -> None:
    history = [{"epoch": 1, "test_acc": 0.9, "test_loss": 0.3, "train_loss": 0.2,
                "wall_time_s": 1.0, "rounds": 3}]  # fmt: skip
    rows = [
        trial_row("s", c.trial_name(), c, history, "completed")
        for c in (_config(P=2, K=4), _config(P=2, K=4, fragments=2, fragment_delay=1,
                                              fragment_alpha=0.25))
    ]
    assert [(r["fragments"], r["fragment_delay"], r["fragment_alpha"]) for r in rows] == [
        (1, 0, 0.0), (2, 1, 0.25)]  # fmt: skip
    frame = pd.DataFrame(rows)
    _, keys = costmodel._streaming_groups(frame)
    assert keys is not None
    assert {"fragments", "fragment_delay", "fragment_alpha"} <= set(keys)


def test_packed_points_with_fragments_equal_the_points_run_alone() -> None:
    from kavg_ray.train.packed import pack_key

    from .test_packed import alone, cfg, packed

    points = [
        cfg(K=4, seed=0),
        cfg(K=4, seed=1, fragments=2, fragment_delay=1),
        cfg(K=8, seed=2, fragments=4, fragment_delay=1, fragment_alpha=0.25,
            outer={"lr": 0.7, "momentum": 0.9}),
    ]  # fmt: skip
    assert len({pack_key(c) for c in points}) == 1  # the three keys may differ in a pack
    got = packed(points)
    for i, c in enumerate(points):
        for a, b in zip(got[i], alone(c), strict=True):
            assert a["test_acc"] == b["test_acc"], i
            for key in ("test_loss", "train_loss"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), (i, key)
            assert a["rounds"] == b["rounds"] == 22 * a["epoch"] // (c.K // c.fragments), i


def test_kopt_by_accuracy_splits_by_the_fragment_keys() -> None:
    from kavg_ray.analysis.results import kopt_table

    rows = []
    for fragments, best in ((1, 4), (2, 8)):
        for K in (4, 8):
            c = _config(P=2, K=K, fragments=fragments)
            acc = 0.9 if K == best else 0.8
            hist = [{"epoch": 1, "test_acc": acc, "test_loss": 0.3, "train_loss": 0.2,
                     "wall_time_s": 1.0}]  # fmt: skip
            rows.append(trial_row("s", c.trial_name(), c, hist, "completed"))
    table = kopt_table(pd.DataFrame(rows))
    assert dict(zip(table["fragments"], table["K_opt"], strict=True)) == {1: 4, 2: 8}
