"""Compressed averages: what travels in a ``payload`` other than fp32, and how it is summed.

Formats (``payload``), on the flat float32 buffer of the averager:

- ``bf16``, ``fp16``: a plain cast, 2 bytes an element, no scale.
- ``fp8`` (``torch.float8_e4m3fn``), ``int8``, ``int4`` (two an byte, low nibble first):
  the buffer is cut into blocks of :data:`PAYLOAD_BLOCK` = 256 consecutive elements (the
  last one shorter); each block carries one float32 scale, ``max|x| / Q`` with Q = 448,
  127 and 7, and its elements travel as ``x / scale`` rounded to the format (the integers
  to nearest, ties to even, clamped to [-Q, Q]). Dequantized: ``q * scale``.

So E elements travel as ``ceil(E bits / 8) + 4 ceil(E / 256)`` bytes, the cost model's
``payload_bytes`` exactly (:func:`wire_bytes`).

Why not an all-reduce: a collective sums in the tensor's own type at every hop, so the
partial sums of quantized values would be requantized (or overflow) along the ring, and
the scales of different learners do not add. The average is therefore (:meth:`Payload.
average`): the buffer is cut into P shards on block boundaries; every learner quantizes
its P shards and sends shard j to learner j (an all-to-all); learner j dequantizes the P
copies of its shard and sums them in float32, in rank order, divides by P, quantizes the
mean shard again and sends it to everyone (an all-gather, done as a second all-to-all
because the last shard may be shorter); every learner dequantizes the P mean shards. All
learners end with the same bits. Each learner hands in ``wire_bytes(E)`` bytes an average,
which is what ``bytes_communicated`` counts. The two halves (:meth:`Payload.launch`, the
quantization and the first all-to-all issued asynchronously; :meth:`Payload.finish`, the
rest) can run steps apart: a streamed fragment's launch and apply. A fragment's slice is
averaged as a vector of its own (blocks and shards counted from its first element).

Error feedback (optional): what quantizing a learner's payload dropped, ``payload -
dequantize(quantize(payload))``, is kept (float32, one element per element of the buffer)
and added to its next payload. The requantized mean has no feedback: its error is common
to every learner and is not carried.

The shards are aligned to blocks, so quantizing a whole row block by block gives the same
values as quantizing its shards: :meth:`Payload.simulated_average`, the one-process form
for the stacked engine, reproduces the collective scheme bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from kavg_ray.train import collectives

PAYLOADS = ("fp32", "bf16", "fp16", "fp8", "int8", "int4")
#: Bits an element in each format (kavg_ray.analysis.costmodel.PAYLOAD_BITS).
PAYLOAD_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}
#: Elements per block of the quantized formats, each with one float32 scale.
PAYLOAD_BLOCK = 256
#: The largest magnitude of a quantized element: float8_e4m3fn's largest finite value,
#: and the symmetric integer ranges.
QMAX = {"fp8": 448.0, "int8": 127.0, "int4": 7.0}
_CASTS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_payload(payload: str) -> None:
    """Refuse (ValueError) a payload kavg does not know."""
    if payload not in PAYLOADS:
        raise ValueError(f"payload must be one of {', '.join(PAYLOADS)}, got {payload!r}")


def wire_bytes(elements: int, payload: str) -> int:
    """Bytes ``elements`` values take in ``payload``, scales included."""
    data = -(-elements * PAYLOAD_BITS[payload] // 8)
    return data + (4 * -(-elements // PAYLOAD_BLOCK) if payload in QMAX else 0)


def shard_bounds(elements: int, shards: int) -> list[tuple[int, int]]:
    """(start, stop) of ``shards`` consecutive shards of a buffer, cut on block boundaries
    (shard j holds blocks ``[j nb / P, (j + 1) nb / P)``; some may be empty)."""
    blocks = -(-elements // PAYLOAD_BLOCK)
    cuts = [min(elements, PAYLOAD_BLOCK * (blocks * j // shards)) for j in range(shards + 1)]
    return list(zip(cuts, cuts[1:], strict=False))


def _view(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` (uint8) viewed as ``dtype``; copied first when its offset is not aligned."""
    size = torch.tensor([], dtype=dtype).element_size()
    if t.storage_offset() % size:
        t = t.clone()
    return t.view(dtype)


def _scales(x: Tensor, qmax: float) -> Tensor:
    """Each block's ``max|x| / qmax`` (float32), the whole blocks read without a copy."""
    n = x.numel()
    full = n - n % PAYLOAD_BLOCK
    parts = [torch.linalg.vector_norm(x[:full].view(-1, PAYLOAD_BLOCK), float("inf"), dim=1)]
    if n > full:
        parts.append(x[full:].abs().amax().reshape(1))
    return torch.cat(parts) / qmax


def _by_block(op: str, x: Tensor, scale: Tensor, out: Tensor) -> Tensor:
    """``out = x / scale`` or ``x * scale`` (``op`` "div" or "mul"), each block by its own
    scale: the whole blocks as one (blocks, 256) view, then the short last block."""
    n = x.numel()
    full = n - n % PAYLOAD_BLOCK
    fn = torch.div if op == "div" else torch.mul
    fn(x[:full].view(-1, PAYLOAD_BLOCK), scale[: full // PAYLOAD_BLOCK, None],
       out=out[:full].view(-1, PAYLOAD_BLOCK))  # fmt: skip
    if n > full:
        fn(x[full:], scale[-1], out=out[full:])
    return out


def quantize(x: Tensor, payload: str) -> Tensor:
    """The bytes (uint8) that a float32 vector ``x`` travels as: for fp8, int8 and int4 the
    scales (float32, one a block) first, then the elements."""
    if payload in _CASTS:
        return x.to(_CASTS[payload]).view(torch.uint8)
    qmax, n = QMAX[payload], x.numel()
    scale = _scales(x, qmax)
    y = _by_block("div", x, torch.where(scale > 0, scale, 1.0), torch.empty_like(x))
    if payload == "fp8":  # |y| <= qmax up to the scale's rounding: clamped onto 448
        data = y.clamp_(-qmax, qmax).to(torch.float8_e4m3fn).view(torch.uint8)
    else:  # |y| < qmax + 1/2, so rounding never leaves [-qmax, qmax]
        q = y.round_().to(torch.int8)
        if payload == "int8":
            data = q.view(torch.uint8)
        else:  # int4: q + 8 in 1..15, two a byte, the first element in the low nibble
            nib = torch.zeros(n + n % 2, dtype=torch.uint8, device=x.device)
            nib[:n] = q.add_(8).view(torch.uint8)
            data = nib[0::2] | (nib[1::2] << 4)
    return torch.cat([scale.view(torch.uint8), data])


def dequantize(wire: Tensor, elements: int, payload: str) -> Tensor:
    """The float32 vector of ``elements`` values that :func:`quantize` sent as ``wire``."""
    if payload in _CASTS:
        return _view(wire, _CASTS[payload]).float()
    nscale = 4 * -(-elements // PAYLOAD_BLOCK)
    scale, data = _view(wire[:nscale], torch.float32), wire[nscale:]
    if payload == "fp8":
        q = _view(data, torch.float8_e4m3fn).float()
    elif payload == "int8":
        q = data.view(torch.int8).float()
    else:
        pairs = torch.stack([data & 15, data >> 4], dim=1).view(-1)[:elements]
        q = pairs.float().sub_(8.0)
    return _by_block("mul", q, scale, q)


def roundtrip(x: Tensor, payload: str) -> Tensor:
    """What ``x`` is on arrival: ``dequantize(quantize(x))``."""
    return dequantize(quantize(x, payload), x.numel(), payload)


@dataclass
class Exchange:
    """A compressed average between its two all-to-alls (:meth:`Payload.launch`)."""

    elements: int  # the averaged vector's length
    sizes: list[int]  # the bytes of this learner's P quantized shards
    got: Tensor  # the P learners' quantized copies of this learner's shard, once arrived
    work: Any = None  # the first all-to-all while it may be in flight
    sent: Tensor | None = None  # what it sends, kept alive until it is done

    def wait(self) -> None:
        """Wait for the first all-to-all (at once when it is done or was never pending)."""
        if self.work is not None:
            self.work.wait()
            self.work = self.sent = None

    def state_dict(self) -> dict:
        """Waited for: what arrived, so a resume finishes the average."""
        self.wait()
        return {"elements": self.elements, "sizes": list(self.sizes), "got": self.got.clone()}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> Exchange:
        return cls(int(state["elements"]), [int(n) for n in state["sizes"]],
                   state["got"].to(device).clone())  # fmt: skip


class Payload:
    """The compressed average of one learner's (or, simulated, every learner's) flat
    float32 vector, and its error-feedback residual."""

    def __init__(self, payload: str, error_feedback: bool, elements: int, rows: int = 1,
                 device: torch.device | None = None) -> None:  # fmt: skip
        """``rows``: the learners whose residuals this object keeps (the stacked engine's
        P; 1 for a real learner)."""
        check_payload(payload)
        if payload == "fp32":
            raise ValueError("payload fp32 is the plain all-reduce: no Payload needed")
        self.payload, self.elements = payload, elements
        self.residual: Tensor | None = None
        if error_feedback:
            self.residual = torch.zeros((rows, elements), dtype=torch.float32, device=device)

    @property
    def error_feedback(self) -> bool:
        return self.residual is not None

    def average(
        self, g: Tensor, group: dist.ProcessGroup | None, size: int, device: torch.device,
        start: int = 0,
    ) -> tuple[Tensor, int]:  # fmt: skip
        """The mean over ``group`` of every learner's ``g`` (flat float32; overwritten with
        the residual added, under error feedback), through the shard scheme of the module
        docstring; returns it (dequantized, the same bits on every learner) and the bytes
        this learner handed in. ``g`` is elements ``[start, start + len(g))`` of the buffer
        (a fragment's slice: its blocks and shards start at ``start``, and so does its
        share of the residual). Collective: every member calls it. It is :meth:`launch`
        then :meth:`finish`."""
        return self.finish(self.launch(g, group, size, device, start), group, size, device)

    def launch(
        self, g: Tensor, group: dist.ProcessGroup | None, size: int, device: torch.device,
        start: int = 0,
    ) -> Exchange:  # fmt: skip
        """The first half of :meth:`average`: quantize this learner's P shards (error
        feedback's residual updated) and start the all-to-all that sends shard j to
        learner j, asynchronously. Collective."""
        residual = None if self.residual is None else self.residual[0, start : start + g.numel()]
        if residual is not None:
            g.add_(residual)
        bounds = shard_bounds(g.numel(), size)
        send = [quantize(g[a:b], self.payload) for a, b in bounds]
        sizes = [w.numel() for w in send]
        if residual is not None:
            sent = torch.cat([dequantize(w, b - a, self.payload)
                              for w, (a, b) in zip(send, bounds, strict=True)])  # fmt: skip
            torch.sub(g, sent, out=residual)
        mine, sent = sizes[dist.get_rank(group)], torch.cat(send)
        got = torch.empty(mine * size, dtype=torch.uint8, device=g.device)
        work = collectives.all_to_all_single(got, sent, [mine] * size, sizes, device, group,
                                             async_op=True)  # fmt: skip
        return Exchange(g.numel(), sizes, got, work, sent)

    def finish(
        self, ex: Exchange, group: dist.ProcessGroup | None, size: int, device: torch.device
    ) -> tuple[Tensor, int]:
        """The second half of :meth:`average`: wait for ``ex``'s all-to-all, sum the P
        copies of this learner's shard in float32 in rank order, divide by P, requantize
        and send the mean shard to every learner (a second all-to-all); returns the mean
        and the bytes this learner handed in. Collective."""
        ex.wait()
        bounds, sizes, got = shard_bounds(ex.elements, size), ex.sizes, ex.got
        rank = dist.get_rank(group)
        (a, b), mine = bounds[rank], sizes[rank]
        acc = dequantize(got[:mine], b - a, self.payload)
        for r in range(1, size):  # float32, in rank order
            acc.add_(dequantize(got[r * mine : (r + 1) * mine], b - a, self.payload))
        shard = quantize(acc.div_(size), self.payload)
        back = torch.empty(sum(sizes), dtype=torch.uint8, device=got.device)
        collectives.all_to_all_single(back, shard.repeat(size), sizes, [mine] * size, device,
                                      group)  # fmt: skip
        offsets = [sum(sizes[:j]) for j in range(size)]
        parts = zip(offsets, sizes, bounds, strict=True)
        mean = torch.cat([dequantize(back[o : o + s], hi - lo, self.payload)
                          for o, s, (lo, hi) in parts])  # fmt: skip
        return mean, sum(sizes)

    def simulated_average(self, g: Tensor, start: int = 0) -> Tensor:
        """:meth:`average` of the P rows of ``g`` (``(P, E)`` float32, overwritten with the
        residuals added; columns ``[start, start + E)`` of the buffer) in one process, bit
        for bit: each row quantized and dequantized, the rows summed in order in float32,
        divided by P, and the mean quantized and dequantized."""
        residual = None if self.residual is None else self.residual[:, start : start + g.shape[1]]
        if residual is not None:
            g.add_(residual)
        acc: Tensor | None = None
        for r in range(g.shape[0]):
            sent = roundtrip(g[r], self.payload)
            if residual is not None:
                torch.sub(g[r], sent, out=residual[r])
            acc = sent if acc is None else acc.add_(sent)
        return roundtrip(acc.div_(g.shape[0]), self.payload)

    def state_dict(self) -> dict:
        return {"residual": None if self.residual is None else self.residual.clone()}

    def load_state_dict(self, state: dict) -> None:
        if self.residual is None:
            return
        residual = state.get("residual")
        if residual is None or tuple(residual.shape) != tuple(self.residual.shape):
            raise ValueError("the checkpoint has no error-feedback residual of this model's size")
        self.residual.copy_(residual)
