"""Compressed averages (kavg_ray.train.payload, issue #28 item 2) against an independent
reference of the scheme written here with plain tensors: quantization per block of 256
with a float32 scale, an all-to-all of quantized shards, a float32 sum in rank order, the
mean requantized and gathered; error feedback; the outer optimizer as torch.optim.SGD."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from kavg_ray.analysis.costmodel import PAYLOAD_BITS, PAYLOAD_BLOCK, payload_bytes
from kavg_ray.config import ConfigError, parse_run
from kavg_ray.train import payload as pl
from kavg_ray.train.averaging import KAvgAverager
from kavg_ray.train.stacked import StackedEngine

from ..distributed import run_distributed
from .test_process_group import _config

CPU = torch.device("cpu")
OUTER_KW = ("outer_lr", "outer_momentum", "nesterov")
QMAX = {"fp8": 448.0, "int8": 127.0, "int4": 7.0}
ROUNDS = 3
# (payload, error feedback, outer optimizer) of the distributed cases.
CASES = [
    ("bf16", False, None), ("fp16", False, None), ("fp8", False, None), ("int8", False, None),
    ("int4", False, None), ("int8", True, None), ("bf16", True, None),
    ("int4", True, (0.7, 0.9, True)), ("fp8", False, (0.5, 0.0, False)),
]  # fmt: skip


def ref_roundtrip(x: torch.Tensor, payload: str) -> torch.Tensor:
    """What ``x`` is after it travelled, block by block, written without kavg's code."""
    if payload in ("bf16", "fp16"):
        return x.to(torch.bfloat16 if payload == "bf16" else torch.float16).float()
    out = torch.empty_like(x)
    for a in range(0, x.numel(), 256):
        block = x[a : a + 256]
        scale = block.abs().max() / QMAX[payload]
        if scale == 0:
            out[a : a + 256] = 0.0
            continue
        y = (block / scale).clamp(-QMAX[payload], QMAX[payload])
        q = y.to(torch.float8_e4m3fn).float() if payload == "fp8" else torch.round(y)
        out[a : a + 256] = q * scale
    return out


def _model() -> nn.Module:
    """907 parameters and 60 floating buffers (BatchNorm): 967 elements, 4 blocks, the
    last of 199 (odd: int4 pads a nibble)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.BatchNorm1d(30), nn.Linear(30, 7))


N, N_PARAMS = 967, 907


def _change(t: int, r: int) -> torch.Tensor:
    """Learner r's local change before average t: magnitudes that differ by block."""
    g = torch.Generator().manual_seed(1000 * t + r)
    return torch.randn(N, generator=g) * torch.linspace(1e-3, 2.0, N) ** 2


def _start() -> torch.Tensor:
    """The flat model every learner starts from: parameters, then floating buffers."""
    model = _model()
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def reference(P: int, payload: str, ef: bool, outer: tuple | None) -> list[dict]:
    """The scheme on P learners for ROUNDS averages, in one process: per average the model
    every learner holds, and each learner's residual."""
    model = _start()
    residual = torch.zeros(P, N)
    anchor = nn.Parameter(model[:N_PARAMS].clone())
    opt = None
    if outer is not None:
        lr, mu, nesterov = outer
        opt = torch.optim.SGD([anchor], lr=lr, momentum=mu, nesterov=nesterov)
    out = []
    for t in range(ROUNDS):
        xs = [model + _change(t, r) for r in range(P)]
        sent = []
        for r in range(P):
            g = model - xs[r]
            if ef:
                g = g + residual[r]
            sent.append(ref_roundtrip(g, payload))
            if ef:
                residual[r] = g - sent[-1]
        total = sent[0].clone()
        for s in sent[1:]:
            total += s
        mean = ref_roundtrip(total / P, payload)
        if opt is None:
            model = model - mean
        else:
            anchor.grad = mean[:N_PARAMS].clone()
            opt.step()
            model = torch.cat([anchor.detach(), model[N_PARAMS:] - mean[N_PARAMS:]])
        out.append({"model": model.clone(), "residual": residual.clone()})
    return out


def _learner_rounds(rank: int, world: int, out_dir: str) -> None:
    """Every case on this rank: ROUNDS averages; after the first, a second averager loaded
    from the first's checkpoint takes the next average beside it."""
    results = {}
    for payload, ef, outer in CASES:
        kw = {} if outer is None else dict(zip(OUTER_KW, outer, strict=True))
        avg = KAvgAverager(_model(), 1, payload=payload, payload_error_feedback=ef, **kw)
        rows = []
        for t in range(ROUNDS):
            avg.flat.buffer.add_(_change(t, rank))
            if t == 1:  # the checkpoint carries the base, the residual and the outer state
                twin = KAvgAverager(_model(), 1, payload=payload, payload_error_feedback=ef, **kw)
                twin.load_state_dict(avg.state_dict())
                twin.flat.buffer.copy_(avg.flat.buffer)
            avg.average()
            row = {"model": avg.flat.buffer.clone()}
            if ef:
                row["residual"] = avg.payload.residual[0].clone()
            if t == 1:
                twin.average()
                row["twin"] = twin.flat.buffer.clone()
            rows.append(row)
        results[(payload, ef, outer)] = {"rows": rows, "bytes": avg.stats.bytes,
                                         "count": avg.stats.count}  # fmt: skip
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _simulated_rounds(P: int, payload: str, ef: bool, outer: tuple | None) -> list[dict]:
    """The stacked engine's global average on the same inputs as the real learners."""
    doc = {"P": P, "K": 1, "backend": "simulated", "payload": payload,
           "payload_error_feedback": ef}  # fmt: skip
    if outer is not None:
        doc["outer"] = dict(zip(("lr", "momentum", "nesterov"), outer, strict=True))
    build = lambda shape, classes: _model()  # noqa: E731
    engine = StackedEngine(_config(**doc), CPU, build=build, check=False)
    flat, out = engine.stacked.flat, []
    assert torch.equal(engine.base, _start()) and flat.shape == (P, N)
    for t in range(ROUNDS):
        for r in range(P):
            flat[r].add_(_change(t, r))
        engine._average_global()
        out.append({"model": flat.clone(), "residual": None if not ef else
                    engine.payload.residual.clone()})  # fmt: skip
    return out


def _check_against_reference(got: torch.Tensor, want: torch.Tensor, outer: tuple | None) -> None:
    """Bit for bit; through an outer optimizer to torch.optim.SGD's rounding (its momentum
    update rounds mu * v before the add, kavg's may not), as tests/test_outer_optimizer.py."""
    if outer is None:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("P", [2, 4])
def test_compressed_average_equals_the_reference(P: int, tmp_path) -> None:
    """P gloo learners: every average equals the one-process reference on every learner;
    residuals are carried exactly; a learner resumed from a checkpoint takes the same next
    average; the bytes are the cost model's payload_bytes per average; and the stacked
    engine's average (simulated) equals the real learners' bit for bit."""
    run_distributed(_learner_rounds, P, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(P)]
    for case in CASES:
        payload, ef, outer = case
        ref, sim = reference(P, payload, ef, outer), _simulated_rounds(P, payload, ef, outer)
        for r, got in enumerate(ranks):
            rows = got[case]["rows"]
            for t in range(ROUNDS):
                _check_against_reference(rows[t]["model"], ref[t]["model"], outer)
                assert torch.equal(rows[t]["model"], sim[t]["model"][r]), (case, r, t)
                if ef:
                    _check_against_reference(rows[t]["residual"], ref[t]["residual"][r], outer)
                    assert torch.equal(rows[t]["residual"], sim[t]["residual"][r])
            assert torch.equal(rows[1]["twin"], rows[1]["model"])
            assert got[case]["count"] == ROUNDS
            assert got[case]["bytes"] == ROUNDS * payload_bytes(N, payload)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-ef{int(c[1])}-o{int(bool(c[2]))}")
def test_simulated_average_equals_the_reference(case: tuple) -> None:
    """The stacked engine's compressed average at P = 3, against the reference."""
    ref, sim = reference(3, *case), _simulated_rounds(3, *case)
    for t in range(ROUNDS):
        for r in range(3):
            _check_against_reference(sim[t]["model"][r], ref[t]["model"], case[2])
        if case[1]:
            _check_against_reference(sim[t]["residual"], ref[t]["residual"], case[2])


# ----------------------------------------------------------------------------------------
# Quantization


def _signal() -> torch.Tensor:
    """1,000 values: blocks of very different magnitude, one block of zeros, a short last
    block (232 elements), tiny values beside large ones."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    x[:256] *= 1e-4
    x[256:512] = 0.0
    x[512:768] *= 50.0
    x[770] = 1e-9
    return x


@pytest.mark.parametrize("payload", ["bf16", "fp16", "fp8", "int8", "int4"])
def test_roundtrip_is_the_reference_and_within_its_bound(payload: str) -> None:
    x = _signal()
    wire = pl.quantize(x, payload)
    assert wire.dtype == torch.uint8 and wire.numel() == payload_bytes(x.numel(), payload)
    y = pl.dequantize(wire, x.numel(), payload)
    assert torch.equal(y, ref_roundtrip(x, payload))
    err = (x - y).abs()
    if payload in ("bf16", "fp16"):  # half an ulp: 2**-8 and 2**-11 relative; fp16's
        # subnormals (below 2**-14) are 2**-24 apart
        bound = x.abs() * 2.0**-8 if payload == "bf16" else x.abs() * 2.0**-11 + 2.0**-25
        assert (err <= bound).all() and err.max() > 0
        return
    for a in range(0, x.numel(), PAYLOAD_BLOCK):
        block, e = x[a : a + PAYLOAD_BLOCK], err[a : a + PAYLOAD_BLOCK]
        scale = float(block.abs().max()) / QMAX[payload]
        if payload == "fp8":  # 3 mantissa bits: 2**-4 relative; subnormal steps 2**-9 scale
            bound = block.abs() * 2.0**-4 + scale * 2.0**-10
        else:  # round to nearest: half a step
            bound = torch.full_like(block, scale / 2)
        assert (e <= bound * (1 + 1e-6)).all(), a
        if scale == 0:
            assert (e == 0).all()
        else:  # the bound is reached within a factor: the payload really is coarse
            assert e.max() > bound.max() / 8


def test_int4_packs_two_elements_a_byte_low_nibble_first() -> None:
    x = torch.tensor([7.0, -7.0, 1.0, 0.0, -3.0])  # scale 1: q = x
    wire = pl.quantize(x, "int4")
    assert torch.equal(wire[:4].view(torch.float32), torch.tensor([1.0]))
    # q + 8: 15, 1, 9, 8, 5 -> bytes 0x1F, 0x89, 0x05
    assert wire[4:].tolist() == [0x1F, 0x89, 0x05]
    assert torch.equal(pl.dequantize(wire, 5, "int4"), x)


def test_the_block_and_sizes_are_the_cost_models() -> None:
    assert pl.PAYLOAD_BLOCK == PAYLOAD_BLOCK and pl.PAYLOAD_BITS == PAYLOAD_BITS
    for payload in pl.PAYLOADS:
        for n in (0, 1, 255, 256, 257, 999, 11_173_962):
            assert pl.wire_bytes(n, payload) == payload_bytes(n, payload)


def test_shards_are_cut_on_block_boundaries() -> None:
    assert pl.shard_bounds(967, 2) == [(0, 512), (512, 967)]
    assert pl.shard_bounds(967, 4) == [(0, 256), (256, 512), (512, 768), (768, 967)]
    assert pl.shard_bounds(300, 4) == [(0, 0), (0, 256), (256, 256), (256, 300)]
    assert pl.shard_bounds(2560, 3) == [(0, 768), (768, 1536), (1536, 2560)]


# ----------------------------------------------------------------------------------------
# Configs


def test_fp32_keeps_no_payload_state_and_sends_the_flat_buffer() -> None:
    avg = KAvgAverager(_model(), 1)
    assert avg.payload is None and avg.base is None and "payload" not in avg.state_dict()
    with pytest.raises(ValueError, match="needs a payload other than fp32"):
        KAvgAverager(_model(), 1, payload_error_feedback=True)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"payload": "int2"}, "payload: Input should be 'fp32', 'bf16', 'fp16', 'fp8'"),
        ({"payload_error_feedback": True}, "payload_error_feedback needs a compressed payload"),
        ({"algorithm": "hier_avg", "K": None, "S": 2, "K1": 1, "K2": 2, "payload": "int8"},
         "payload int8 is built for kavg only; hier_avg averages send fp32"),
        ({"algorithm": "downpour", "K": None, "payload": "bf16"},
         "payload bf16 is built for kavg only; downpour"),
    ],
)  # fmt: skip
def test_configs_that_cannot_be_run_are_refused(doc: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_run({"K": 4, "P": 2, **doc})


def test_the_keys_are_grid_keys_and_trial_columns() -> None:
    from kavg_ray.config import parse_sweep
    from kavg_ray.launch.sweep import _setting_columns

    spec = parse_sweep({"name": "s", "K": 4, "P": 2, "backend": "simulated",
                        "payload_error_feedback": True,
                        "grid": {"payload": ["int8", "int4"]}})  # fmt: skip
    points = spec.points()
    assert [p.trial_name() for p in points] == ["K4-P2-s0-payloadint8-sim",
                                                "K4-P2-s0-payloadint4-sim"]  # fmt: skip
    row = _setting_columns(points[1])
    assert (row["payload"], row["payload_error_feedback"]) == ("int4", True)
    assert _setting_columns(parse_run({"K": 4}))["payload"] == "fp32"


# ----------------------------------------------------------------------------------------
# Whole runs


def _payload_config(**overrides):
    workload = {**_config().workload.model_dump(), "momentum": 0.9}
    doc = {"P": 2, "K": 3, "payload": "int8", "payload_error_feedback": True,
           "workload": workload, **overrides}  # fmt: skip
    return _config(**doc)


def _simulated_run(cfg, resume=None) -> tuple[list, list]:
    from kavg_ray.train.loop import run_epochs

    metrics, states = [], []
    run_epochs(cfg, StackedEngine(cfg, CPU), lambda m, s: (metrics.append(m), states.append(s)),
               resume)  # fmt: skip
    return metrics, states


def test_a_simulated_run_resumes_with_its_base_and_residuals() -> None:
    """A compressed run (int8, error feedback, DiLoCo's outer optimizer) resumed after its
    first epoch ends as the run that was not stopped, bit for bit."""
    cfg = _payload_config(outer={"lr": 0.7, "momentum": 0.9, "nesterov": True})
    full_m, full_s = _simulated_run(cfg)
    one = cfg.model_copy(update={"workload": cfg.workload.model_copy(update={"epochs": 1})})
    _, part_s = _simulated_run(one)
    assert part_s[-1]["engine"]["payload"]["residual"].abs().sum() > 0
    res_m, res_s = _simulated_run(cfg, resume=part_s[-1])
    full, res = full_s[-1]["engine"], res_s[-1]["engine"]
    for name, t in full["params"].items():
        assert torch.equal(res["params"][name], t), name
    assert torch.equal(res["payload"]["base"], full["payload"]["base"])
    assert torch.equal(res["payload"]["residual"], full["payload"]["residual"])
    assert res_m[-1]["test_loss"] == full_m[-1]["test_loss"]
    # ... and the compression changed the run: fp32 ends elsewhere
    fp32 = cfg.model_copy(update={"payload": "fp32", "payload_error_feedback": False})
    plain = _simulated_run(fp32)[1][-1]
    assert "payload" not in plain["engine"]
    gap = max((plain["engine"]["params"][k] - t).abs().max() for k, t in full["params"].items())
    assert gap > 1e-4


def _real_run(rank: int, world: int, out_dir: str, doc: dict) -> None:
    from kavg_ray.config import RunConfig
    from kavg_ray.train import train

    reports: list = []
    train(RunConfig.model_validate(doc), lambda m, s: reports.append((m, s)), rank=rank,
          world_size=world)  # fmt: skip
    metrics, state = reports[-1]
    torch.save({"metrics": metrics, "model": state["engine"]["model"]},
               os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip


def test_a_real_run_counts_its_bytes_and_follows_the_simulated_one(tmp_path) -> None:
    """P = 2 gloo learners train with payload int8 and error feedback: every average hands
    in the cost model's payload_bytes of the flat model, and the learners follow the
    simulated run (to the rounding of the batched kernels, as tests/train/test_stacked.py)."""
    cfg = _payload_config()
    run_distributed(_real_run, 2, str(tmp_path), cfg.model_dump(mode="json"))
    real = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    sim_m, sim_s = _simulated_run(cfg)
    elements = sum(t.numel() for t in real[0]["model"].values() if t.is_floating_point())
    m = real[0]["metrics"]
    assert m["rounds"] == sim_m[-1]["rounds"] > 0
    assert m["bytes_communicated"] == m["rounds"] * payload_bytes(elements, "int8")
    for name, t in sim_s[-1]["engine"]["params"].items():
        for r in range(2):
            torch.testing.assert_close(real[r]["model"][name], t[r], rtol=0, atol=1e-4)


def test_packed_points_with_payloads_equal_the_points_run_alone() -> None:
    """Points that differ in payload and error feedback share a pack (the packed engine
    runs each point's stacked average) and end as each point run alone."""
    from kavg_ray.train.packed import pack_key

    from .test_packed import alone, cfg, packed

    points = [cfg(K=2, seed=0, payload="int8", payload_error_feedback=True),
              cfg(K=4, seed=1, payload="int4", outer={"lr": 0.7, "momentum": 0.9}),
              cfg(K=2, seed=0)]  # fmt: skip
    assert len({pack_key(c) for c in points}) == 1
    got = packed(points)
    for i, c in enumerate(points):
        for a, b in zip(got[i], alone(c), strict=True):
            assert a["test_acc"] == b["test_acc"], i
            assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-5), i
            assert a["rounds"] == b["rounds"], i
    assert got[0][-1]["test_loss"] != got[2][-1]["test_loss"]  # int8 is not fp32
