"""The run's claim on its --output_path: writable, not silently replacing an earlier run, and used by one run at
a time (an exclusive lock held by rank 0 for the run's lifetime).

Only rank 0 checks and locks the directory; what it finds is broadcast, so every rank stops with the same one-line
error instead of waiting at the next collective. Then every rank checks that it sees the same directory.
"""

import fcntl
import glob
import os
import secrets
import shutil
import socket
from contextlib import contextmanager, suppress

import torch.distributed as dist

from ..parallel.comm import all_reduce_values
from .checkpoint import FINAL_DIR, PREFIX, OutputDirError, broadcast_problem, list_checkpoints

LOCK_FILE = ".lock"


def check_writable(path: str) -> None:
    """Fail before any work if the run could not save into path (found out only at the first checkpoint, else)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise PermissionError(f"--output_path {path} is not a writable directory ({error.strerror}); "
                              f"choose another --output_path") from None


def tidy(path: str) -> None:
    """Undo what a crash while saving left behind (see checkpoint.publish): a partial directory is no
    checkpoint; an old one renamed aside goes back in place unless its replacement made it."""
    for partial in glob.glob(os.path.join(path, f".{PREFIX}*.partial")) + [os.path.join(path, f".{FINAL_DIR}.partial")]:
        shutil.rmtree(partial, ignore_errors=True)
    for old in glob.glob(os.path.join(path, f".{PREFIX}*.old")) + glob.glob(os.path.join(path, f".{FINAL_DIR}.old")):
        current = os.path.join(path, os.path.basename(old)[1:-len(".old")])
        if os.path.exists(current):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, current)


def earlier_outputs(path: str) -> list[str]:
    """What an earlier run left in path that a new run would replace: its checkpoints and final model."""
    found = [p for _, p in list_checkpoints(path)]
    final = os.path.join(path, FINAL_DIR)
    return found + [final] if os.path.isdir(final) else found


class OutputLock:
    """flock on OUTPUT/.lock. The kernel drops it when the holder dies, so a crashed run never blocks the next;
    the file names the holder for the refusal message. Works on local filesystems and on NFS (Linux maps flock
    to NFS byte-range locks)."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_FILE)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that is starting"
                os.close(fd)
                raise OutputDirError(f"--output_path {directory} is in use by another run ({holder}); wait for "
                                     f"it to finish or stop it, or choose another --output_path") from None
            # A holder that was releasing may have unlinked the file we locked: lock the file now at the path.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with suppress(FileNotFoundError):  # while still held: a waiting run then locks a fresh file (__init__)
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


def check_shared(path: str) -> None:
    """Every rank must see rank 0's --output_path: checkpoints are written by all ranks into directories one rank
    creates, and published by rank 0's rename. Rank 0 writes a random token there; every rank reads it back.
    Collective; call after rank 0 created the directory."""
    world = dist.get_world_size()
    if world == 1:
        return
    box = [secrets.token_hex(16), path] if dist.get_rank() == 0 else [None, None]
    dist.broadcast_object_list(box, src=0)
    token, rank0_path = box  # the message names rank 0's path: the same line on every rank
    name = f".shared-check-{token}"
    if dist.get_rank() == 0:
        with open(os.path.join(path, name), "w") as f:
            f.write(token)
    dist.barrier()
    try:
        with open(os.path.join(path, name)) as f:
            seen = f.read() == token
    except OSError:
        seen = False
    missing = [0.0] * world
    missing[dist.get_rank()] = float(not seen)
    blind = all_reduce_values(missing, dist.group.WORLD).nonzero().flatten().tolist()
    if dist.get_rank() == 0:
        os.remove(os.path.join(path, name))
    if blind:
        ranks = ", ".join(map(str, blind[:8])) + (", ..." if len(blind) > 8 else "")
        raise OutputDirError(
            f"--output_path {rank0_path} is not the same directory on every rank: rank(s) {ranks} of {world} do not see "
            f"what rank 0 wrote there. Training on several nodes needs a filesystem shared by all nodes and mounted "
            f"at the same path (NFS, Lustre, ...); pass an --output_path on it")


@contextmanager
def claim_output_dir(path: str, resume: str | None, overwrite: bool):
    """For the run's lifetime: the directory is locked and checked. Yields the earlier run's outputs that
    --overwrite_output_dir lets this run replace (rank 0; empty elsewhere): the first checkpoint removes them,
    so a run that fails before saving anything leaves them as they were."""
    lock, earlier, problem = None, [], None
    if dist.get_rank() == 0:
        try:
            check_writable(path)
            lock = OutputLock(path)
            tidy(path)  # safe now: no other run writes here
            earlier = earlier_outputs(path) if not resume else []
            if earlier and not overwrite:
                names = ", ".join(os.path.basename(p) for p in earlier)
                raise OutputDirError(f"--output_path {path} already holds an earlier run ({names}); continue it "
                                     f"with --resume latest, replace it with --overwrite_output_dir, or choose "
                                     f"another --output_path")
        except (OutputDirError, OSError) as error:  # PermissionError from check_writable among them
            problem = str(error) if isinstance(error, (OutputDirError, PermissionError)) else \
                f"--output_path {path}: {error}"
            if lock:
                lock.release()
    broadcast_problem(problem)
    try:
        check_shared(path)
        yield earlier
    finally:
        if lock:
            lock.release()
