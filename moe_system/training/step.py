"""One optimizer step and the run's progress counters.

`train_step` runs the forward/backward of a step's micro-batches and the optimizer step, and says what came of
it instead of updating regardless: a non-finite loss or gradient, or an fp16 loss-scale overflow, leaves the
weights alone. Every outcome is decided from all-reduced values, so every rank takes the same one.
"""

import math
from dataclasses import dataclass

import torch

from .forward_backward import forward_backward, pipeline_forward_backward

OK, NONFINITE_LOSS, NONFINITE_GRAD, OVERFLOW = "ok", "nonfinite_loss", "nonfinite_grad", "overflow"


@dataclass
class TrainState:
    """Where a run stands; what a checkpoint stores about progress (trainer_state.json's keys)."""
    step: int = 0  # optimizer steps that updated the weights
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    overflows: int = 0  # fp16 steps skipped by the loss scaler (routine, not counted as bad)
    consumed: int = 0  # step-sized groups of batches drawn from the data, skipped steps included: the data position
    bad_in_a_row: int = 0  # consecutive non-finite steps; not saved (a resumed run starts with a clean record)

    def record(self, outcome: str) -> None:
        if outcome == OK:
            self.step, self.bad_in_a_row = self.step + 1, 0
        elif outcome == OVERFLOW:
            self.overflows += 1
        else:
            self.skipped, self.bad_in_a_row = self.skipped + 1, self.bad_in_a_row + 1

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped, "overflow_steps": self.overflows,
                "consumed_steps": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped = state["step"], state["skipped_steps"]
        # checkpoints from before fp16 overflow counting and data positions: none, and the position is the step
        self.overflows, self.consumed = state.get("overflow_steps", 0), state.get("consumed_steps", self.step)


@dataclass
class StepResult:
    outcome: str  # OK, NONFINITE_LOSS, NONFINITE_GRAD or OVERFLOW
    parts: dict  # global-mean lm_loss, aux_loss, router_z_loss and the target-token count, as Python floats


def train_step(booster, model, optimizer, scheduler, micro_batches: list[dict], plugin, device,
               after_update=()) -> StepResult:
    """Forward/backward over the micro-batches and the optimizer step; `after_update` callbacks run only when the
    weights were updated (the optimizer wrappers call their inner step even when they drop the gradients)."""
    if plugin.pp_size > 1:
        parts = pipeline_forward_backward(booster, model, optimizer, micro_batches, plugin.dp_group,
                                          plugin.pp_group, device)
    else:
        parts = forward_backward(booster, model, optimizer, micro_batches, plugin.dp_group, device)
    # The step's one device-to-host copy of its own: the loss parts for the log, and their sum for the finite check
    # (all-reduced, so every rank decides the same). fp64: the token count stays exact beyond 2^24.
    lm, aux, z = parts["lm_loss"], parts["aux_loss"], parts["router_z_loss"]
    total, *values = torch.stack([t.double() for t in (lm + aux + z, lm, aux, z, parts["tokens"])]).tolist()
    parts = dict(zip(("lm_loss", "aux_loss", "router_z_loss", "tokens"), values))
    if not math.isfinite(total):
        outcome = NONFINITE_LOSS
    else:
        optimizer.step()  # skips the update itself if the global gradient norm (all-reduced) is inf/nan
        outcome = NONFINITE_GRAD if optimizer.skipped_nonfinite else OVERFLOW if optimizer.skipped_overflow else OK
    optimizer.zero_grad()
    if outcome == OK:
        for callback in after_update:
            callback()
        scheduler.step()
    return StepResult(outcome, parts)
