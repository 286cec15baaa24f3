"""Differentiable all-to-all for expert parallelism, split into launch and wait so that it can overlap compute.

The backward of an all-to-all is the same all-to-all with send and receive sizes swapped: every row's
gradient travels back to the rank that sent the row.

An exchange is two autograd nodes sharing an `AsyncAllToAll`: `launch` starts an asynchronous
all_to_all_single and returns its receive buffer, not yet filled; `wait` waits for it and passes the buffer
on. Whatever runs between the two (another chunk's experts) overlaps the transfer. In backward the roles swap:
`wait`'s backward launches the reverse exchange of the gradient and `launch`'s backward waits for it and
returns it, so the gradient exchange overlaps whatever the autograd engine runs between those two nodes
(moe/expert_parallel.py orders the graph so that this is the expert backward of a neighbouring chunk). Every
rank must build the same graph: collectives are matched by the order in which ranks issue them.
`launch`/`wait` take any object with this interface (`start(x, reverse)`, `wait()`): the two-level exchange of
moe/hierarchical_all_to_all.py reuses them.
"""

import torch
import torch.distributed as dist


class AsyncAllToAll:
    """One all-to-all of rows: recv_splits[j] rows come from rank j, send_splits[j] go to it (None: equal parts).
    Holds the collective in flight and its send buffer, which must stay alive until the collective completes."""

    def __init__(self, group, recv_splits: list[int] | None = None, send_splits: list[int] | None = None):
        self.group, self.recv_splits, self.send_splits = group, recv_splits, send_splits
        self._work = self._sent = self._received = None

    def reversed(self) -> "AsyncAllToAll":
        """The exchange that sends every row back where it came from."""
        return AsyncAllToAll(self.group, self.send_splits, self.recv_splits)

    def start(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """Start sending x (reverse: with send and receive sizes swapped); returns the receive buffer."""
        if self._work is not None:
            raise RuntimeError("this exchange is already in flight")
        recv_splits, send_splits = (self.send_splits, self.recv_splits) if reverse else \
            (self.recv_splits, self.send_splits)
        self._sent = x.contiguous()
        rows = self._sent.shape[0] if recv_splits is None else sum(recv_splits)
        out = self._sent.new_empty((rows, *self._sent.shape[1:]))
        self._work = dist.all_to_all_single(out, self._sent, recv_splits, send_splits, group=self.group,
                                            async_op=True)
        self._received = out
        return out

    def wait(self) -> torch.Tensor:
        """Wait for the exchange in flight; returns its receive buffer, now filled."""
        if self._work is None:
            raise RuntimeError("no exchange in flight")
        self._work.wait()
        received, self._work, self._sent, self._received = self._received, None, None, None
        return received


class _Launch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, exchange):
        ctx.exchange = exchange
        return exchange.start(x)

    @staticmethod
    def backward(ctx, grad):
        # `grad` is only the token _Wait.backward passed along the edge; the gradient of x is the reverse
        # exchange it launched.
        return ctx.exchange.wait(), None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, exchange):
        exchange.wait()
        ctx.exchange = exchange
        return buffer.view_as(buffer)

    @staticmethod
    def backward(ctx, grad):
        exchange = ctx.exchange
        exchange.start(grad, reverse=True)
        # The edge to _Launch carries a tensor of the receive buffer's shape; the exchanged gradient has the
        # send buffer's and is handed over through the AsyncAllToAll.
        return grad, None


def launch(x: torch.Tensor, exchange: AsyncAllToAll) -> torch.Tensor:
    """Start sending rows x [N, ...] (send_splits[j] consecutive rows to rank j); returns the receive buffer,
    which holds the rows received, grouped by source rank, only after `wait(buffer, exchange)`."""
    return _Launch.apply(x, exchange)


def wait(buffer: torch.Tensor, exchange: AsyncAllToAll) -> torch.Tensor:
    """Wait for the exchange `launch` started; returns the filled receive buffer."""
    return _Wait.apply(buffer, exchange)


def all_to_all(x: torch.Tensor, group, recv_splits: list[int] | None = None,
               send_splits: list[int] | None = None) -> torch.Tensor:
    """Rows x [N, ...]: send_splits[j] consecutive rows go to rank j; returns the rows received, grouped by
    source rank (recv_splits[j] from rank j). Without splits, every rank sends and receives equal parts."""
    exchange = AsyncAllToAll(group, recv_splits, send_splits)
    return wait(launch(x, exchange), exchange)


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """counts [ep * m]: m counts for each destination rank -> [ep * m]: the m counts each source rank sent to
    this rank (laid out [source, m]). Not differentiable: sizes only."""
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
