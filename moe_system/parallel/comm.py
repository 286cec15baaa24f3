"""Small reductions (token counts, expert loads, stop and error flags) on the communication device.

NCCL reduces device tensors only: a tensor made without a device lives on the CPU, which gloo (the tests'
backend) takes and NCCL rejects at the first collective. Every such reduction goes through all_reduce_values,
which puts its tensor on the accelerator's current device whatever the values came as.
"""

import torch
import torch.distributed as dist
from colossalai.accelerator import get_accelerator


def comm_device() -> torch.device:
    """The accelerator's current device: the rank's GPU under NCCL, the CPU under gloo (CpuZeroAccelerator)."""
    return get_accelerator().get_current_device()


def group_size(group) -> int:
    """Processes in group; None stands for a single process."""
    return dist.get_world_size(group) if group is not None else 1


def all_reduce_values(values, group, op=dist.ReduceOp.SUM, dtype=torch.float64) -> torch.Tensor:
    """values (a tensor on any device, or numbers) reduced with op over group, as a new tensor of dtype on the
    communication device (the caller's own tensor is left as it is). group None: a single process, nothing to
    reduce. A collective: every rank of the group calls it at the same point."""
    tensor = torch.as_tensor(values).to(comm_device(), dtype, copy=True)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor
