"""A free TCP port on this host for a local rendezvous (one-process worlds, tests, benchmarks)."""

import socket


def free_port() -> int:
    # The OS picks an unused port; it is released again on return, so a rare race with another process remains.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
