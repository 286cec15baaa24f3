"""Where a run's numbers go: a jsonl file (one record per log step), tensorboard scalars, and the console.

Only the main rank writes. Per-expert load (moe/load.py) is logged as each MoE layer's share of routed tokens,
plus the max/mean imbalance ratio, so a collapsing router is visible while the run is still going.
"""

import json
import os
import time

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


class TrainProgress:
    """The console bar, the skip lines and the metrics of each logged step. Throughput is measured over the
    window of steps since the last logged one; tok_s counts every token processed, tgt_tok_s the target
    (loss-bearing) tokens among them."""

    def __init__(self, logger: MetricsLogger, bar, log_interval: int, total_steps: int, tokens_per_step: int,
                 load_meter, extra_stats, flops_per_token: float, peak_flops: float | None):
        self.logger, self.bar, self.log_interval, self.total_steps = logger, bar, log_interval, total_steps
        self.tokens_per_step, self.load_meter, self.extra_stats = tokens_per_step, load_meter, extra_stats
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops  # peak: the whole world's, or None
        self.last_loss, self.last_load = None, {}
        self._start_window()

    def _start_window(self) -> None:
        self.window_tokens, self.window_start, self.window_steps = 0.0, time.perf_counter(), 0

    def write(self, line: str) -> None:
        if self.logger.enabled:  # tqdm.write prints even where the bar is disabled
            self.bar.write(line)

    def log_skip(self, state, what: str) -> None:
        step = state.step
        if what == "overflow":  # fp16 loss scaler backed off: routine, not counted toward the limit
            self.logger.log(step, {"train/skipped_overflow": state.overflows})
            self.write(f"step {step + 1}: fp16 loss-scale overflow, update skipped")
            return
        self.logger.log(step, {"train/skipped_nonfinite": state.skipped})
        self.write(f"step {step + 1}: non-finite {what}, update skipped ({state.bad_in_a_row} in a row)")

    def log_step(self, step: int, parts: dict, lr: float) -> None:
        """parts: the step's loss parts and target tokens as Python numbers (read once by train_step)."""
        loss = parts["lm_loss"]
        self.last_loss = loss
        self.window_steps += 1
        self.window_tokens += parts["tokens"]
        seconds = max(time.perf_counter() - self.window_start, 1e-9)
        tokens_per_s = self.window_tokens / seconds
        self.bar.set_postfix(loss=f"{loss:.4f}", aux=f"{parts['aux_loss']:.3f}",
                             tok_s=f"{self.tokens_per_step * self.window_steps / seconds:,.0f}",
                             tgt_tok_s=f"{tokens_per_s:,.0f}")
        self.bar.update(1)
        if not (step % self.log_interval == 0 or step in (1, self.total_steps)):
            return
        elapsed = time.perf_counter() - self.window_start
        load = self.load_meter.stats()
        record = {"train/lm_loss": loss, "train/aux_loss": parts["aux_loss"],
                  "train/router_z_loss": parts["router_z_loss"], "lr": lr,
                  "perf/target_tokens_per_s": tokens_per_s,
                  "perf/tokens_per_s": self.tokens_per_step * self.window_steps / max(elapsed, 1e-9),
                  **load, **self.extra_stats()}  # extra_stats may be a collective: every rank
        if self.peak_flops:
            record["perf/mfu"] = record["perf/tokens_per_s"] * self.flops_per_token / self.peak_flops
        if torch.cuda.is_available():
            record["perf/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.logger.log(step, record)
        self.last_load = load
        self.load_meter.reset()
        self._start_window()

    def close(self) -> None:
        self.bar.close()
        self.logger.close()
