"""One optimizer step's forward and backward over its micro-batches (the optimizer step stays in the loop).

Loss scaling: every rank computes sum(token losses) / N_global, with N_global the number of target tokens in
the whole global batch (all data-parallel ranks, all accumulation micro-batches). Data-parallel gradient
reduction averages over the DP group, so the LM term is multiplied by the DP size to turn that average back
into the exact global-batch mean. Router losses are per-micro-batch means: averaging them over micro-batches
and ranks gives their global mean.
"""

from contextlib import nullcontext

import torch
import torch.distributed as dist

from ..model.loss import router_loss


def global_target_count(micro_batches: list[dict], group, device) -> torch.Tensor:
    # int64: the plugin casts floating inputs to the training precision (fp16 is inf above 65,504 tokens)
    # non_blocking: a blocking copy to the device would wait for all the work queued before it (see forward_backward)
    count = sum((mb["labels"][:, 1:] != -100).sum() for mb in micro_batches).to(device, torch.int64, non_blocking=True)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(count, group=group)
    return count.clamp(min=1)


def forward_backward(booster, model, optimizer, micro_batches: list[dict], dp_group, device) -> dict:
    """Forward and backward on the micro-batches of one step; returns detached global-mean loss parts."""
    num_items = global_target_count(micro_batches, dp_group, device)
    dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
    cfg = model.unwrap().config if hasattr(model, "unwrap") else model.config
    parts = torch.zeros(3, device=device)
    for i, mb in enumerate(micro_batches):
        # Right-padded rows need no padding mask: under a causal mask no real token ever looks at a later pad.
        # non_blocking: a blocking copy would make the host wait for the previous micro-batch's backward before it
        # can queue this one; from pageable host memory CUDA stages the source at once, so it is free to go after.
        input_ids, labels = (mb[key].to(device, non_blocking=True) for key in ("input_ids", "labels"))
        out = model(input_ids=input_ids, labels=labels, num_items_in_batch=num_items)
        router = router_loss(cfg, out.aux_loss, out.router_z_loss)
        # Gradients add up locally; only the last micro-batch's backward reduces them over the DP group.
        with booster.no_sync(model, optimizer) if i < len(micro_batches) - 1 else nullcontext():
            booster.backward(out.lm_loss * dp_size + router / len(micro_batches), optimizer)
        parts += torch.stack([out.lm_loss.detach() * dp_size, out.aux_loss.detach() / len(micro_batches),
                              out.router_z_loss.detach() / len(micro_batches)])
    if dp_size > 1:
        dist.all_reduce(parts, group=dp_group)
        parts /= dp_size
    return {"lm_loss": parts[0], "aux_loss": parts[1], "router_z_loss": parts[2], "tokens": num_items}


def pipeline_forward_backward(booster, model, optimizer, micro_batches: list[dict], dp_group, pp_group,
                              device) -> dict:
    """The same step through the 1F1B pipeline (plugin hybrid); every rank returns the same loss parts.

    The accumulation micro-batches form one pipeline batch that the schedule splits into micro-batches of
    --microbatch_size; those are the routing groups. The schedule divides each micro-batch's criterion by
    their number M, so the LM term is multiplied by dp_size * M and router losses average over micro-batches.
    """
    batch = {key: torch.cat([mb[key] for mb in micro_batches]).to(device, non_blocking=True)
             for key in ("input_ids", "labels")}
    num_items = global_target_count(micro_batches, dp_group, device)
    dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
    num_pipeline_mb = batch["input_ids"].shape[0] // booster.plugin.scheduler.microbatch_size
    cfg = model.unwrap().config
    seen = []

    def criterion(out, _micro_batch):
        seen.append(torch.stack([out.lm_loss.detach(), out.aux_loss.detach(), out.router_z_loss.detach()]).float())
        router = router_loss(cfg, out.aux_loss, out.router_z_loss)
        return out.lm_loss * (dp_size * num_pipeline_mb) + router

    # The schedule cuts every tensor of the batch along dim 0: the count goes in once per row (a stride-0 view),
    # so each micro-batch gets it whole, still on the device (a float would read it back every step).
    batch["num_items_in_batch"] = num_items.expand(batch["input_ids"].shape[0])
    booster.execute_pipeline(iter([batch]), model, criterion, optimizer, return_loss=False)
    parts = torch.zeros(3, device=device)
    if seen:  # last stage only
        parts = torch.stack(seen).sum(0) * torch.tensor([dp_size, 1 / len(seen), 1 / len(seen)], device=device)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(parts, group=pp_group)
    if dp_size > 1:
        dist.all_reduce(parts, group=dp_group)
        parts /= dp_size
    return {"lm_loss": parts[0], "aux_loss": parts[1], "router_z_loss": parts[2], "tokens": num_items}
