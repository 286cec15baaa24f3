"""Aux-loss-free load balancing (DeepSeek-V3, arXiv:2412.19437 §2.1.2): after each optimizer step every MoE
layer's selection bias moves by `rate` towards balance: up for experts that received fewer tokens than the
mean, down for those that received more. The counts are summed over the data-parallel group first, so every
rank (which routes its own tokens with a replicated gate) applies the same update.
"""

import torch
import torch.distributed as dist


@torch.no_grad()
def update_expert_bias(moe_layers, rate: float, group=None) -> None:
    layers = [layer for layer in moe_layers if layer.expert_bias is not None]
    if not layers:
        return
    counts = torch.stack([layer.bias_counts.to(layer.expert_bias.device, torch.float32) for layer in layers])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    for layer, layer_counts in zip(layers, counts):
        layer.expert_bias += rate * torch.sign(layer_counts.mean() - layer_counts)
        layer.bias_counts = torch.zeros_like(layer_counts)
