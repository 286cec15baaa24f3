"""Full-state training checkpoints: model (Hugging Face format), optimizer (ZeRO and expert shards included),
LR scheduler, data position, per-rank RNG states, step and arguments, in OUTPUT/checkpoint-STEP/.

Publishing is atomic: every rank writes into OUTPUT/.checkpoint-STEP.partial, and only after all of them
finished does rank 0 rename it. A crash while saving leaves the previous checkpoint as the latest valid one.
Before the rename every file is fsynced and listed in manifest.json with its size and sha256, so a power loss or
a damaged file is found on resume (--resume latest then falls back to the newest intact checkpoint).

Like the rename, the manifest assumes that the output directory is one filesystem shared by every rank (NFS,
Lustre, ...): each rank checksums its own optimizer and RNG files (still in its page cache) plus a share of the
others, and rank 0 writes the manifest of all of them.

Every file loads with torch.load(weights_only=True): tensors and plain containers, no pickled code.
"""

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from ..model.convert import CheckpointError
from ..parallel.checkpoint_io import safe_load, save_state

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
FINAL_DIR = "final"


class OutputDirError(RuntimeError):
    """The output directory cannot take this run or this save: in use, holding an earlier run, or full."""


def broadcast_problem(problem: str | None) -> None:
    """Rank 0's verdict to every rank: each raises OutputDirError(problem) if it found one, so no rank is left
    waiting at a collective."""
    box = [problem]
    dist.broadcast_object_list(box, src=0)  # object collectives use the backend's device (CUDA under NCCL)
    if box[0]:
        raise OutputDirError(box[0])


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Published checkpoints as (step, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX}(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


# ---------------------------------------------------------------- manifest
def _sha256(path: str, fsync: bool = False) -> str:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if fsync:
            os.fsync(f.fileno())
    return digest


def _my_share(names: list[str]) -> list[str]:
    """The files this rank checksums: its own optimizer and RNG files, and every world-th of the others."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = []
    for i, name in enumerate(names):
        own = re.fullmatch(r"(?:optimizer/rank|rng/rank)0*(\d+)\.pt", name)
        if (int(own.group(1)) if own else i) % world == rank:
            mine.append(name)
    return mine


def _gather(value) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def write_manifest(directory: str) -> None:
    """fsync every file of directory and record its size and checksum in manifest.json. Collective."""
    names = None
    if dist.get_rank() == 0:  # one listing for all: directory caches of other nodes may lag behind
        names = sorted(os.path.relpath(os.path.join(root, f), directory).replace(os.sep, "/")
                       for root, _, files in os.walk(directory) for f in files)
    box = [names]
    dist.broadcast_object_list(box, src=0)
    mine = {name: {"size": os.path.getsize(os.path.join(directory, name)),
                   "sha256": _sha256(os.path.join(directory, name), fsync=True)} for name in _my_share(box[0])}
    parts = _gather(mine)
    if dist.get_rank() == 0:
        files = {name: entry for part in parts for name, entry in part.items()}
        _write_json(os.path.join(directory, MANIFEST_FILE), {"files": dict(sorted(files.items()))})


def checkpoint_problem(directory: str) -> str | None:
    """What is damaged in a published checkpoint according to its manifest, or None. A checkpoint without a
    manifest (saved before they existed) cannot be checked and passes. Collective: every rank checks its share
    of the files and all return the same answer."""
    box = [None]
    if dist.get_rank() == 0:
        path = os.path.join(directory, MANIFEST_FILE)
        try:
            with open(path) as f:
                box = [json.load(f)["files"]]
        except FileNotFoundError:
            box = [{}]
        except (ValueError, KeyError, TypeError):
            box = [f"{MANIFEST_FILE} is unreadable"]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        return box[0]
    files = box[0]
    problem = None
    for name in _my_share(sorted(files)):
        path, entry = os.path.join(directory, name), files[name]
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size is None:
            problem = f"{name} is missing"
        elif size != entry["size"]:
            problem = f"{name} has {size} bytes, {entry['size']} were saved"
        elif _sha256(path) != entry["sha256"]:
            problem = f"{name} does not match its checksum"
        if problem:
            break
    return next((p for p in _gather(problem) if p), None)


# ---------------------------------------------------------------- resume
def resolve_resume(resume: str, output_dir: str) -> str:
    """'latest' -> the newest intact published checkpoint in output_dir; otherwise a checkpoint directory, which
    must be intact. Collective (every rank checks its share of the files)."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint-STEP directory in {output_dir}; "
                                    f"train without --resume first, or pass a checkpoint path")
        for _, path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            if dist.get_rank() == 0:
                print(f"warning: {os.path.basename(path)} is damaged ({problem}); skipping it", file=sys.stderr,
                      flush=True)
        raise CheckpointError(f"--resume latest: every checkpoint in {output_dir} is damaged (see the warnings); "
                              f"start from the weights alone with --load_checkpoint, or train without --resume")
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise FileNotFoundError(f"--resume {resume}: not a training checkpoint (no {STATE_FILE}); "
                                f"pass a {PREFIX}STEP directory or 'latest'")
    problem = checkpoint_problem(resume)
    if problem:
        raise CheckpointError(f"--resume {resume}: the checkpoint is damaged ({problem}); pass an earlier "
                              f"{PREFIX}STEP, or --resume latest for the newest intact one")
    return resume


# ---------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every generator's state as tensors and plain numbers and lists (loadable with weights_only=True)."""
    _, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                       "cached_gaussian": cached_gaussian},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy, python = state["numpy"], state["python"]
    if isinstance(numpy, dict):
        numpy = ("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                 numpy["cached_gaussian"])
    np.random.set_state(numpy)  # (older checkpoints hold numpy's and Python's own tuples)
    if isinstance(python, dict):
        python = (python["version"], tuple(python["internal"]), python["gauss_next"])
    random.setstate(python)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- disk space
def _tree_size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} TB"


def _needed_space(output_dir: str) -> int | None:
    """A checkpoint takes about as much as the last one (None before the first)."""
    found = list_checkpoints(output_dir)
    return _tree_size(found[-1][1]) if found else None


def space_problem(output_dir: str, what: str) -> str | None:
    """Refuse a save up front that the free space could not hold (judged by the last checkpoint's size)."""
    needed, free = _needed_space(output_dir), shutil.disk_usage(output_dir).free
    if needed is None or free >= needed:
        return None
    return (f"disk full: {what} needs about {_size(needed)} (as much as the last checkpoint) and {output_dir} has "
            f"{_size(free)} free; free up space or choose another --output_path, then --resume latest")


def _is_disk_full(error: BaseException, output_dir: str) -> bool:
    while error is not None:  # the OSError may be the cause or context of a library's own error
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        if "inline_container" in text:  # torch's own file writer says no more; judge by the space left
            return shutil.disk_usage(output_dir).free < max(_needed_space(output_dir) or 0, 64 << 20)
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def disk_full_is_an_error(output_dir: str, what: str, partial: str):
    """A save that runs out of disk ends with one clear error; its partial directory is removed."""
    try:
        yield
    except Exception as error:
        if not _is_disk_full(error, output_dir):
            raise
        shutil.rmtree(partial, ignore_errors=True)
        needed = _needed_space(output_dir)
        raise OutputDirError(
            f"disk full while saving {what} into {output_dir} ({_size(shutil.disk_usage(output_dir).free)} free"
            + (f", about {_size(needed)} needed" if needed else "") + "); the partial save was removed and the "
            "earlier checkpoints are intact: free up space or choose another --output_path, then --resume latest"
        ) from None


# ---------------------------------------------------------------- publishing
def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(partial: str, final: str) -> None:
    """Rename partial (files already fsynced) to final. An existing final is renamed aside first and deleted
    only once the new one is in place; the directory entries are fsynced before and after the rename."""
    for root, _, _ in os.walk(partial, topdown=False):
        _fsync_dir(root)
    parent = os.path.dirname(final)
    old = os.path.join(parent, f".{os.path.basename(final)}.old")
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(partial, final)
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(booster, model, optimizer, scheduler, tokenizer, output_dir: str, trainer_state: dict,
                    keep: int | None, replacing: list[str] | None = None) -> str:
    """Save and publish OUTPUT/checkpoint-STEP; keep the newest `keep`. `replacing`: an earlier run's outputs
    (--overwrite_output_dir, rank 0), deleted once this checkpoint is in place, then emptied."""
    step = trainer_state["step"]
    name = f"{PREFIX}{step}"
    final = os.path.join(output_dir, name)
    partial = os.path.join(output_dir, f".{name}.partial")
    rank = dist.get_rank()
    problem = None
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crash at this very step
        problem = space_problem(output_dir, name)
    broadcast_problem(problem)
    with disk_full_is_an_error(output_dir, name, partial):
        save_model(booster, model, tokenizer, os.path.join(partial, "model"))
        booster.save_optimizer(optimizer, os.path.join(partial, "optimizer"), shard=True)
        booster.save_lr_scheduler(scheduler, os.path.join(partial, "scheduler.pt"))
        os.makedirs(os.path.join(partial, "rng"), exist_ok=True)  # by every rank: it writes there
        save_state(rng_state(), os.path.join(partial, "rng", f"rank{rank}.pt"))
        dist.barrier()
        if rank == 0:
            _write_json(os.path.join(partial, STATE_FILE), trainer_state)
        write_manifest(partial)
        if rank == 0:
            publish(partial, final)
    if rank == 0:
        for path in replacing or []:  # first: rotation must not count an earlier run's (newer) steps
            if path != final:  # an earlier run's checkpoint of this very step was just replaced
                shutil.rmtree(path, ignore_errors=True)
        if replacing:
            replacing.clear()
        if keep:
            for _, old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    dist.barrier()
    return final


def load_checkpoint(booster, model, optimizer, scheduler, path: str) -> dict:
    """Restores every piece saved by save_checkpoint; returns the trainer state."""
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
    except ValueError:
        raise CheckpointError(f"{os.path.join(path, STATE_FILE)} is unreadable; resume from another "
                              f"{PREFIX}STEP") from None
    booster.load_model(model, os.path.join(path, "model"))
    booster.load_optimizer(optimizer, os.path.join(path, "optimizer"))
    booster.load_lr_scheduler(scheduler, os.path.join(path, "scheduler.pt"))
    rng_file = os.path.join(path, "rng", f"rank{dist.get_rank()}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(safe_load(rng_file))
    return state


def save_model(booster, model, tokenizer, path: str) -> None:
    """A Hugging Face-format checkpoint (safetensors shards + config + tokenizer) that from_pretrained loads."""
    # config.json's "dtype" (Hugging Face's field) is the training precision's: `infer.py --dtype auto` loads that.
    model.unwrap().config.dtype = next(model.unwrap().parameters()).dtype
    booster.save_model(model, path, shard=True, use_safetensors=True)
    if dist.get_rank() == 0:
        model.unwrap().config.save_pretrained(path)
        tokenizer.save_pretrained(path)
    dist.barrier()


def save_final_model(booster, model, tokenizer, path: str) -> None:
    """save_model, published like a checkpoint: written aside, fsynced, then renamed over the old one."""
    partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    with disk_full_is_an_error(os.path.dirname(path), "the final model", partial):
        save_model(booster, model, tokenizer, partial)
        if dist.get_rank() == 0:
            for root, _, files in os.walk(partial):
                for f in files:
                    with open(os.path.join(root, f), "rb") as written:
                        os.fsync(written.fileno())
            publish(partial, path)
    dist.barrier()


class Checkpointer:
    """A run's checkpoints: every --save_interval steps, when it stops, and at the end. A save right after
    another at the same step (a stop just after a periodic save) returns the one already written."""

    def __init__(self, booster, model, optimizer, scheduler, tokenizer, args, layout, data, dp_group,
                 replacing: list[str]):
        self.booster, self.model, self.optimizer, self.scheduler = booster, model, optimizer, scheduler
        self.tokenizer, self.args, self.layout, self.data, self.dp_group = tokenizer, args, layout, data, dp_group
        self.replacing = replacing  # an earlier run's outputs, deleted once the first checkpoint is in place
        self.saved = (None, None)  # (step, path) of the last checkpoint

    def resume(self, path: str, state) -> None:
        saved = load_checkpoint(self.booster, self.model, self.optimizer, self.scheduler, path)
        state.load_state_dict(saved)
        self.data.load_state_dict(saved, state.consumed, self.dp_group)

    def maybe_save(self, state) -> None:
        if state.step % self.args.save_interval == 0 and state.step < self.data.total_steps:
            self.save(state)

    def save(self, state) -> str:
        if self.saved[0] == state.step:
            return self.saved[1]
        trainer_state = {**state.state_dict(), "args": vars(self.args), "layout": self.layout.describe(),
                         **self.data.state_dict(state.consumed, self.dp_group)}
        path = save_checkpoint(self.booster, self.model, self.optimizer, self.scheduler, self.tokenizer,
                               self.args.output_path, trainer_state, self.args.save_total_limit or None,
                               replacing=self.replacing)
        self.saved = state.step, path
        return path
