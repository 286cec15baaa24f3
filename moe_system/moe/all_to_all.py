"""Differentiable all-to-all for expert parallelism, and a gradient scale for expert weights.

The backward of an all-to-all is the same all-to-all with send and receive sizes swapped: every row's
gradient travels back to the rank that sent the row.
"""

import torch
import torch.distributed as dist


def _exchange(x: torch.Tensor, recv_splits: list[int] | None, send_splits: list[int] | None, group) -> torch.Tensor:
    rows = x.shape[0] if recv_splits is None else sum(recv_splits)
    out = x.new_empty((rows, *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, recv_splits, send_splits, group):
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        return _exchange(x, recv_splits, send_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.send_splits, ctx.recv_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, group, recv_splits: list[int] | None = None,
               send_splits: list[int] | None = None) -> torch.Tensor:
    """Rows x [N, ...]: send_splits[j] consecutive rows go to rank j; returns the rows received, grouped by
    source rank (recv_splits[j] from rank j). Without splits, every rank sends and receives equal parts."""
    return _AllToAll.apply(x, recv_splits, send_splits, group)


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """counts [ep * E_local] rows this rank sends to each expert -> [ep * E_local] rows each source rank sends
    to each of this rank's experts (laid out [source, local expert]). Not differentiable: sizes only."""
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient flowing back into x by scale."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)
