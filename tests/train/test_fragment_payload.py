"""Compressed fragments (``fragments`` with a ``payload`` other than fp32; issue #28): each
fragment's change since its last apply, quantized per block of 256 of the fragment's own
slice, averaged by the shard scheme, applied tau steps after its launch. The real gloo
learners (P = 2) against an independent one-process reference written with plain tensors
and torch.optim.SGD, the stacked engine against both, a resume with an average in flight,
the bytes, and F = 1, tau = 0 against today's whole-model compressed average."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from kavg_ray.analysis.costmodel import payload_bytes
from kavg_ray.train.averaging import KAvgAverager
from kavg_ray.train.fragments import fragment_bounds
from kavg_ray.train.stacked import StackedEngine, StackedFragments

from ..distributed import run_distributed
from .test_fragments import torchft_order
from .test_payload import N_PARAMS, N, _change, _model, _start, ref_roundtrip
from .test_process_group import _config

CPU = torch.device("cpu")
SIZES = [600, 30, 30, 30, 210, 7]  # the parameters of test_payload's model, 60 buffers after
STEPS, CUT = 13, 5  # CUT: a checkpoint taken with a fragment average in flight (tau > 0)
CASES = {
    "int8-F2-tau1": dict(K=4, F=2, tau=1, alpha=0.0, payload="int8", ef=False, outer=None),
    "int4-F3-tau1-ef-nesterov-alpha": dict(K=6, F=3, tau=1, alpha=0.25, payload="int4", ef=True,
                                           outer=(0.7, 0.9, True)),
    "fp8-F1-tau2-ef-momentum": dict(K=3, F=1, tau=2, alpha=0.0, payload="fp8", ef=True,
                                    outer=(0.5, 0.8, False)),
    "bf16-F3-tau0-sgd": dict(K=3, F=3, tau=0, alpha=0.5, payload="bf16", ef=False,
                             outer=(1.3, 0.0, False)),
}  # fmt: skip


def test_the_fragments_cut_blocks_off_the_buffers_grid() -> None:
    """The test model's fragments start off the whole buffer's 256-element grid (630), and
    one (30 elements, one block) leaves learner 0 an empty shard at P = 2: the cases below
    exercise blocks counted from the fragment's own start."""
    assert fragment_bounds(SIZES, 3, N) == [(0, 600), (600, 630), (630, N)]
    assert fragment_bounds(SIZES, 2, N) == [(0, 600), (600, N)]


def reference(case: dict, P: int, steps: int) -> tuple[list, torch.Tensor]:
    """P learners' flat models in one process: at a launch each learner's fragment change
    ``base_f - x_f`` (plus its residual) is quantized block by block from the fragment's
    start, the P copies summed in rank order, divided by P and quantized again; tau steps
    later ``base_f`` moves by that mean (through the fragment's own torch.optim.SGD on its
    parameters with an outer optimizer) and every learner's fragment becomes
    ``lerp(base_f, own, alpha)``. Returns every step's models and the residuals."""
    K, Fr, tau, alpha, payload = (case[k] for k in ("K", "F", "tau", "alpha", "payload"))
    xs, base, residual = [_start() for _ in range(P)], _start(), torch.zeros(P, N)
    bounds = fragment_bounds(SIZES, Fr, N)
    anchors, opts = [], []
    for a, b in bounds:
        anchors.append(nn.Parameter(base[a : min(b, N_PARAMS)].clone()))
        if case["outer"] is not None:
            lr, mu, nesterov = case["outer"]
            opts.append(torch.optim.SGD([anchors[-1]], lr=lr, momentum=mu, nesterov=nesterov))
    launched, applied = torchft_order(K, Fr, tau, steps)
    out, pending = [], None
    for t in range(1, steps + 1):
        xs = [x + _change(t, r) for r, x in enumerate(xs)]
        if t in launched:
            a, b = bounds[launched[t]]
            sent = []
            for r in range(P):
                g = base[a:b] - xs[r][a:b] + (residual[r, a:b] if case["ef"] else 0.0)
                sent.append(ref_roundtrip(g, payload))
                if case["ef"]:
                    residual[r, a:b] = g - sent[-1]
            total = sent[0].clone()
            for s in sent[1:]:
                total += s
            pending = ref_roundtrip(total / P, payload)
        if t in applied:
            f = applied[t]
            (a, b), cut = bounds[f], min(bounds[f][1], N_PARAMS) - bounds[f][0]
            if case["outer"] is None:
                base[a:b] = base[a:b] - pending
            else:
                anchors[f].grad = pending[:cut].clone()
                opts[f].step()
                base[a : a + cut] = anchors[f].detach()
                base[a + cut : b] = base[a + cut : b] - pending[cut:]
            for x in xs:
                x[a:b] = torch.lerp(base[a:b], x[a:b], alpha)
        out.append(torch.stack(xs))
    return out, residual


def _averager(case: dict) -> KAvgAverager:
    kw = {} if case["outer"] is None else dict(
        zip(("outer_lr", "outer_momentum", "nesterov"), case["outer"], strict=True))
    return KAvgAverager(_model(), case["K"], fragments=case["F"], fragment_delay=case["tau"],
                        fragment_alpha=case["alpha"], payload=case["payload"],
                        payload_error_feedback=case["ef"], **kw)  # fmt: skip


def _one_case(case: dict, rank: int) -> dict:
    """STEPS steps of synthetic local changes; after step CUT a twin loaded from the
    averager's checkpoint (an average in flight when tau > 0) runs beside it."""
    avg, twin, states = _averager(case), None, []
    for t in range(1, STEPS + 1):
        for a in (avg, twin) if twin is not None else (avg,):
            a.flat.buffer.add_(_change(t, rank))
            a.step()
        if t == CUT:
            # The launch left its first all-to-all in flight (nothing waited for it).
            pending = avg.streaming.pending
            in_flight = pending is not None and pending.exchange.work is not None
            ckpt = copy.deepcopy(avg.state_dict())
            assert (ckpt["fragments"]["pending"] is not None) == (case["tau"] > 0)
            twin = _averager(case)
            twin.load_state_dict(ckpt)
            twin.flat.buffer.copy_(avg.flat.buffer)
        states.append(avg.flat.buffer.clone())
    res = avg.payload.residual
    return {"states": states, "twin": twin.flat.buffer.clone(), "count": avg.stats.count,
            "in_flight": in_flight,
            "bytes": avg.stats.bytes, "bounds": avg.streaming.bounds,
            "residual": None if res is None else res[0].clone()}  # fmt: skip


def _todays_compressed_average_is_one_fragment(rank: int) -> int:
    """F = 1, tau = 0, alpha = 0 through the fragment code equals today's compressed
    average bit for bit (int8 plain; int4 with error feedback and Nesterov); returns the
    steps compared."""
    compared = 0
    for payload, ef, kw in (("int8", False, {}),
                            ("int4", True, {"outer_lr": 0.7, "outer_momentum": 0.9,
                                            "nesterov": True})):  # fmt: skip
        today = KAvgAverager(_model(), 3, payload=payload, payload_error_feedback=ef, **kw)
        streamed = KAvgAverager(_model(), 3, payload=payload, payload_error_feedback=ef, **kw)
        streamed.stream(1, 0, 0.0)
        for t in range(1, 11):
            for avg in (today, streamed):
                avg.flat.buffer.add_(_change(t, rank))
                avg.step()
            assert torch.equal(today.flat.buffer, streamed.flat.buffer), (payload, t)
            assert torch.equal(today.base, streamed.base), (payload, t)
            if ef:
                assert torch.equal(today.payload.residual, streamed.payload.residual)
            compared += 1
        assert (today.stats.count, today.stats.bytes) == (streamed.stats.count,
                                                           streamed.stats.bytes) == (
            3, 3 * payload_bytes(N, payload))  # fmt: skip
    return compared


def _ranks(rank: int, world: int, out_dir: str) -> None:
    results = {name: _one_case(case, rank) for name, case in CASES.items()}
    results["today"] = _todays_compressed_average_is_one_fragment(rank)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def simulated(case: dict, P: int, stream_one: bool = False) -> tuple[list, StackedEngine]:
    """The stacked engine's fragment averages on the same synthetic changes."""
    doc = {"P": P, "K": case["K"], "backend": "simulated", "payload": case["payload"],
           "payload_error_feedback": case["ef"], "fragments": case["F"],
           "fragment_delay": case["tau"], "fragment_alpha": case["alpha"]}  # fmt: skip
    if case["outer"] is not None:
        doc["outer"] = dict(zip(("lr", "momentum", "nesterov"), case["outer"], strict=True))
    cfg = _config(**doc)
    engine = StackedEngine(cfg, CPU, build=lambda shape, classes: _model(), check=False)
    if stream_one:
        engine.streaming = StackedFragments(engine, cfg)
    flat, out = engine.stacked.flat, []
    for t in range(1, STEPS + 1):
        for r in range(P):
            flat[r].add_(_change(t, r))
        if engine.streaming is not None:
            engine.streaming.after_step(t)
        elif t % case["K"] == 0:
            engine._average_global()
        out.append(flat.clone())
    return out, engine


def _close(got: torch.Tensor, want: torch.Tensor, case: dict, what: object) -> None:
    """Bit for bit; through an outer optimizer to torch.optim.SGD's rounding (as
    tests/train/test_payload.py)."""
    if case["outer"] is None:
        assert torch.equal(got, want), what
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=str(what))


def test_real_p2_equals_the_reference_and_the_simulated_engine(tmp_path) -> None:
    run_distributed(_ranks, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["today"] == ranks[1]["today"] == 20
    for name, case in CASES.items():
        ref, ref_residual = reference(case, 2, STEPS)
        sim, engine = simulated(case, 2)
        _, applied = torchft_order(case["K"], case["F"], case["tau"], STEPS)
        for r in range(2):
            got = ranks[r][name]
            for t in range(STEPS):
                _close(got["states"][t], ref[t][r], case, (name, r, t + 1))
                assert torch.equal(got["states"][t], sim[t][r]), (name, r, t + 1)
            assert torch.equal(got["twin"], got["states"][-1]), (name, r)
            assert got["in_flight"] == (case["tau"] > 0), (name, r)
            if case["ef"]:
                _close(got["residual"], ref_residual[r], case, (name, r))
                assert torch.equal(got["residual"], engine.payload.residual[r]), (name, r)
            # rounds: fragment averages applied; bytes: payload_bytes of each one's slice.
            bounds = got["bounds"]
            assert got["count"] == len(applied) > 0
            assert got["bytes"] == sum(payload_bytes(bounds[f][1] - bounds[f][0], case["payload"])
                                       for f in applied.values()), name  # fmt: skip
        # The compression changed the run: the fp32 fragments end elsewhere.
        fp32, _ = simulated({**case, "payload": "fp32", "ef": False}, 2)
        assert not torch.equal(fp32[-1], sim[-1]), name


@pytest.mark.parametrize("name", list(CASES))
def test_simulated_p4_equals_the_reference(name: str) -> None:
    case = CASES[name]
    ref, ref_residual = reference(case, 4, STEPS)
    sim, engine = simulated(case, 4)
    for t in range(STEPS):
        _close(sim[t], ref[t], case, (name, t + 1))
    if case["ef"]:
        _close(engine.payload.residual, ref_residual, case, name)


def test_simulated_one_fragment_is_todays_compressed_average() -> None:
    for name in ("int8-F2-tau1", "int4-F3-tau1-ef-nesterov-alpha"):
        case = {**CASES[name], "F": 1, "tau": 0, "alpha": 0.0, "K": 3}
        today, a = simulated(case, 2)
        ours, b = simulated(case, 2, stream_one=True)
        assert a.streaming is None and b.streaming is not None
        for t in range(STEPS):
            assert torch.equal(today[t], ours[t]), (name, t + 1)
        assert torch.equal(a.base, b.base)


# ----------------------------------------------------------------- the training loop
def _loop_config(**overrides):
    workload = {**_config().workload.model_dump(), "momentum": 0.9}
    doc = {"P": 2, "K": 6, "fragments": 3, "fragment_delay": 1, "payload": "int8",
           "payload_error_feedback": True, "outer": {"lr": 0.7, "momentum": 0.9,
                                                     "nesterov": True},
           "workload": workload, **overrides}  # fmt: skip
    return _config(**doc)


def test_a_real_run_counts_each_fragments_payload_and_follows_the_simulated_one(
    tmp_path,
) -> None:
    """P = 2 gloo learners train through the loop with int8 fragments (error feedback,
    DiLoCo's outer optimizer, tau = 1): each applied fragment average hands in
    payload_bytes of its slice, and the learners follow the simulated run (to the rounding
    of the batched kernels, as tests/train/test_payload.py)."""
    from .test_fragments import _simulate
    from .test_payload import _real_run

    cfg = _loop_config()
    run_distributed(_real_run, 2, str(tmp_path), cfg.model_dump(mode="json"))
    real = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    sim_m, sim_s = _simulate(cfg)
    m = real[0]["metrics"]
    steps = 44 * 2  # 44 steps an epoch
    _, applied = torchft_order(cfg.K, cfg.fragments, cfg.fragment_delay, steps)
    bounds = fragment_bounds([8192, 128, 1280, 10], cfg.fragments, 9610)
    assert m["rounds"] == sim_m[-1]["rounds"] == len(applied)
    assert m["bytes_communicated"] == sum(payload_bytes(bounds[f][1] - bounds[f][0], "int8")
                                          for f in applied.values())  # fmt: skip
    for name, t in sim_s[-1]["engine"]["params"].items():
        for r in range(2):
            torch.testing.assert_close(real[r]["model"][name], t[r], rtol=0, atol=1e-4)


def test_a_simulated_run_resumes_with_a_compressed_fragment_in_flight() -> None:
    from .test_fragments import resumed_after_step_15, steps_workload

    a, b, full_m, res_m, _ = resumed_after_step_15(_loop_config(workload=steps_workload()))
    assert torch.equal(a["payload"]["residual"], b["payload"]["residual"])
    assert torch.equal(a["payload"]["base"], b["payload"]["base"])
    assert res_m[-1]["rounds"] == full_m[-1]["rounds"] == 15


def test_one_learner_quantizes_nothing() -> None:
    """P = 1: nothing travels, so nothing is quantized: a compressed fragment run is the
    fp32 one, bit for bit, simulated and real (no process group), and the base follows."""
    for name in ("int4-F3-tau1-ef-nesterov-alpha", "int8-F2-tau1"):
        case = CASES[name]
        sim, engine = simulated(case, 1)
        fp32, _ = simulated({**case, "payload": "fp32", "ef": False}, 1)
        avg = _averager(case)
        for t in range(1, STEPS + 1):
            avg.flat.buffer.add_(_change(t, 0))
            avg.step()
            assert torch.equal(sim[t - 1], fp32[t - 1]), (name, t)
            assert torch.equal(avg.flat.buffer, sim[t - 1][0]), (name, t)
        assert engine.payload.residual is None or not engine.payload.residual.any()
        # the base is the model after the last apply of each fragment: here the last one's
        a, b = avg.streaming.bounds[-1]
        assert torch.equal(avg.base[a:b], engine.base[a:b])
        assert avg.stats.bytes == 0
