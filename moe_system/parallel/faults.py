"""A run with several ranks that stops on an error shows the one real error, once: not a copy from every rank
that found the same problem, nor a traceback from every rank whose collective broke because a peer exited."""

import sys
from datetime import timedelta

import torch.distributed as dist


def lost_peer(error: BaseException) -> bool:
    """A collective failed because another rank is gone: gloo reports a transport error (a closed connection, a
    timeout), NCCL and the rendezvous store raise torch.distributed's own error types."""
    return dist.is_initialized() and (isinstance(error, dist.DistError)
                                      or isinstance(error, RuntimeError) and "gloo/transport" in str(error))


def report_once(line: str, key: str | None = None) -> None:
    """Print line on stderr unless another rank already printed one with this key (default: the line itself)."""
    first = True
    if dist.is_initialized() and dist.get_world_size() > 1:
        try:  # the rendezvous store outlives a failed collective; add() is atomic, so exactly one rank sees 1
            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(timedelta(seconds=10))
            first = store.add(f"moe_system/reported/{key or line}", 1) == 1
        except Exception:  # the store's host is gone as well: rather twice than never
            pass
    if first:
        print(line, file=sys.stderr, flush=True)
