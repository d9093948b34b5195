"""The one place where training hands tensors to a collective, and the process-group
backend kavg asks for.

Every collective of a run names the device the run's collectives use (the engine's). A
tensor anywhere else is refused here, on any machine: with NCCL it would only fail at run
time, after the first epoch's training, as "No backend type associated with device type
cpu". And the groups kavg creates on GPUs register gloo for host tensors beside NCCL for
CUDA ones (:func:`backend`), so that a host tensor that slips past cannot end a run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

#: Process-group backend on GPUs: NCCL for CUDA tensors, gloo for host tensors.
GPU_BACKEND = "cpu:gloo,cuda:nccl"


class CollectiveDeviceError(ValueError):
    """A tensor handed to a collective is not on the run's collective device."""


def backend(use_cuda: bool) -> str:
    """The backend of the process groups kavg creates (Ray Train, torchrun)."""
    return GPU_BACKEND if use_cuda else "gloo"


def check_device(tensor: torch.Tensor, device: torch.device) -> None:
    """Refuse ``tensor`` unless it is on ``device`` (any index when ``device`` has none)."""
    here = tensor.device
    if here.type != device.type or (device.index is not None and here.index != device.index):
        raise CollectiveDeviceError(
            f"a collective was handed a tensor on {here}; this run's collectives are on {device}"
        )


def all_reduce(
    tensor: torch.Tensor,
    device: torch.device,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
) -> dist.Work | None:
    """``dist.all_reduce`` of a tensor on the run's collective ``device``."""
    check_device(tensor, device)
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def all_to_all_single(
    output: torch.Tensor,
    tensor: torch.Tensor,
    output_split_sizes: list[int],
    input_split_sizes: list[int],
    device: torch.device,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
) -> dist.Work | None:
    """``dist.all_to_all_single`` of tensors on the run's collective ``device``: piece j of
    ``tensor`` (``input_split_sizes[j]`` elements) goes to rank j, and ``output`` receives
    rank r's piece in its r-th part (``output_split_sizes[r]``); used by compressed
    averages (:mod:`kavg_ray.train.payload`). ``async_op``: returns the work to wait for."""
    check_device(tensor, device)
    check_device(output, device)
    return dist.all_to_all_single(
        output, tensor, output_split_sizes, input_split_sizes, group=group, async_op=async_op
    )


def broadcast(tensor: torch.Tensor, device: torch.device, src: int) -> None:
    """``dist.broadcast`` over the default group of a tensor on ``device``."""
    check_device(tensor, device)
    dist.broadcast(tensor, src=src)


def has_average(group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether the group's backend for ``device``'s tensors has ``ReduceOp.AVG``."""
    return backend_has_average(str(dist.get_backend(group)), device)


def backend_has_average(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` averages ``device``'s tensors natively (NCCL does, gloo
    does not). A group of several backends ("cpu:gloo,cuda:nccl") names one per device
    type; torch's Backend.NCCL comparison would miss it."""
    name = name.lower().replace(" ", "")
    return name == "nccl" or f"{device.type}:nccl" in name.split(",")
