"""Test-only launcher: runs train.py (same arguments) with faults injected by monkeypatching, never through hooks in
the production code. Faults are chosen by environment variables:

FAULT_INF_GRAD=3,6,7    in the backward of these step groups (1-based count of forward/backward calls, skipped
                        steps included), the gradient of the rank's first parameter becomes all inf (the loss
                        itself stays finite)
FAULT_INF_RANKS=1       ... on these ranks only (default: every rank)
FAULT_KILL_IN_SAVE=N    SIGKILL every rank in the middle of writing its N-th checkpoint: model and optimizer are
                        in .checkpoint-STEP.partial, the RNG states and trainer_state.json not yet
FAULT_KILL_AFTER_SAVE=N SIGKILL every rank right after its N-th checkpoint was published
FAULT_SIGNAL_IN_SAVE=N  SIGTERM every rank in the middle of writing its N-th checkpoint, after waiting out the
                        window in which a repeat counts as the same signal (so it is a second one after an earlier)
FAULT_KILL_IN_PUBLISH=N SIGKILL the process that is about to rename .checkpoint-N.partial to checkpoint-N
FAULT_ENOSPC_IN_SAVE=N  in the N-th checkpoint save the disk is full: torch.save writes a few bytes, then raises
                        OSError(ENOSPC)
FAULT_DISK_FREE=BYTES   shutil.disk_usage reports this much free space
FAULT_FSYNC_LOG=FILE    append the path of every os.fsync'ed file or directory to FILE

Single process: `python tests/workers/fault_launcher.py ARGS`; several:
`torchrun ... tests/workers/fault_launcher.py ARGS`.
"""

import errno
import os
import runpy
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import moe_system.training.checkpoint as checkpoint_module
import moe_system.training.step as step_module

ROOT = Path(__file__).resolve().parents[2]


def numbers(name: str) -> set[int]:
    return {int(x) for x in os.environ.get(name, "").split(",") if x.strip()}


def inject_inf_gradients(calls: set[int], ranks: set[int]) -> None:
    state = {"call": 0, "armed": False, "hooked": False}

    def poison(grad):
        return torch.full_like(grad, float("inf")) if state["armed"] else grad

    def wrap(forward_backward):
        def wrapped(booster, model, optimizer, micro_batches, *rest):
            state["call"] += 1
            state["armed"] = state["call"] in calls and (not ranks or dist.get_rank() in ranks)
            if not state["hooked"]:  # a tensor hook runs before the gradient is accumulated, reduced or sharded
                next(p for p in model.unwrap().parameters() if p.requires_grad).register_hook(poison)
                state["hooked"] = True
            return forward_backward(booster, model, optimizer, micro_batches, *rest)
        return wrapped

    step_module.forward_backward = wrap(step_module.forward_backward)
    step_module.pipeline_forward_backward = wrap(step_module.pipeline_forward_backward)


def kill_in_save(nth: int) -> None:
    rng_state, count = checkpoint_module.rng_state, [0]

    def dying_rng_state():  # save_checkpoint calls it after the model and optimizer were written
        count[0] += 1
        if count[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return rng_state()

    checkpoint_module.rng_state = dying_rng_state


def signal_in_save(nth: int) -> None:
    rng_state, count = checkpoint_module.rng_state, [0]

    def signalling_rng_state():
        count[0] += 1
        if count[0] == nth:
            time.sleep(2.5)  # longer than interrupt.REPEAT_WINDOW_S
            os.kill(os.getpid(), signal.SIGTERM)
        return rng_state()

    checkpoint_module.rng_state = signalling_rng_state


def kill_after_save(nth: int) -> None:
    save_checkpoint, count = checkpoint_module.save_checkpoint, [0]

    def save_then_die(*args, **kwargs):
        path = save_checkpoint(*args, **kwargs)  # ends with a barrier: every rank published
        count[0] += 1
        if count[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    checkpoint_module.save_checkpoint = save_then_die


def kill_in_publish(step: int) -> None:
    rename = os.rename

    def dying_rename(src, dst, *args, **kwargs):
        if str(src).endswith(".partial") and os.path.basename(dst) == f"checkpoint-{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(src, dst, *args, **kwargs)

    os.rename = dying_rename


def disk_full_in_save(nth: int) -> None:
    save_checkpoint, save, count = checkpoint_module.save_checkpoint, torch.save, [0]

    def full_save(obj, f, *args, **kwargs):
        if count[0] != nth:
            return save(obj, f, *args, **kwargs)
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def counting_save_checkpoint(*args, **kwargs):
        count[0] += 1
        return save_checkpoint(*args, **kwargs)

    torch.save = full_save
    checkpoint_module.save_checkpoint = counting_save_checkpoint


def fake_free_space(free: int) -> None:
    disk_usage = shutil.disk_usage
    shutil.disk_usage = lambda path: disk_usage(path)._replace(free=free)


def log_fsync(log: str) -> None:
    fsync = os.fsync

    def logged_fsync(fd):
        fsync(fd)
        with open(log, "a") as f:
            f.write(os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}") + "\n")

    os.fsync = logged_fsync


# One fault per variable: its injector and how to read the variable's value.
FAULTS = {"FAULT_KILL_IN_SAVE": (kill_in_save, int), "FAULT_SIGNAL_IN_SAVE": (signal_in_save, int),
          "FAULT_KILL_AFTER_SAVE": (kill_after_save, int), "FAULT_KILL_IN_PUBLISH": (kill_in_publish, int),
          "FAULT_ENOSPC_IN_SAVE": (disk_full_in_save, int), "FAULT_DISK_FREE": (fake_free_space, int),
          "FAULT_FSYNC_LOG": (log_fsync, str)}

if __name__ == "__main__":
    if numbers("FAULT_INF_GRAD"):
        inject_inf_gradients(numbers("FAULT_INF_GRAD"), numbers("FAULT_INF_RANKS"))
    for name, (inject, parse) in FAULTS.items():
        if os.environ.get(name):
            inject(parse(os.environ[name]))
    sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
