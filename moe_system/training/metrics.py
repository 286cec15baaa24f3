"""Where a run's numbers go: a jsonl file (one record per log step), tensorboard scalars, and the console.

Only the main rank writes. Per-expert load (moe/load.py) is logged as each MoE layer's share of routed tokens,
plus the max/mean imbalance ratio, so a collapsing router is visible while the run is still going.
"""

import json
import os

import torch


def format_load(stats: dict) -> str:
    """One console line per layer: expert shares in percent and the imbalance ratio."""
    lines = []
    layer = 0
    while f"moe/layer{layer}/imbalance" in stats:
        shares = [v for k, v in stats.items() if k.startswith(f"moe/layer{layer}/expert")]
        pct = " ".join(f"{100 * s:4.1f}" for s in shares)
        lines.append(f"  moe layer {layer}: load % [{pct}]  max/mean {stats[f'moe/layer{layer}/imbalance']:.2f}"
                     f"  dropped {100 * stats[f'moe/layer{layer}/dropped_frac']:.1f}%")
        layer += 1
    return "\n".join(lines)


class MetricsLogger:
    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = True, wandb_project: str | None = None,
                 run_config: dict | None = None):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        self.wandb = None
        if not enabled:
            return
        if wandb_project:  # optional: only when asked for, and only if installed (WANDB_MODE=offline works)
            try:
                import wandb
            except ImportError:
                raise ImportError("--wandb_project needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_project, dir=output_dir, config=run_config)
        os.makedirs(output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
