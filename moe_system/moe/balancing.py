"""Aux-loss-free load balancing (DeepSeek-V3, arXiv:2412.19437 §2.1.2): after each optimizer step every MoE
layer's selection bias moves by `rate` towards balance: up for experts that received fewer tokens than the
mean, down for those that received more. The counts are summed over the data-parallel group first, so every
rank (which routes its own tokens with a replicated gate) applies the same update.
"""

import torch

from .load import ExpertLoadMeter, global_counts


@torch.no_grad()
def update_expert_bias(meter: ExpertLoadMeter, rate: float, group=None) -> None:
    """meter: an ExpertLoadMeter over the MoE layers, whose window is the steps since the last update."""
    pairs = [(layer, counts) for layer, counts in zip(meter.layers, meter.counts()) if layer.expert_bias is not None]
    if not pairs:
        return
    counts = global_counts([counts for _, counts in pairs], [group])
    for (layer, _), layer_counts in zip(pairs, counts):
        layer_counts = layer_counts.to(layer.expert_bias.device, torch.float32)
        layer.expert_bias += rate * torch.sign(layer_counts.mean() - layer_counts)
    meter.reset()
