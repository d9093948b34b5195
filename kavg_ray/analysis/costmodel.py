"""Time on a cluster you name: a communication cost model (docs/design.md section 10).

A sweep's measured wall time is the time on the machine that ran it. This module predicts
what a trial would take on another cluster, from the trial's own history (how many local
steps and averages it needed) and a model of the network.

**Averages (K-AVG, Hier-AVG).** An average of ``n`` bytes over P learners is a ring
all-reduce: ``2 (P-1) alpha + 2 (P-1)/P * n / beta`` seconds, with ``alpha`` the latency
of one message (s) and ``beta`` the bandwidth (bytes/s); P = 1 costs nothing. Hier-AVG's
local averages (groups of S) run on the intra-node link, its global ones (all P) on the
inter-node link; a trial whose groups spanned nodes (``hier_groups: any``, its row's
``local_on_node`` is 0) pays its local averages on the inter-node link too.

**What an average carries** (issue #28; each read from the trial's row when it has the
column, and the default reproduces the prices of a row without it):

- ``payload`` (default ``fp32``): ``fp32`` 4 bytes an element, ``bf16``/``fp16`` 2,
  ``fp8``/``int8`` 1, ``int4`` 1/2; the last three carry one float32 scale per block of
  :data:`PAYLOAD_BLOCK` (256) elements (:func:`payload_bytes`). A quantized average
  cannot sum in the collective's own arithmetic: it is an all-to-all of quantized shards,
  a local float32 sum, and an all-gather of the quantized result,
  ``(P-1) (alpha + q/(P beta)) + (P-1) (alpha + q/(P beta))`` for ``q`` payload bytes:
  the ring all-reduce's form with ``q`` for ``n`` (:func:`quantized_average_time`).
- ``fragments`` F (default 1): the history's ``rounds`` counts fragment averages, each a
  collective of its own (its own latency) carrying 1/F of the bytes.
- ``fragment_delay`` tau (default 0): a fragment's average is hidden behind up to tau
  local steps; each pays ``max(0, T - tau * step_time)`` (:func:`exposed_time`).
- An adaptive period (``K_schedule``) needs nothing: every count is the history's own.

**Parameter server (Downpour, EAMSGD).** Every pull or push moves ``n`` bytes through one
server: ``alpha + n / beta`` for the learner that makes it (an EAMSGD exchange is one push
and one pull). The server's link carries the messages of all P learners, pushes in one
direction and pulls in the other, so a run takes at least ``P * max(pushes, pulls) *
n / beta`` (per learner counts); the prediction is the larger of that and one learner's
own steps plus messages.

**Time of a trial** = local steps x step time + the communication above. The step time is
measured (``compute_time_s`` per local step of the trial; on the simulated backend, which
stacks all P learners in one process, that divided by P, and for a packed point, whose
``compute_time_s`` is its pack's, also by the points of the pack, ``pack_points``) or given
for the target hardware.

What the model leaves out, plainly: overlap of communication with computation other than
a fragment's ``fragment_delay`` (the plain averager does not overlap), the compute of
quantizing, dequantizing and summing a quantized payload, contention from other jobs on
the links, the tree and hierarchical algorithms NCCL may pick instead of a ring,
stragglers (every learner is assumed to take the step time; a real average waits for the
slowest: the process-group engine measures that wait, ``wait_time_s``, and a prediction
reports the trial's ``comm_time_s`` less it as ``measured_transfer_time_s``), the
parameter server's own compute and the queueing of simultaneous requests beyond the link
bound, evaluation and checkpoint time, and start-up. Predicted times are therefore
lower bounds for a cluster whose links match the profile.

This module imports neither torch nor ray nor kavg_ray.train: the size of a model whose
trial communicated nothing comes from a ``model_bytes`` function the caller passes (the
CLI passes :func:`kavg_ray.train.models.model_bytes`, which builds it on torch's meta device).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kavg_ray.errors import BadInputError

__all__ = [
    "GB",
    "PAYLOAD_BITS",
    "PAYLOAD_BLOCK",
    "PRESETS",
    "Fit",
    "Link",
    "Network",
    "allreduce_time",
    "asgd_speedup_table",
    "average_time",
    "exposed_time",
    "fit_alpha_beta",
    "kopt_by_predicted_time",
    "load_profile",
    "parse_network",
    "payload_bytes",
    "predict_trials",
    "quantized_average_time",
    "server_time",
    "write_profile",
]

GB = 1e9  # bandwidths are given in GB/s, decimal (10^9 bytes per second)
PROFILE_KIND = "kavg-network-profile"


@dataclass(frozen=True)
class Link:
    """One kind of link: message latency ``alpha`` (s) and bandwidth ``beta`` (bytes/s)."""

    alpha: float
    beta: float

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise BadInputError(f"alpha must be a finite number of seconds, got {self.alpha!r}")
        if self.alpha < 0:
            raise BadInputError(f"alpha must be >= 0 seconds, got {self.alpha!r}")
        ok = isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0
        if not ok:
            raise BadInputError(f"bandwidth must be a finite number > 0, got {self.beta!r} B/s")

    def describe(self) -> str:
        """E.g. ``alpha 30 us, 1.25 GB/s``."""
        return f"alpha {self.alpha * 1e6:.3g} us, {self.beta / GB:.4g} GB/s"


@dataclass(frozen=True)
class Network:
    """A named network: the inter-node link, and the intra-node one (None: the same link)."""

    name: str
    inter: Link
    intra: Link | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def local_link(self) -> Link:
        """The link Hier-AVG's local averages use."""
        return self.intra or self.inter

    def describe(self) -> str:
        """One line: name, both links, and where the figures come from."""
        intra = self.intra.describe() if self.intra else "same link"
        text = f"{self.name}: {self.inter.describe()} (intra-node: {intra})"
        return f"{text}; {self.source}" if self.source else text

    def to_dict(self) -> dict[str, Any]:
        """The profile document (see :func:`load_profile`)."""
        doc: dict[str, Any] = {
            "kind": PROFILE_KIND,
            "name": self.name,
            "alpha_s": self.inter.alpha,
            "bandwidth_GBps": self.inter.beta / GB,
        }
        if self.intra is not None:
            doc["intra"] = {"alpha_s": self.intra.alpha, "bandwidth_GBps": self.intra.beta / GB}
        if self.source:
            doc["source"] = self.source
        return {**doc, **self.extra}


def _preset(name: str, alpha_us: float, gbps_line: float, source: str) -> Network:
    return Network(name, Link(alpha_us * 1e-6, gbps_line / 8 * GB), None, source)


_ARCHETYPE = "DiLoCo scaling-law study's network archetype (arXiv 2503.09799, App. A.3): {}"


#: Named networks. Bandwidth: the nominal line rate of one port per direction (Ethernet:
#: IEEE 802.3ab 1000BASE-T, 802.3ae 10GBASE, 802.3ba 100GBASE; InfiniBand: the InfiniBand
#: Trade Association's HDR = 200 Gb/s and NDR = 400 Gb/s for a 4x port; NVLink: NVIDIA's
#: A100 datasheet, 600 GB/s total NVLink bandwidth per GPU, i.e. 300 GB/s each way).
#: An all-reduce achieves less than the line rate (framing, protocol, copies): typically
#: 70-95% of it. Alpha: one message's latency as a communication library sees it, round
#: figures of the usual order (a few us on NVLink and InfiniBand with RDMA, tens of us for
#: TCP over Ethernet), not measurements. Calibrate (``kavg calibrate``) for real figures.
#: ``wan400g``, ``wan100g``, ``wan10g``: the three network archetypes of the DiLoCo
#: scaling-law study (Charles et al. 2025, arXiv 2503.09799, Appendix A.3), its figures
#: as given: 400 Gbit/s with 0.1 ms latency, 100 Gbit/s with 1 ms, 10 Gbit/s with 10 ms.
#: Alpha is that latency for every message; a ring all-reduce pays it 2(P-1) times,
#: where the study's model pays it once per all-reduce (docs/design.md section 10).
PRESETS: dict[str, Network] = {
    "nvlink": _preset("nvlink", 3.0, 2400.0, "NVLink 3 (A100), 300 GB/s each way, nominal"),
    "ib200": _preset("ib200", 5.0, 200.0, "InfiniBand HDR 4x, 200 Gb/s line rate"),
    "ib400": _preset("ib400", 5.0, 400.0, "InfiniBand NDR 4x, 400 Gb/s line rate"),
    "eth1g": _preset("eth1g", 50.0, 1.0, "Ethernet 1 Gb/s line rate, TCP"),
    "eth10g": _preset("eth10g", 30.0, 10.0, "Ethernet 10 Gb/s line rate, TCP"),
    "eth100g": _preset("eth100g", 20.0, 100.0, "Ethernet 100 Gb/s line rate, TCP"),
    "wan400g": _preset("wan400g", 100.0, 400.0, _ARCHETYPE.format("400 Gbit/s, 0.1 ms")),
    "wan100g": _preset("wan100g", 1000.0, 100.0, _ARCHETYPE.format("100 Gbit/s, 1 ms")),
    "wan10g": _preset("wan10g", 10000.0, 10.0, _ARCHETYPE.format("10 Gbit/s, 10 ms")),
}


# --------------------------------------------------------------------------- formulas


def allreduce_time(P: int, nbytes: float, link: Link) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``P`` learners on ``link``."""
    if P < 1:
        raise ValueError(f"P must be >= 1, got {P}")
    if P == 1:
        return 0.0
    return 2 * (P - 1) * link.alpha + 2 * (P - 1) / P * nbytes / link.beta


#: ``payload``: bits of one element on the wire.
PAYLOAD_BITS: dict[str, int] = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}
#: Payloads quantized per block: each block of PAYLOAD_BLOCK elements carries one float32
#: scale (SCALE_BYTES). The training side's quantizer uses the same block.
QUANTIZED: frozenset[str] = frozenset({"fp8", "int8", "int4"})
PAYLOAD_BLOCK = 256
SCALE_BYTES = 4


def payload_bytes(elements: int, payload: str = "fp32") -> int:
    """Bytes one learner hands to an average of ``elements`` values sent as ``payload``:
    ``ceil(E * bits / 8)``, plus ``4 * ceil(E / 256)`` of scales for fp8, int8 and int4."""
    bits = PAYLOAD_BITS[payload]
    data = -(-int(elements) * bits // 8)
    if payload in QUANTIZED:
        data += SCALE_BYTES * -(-int(elements) // PAYLOAD_BLOCK)
    return data


def quantized_average_time(P: int, qbytes: float, link: Link) -> float:
    """Seconds of a quantized average of ``qbytes`` (payload and scales) over ``P`` learners.

    The sum cannot run in the collective's own arithmetic (a quantized partial sum would be
    requantized at every hop), so: an all-to-all sends shard j (q/P bytes) to learner j,
    ``(P-1) alpha + (P-1)/P * q / beta``; learner j dequantizes its P shards, sums them in
    float32 and quantizes the sum; an all-gather returns every summed shard,
    ``(P-1) alpha + (P-1)/P * q / beta``. Together the ring all-reduce's form with q.
    """
    if P < 1:
        raise ValueError(f"P must be >= 1, got {P}")
    if P == 1:
        return 0.0
    all_to_all = (P - 1) * link.alpha + (P - 1) / P * qbytes / link.beta
    all_gather = (P - 1) * link.alpha + (P - 1) / P * qbytes / link.beta
    return all_to_all + all_gather


def average_time(P: int, nbytes: float, link: Link, payload: str = "fp32") -> float:
    """Seconds of one average of ``nbytes`` (as handed in) over ``P`` learners: a ring
    all-reduce, or for a quantized ``payload`` :func:`quantized_average_time`."""
    if payload in QUANTIZED:
        return quantized_average_time(P, nbytes, link)
    return allreduce_time(P, nbytes, link)


def exposed_time(seconds: float, delay_steps: float, step_time: float) -> float:
    """What an average taking ``seconds`` costs when it overlaps up to ``delay_steps``
    local steps of ``step_time`` each: ``max(0, seconds - delay_steps * step_time)``; all
    of it when ``delay_steps`` is 0 (whatever the step time)."""
    if not delay_steps > 0:
        return seconds
    return max(0.0, seconds - delay_steps * step_time) if math.isfinite(step_time) else math.nan


def server_time(
    P: int, pushes: float, pulls: float, nbytes: float, link: Link
) -> tuple[float, float]:
    """(one learner's message time, the server link's busy time) for per-learner counts."""
    learner = (pushes + pulls) * (link.alpha + nbytes / link.beta)
    server = P * max(pushes, pulls) * nbytes / link.beta
    return learner, server


def _comm_parts(
    row: Mapping[str, Any], network: Network, step_time: float = 0.0
) -> tuple[float, float]:
    """(paid, hidden) communication seconds of one trial's progress ``row`` (see
    :func:`_progress`): hidden is what a ``fragment_delay`` overlapped with local steps."""
    P, n, algo = int(row["P"]), float(row["model_bytes"]), row["algorithm"]
    if algo in ("downpour", "eamsgd"):
        raise ValueError("parameter-server runs have no all-reduce time")
    payload = row.get("payload", "fp32")
    one = average_time(P, n, network.inter, payload)
    paid = exposed_time(one, row.get("fragment_delay", 0.0), step_time)
    total, hidden = row["averages"] * paid, row["averages"] * (one - paid)
    if algo == "hier_avg" and row["local_averages"]:
        S = int(row["S"])
        # Groups that spanned nodes (hier_groups: any) average over the inter-node link.
        link = network.inter if row.get("local_on_node") == 0 else network.local_link
        total += row["local_averages"] * average_time(S, n, link, payload)
    return total, hidden


def _comm_time(row: Mapping[str, Any], network: Network, step_time: float = 0.0) -> float:
    """Communication seconds a trial's progress ``row`` pays (see :func:`_comm_parts`)."""
    return _comm_parts(row, network, step_time)[0]


def predicted_time(row: Mapping[str, Any], network: Network, step_time: float) -> float:
    """Seconds for ``row['local_steps']`` local steps and its communication on ``network``."""
    compute = float(row["local_steps"]) * step_time
    if row["algorithm"] in ("downpour", "eamsgd"):
        learner, server = server_time(
            int(row["P"]), row["pushes"], row["pulls"], float(row["model_bytes"]), network.inter
        )
        return max(compute + learner, server)
    return compute + _comm_time(row, network, step_time)


# --------------------------------------------------------------------------- networks


def parse_network(spec: str) -> Network:
    """A network from ``NAME`` (a preset), ``alpha=S,bandwidth=GB/s`` or a profile FILE.

    The ``key=value`` form also takes ``intra_alpha=S,intra_bandwidth=GB/s`` for the
    intra-node link, ``inter=PRESET`` / ``intra=PRESET`` to combine presets, and
    ``name=TEXT``. BadInputError (exit 2) for anything else.
    """
    text = (spec or "").strip()
    if not text:
        raise BadInputError("--network is empty: " + _NETWORK_HELP)
    if text.lower() in PRESETS:
        return PRESETS[text.lower()]
    if os.path.exists(text) or text.endswith((".json", ".yaml", ".yml")):
        return load_profile(text)
    if "=" in text:
        return _parse_pairs(text)
    raise BadInputError(f"unknown network {text!r}: {_NETWORK_HELP}")


_NETWORK_HELP = (
    f"use a preset ({', '.join(PRESETS)}), alpha=SECONDS,bandwidth=GB/s, "
    "or a profile file written by 'kavg calibrate'"
)


def _number(key: str, value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise BadInputError(f"network {key}={value!r} is not a number") from None
    if not math.isfinite(x) or x < 0 or (x == 0 and "bandwidth" in key):
        raise BadInputError(f"network {key}={value!r} must be a finite number" + (
            " > 0" if "bandwidth" in key else " >= 0"))  # fmt: skip
    return x


def _parse_pairs(text: str) -> Network:
    known = {"alpha", "bandwidth", "intra_alpha", "intra_bandwidth", "inter", "intra", "name"}
    pairs: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in known or key in pairs:
            raise BadInputError(f"bad network item {part.strip()!r}: {_NETWORK_HELP}")
        pairs[key] = value.strip()
    for key in ("inter", "intra"):
        if key in pairs and pairs[key].lower() not in PRESETS:
            raise BadInputError(f"unknown network {pairs[key]!r} in {key}=: {_NETWORK_HELP}")
    base = PRESETS[pairs["inter"].lower()].inter if "inter" in pairs else None
    if ("alpha" in pairs) != ("bandwidth" in pairs) or (base is None and "alpha" not in pairs):
        raise BadInputError(f"network {text!r} needs both alpha= and bandwidth=")
    inter = base or Link(
        _number("alpha", pairs["alpha"]), _number("bandwidth", pairs["bandwidth"]) * GB
    )
    intra = PRESETS[pairs["intra"].lower()].inter if "intra" in pairs else None
    if ("intra_alpha" in pairs) != ("intra_bandwidth" in pairs):
        raise BadInputError(f"network {text!r} needs both intra_alpha= and intra_bandwidth=")
    if "intra_alpha" in pairs:
        intra = Link(
            _number("intra_alpha", pairs["intra_alpha"]),
            _number("intra_bandwidth", pairs["intra_bandwidth"]) * GB,
        )
    return Network(pairs.get("name") or text, inter, intra, "given on the command line")


def load_profile(path: str | os.PathLike[str]) -> Network:
    """A network profile file (JSON or YAML): ``alpha_s``, ``bandwidth_GBps``, optional
    ``intra: {alpha_s, bandwidth_GBps}``, ``name``, ``source``; other keys are kept."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as exc:  # OSError, JSON and YAML errors (yaml.YAMLError) alike
        raise BadInputError(f"cannot read network profile {p}: {exc}") from None
    if not isinstance(doc, dict):
        raise BadInputError(f"network profile {p} is not a mapping")
    try:
        inter = _link_from(doc)
        intra = _link_from(doc["intra"]) if doc.get("intra") is not None else None
    except BadInputError as exc:
        raise BadInputError(f"network profile {p}: {exc}") from None
    known = {"name", "alpha_s", "bandwidth_GBps", "intra", "source", "kind"}
    extra = {k: v for k, v in doc.items() if k not in known}
    return Network(str(doc.get("name") or p.stem), inter, intra, str(doc.get("source", "")), extra)


def _link_from(doc: Any) -> Link:
    if not isinstance(doc, dict) or "alpha_s" not in doc or "bandwidth_GBps" not in doc:
        raise BadInputError("needs alpha_s (seconds) and bandwidth_GBps (GB/s)")
    alpha, bw = doc["alpha_s"], doc["bandwidth_GBps"]
    if isinstance(alpha, bool) or isinstance(bw, bool):
        raise BadInputError("alpha_s and bandwidth_GBps must be numbers")
    try:
        return Link(float(alpha), float(bw) * GB)
    except (TypeError, ValueError):
        raise BadInputError("alpha_s and bandwidth_GBps must be numbers") from None


def write_profile(path: str | os.PathLike[str], network: Network) -> Path:
    """Write ``network`` as a profile file (YAML for .yaml/.yml, else JSON); its path."""
    p = Path(path)
    doc = network.to_dict()
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(doc, sort_keys=False)
    else:
        text = json.dumps(doc, indent=2) + "\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    return p


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class Fit:
    """alpha (s) and beta (bytes/s) fitted to all-reduce timings, with the residuals."""

    alpha: float
    beta: float
    residuals: pd.DataFrame  # P, nbytes, measured_s, predicted_s, rel_error

    @property
    def rms_rel_error(self) -> float:
        """Root mean square of the relative residuals."""
        return float(np.sqrt(np.mean(self.residuals["rel_error"].to_numpy() ** 2)))

    def link(self) -> Link:
        """The fitted link."""
        return Link(self.alpha, self.beta)


def fit_alpha_beta(samples: Iterable[tuple[int, float, float]]) -> Fit:
    """Least-squares alpha and beta from (P, nbytes, seconds) all-reduce timings.

    Minimises the relative error ``(model - measured) / measured`` (small messages weigh as
    much as large ones), over ``model = 2(P-1) alpha + 2(P-1)/P n / beta``. A negative
    alpha is clamped to 0 and 1/beta refitted alone. Needs two distinct sizes (or P).
    """
    rows = [(int(p), float(n), float(t)) for p, n, t in samples]
    if any(p < 2 or n < 0 or not (t > 0 and math.isfinite(t)) for p, n, t in rows):
        raise BadInputError("calibration needs P >= 2, sizes >= 0 and positive finite times")
    P = np.array([r[0] for r in rows], dtype=float)
    n = np.array([r[1] for r in rows], dtype=float)
    t = np.array([r[2] for r in rows], dtype=float)
    A = np.column_stack([2 * (P - 1), 2 * (P - 1) / P * n])
    if len(rows) < 2 or np.linalg.matrix_rank(A) < 2:
        raise BadInputError("calibration needs timings of at least two different sizes")
    w = 1.0 / t
    (alpha, inv_beta), *_ = np.linalg.lstsq(A * w[:, None], t * w, rcond=None)
    if alpha < 0:
        alpha = 0.0
        col = A[:, 1] * w
        inv_beta = float(col @ (t * w) / (col @ col))
    if inv_beta <= 0:
        raise BadInputError("the timings do not grow with the size: no bandwidth to fit")
    pred = A @ np.array([alpha, inv_beta])
    res = pd.DataFrame(
        {"P": P.astype(int), "nbytes": n, "measured_s": t, "predicted_s": pred,
         "rel_error": (pred - t) / t}
    )  # fmt: skip
    return Fit(float(alpha), float(1.0 / inv_beta), res)


# --------------------------------------------------------------------------- trials

#: Columns :func:`predict_trials` adds to the trials frame.
PREDICTION_COLUMNS: list[str] = [
    "network",
    "model_bytes",
    "step_time_s",
    "step_time_source",
    "target_accuracy",
    "target_epoch",
    "local_steps_to_target",
    "averages_to_target",
    "measured_time_to_target_s",
    "predicted_time_to_target_s",
    "predicted_time_s",
    "predicted_comm_time_s",
    "measured_transfer_time_s",
    "predicted_hidden_time_s",
]

_ASGD = ("downpour", "eamsgd")


def _num(v: Any, default: float = 0.0) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def _no_sizer(model: str, dataset: str) -> float:
    raise BadInputError(
        f"a {model} trial on {dataset} moved no bytes and no model size was given to price it"
    )


def _payload(trial: Mapping[str, Any]) -> str:
    """The trial's ``payload`` (absent or empty: fp32); BadInputError for an unknown one."""
    value = trial.get("payload")
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "fp32"
    name = str(value).strip().lower() or "fp32"
    if name not in PAYLOAD_BITS:
        raise BadInputError(
            f"trial {trial.get('trial_id')!r}: unknown payload {value!r}; "
            f"expected one of {', '.join(PAYLOAD_BITS)}"
        )
    return name


def _count(trial: Mapping[str, Any], key: str, default: float, least: float) -> float:
    """A count column of the trial (absent or NaN: ``default``); BadInputError below ``least``."""
    x = _num(trial.get(key), math.nan)
    if math.isnan(x):
        return default
    if x < least:
        raise BadInputError(f"trial {trial.get('trial_id')!r}: {key} must be >= {least}, got {x}")
    return x


def _fragments(trial: Mapping[str, Any]) -> int:
    return int(_count(trial, "fragments", 1.0, 1.0))


def _sized(fp32_bytes: float, payload: str, fragments: int) -> float:
    """Bytes per average of a model of ``fp32_bytes`` (float32) sent as ``payload`` in
    ``fragments``: 1/F of :func:`payload_bytes` of its ``fp32_bytes / 4`` elements."""
    whole = fp32_bytes if payload == "fp32" else payload_bytes(math.ceil(fp32_bytes / 4), payload)
    return whole / fragments if fragments > 1 else whole


def _trial_model_bytes(trial: Mapping[str, Any], last: Mapping[str, Any], sizer: Callable) -> float:
    """Bytes per average: the trial's own bytes / reductions, else the model's size (as its
    payload, in its fragments)."""
    algo, P = trial["algorithm"], int(trial["P"])
    sent = _num(last.get("bytes_communicated"))
    if algo == "kavg":
        if P == 1:
            return 0.0  # one learner never averages: the size does not matter
        if sent > 0 and _num(last.get("rounds")) > 0:
            return sent / _num(last.get("rounds"))
    if algo == "hier_avg":
        reductions = _num(last.get("global_reductions", last.get("rounds")))
        if _num(trial.get("S"), 1.0) > 1:
            reductions += _num(last.get("local_reductions"))
        if P == 1:
            return 0.0
        if sent > 0 and reductions > 0:
            return sent / reductions
    fp32 = float(sizer(str(trial["model"]), str(trial["dataset"])))
    return _sized(fp32, _payload(trial), _fragments(trial))


def _progress(trial: Mapping[str, Any], hist: Mapping[str, Any], nbytes: float) -> dict:
    """Per-learner counts at one history row: local steps, averages, pushes and pulls."""
    P = int(trial["P"])
    row = {
        "algorithm": trial["algorithm"], "P": P, "S": _num(trial.get("S"), 1.0),
        "model_bytes": nbytes, "local_steps": _local_steps(trial, hist),
        "averages": _num(hist.get("rounds")), "local_averages": 0.0,
        "payload": _payload(trial), "fragment_delay": _count(trial, "fragment_delay", 0.0, 0.0),
    }  # fmt: skip
    if trial["algorithm"] == "hier_avg":
        row["averages"] = _num(hist.get("global_reductions", hist.get("rounds")))
        row["local_averages"] = _num(hist.get("local_reductions"))
        row["local_on_node"] = _num(trial.get("local_on_node"), 1.0)
    if trial["algorithm"] in _ASGD:
        ins = _num(hist.get("rounds")) / P  # pushes (Downpour) or exchanges (EAMSGD)
        messages = _num(hist.get("bytes_communicated")) / nbytes if nbytes > 0 else 0.0
        row.update(pushes=ins, pulls=max(messages - ins, 0.0), averages=ins)
    return row


def _comm_only(progress: Mapping[str, Any], network: Network, step_time: float) -> tuple:
    """(paid, hidden) communication seconds; the parameter server hides nothing (NaN)."""
    if progress["algorithm"] in _ASGD:
        learner, _ = server_time(
            progress["P"], progress["pushes"], progress["pulls"],
            progress["model_bytes"], network.inter,
        )  # fmt: skip
        return learner, math.nan
    return _comm_parts(progress, network, step_time)


def _local_steps(trial: Mapping[str, Any], hist: Mapping[str, Any]) -> float:
    """A learner's optimizer steps at a history row: its ``step``, else (rows from before
    step counting) samples / (P B)."""
    step = _num(hist.get("step"), math.nan)
    if math.isfinite(step):
        return step
    return _num(hist.get("samples")) / (int(trial["P"]) * _num(trial.get("batch_size"), math.nan))


def _measured_step_time(trial: Mapping[str, Any], last: Mapping[str, Any]) -> float:
    steps = _local_steps(trial, last)
    compute = _num(last.get("compute_time_s"), math.nan)
    if not steps > 0:
        return math.nan
    per_step = compute / steps
    if trial.get("backend") != "simulated":
        return per_step
    # One process ran the P learners (a packed point: those of every point of its pack).
    return per_step / (int(trial["P"]) * _count(trial, "pack_points", 1.0, 1.0))


def _predict_one(
    trial: Mapping[str, Any], hist: pd.DataFrame, network: Network,
    step_time: float | None, target: float | None, sizer: Callable,
) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {c: math.nan for c in PREDICTION_COLUMNS}
    out.update(network=network.name, target_accuracy=math.nan if target is None else target)
    out["step_time_source"] = "given" if step_time is not None else "measured"
    if hist.empty:
        return out
    last = hist.iloc[-1].to_dict()
    n = _trial_model_bytes(trial, last, sizer)
    st = step_time if step_time is not None else _measured_step_time(trial, last)
    if step_time is None and trial.get("backend") == "simulated":
        packed = _count(trial, "pack_points", 1.0, 1.0)
        out["step_time_source"] = (f"measured/(P x {packed:g} packed points)" if packed > 1
                                   else "measured/P (simulated)")  # fmt: skip
    end = _progress(trial, last, n)
    out.update(model_bytes=n, step_time_s=st, predicted_time_s=predicted_time(end, network, st))
    out["predicted_comm_time_s"], out["predicted_hidden_time_s"] = _comm_only(end, network, st)
    # The measured averaging time less the wait for the last learner: what the model predicts.
    wait = _num(last.get("wait_time_s"), math.nan)
    out["measured_transfer_time_s"] = _num(last.get("comm_time_s"), math.nan) - wait
    if target is not None:
        acc = pd.to_numeric(hist["test_acc"], errors="coerce")
        reached = hist[acc >= target]
        if len(reached):
            first = reached.iloc[0].to_dict()
            prog = _progress(trial, first, n)
            out.update(
                target_epoch=_num(first.get("epoch"), math.nan),
                local_steps_to_target=prog["local_steps"],
                averages_to_target=prog["averages"],
                measured_time_to_target_s=_num(first.get("wall_time_s"), math.nan),
                predicted_time_to_target_s=predicted_time(prog, network, st),
            )
    return out


def predict_trials(
    trials: pd.DataFrame,
    history: pd.DataFrame,
    network: Network,
    *,
    step_time: float | None = None,
    target: float | None = None,
    sizer: Callable[[str, str], float] | None = None,
) -> pd.DataFrame:
    """``trials`` with :data:`PREDICTION_COLUMNS`: each trial's predicted time on ``network``.

    From the trial's history: local steps and averages up to the first epoch whose test
    accuracy reaches ``target`` (``predicted_time_to_target_s``; NaN if never reached or no
    target) and to its last epoch (``predicted_time_s``, the end of its budget;
    ``predicted_comm_time_s`` is that run's communication alone, to compare with
    ``measured_transfer_time_s``: ``comm_time_s`` less ``wait_time_s``, the wait for the
    last learner, which the model leaves out; ``predicted_hidden_time_s`` is what its
    ``fragment_delay`` hid behind local steps, 0 without one). ``step_time``: seconds per
    local step on the target hardware; None uses each trial's measured one.
    ``sizer(model, dataset)`` gives the float32 bytes of the model of a trial whose history
    carries none, priced as its ``payload`` in its ``fragments`` (BadInputError if such a
    trial needs it and none is given; or if a trial's payload, fragments or fragment_delay
    is not one the model knows).
    """
    if step_time is not None and not (math.isfinite(step_time) and step_time >= 0):
        raise BadInputError(f"--step-time must be a finite number >= 0, got {step_time}")
    if target is not None and not (math.isfinite(target) and 0 < target <= 1):
        raise BadInputError(f"--target must be an accuracy in (0, 1], got {target}")
    sizer = sizer or _no_sizer
    by_trial = {
        str(t): g.sort_values("epoch", kind="stable")
        for t, g in history.groupby(history["trial_id"].astype(str), sort=False)
    } if not history.empty else {}  # fmt: skip
    rows = []
    for trial in trials.to_dict("records"):
        hist = by_trial.get(str(trial["trial_id"]), history.iloc[0:0])
        rows.append(_predict_one(trial, hist, network, step_time, target, sizer))
    pred = pd.DataFrame(rows, index=trials.index, columns=PREDICTION_COLUMNS)
    out = trials.drop(columns=[c for c in PREDICTION_COLUMNS if c in trials.columns])
    return pd.concat([out, pred], axis=1)


#: Trial columns of issue #28 that change how an average travels: with their defaults
#: (what a row without the column means). A K_opt table by predicted time splits by each
#: one that varies in the sweep, as by results.VARYING_GROUP_KEYS. ``K_schedule`` is not
#: one: a schedule is a candidate beside the fixed K of its group (analysis/schedules.py).
STREAMING_DEFAULTS: dict[str, Any] = {
    "fragments": 1, "fragment_delay": 0, "payload": "fp32",
    "fragment_alpha": None, "payload_error_feedback": None,
}  # fmt: skip


def _streaming_groups(predicted: pd.DataFrame) -> tuple[pd.DataFrame, list[str] | None]:
    """``predicted`` with absent streaming values set to their defaults, and the group keys
    for kopt_table (None, its own default, when no streaming column varies)."""
    from kavg_ray.analysis.results import _kopt_group_keys

    out, extra = predicted.copy(), []
    for key, default in STREAMING_DEFAULTS.items():
        if key not in out.columns:
            continue
        if default is not None:
            out[key] = out[key].where(out[key].notna(), default)
            col = pd.to_numeric(out[key], errors="coerce")
            if isinstance(default, int) and col.notna().all() and (col % 1 == 0).all():
                out[key] = col.astype("Int64")  # counts read as counts (1, not 1.0)
            if key == "payload":
                out[key] = out[key].map(lambda v: str(v).strip().lower() or "fp32")
        if out[key].dropna().nunique() > 1:
            extra.append(key)
    if not extra:
        return out, None
    keys = _kopt_group_keys(out, None)
    return out, keys + [k for k in extra if k not in keys]


def kopt_by_predicted_time(predicted: pd.DataFrame) -> pd.DataFrame:
    """K_opt per group by predicted time to target (the columns of results.kopt_table),
    plus ``predicted_time_s`` and ``measured_time_s`` (mean time to target of K_opt's
    trials: predicted on the network, and measured on the machine that ran the sweep),
    ``measured_K_opt`` (K_opt by the measured time; both left out when every trial is
    simulated: stacked learners communicate nothing) and ``network``. Trials that differ
    in ``fragments``, ``fragment_delay``, ``payload`` (and the other
    :data:`STREAMING_DEFAULTS` columns) are ranked in groups of their own; a K_schedule's
    trials share their group and are set against its best fixed K (analysis/schedules.py)."""
    from kavg_ray.analysis.results import kopt_table

    predicted, group_by = _streaming_groups(predicted)
    by_pred = kopt_table(  # predicted times hold no wait for the last learner
        predicted.assign(time_to_target_s=predicted["predicted_time_to_target_s"]), by="time",
        group_by=group_by, flag_wait=False,
    )  # fmt: skip
    by_meas = kopt_table(
        predicted.assign(time_to_target_s=predicted["measured_time_to_target_s"]),
        by="time",
        group_by=group_by,
    )
    keys = [c for c in by_pred.columns if c in predicted.columns and c != "K"]
    from kavg_ray.analysis.schedules import candidate_labels

    ok = (predicted["status"] == "completed") & predicted["K"].notna()
    ok &= candidate_labels(predicted).isna()  # a K_schedule's trials: not its K0's
    measured_means = []
    for row in by_pred.to_dict("records"):
        sel = ok & (predicted["K"] == row["K_opt"]) if not pd.isna(row["K_opt"]) else ok & False
        for k in keys:
            sel &= predicted[k].isna() if pd.isna(row[k]) else predicted[k] == row[k]
        vals = pd.to_numeric(
            predicted.loc[sel, "measured_time_to_target_s"], errors="coerce"
        ).dropna()
        measured_means.append(float(vals.mean()) if len(vals) else math.nan)
    out = by_pred.copy()
    out["predicted_time_s"] = out["mean"]
    out["measured_time_s"] = measured_means
    out["measured_K_opt"] = by_meas["K_opt"].to_numpy() if len(by_meas) == len(out) else pd.NA
    out["network"] = predicted["network"].iloc[0] if len(predicted) else ""
    if "backend" in predicted.columns and len(predicted) and (
        predicted["backend"] == "simulated"
    ).all():  # stacked learners' wall clock is the pack's and holds no communication
        out = out.drop(columns=["measured_time_s", "measured_K_opt"])
    return out


def asgd_speedup_table(predicted: pd.DataFrame, which: str = "predicted_time_s") -> pd.DataFrame:
    """Per P: mean predicted time (to the end of the budget) of K-AVG and of each
    parameter-server method, and the speed-up of K-AVG over each (their time / K-AVG's),
    as in the paper's Figures 3 and 4. Completed trials only."""
    ok = predicted[predicted["status"] == "completed"]
    means = ok.groupby(["P", "algorithm"])[which].mean().unstack("algorithm")
    out = pd.DataFrame(index=means.index)
    for algo in means.columns:
        out[f"{algo}_s"] = means[algo]
    if "kavg" in means.columns:
        for algo in (a for a in means.columns if a in _ASGD):
            out[f"speedup_over_{algo}"] = means[algo] / means["kavg"]
    return out.reset_index()


def predict_sweep(
    sweep: str,
    storage: str | os.PathLike[str] | None,
    network: Network,
    *,
    trials: pd.DataFrame | None = None,
    step_time: float | None = None,
    target: float | None = None,
    require_target: bool = True,
    model_bytes: Callable[[str, str, Mapping[str, Any]], float] | None = None,
) -> pd.DataFrame:
    """:func:`predict_trials` for a stored sweep; ``target`` defaults to the spec's
    ``target_accuracy`` (BadInputError when neither is set, unless ``require_target`` is
    False: then only the end-of-budget columns are predicted). ``trials`` (default: the
    stored ones) lets a caller pass rows with predictions already attached.
    ``model_bytes(model, dataset, workload)`` sizes the trials that moved no bytes, given
    the spec's ``workload`` mapping (its ``model_args``, ``dataset_args``, ``synthetic``:
    the CLI's sizer builds the model as the run did)."""
    from kavg_ray.analysis.results import ResultsError, ResultsStore

    store = ResultsStore(storage)
    if trials is None:
        trials = store.read_trials(sweep)
    try:
        spec = store.read_spec(sweep)
    except ResultsError:
        spec = {}
    if target is None:
        target = spec.get("target_accuracy")
    if target is None and require_target:
        raise BadInputError(
            f"sweep {sweep!r} has no target_accuracy: give --target ACC for the time to target"
        )
    workload = spec.get("workload") or {}

    def sizer(model: str, dataset: str) -> float:
        if model_bytes is None:
            return _no_sizer(model, dataset)
        return model_bytes(model, dataset, workload)

    history = store.read_history(sweep)
    target = None if target is None else float(target)
    return predict_trials(trials, history, network, step_time=step_time, target=target, sizer=sizer)
