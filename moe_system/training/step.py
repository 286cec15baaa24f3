"""One training step's forward and backward (the optimizer step stays in the loop).

Loss scaling: every rank computes sum(token losses) / N_global, with N_global the number of target tokens in
the whole global batch. Data-parallel gradient reduction averages over the DP group, so the LM term is
multiplied by the DP size to turn that average back into the exact global-batch mean. Router losses are
per-rank means already; averaging them over ranks is their global mean.
"""

import torch
import torch.distributed as dist


def global_target_count(labels: torch.Tensor, group) -> torch.Tensor:
    count = (labels[:, 1:] != -100).sum().to(torch.float32)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(count, group=group)
    return count.clamp(min=1)


def forward_backward(booster, model, optimizer, batch: dict, dp_group, device) -> dict:
    """Forward and backward on one batch; returns detached loss parts for logging (global means)."""
    labels = batch["labels"].to(device)
    num_items = global_target_count(labels, dp_group)
    dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
    # Right-padded rows need no padding mask: under a causal mask no real token ever looks at a later pad.
    out = model(input_ids=batch["input_ids"].to(device), labels=labels, num_items_in_batch=num_items)
    cfg = model.unwrap().config if hasattr(model, "unwrap") else model.config
    loss = (out.lm_loss * dp_size + cfg.router_aux_loss_factor * out.aux_loss
            + cfg.router_z_loss_factor * out.router_z_loss)
    booster.backward(loss, optimizer)
    parts = torch.stack([out.lm_loss.detach() * dp_size, out.aux_loss.detach(), out.router_z_loss.detach()])
    if dp_size > 1:
        dist.all_reduce(parts, group=dp_group)
        parts /= dp_size
    return {"lm_loss": parts[0], "aux_loss": parts[1], "router_z_loss": parts[2], "tokens": num_items}
