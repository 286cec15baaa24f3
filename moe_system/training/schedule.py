"""Learning-rate schedules: constant, linear warmup + cosine decay, and OpenMoE's inverse square root."""

import math

from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(kind: str, step: int, warmup: int, total: int) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if kind == "inverse_sqrt":  # T5X/OpenMoE pretraining: 1/sqrt(max(step, warmup)), continuous at the warmup end
        return math.sqrt(max(warmup, 1)) / math.sqrt(max(step + 1, warmup, 1))
    raise ValueError(f"unknown lr schedule {kind!r}")


def build_scheduler(optimizer, kind: str, warmup: int, total: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_multiplier(kind, step, warmup, total))
