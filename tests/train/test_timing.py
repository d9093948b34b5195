"""How averages are timed (#25 item 2): the host clock on CPU, CUDA events on a GPU.

There is no GPU here, so the CUDA path runs on CPU tensors with ``torch.cuda.Event``,
``torch.cuda.current_stream`` and ``torch.cuda.synchronize`` replaced by fakes that count
their calls: an average records one event before and one after its collective, nothing
waits for the device, and the events' times reach ``CommStats`` only when they are read
(at ``settle_waits``, or when the epoch loop asks for ``comm_seconds``), split into wait
and transfer over the learners as on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kavg_ray.config import RunConfig
from kavg_ray.train import timing
from kavg_ray.train.averaging import HierAvgAverager, KAvgAverager
from kavg_ray.train.timing import CommStats

from ..distributed import run_distributed

STREAM = object()  # what the fake torch.cuda.current_stream returns


class FakeCuda:
    """Stands in for torch.cuda's events, current stream and synchronize in one process.
    Every event pair measures ``ms`` milliseconds; ``finished`` is what ``query`` says."""

    def __init__(self, ms: float) -> None:
        self.ms, self.finished = ms, True
        self.calls = {"record": 0, "elapsed": 0, "event_sync": 0, "query": 0, "synchronize": 0}
        fake = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                assert enable_timing, "an unmeasurable event"
                self.recorded = False

            def record(self, stream: object = None) -> None:
                assert stream is STREAM, "not recorded on the current stream"
                fake.calls["record"] += 1
                self.recorded = True

            def query(self) -> bool:
                fake.calls["query"] += 1
                return fake.finished

            def synchronize(self) -> None:
                fake.calls["event_sync"] += 1

            def elapsed_time(self, end: Event) -> float:
                assert self.recorded and end.recorded
                fake.calls["elapsed"] += 1
                return fake.ms

        self.Event = Event

    def install(self) -> None:
        """Replace torch.cuda's pieces in this (spawned) process."""
        torch.cuda.Event = self.Event
        torch.cuda.current_stream = lambda device=None: STREAM

        def synchronize(device: object = None) -> None:
            self.calls["synchronize"] += 1

        torch.cuda.synchronize = synchronize


def _on_fake_cuda(avg: KAvgAverager | HierAvgAverager) -> None:
    """Time ``avg``'s averages as on a GPU (its tensors stay on the CPU)."""
    avg._timer = timing.collective_timer(torch.device("cuda", 0))


def _vector_model(values: list[float]) -> nn.Module:
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor(values, dtype=torch.float64))
    return model


def test_the_timer_follows_the_device() -> None:
    assert isinstance(timing.collective_timer(torch.device("cpu")), timing.HostTimer)
    timer = timing.collective_timer(torch.device("cuda", 1))
    assert isinstance(timer, timing.CudaEventTimer) and timer.device.index == 1


def test_a_cpu_average_is_timed_on_the_host_clock_at_once() -> None:
    """CPU figures as before: perf_counter around the collective, added at once."""
    stats = CommStats()
    timer = timing.HostTimer()
    start = timer.start()
    timer.stop(start, stats, 8)
    assert (stats.count, stats.bytes, len(stats.unsettled), len(stats.pending)) == (1, 8, 1, 0)
    assert 0.0 <= stats.seconds < 1.0 and stats.unsettled == [stats.seconds]


def test_pending_events_are_read_in_order_and_finished_only_never_waits() -> None:
    fake = FakeCuda(ms=30.0)
    stats = CommStats()
    for _ in range(3):
        a, b = fake.Event(enable_timing=True), fake.Event(enable_timing=True)
        a.record(STREAM)
        b.record(STREAM)
        stats.add_pending(a, b, 4)
    assert (stats.count, stats.bytes, stats.seconds, len(stats.pending)) == (3, 12, 0.0, 3)
    fake.finished = False
    stats.resolve(finished_only=True)  # the device is not past them: nothing read, no wait
    assert len(stats.pending) == 3 and fake.calls["event_sync"] == 0
    assert fake.calls["elapsed"] == 0
    totals = stats.totals()  # a checkpoint reads them (waiting for the device if need be)
    assert totals["seconds"] == pytest.approx(0.09) and not stats.pending
    assert stats.unsettled == [0.03, 0.03, 0.03] and fake.calls["event_sync"] == 3


def test_unread_events_stay_few_in_a_long_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCuda(ms=1.0)
    monkeypatch.setattr(timing, "PENDING_EVENTS", 4)
    stats = CommStats()
    for i in range(10):
        fake.finished = i % 2 == 0  # query() is asked; only finished events are read
        a, b = fake.Event(enable_timing=True), fake.Event(enable_timing=True)
        a.record(STREAM)
        b.record(STREAM)
        stats.add_pending(a, b, 1)
        assert len(stats.pending) <= 5
    assert stats.count == 10 and fake.calls["event_sync"] == len(stats.unsettled) > 0
    stats.resolve()
    assert stats.seconds == pytest.approx(0.01) and len(stats.unsettled) == 10


# ------------------------------------------------------------------ P = 2 learners


def _event_timed_averages(rank: int, world: int) -> None:
    """K-AVG (plain, and DiLoCo's outer average) and Hier-AVG on 2 learners whose averages
    are timed by fake CUDA events: rank r's every average measures 10 (r + 1) ms."""
    fake = FakeCuda(ms=10.0 * (rank + 1))
    fake.install()
    ms = fake.ms / 1000

    model = _vector_model([float(rank), 10.0 * rank])
    avg = KAvgAverager(model, period=1)
    _on_fake_cuda(avg)
    for step in range(1, 5):
        with torch.no_grad():
            model.w.add_(rank + 1)
        avg.step()
        # The arithmetic is the CPU one: the mean of ranks 0 and 1 after each step.
        assert model.w.tolist() == [0.5 + 1.5 * step, 5.0 + 1.5 * step], step
    stats = avg.stats
    # Counted at once; one event before and one after each collective; nothing read yet,
    # and no device synchronisation anywhere on the averages' path.
    assert (stats.count, stats.bytes, stats.seconds) == (4, 4 * 16, 0.0)
    assert len(stats.pending) == 4 and stats.unsettled == []
    assert fake.calls == {"record": 8, "elapsed": 0, "event_sync": 0, "query": 0,
                          "synchronize": 0}  # fmt: skip
    avg.settle_waits()
    assert stats.seconds == pytest.approx(4 * ms) and not stats.pending
    # The shortest time over the learners (rank 0's 10 ms) is the transfer; the rest waits.
    assert stats.wait_seconds == pytest.approx(4 * (ms - 0.010))
    assert fake.calls["elapsed"] == 4 and fake.calls["synchronize"] == 0

    # DiLoCo: the pieces travel asynchronously and are stepped as they arrive; one event
    # pair spans them all, outer step included.
    outer = KAvgAverager(_vector_model([float(rank)] * 3), 1, outer_lr=0.7,
                         outer_momentum=0.9, nesterov=True)  # fmt: skip
    _on_fake_cuda(outer)
    outer.step()
    outer.step()
    assert outer.stats.count == 2 and len(outer.stats.pending) == 2
    assert fake.calls["record"] == 8 + 4 and fake.calls["synchronize"] == 0
    outer.resolve_times()
    assert outer.stats.seconds == pytest.approx(2 * ms) and outer.stats.wait_seconds == 0.0

    # Hier-AVG (S = P = 2): a local average, then a global one, each in its own statistics.
    hier = HierAvgAverager(_vector_model([float(rank)]), 1, 2, 2)
    _on_fake_cuda(hier)
    assert [hier.step(), hier.step()] == ["local", "global"]
    assert len(hier.local_stats.pending) == len(hier.global_stats.pending) == 1
    assert hier.stats.seconds == pytest.approx(2 * ms)  # reading the sum reads the events
    hier.settle_waits()
    assert hier.local_stats.wait_seconds == pytest.approx(ms - 0.010)
    assert hier.global_stats.wait_seconds == pytest.approx(ms - 0.010)
    assert fake.calls["synchronize"] == 0


def test_cuda_averages_are_timed_by_events_read_at_settle() -> None:
    run_distributed(_event_timed_averages, 2)


class FakeClock:
    """The epoch loop's ``time`` module: each perf_counter() is 100 s after the last."""

    def __init__(self) -> None:
        self.now = -100.0

    def perf_counter(self) -> float:
        self.now += 100.0
        return self.now


def _loop_with_event_times(rank: int, world: int) -> None:
    """One epoch of K-AVG through the real loop with event-timed averages of 250 (r + 1)
    ms: compute_time_s is the epoch's wall clock (100 s on the fake clock) less exactly
    the averages' time, read when the loop asks for comm_seconds after its sync."""
    from kavg_ray.train import loop
    from kavg_ray.train.process_group import ProcessGroupEngine

    fake = FakeCuda(ms=250.0 * (rank + 1))
    fake.install()
    cfg = RunConfig.model_validate({
        "workload": {"dataset": "digits", "model": "mlp", "epochs": 1, "batch_size": 64,
                     "lr": {"initial": 0.1}},
        "K": 4, "P": 2, "seed": 1,
    })  # fmt: skip
    engine = ProcessGroupEngine(cfg, rank, world, torch.device("cpu"))
    _on_fake_cuda(engine.averager)
    loop.time = FakeClock()
    reports: list[dict] = []
    metrics = loop.run_epochs(cfg, engine, lambda m, s: reports.append(m))
    rounds = (1437 // (64 * 2)) // 4  # the digits training set has 1437 images
    comm = rounds * fake.ms / 1000
    assert metrics["rounds"] == rounds == 2 and len(reports) == 1
    assert metrics["comm_time_s"] == pytest.approx(comm)
    assert metrics["compute_time_s"] == pytest.approx(100.0 - comm)
    assert metrics["wait_time_s"] == pytest.approx(rounds * 0.25 * rank)
    assert metrics["global_comm_time_s"] == metrics["comm_time_s"]
    assert math.isfinite(metrics["train_loss"]) and fake.calls["synchronize"] == 0
    assert fake.calls["record"] == 2 * rounds and fake.calls["elapsed"] == rounds


def test_the_loop_reads_event_times_before_it_derives_compute_time() -> None:
    run_distributed(_loop_with_event_times, 2)
