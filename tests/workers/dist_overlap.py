"""Worker: the expert-parallel exchange overlapped in chunks (--comm_overlap) against the same model without it.

Usage: torchrun --nproc_per_node N tests/workers/dist_overlap.py OUT_JSON

The tiny OpenMoE with every MoE layer turned into an EP layer over the whole (gloo) world, each rank training on
its shard of the parity batch. For every dispatch mode (and with experts that receive no token), the loss, the
MoE layers' outputs and every gradient with overlap_chunks = 1 (one plain exchange each way) are the baseline;
other chunk counts, and non-reentrant activation checkpointing (full: the forward, collectives included, re-runs
inside the backward; selective: no collective re-runs), must reproduce them. Rank 0 writes the largest
differences over all ranks, and how many all-to-alls its forward and its backward issued.
"""

import os
import sys

import torch
import torch.distributed as dist

# Run as a script: its own folder (tests/workers) is on sys.path; dist_common and moe_system are not.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]
from dist_common import make_batch, make_config, make_model, routing_groups, write_records_and_leave  # noqa: E402

from moe_system.moe.expert_parallel import shard_experts  # noqa: E402

# (chunks, what checkpointing recomputes: None for no checkpointing)
VARIANTS = [(1, None), (1, "selective"), (1, "full"), (2, None), (3, None), (4, None), (4, "selective"), (4, "full"),
            (7, None)]


class CountedAllToAll:
    """dist.all_to_all_single, counting its calls (the count exchange and every row exchange)."""

    def __init__(self):
        self.real, self.calls = dist.all_to_all_single, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


def run(model, shard, num_items, chunks: int, checkpointing: str | None, train: bool = True, counts: dict = None):
    """counts, if given, receives the number of all-to-alls the forward and the backward issued."""
    layers = model.moe_layers()
    for layer in layers:
        layer.dispatcher.overlap_chunks = chunks
    model.model.gradient_checkpointing = checkpointing is not None
    model.model.recompute = checkpointing or "selective"
    model.train(train)
    outputs = []  # full recompute runs each layer twice: the first len(layers) are the forward's
    hooks = [m.register_forward_hook(lambda mod, inp, out: outputs.append(out[0].detach().clone())) for m in layers]
    model.zero_grad(set_to_none=True)
    counted = dist.all_to_all_single = CountedAllToAll()
    try:
        if not train:
            with torch.no_grad():
                out = model(**shard, num_items_in_batch=num_items)
            return out.loss.detach(), outputs[:len(layers)], {}
        out = model(**shard, num_items_in_batch=num_items)
        forward_calls = counted.calls
        out.loss.backward()
        if counts is not None:
            counts.update(forward_all_to_alls=forward_calls, backward_all_to_alls=counted.calls - forward_calls)
    finally:
        dist.all_to_all_single = counted.real
        for hook in hooks:
            hook.remove()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"rank {dist.get_rank()}: no gradient for {missing}"
    return out.loss.detach(), outputs[:len(layers)], {n: p.grad.clone() for n, p in model.named_parameters()}


def max_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def compare(base, other) -> dict:
    (loss0, outs0, grads0), (loss1, outs1, grads1) = base, other
    out_diff = max((a - b).abs().max().item() for a, b in zip(outs0, outs1))
    out_rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outs0, outs1))
    result = {"loss_abs_diff": (loss0 - loss1).abs().item(), "out_abs_diff": out_diff, "out_rel_diff": out_rel}
    for kind in ("expert", "other"):
        names = [n for n in grads0 if (".experts." in n) == (kind == "expert")]
        if not names:
            continue
        diff = max((grads0[n] - grads1[n]).abs().max().item() for n in names)
        scale = max(grads0[n].abs().max().item() for n in names)
        result[f"{kind}_grad_abs_diff"], result[f"{kind}_grad_scale"] = diff, scale
        # rounding-level check per tensor: |diff| relative to that tensor's largest entry
        result[f"{kind}_grad_rel_diff"] = max(
            ((grads0[n] - grads1[n]).abs().max() / grads0[n].abs().max().clamp(min=1e-30)).item() for n in names)
    keys = sorted(result)
    return dict(zip(keys, max_over_ranks([result[k] for k in keys])))


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    batch = make_batch()
    shard = routing_groups(batch, world, None)[rank]
    num_items = float((batch["labels"][:, 1:] != -100).sum())
    records = []
    for dispatch, starve in (("dropless", False), ("dropless", True), ("capacity", False), ("capacity", True)):
        model = make_model(make_config(dispatch), starve=starve)
        for layer in model.model.layers:
            if layer.is_moe:
                shard_experts(layer.mlp, ep_group=dist.group.WORLD)
        base = run(model, shard, num_items, 1, False)
        for chunks, checkpointing in VARIANTS:
            counts = {}
            diffs = compare(base, run(model, shard, num_items, chunks, checkpointing, counts=counts))
            records.append({"dispatch": dispatch, "starve": starve, "chunks": chunks,
                            "checkpointing": checkpointing, **diffs, **counts})
        eval_base, eval_chunked = (run(model, shard, num_items, c, False, train=False) for c in (1, 4))
        diff = max_over_ranks([max((a - b).abs().max().item() for a, b in zip(eval_base[1], eval_chunked[1]))])[0]
        records.append({"dispatch": dispatch, "starve": starve, "chunks": 4, "eval": True, "out_abs_diff": diff})
        counts = sum(layer.last_counts for layer in model.moe_layers())
        records[-1]["unrouted_experts"] = int((counts == 0).sum())
    write_records_and_leave(records, out_path, world)


if __name__ == "__main__":
    main()
