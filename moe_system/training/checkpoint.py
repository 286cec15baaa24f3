"""Full-state training checkpoints: model (Hugging Face format), optimizer (ZeRO and expert shards included),
LR scheduler, data position, per-rank RNG states, step and arguments, in OUTPUT/checkpoint-STEP/.

Publishing is atomic: every rank writes into OUTPUT/.checkpoint-STEP.partial, and only after all of them
finished does rank 0 rename it. A crash while saving leaves the previous checkpoint as the latest valid one.
"""

import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


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


def resolve_resume(resume: str, output_dir: str) -> str:
    """'latest' -> the newest published checkpoint in output_dir; otherwise a checkpoint directory."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint-STEP directory in {output_dir}; "
                                    f"train without --resume first, or pass a checkpoint path")
        return found[-1][1]
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise FileNotFoundError(f"--resume {resume}: not a training checkpoint (no {STATE_FILE}); "
                                f"pass a {PREFIX}STEP directory or 'latest'")
    return resume


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(booster, model, optimizer, scheduler, tokenizer, output_dir: str, trainer_state: dict,
                    keep: int | None) -> str:
    step = trainer_state["step"]
    final = os.path.join(output_dir, f"{PREFIX}{step}")
    partial = os.path.join(output_dir, f".{PREFIX}{step}.partial")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crash at this very step
        os.makedirs(os.path.join(partial, "rng"))
    dist.barrier()
    save_model(booster, model, tokenizer, os.path.join(partial, "model"))
    booster.save_optimizer(optimizer, os.path.join(partial, "optimizer"), shard=True)
    booster.save_lr_scheduler(scheduler, os.path.join(partial, "scheduler.pt"))
    torch.save(rng_state(), os.path.join(partial, "rng", f"rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        with open(os.path.join(partial, STATE_FILE), "w") as f:
            json.dump(trainer_state, f, indent=2)
        if os.path.exists(final):  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.rename(partial, final)
        if keep:
            for _, old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    dist.barrier()
    return final


def load_checkpoint(booster, model, optimizer, scheduler, path: str) -> dict:
    """Restores every piece saved by save_checkpoint; returns the trainer state."""
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    booster.load_model(model, os.path.join(path, "model"))
    booster.load_optimizer(optimizer, os.path.join(path, "optimizer"))
    booster.load_lr_scheduler(scheduler, os.path.join(path, "scheduler.pt"))
    rng_file = os.path.join(path, "rng", f"rank{dist.get_rank()}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def save_model(booster, model, tokenizer, path: str) -> None:
    """A Hugging Face-format checkpoint (safetensors shards + config + tokenizer) that from_pretrained loads."""
    booster.save_model(model, path, shard=True, use_safetensors=True)
    if dist.get_rank() == 0:
        model.unwrap().config.save_pretrained(path)
        tokenizer.save_pretrained(path)
    dist.barrier()
