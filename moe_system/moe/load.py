"""Per-expert load over a window of training steps, read from the MoE layers' running totals.

Every MoE layer adds each training forward's routed copies (pre-capacity top-k choices) and dropped copies
per expert to `routed_total` / `dropped_total` (layer.py). A meter remembers the totals at its last reset and
reports the difference, so the metrics window, the aux-loss-free bias update and the expert rebalancer each
keep their own window without touching the layers. Under activation checkpointing a recomputed forward counts
twice; only shares and ratios are reported, which that does not change.
"""

import torch

from ..parallel.comm import all_reduce_values


class ExpertLoadMeter:
    def __init__(self, moe_layers):
        self.layers = list(moe_layers)
        self.reset()

    def reset(self) -> None:
        self._start = [(layer.routed_total.clone(), layer.dropped_total.clone()) for layer in self.layers]

    def counts(self) -> list[torch.Tensor]:
        """Routed copies per expert of each layer since the last reset (this rank's tokens), on its device."""
        return [layer.routed_total - start.to(layer.routed_total.device)
                for layer, (start, _) in zip(self.layers, self._start)]

    def dropped(self) -> list[torch.Tensor]:
        return [layer.dropped_total - start.to(layer.dropped_total.device)
                for layer, (_, start) in zip(self.layers, self._start)]

    def stats(self) -> dict:
        """Per-layer expert shares, imbalance (max/mean) and dropped fraction of the routed copies."""
        if not self.layers:
            return {}
        # One device-to-host copy for all layers (each would be a host sync of its own).
        counts, dropped = torch.stack([torch.stack(self.counts()), torch.stack(self.dropped())]).double().cpu()
        stats = {}
        for i in range(len(self.layers)):
            stats.update(load_stats(f"moe/layer{i}", counts[i], dropped[i]))
        return stats


def load_stats(prefix: str, counts: torch.Tensor, dropped: torch.Tensor | None = None) -> dict:
    """{prefix/imbalance, prefix/dropped_frac, prefix/expert<e>}: shares of the routed copies; empty when the
    layer routed nothing (a layer of another pipeline stage: its tokens are counted on that stage)."""
    total = float(counts.sum())
    if total == 0:
        return {}
    stats = {f"{prefix}/imbalance": float(counts.max() / counts.mean())}
    if dropped is not None:
        stats[f"{prefix}/dropped_frac"] = float(dropped.sum()) / total
    stats.update({f"{prefix}/expert{e}": share for e, share in enumerate((counts / total).tolist())})
    return stats


def global_counts(counts: list[torch.Tensor], groups) -> torch.Tensor:
    """Stack per-layer counts [L, E] and sum them over each process group in turn (e.g. the EP group, then
    the expert-DP group: together every data-parallel rank of the stage); float64, on the communication device.
    No counts (a stage without MoE layers) still joins every reduction, as the other ranks of its groups do."""
    stacked = torch.stack([c.double() for c in counts]) if counts else torch.zeros(0, dtype=torch.float64)
    for group in groups:
        stacked = all_reduce_values(stacked, group)
    return stacked
