"""Worker: every optimizer path skips a step whose gradient is non-finite, on every rank alike.

Usage: torchrun --nproc_per_node 2 tests/workers/dist_nonfinite.py CASE_JSON [CASE_JSON ...]
A case: plugin, zero, precision, optionally pp/ep/moe_dp/microbatch, max_norm. Per case: one clean step (applied),
then a step whose gradient is made inf on the last rank only (a tensor hook on its first parameter; the loss stays
finite): every rank must skip it and keep its weights bit for bit; fp16 reports a loss-scale overflow instead,
and at the minimum loss scale a non-finite gradient; then a clean step is applied again. Failures raise.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

# Run as a script: its own folder (tests/workers) is on sys.path; dist_common and moe_system are not.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]
from dist_common import make_batch, make_config, routing_groups  # noqa: E402
from dist_parity import boosted  # noqa: E402

from moe_system.parallel.launch import init_distributed  # noqa: E402
from moe_system.training.forward_backward import forward_backward, pipeline_forward_backward  # noqa: E402


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.unwrap().parameters()]


def run_case(case: dict) -> None:
    plugin, layout, booster, model, optimizer = boosted(case, make_config())
    shard = routing_groups(make_batch(), layout.dp_size, None)[layout.data_parallel_rank]
    poisoned = {"on": False}
    if dist.get_rank() == dist.get_world_size() - 1:
        next(p for p in model.unwrap().parameters() if p.requires_grad).register_hook(
            lambda g: torch.full_like(g, float("inf")) if poisoned["on"] else g)
    mixin = getattr(optimizer, "mixed_precision", None) or getattr(optimizer, "mixed_precision_mixin", None)
    scaler = getattr(mixin, "grad_scaler", None)

    def step(poison: bool) -> tuple[bool, bool, bool]:
        """-> (skipped_nonfinite, skipped_overflow, weights changed)"""
        before = weights(model)
        poisoned["on"] = poison
        if layout.is_pipeline:
            parts = pipeline_forward_backward(booster, model, optimizer, [shard], plugin.dp_group, plugin.pp_group,
                                              torch.device("cpu"))
        else:
            parts = forward_backward(booster, model, optimizer, [shard], plugin.dp_group, torch.device("cpu"))
        assert torch.isfinite(parts["lm_loss"]), "the loss must stay finite: only the gradient is poisoned"
        optimizer.step()
        optimizer.zero_grad()
        after = weights(model)
        assert all(torch.isfinite(w).all() for w in after), "non-finite weights after a step"
        changed = any(not torch.equal(a, b) for a, b in zip(before, after))
        return optimizer.skipped_nonfinite, optimizer.skipped_overflow, changed

    name = case["name"]
    assert step(poison=False) == (False, False, True), f"{name}: a clean step must be applied"
    if case["precision"] == "fp16":  # the loss scaler sees the overflow first: skipped, not counted as non-finite
        assert step(poison=True) == (False, True, False), f"{name}: fp16 overflow"
        scaler._scale = scaler._min_scale.clone()  # no smaller scale left: now it is a non-finite gradient
        assert step(poison=True) == (True, True, False), f"{name}: overflow at the minimum loss scale"
    else:
        assert step(poison=True) == (True, False, False), f"{name}: non-finite gradient"
    assert step(poison=False) == (False, False, True), f"{name}: a clean step after a skipped one"


def main():
    init_distributed(seed=1)
    for case in map(json.loads, sys.argv[1:]):
        run_case(case)
        if dist.get_rank() == 0:
            print(f"case {case['name']} ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
