"""The per-trial dashboard metrics (kavg_ray/launch/dashboard.py), without a Ray cluster.

What reaches a real Prometheus, and through the Grafana dashboard's queries, is in
test_grafana.py; here: the values and tags recorded for an epoch, exactly.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from kavg_ray.config import RunConfig
from kavg_ray.launch import dashboard

GRAFANA_JSON = Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "kavg.json"

# An epoch of K-AVG, K = 4, P = 2 as the process-group engine reports it (loop.py keys).
KAVG_EPOCH = {
    "epoch": 2, "samples": 2816, "rounds": 22, "train_loss": 0.5, "test_loss": 0.25,
    "test_acc": 0.875, "comm_time_s": 1.1, "wait_time_s": 0.4, "bytes_communicated": 4096,
    "wall_time_s": 4.0, "local_reductions": 0, "global_reductions": 22,
}  # fmt: skip


class Recorded:
    """Stands in for a ray.util.metrics Gauge or Counter: keeps what was recorded."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, float, dict]] = []
        self.fail = fail

    def set(self, value: float, tags: dict) -> None:
        if self.fail:
            raise ValueError("the metrics agent refused the value")
        self.calls.append(("set", value, tags))

    def inc(self, value: float, tags: dict) -> None:
        self.calls.append(("inc", value, tags))


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, Recorded]:
    """record_epoch's metrics, recorded here, as if Ray were running."""
    made = {name: Recorded() for name in dashboard.METRIC_NAMES}
    monkeypatch.setattr(dashboard, "_metrics", made)
    monkeypatch.setattr(dashboard, "_ray_ready", lambda: True)
    monkeypatch.setattr(dashboard, "_last", {})
    monkeypatch.setattr(dashboard, "_failed", False)
    return made


def test_epoch_values_of_kavg() -> None:
    values = dashboard.epoch_values(KAVG_EPOCH, previous=(1408.0, 2.0))
    assert values == {
        "kavg_test_accuracy": 0.875, "kavg_test_loss": 0.25, "kavg_train_loss": 0.5,
        "kavg_epoch": 2.0, "kavg_rounds": 22.0, "kavg_local_averages": 0.0,
        "kavg_global_averages": 22.0, "kavg_averaging_time_seconds": 1.1,
        "kavg_wait_time_seconds": 0.4, "kavg_time_per_average_seconds": 1.1 / 22,
        "kavg_bytes_averaged": 4096.0, "kavg_samples_per_second": (2816 - 1408) / 2.0,
    }  # fmt: skip
    assert set(values) == set(dashboard.GAUGES)


def test_without_a_global_count_every_average_is_global() -> None:
    # The stacked engine's K-AVG and older rows: no local or global counts, only rounds.
    metrics = {
        k: v for k, v in KAVG_EPOCH.items() if k not in ("local_reductions", "global_reductions")
    }
    values = dashboard.epoch_values(metrics, previous=None)
    assert (values["kavg_local_averages"], values["kavg_global_averages"]) == (0.0, 22.0)
    assert values["kavg_samples_per_second"] == 2816 / 4.0


def test_hier_avg_counts_local_and_global_averages_apart() -> None:
    metrics = {**KAVG_EPOCH, "rounds": 5, "local_reductions": 17, "global_reductions": 5}
    values = dashboard.epoch_values(metrics, previous=None)
    assert values["kavg_local_averages"] == 17.0
    assert values["kavg_global_averages"] == 5.0
    assert values["kavg_time_per_average_seconds"] == 1.1 / 5


def test_a_wait_that_was_not_measured_is_not_recorded() -> None:
    # The parameter server's learners never wait at a collective: wait_time_s is NaN.
    values = dashboard.epoch_values({**KAVG_EPOCH, "wait_time_s": math.nan}, previous=None)
    assert "kavg_wait_time_seconds" not in values
    assert values["kavg_averaging_time_seconds"] == 1.1


def test_tags_name_sweep_trial_k_and_p() -> None:
    kavg = RunConfig(name="graf", K=4, P=2)
    assert dashboard.trial_tags(kavg) == {"sweep": "graf", "trial": "K4-P2-s0", "K": "4", "P": "2"}
    hier = RunConfig(name="h", algorithm="hier_avg", S=2, K1=2, K2=8, P=4)
    # K is the period the trial rows report as K: Hier-AVG's global period K2.
    assert dashboard.trial_tags(hier) == {
        "sweep": "h", "trial": "S2-K1_2-K2_8-P4-s0", "K": "8", "P": "4",
    }  # fmt: skip
    assert tuple(dashboard.trial_tags(kavg)) == dashboard.TAG_KEYS


def test_record_epoch_sets_every_gauge_with_the_trial_tags(
    recorded: dict[str, Recorded],
) -> None:
    cfg = RunConfig(name="graf", K=4, P=2)
    dashboard.record_epoch(cfg, {**KAVG_EPOCH, "epoch": 1, "samples": 1408, "wall_time_s": 2.0})
    dashboard.record_epoch(cfg, KAVG_EPOCH)
    tags = {"sweep": "graf", "trial": "K4-P2-s0", "K": "4", "P": "2"}
    want = dashboard.epoch_values(KAVG_EPOCH, previous=(1408.0, 2.0))
    for name, value in want.items():
        assert recorded[name].calls[-1] == ("set", value, tags), name
    # The second epoch's rate counts only its own samples and time.
    assert recorded["kavg_samples_per_second"].calls[-1][1] == 704.0
    assert recorded["kavg_global_averages"].calls[-1][1] == 22.0
    assert recorded["kavg_wait_time_seconds"].calls[-1][1] == 0.4
    assert recorded["kavg_epochs"].calls == [("inc", 1.0, tags), ("inc", 1.0, tags)]


def test_record_epoch_never_raises_into_training(recorded: dict[str, Recorded]) -> None:
    recorded["kavg_local_averages"].fail = True
    cfg = RunConfig(name="graf", K=4, P=2)
    dashboard.record_epoch(cfg, KAVG_EPOCH)  # the failure is logged, not raised
    assert dashboard._failed
    # Disabled for the rest of the process: the next epoch records nothing.
    before = len(recorded["kavg_epoch"].calls)
    dashboard.record_epoch(cfg, KAVG_EPOCH)
    assert len(recorded["kavg_epoch"].calls) == before


def test_without_ray_nothing_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    made = {name: Recorded(fail=True) for name in dashboard.METRIC_NAMES}
    monkeypatch.setattr(dashboard, "_metrics", made)
    monkeypatch.setattr(dashboard, "_failed", False)
    monkeypatch.setattr(dashboard, "_ray_ready", lambda: False)
    dashboard.record_epoch(RunConfig(name="graf", K=4, P=2), KAVG_EPOCH)
    assert not dashboard._failed and all(not m.calls for m in made.values())


def test_the_grafana_dashboard_charts_every_metric() -> None:
    board = json.loads(GRAFANA_JSON.read_text())
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    charted = set()
    for panel in panels:
        for target in panel["targets"]:
            charted |= set(re.findall(r"\bray_(kavg_\w+)\{", target["expr"]))
            assert target["legendFormat"] == "{{sweep}}/{{trial}} K={{K}} P={{P}}"
            assert 'SessionName=~"$SessionName"' in target["expr"]
            assert target["expr"].startswith("max by (sweep, trial, K, P) (")
            assert 'ray_io_cluster=~"$Cluster"' in target["expr"]
    # Every average of every engine is a round of the global count: kavg_rounds always
    # equals kavg_global_averages, a panel of its own would repeat that one.
    assert charted == set(dashboard.GAUGES) - {"kavg_rounds"}
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "SessionName", "Cluster"} <= names
