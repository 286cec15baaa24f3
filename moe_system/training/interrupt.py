"""Ctrl-C (SIGINT) and SIGTERM, which Slurm and Kubernetes send before they kill a job, end a run cleanly.

Before the step loop a signal exits at once with one line: there is nothing new to save. Inside the loop it only
marks a stop request. `stop_requested()`, called by every rank at every step, combines the requests of all ranks
with one tiny all-reduce, so all of them stop at the same step even when the signal reached them at different
steps or reached one node only. The loop then saves a checkpoint and `exit_saved` ends the run with 130 (SIGINT)
or 143 (SIGTERM), the codes a shell shows for a process killed by that signal. A second signal exits at once
without saving (the previous checkpoint stays valid: publishing one is atomic).

Imports nothing heavy at the top: train.py installs the handler before torch is imported, which takes seconds.
"""

import os
import signal
import sys
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Ctrl-C reaches torchrun and its workers, and torchrun forwards it to them once more (scancel does the same with
# SIGTERM): a repeat this soon after the first signal is the same request, not an impatient second one.
REPEAT_WINDOW_S = 2.0

_received = {"signal": 0, "at": 0.0}  # this rank's first signal
_in_loop = False
_agreed_signal = 0  # the signal all ranks stop for (the highest number any of them received)


def _say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # every worker gets the signal: one line, from rank 0
        print(line, flush=True)


def _on_signal(signum, _frame) -> None:
    now = time.monotonic()
    name = signal.Signals(signum).name
    if _received["signal"] and now - _received["at"] < REPEAT_WINDOW_S:
        return
    if _received["signal"]:
        _exit_now(signum, f"{name} again: exiting now without saving; --resume latest continues from the last "
                          f"checkpoint")
    _received.update(signal=signum, at=now)
    if not _in_loop:
        _exit_now(signum, f"interrupted ({name}) during startup; nothing to save yet")


def _exit_now(signum: int, line: str) -> None:
    """Exit from inside the handler: an exception raised here could land in a destructor or a C callback and be
    swallowed, so no unwinding (nothing half-written is published: a checkpoint appears only whole)."""
    _say(line)
    sys.stderr.flush()
    os._exit(128 + signum)


def install() -> None:
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)


def ignore() -> None:
    """The process is exiting on an error: torchrun signals the ranks left once one exits, which adds nothing."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stop_at_step_end() -> None:
    """From here on a signal stops the run at the end of the current step (the loop asks stop_requested)."""
    global _in_loop
    _in_loop = True


def stop_requested() -> bool:
    """True on every rank once any rank received a signal. A collective: every rank calls it at the same point."""
    global _agreed_signal
    import torch
    import torch.distributed as dist

    from ..parallel.comm import all_reduce_values

    agreed = _received["signal"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        agreed = int(all_reduce_values([agreed], dist.group.WORLD, op=dist.ReduceOp.MAX, dtype=torch.int32).item())
    _agreed_signal = agreed
    return agreed > 0


def exit_saved(step: int, path: str) -> None:
    _say(f"interrupted at step {step}; checkpoint saved to {path}; continue with --resume latest")
    sys.exit(128 + _agreed_signal)
