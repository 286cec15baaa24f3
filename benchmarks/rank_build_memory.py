"""Peak host memory (RSS) of every rank right after booster.boost: the model built whole vs. each rank's share.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 4 -m benchmarks.rank_build_memory --build rank
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 4 -m benchmarks.rank_build_memory --build full

An expert-heavy model (one MoE layer of 32 experts, hidden 1024, intermediate 3072: 1.6 GB of fp32 experts)
under --plugin ep (every rank holds 32 / world experts), fp32, on the CPU (gloo) or the GPU, as train.py builds
it: `rank` is parallel/rank_model.py (the training path), `full` the whole model built and initialised on the
host by every rank, the expert-parallel policy then keeping the rank's slice. ru_maxrss is the process's peak
resident set since it started (Python, torch and Colossal-AI included), so the difference between the two is
what the build costs.
"""

import argparse
import json
import resource
import time

import torch
import torch.distributed as dist
from colossalai.booster import Booster

from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM
from moe_system.parallel.config import ParallelConfig
from moe_system.parallel.launch import init_distributed
from moe_system.parallel.plugin import build_plugin
from moe_system.parallel.rank_model import build_for_plugin

EXPERT_HEAVY = dict(vocab_size=1024, hidden_size=1024, intermediate_size=3072, num_hidden_layers=1,
                    num_attention_heads=8, head_dim=128, num_experts=32, moe_layer_interval=1, dispatch="dropless")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", choices=["rank", "full"], default="rank")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", help="write the per-rank figures to this JSON file (rank 0)")
    args = parser.parse_args(argv)

    init_distributed(args.seed)
    config = OpenMoeConfig(**EXPERT_HEAVY)
    plugin, layout = build_plugin(ParallelConfig(precision="fp32", max_grad_norm=1.0), config)
    before = peak_rss_gib()
    start = time.perf_counter()
    if args.build == "rank":
        model = build_for_plugin(config, plugin, args.seed)
    else:
        torch.manual_seed(args.seed)
        model = OpenMoeForCausalLM(config)
    build_s = time.perf_counter() - start
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer, *_ = Booster(plugin=plugin).boost(model, optimizer)
    held = sum(p.numel() for p in model.unwrap().parameters())
    mine = {"rank": dist.get_rank(), "peak_rss_gib_before_build": before, "peak_rss_gib": peak_rss_gib(),
            "build_s": build_s, "held_params": held}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, mine)
    if dist.get_rank() == 0:
        with torch.device("meta"):
            total = sum(p.numel() for p in OpenMoeForCausalLM(config).parameters())
        print(f"--build {args.build}: {layout.describe()}; model {total / 1e6:.0f}M parameters")
        print(f"{'rank':>4} {'peak RSS GiB before build':>26} {'after boost':>12} {'build s':>8} {'held M params':>14}")
        for row in rows:
            print(f"{row['rank']:>4} {row['peak_rss_gib_before_build']:>26.2f} {row['peak_rss_gib']:>12.2f} "
                  f"{row['build_s']:>8.2f} {row['held_params'] / 1e6:>14.1f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"build": args.build, "layout": layout.describe(), "ranks": rows}, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
